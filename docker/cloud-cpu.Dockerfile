# syntax=docker/dockerfile:1
# SpecThink cloud, CPU-only variant (for docker compose, CI and laptops). Build from the repo root:
#   docker build -f docker/cloud-cpu.Dockerfile -t specthink-cloud:cpu .
# The model is NOT baked in: mount it (read-only) at /models and pass --model /models/<name>.
FROM python:3.11-slim-bookworm

# torch is pinned and taken from the CPU-only index so no CUDA wheels (GBs) are pulled.
ARG TORCH_VERSION=2.6.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    SPECTHINK_CACHE_DIR=/cache/specthink \
    HF_HOME=/cache/huggingface \
    HOME=/home/specthink

RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

WORKDIR /src
COPY pyproject.toml README.md ./
COPY shared/ shared/
COPY cloud/ cloud/
# Repeating the pin stops the resolver from swapping in a CUDA build of torch from PyPI.
RUN pip install "torch==${TORCH_VERSION}" ".[cloud]" \
 && python -c "import torch; assert torch.__version__.split('+')[0] == '${TORCH_VERSION}'" \
 && rm -rf /src

RUN groupadd --gid 10001 specthink \
 && useradd --uid 10001 --gid 10001 --home-dir /home/specthink --create-home \
      --shell /usr/sbin/nologin specthink \
 && mkdir -p /models /cache/specthink /cache/huggingface \
 && chown -R 10001:10001 /cache

VOLUME ["/models", "/cache"]
WORKDIR /home/specthink
USER 10001:10001

EXPOSE 50051 9400
STOPSIGNAL SIGTERM
ENTRYPOINT ["specthink-cloud", "serve"]
CMD ["--model", "/models/cloud", "--host", "0.0.0.0", "--port", "50051", "--device", "cpu", \
     "--metrics-port", "9400"]
