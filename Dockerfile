# pool-pipeline services (capture-agent, replica, archive, analytics) for compose.yaml users.
FROM python:3.11-slim
RUN apt-get update && apt-get install -y --no-install-recommends picolisp && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY pyproject.toml README.md ./
COPY pipeline pipeline
COPY connectors connectors
COPY pool_pipeline pool_pipeline
COPY schemas schemas
RUN pip install --no-cache-dir .
# The pool and replica directories are mounted volumes; see compose.yaml.
WORKDIR /data
ENTRYPOINT []
