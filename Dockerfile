# The meter worker image used by docker-compose.yml.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY meter ./meter
RUN pip install --no-cache-dir .
USER nobody
ENTRYPOINT ["meter"]
CMD ["worker"]
