# One image for both halves of the service: `bitplan serve` (the API) and `bitplan worker`.
# See docker-compose.yml for how they are wired to Postgres and Redis.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    BITPLAN_DATA_DIR=/data

# torch first, pinned and from the CPU index: a bare `torch` requirement (pulled in by `pip install .`)
# would fetch a multi-GB CUDA build. Its own layer, so code changes do not reinstall it.
ARG TORCH_VERSION=2.13.0
RUN pip install "torch==${TORCH_VERSION}" --index-url https://download.pytorch.org/whl/cpu

WORKDIR /app
# Only what the package needs (no .venv, tests or caches in the build context's layers).
COPY pyproject.toml README.md ./
COPY bitplan ./bitplan
COPY solver ./solver
COPY service ./service
COPY workers ./workers
COPY storage ./storage
# The torch pin is already satisfied, so pip keeps the CPU build. zennit goes in with --no-deps: its torchvision
# requirement would replace the CPU torch with a CUDA build (see the Makefile).
RUN pip install ".[minilm,deploy]" "torch==${TORCH_VERSION}" \
    && pip install --no-deps "zennit==0.5.1"

# Uploads, plans and caches live on /data: a named volume shared by the api and worker containers.
RUN useradd --create-home --uid 10001 bitplan && mkdir -p /data && chown bitplan:bitplan /data
USER bitplan
VOLUME ["/data"]

EXPOSE 8000
CMD ["bitplan", "serve", "--host", "0.0.0.0", "--port", "8000"]
