# The llmbatch application image (docker-compose.yml runs every app process
# from it: migrate, simulator, batcher, workers, scheduler, flower). Passwords
# come from the environment (docker-compose.yml requires them); none is baked in.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY pyproject.toml ./
# every package the `llmbatch` command imports (llmbatch/ is the front door, simulator/ a process)
COPY llmbatch ./llmbatch
COPY pipeline ./pipeline
COPY workers ./workers
COPY schedules ./schedules
COPY simulator ./simulator
COPY sql ./sql
# Editable, so that the package root stays /app: migrations are read from
# sql/ and state (tokenizer files) lives in var/ beside the package.
RUN pip install -e . \
 && python -m pipeline.money.tokens provision \
 && useradd --system --home-dir /app llmbatch \
 && chown -R llmbatch /app/var
USER llmbatch

CMD ["llmbatch", "--help"]
