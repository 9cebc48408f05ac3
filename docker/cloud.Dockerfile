# syntax=docker/dockerfile:1
# SpecThink cloud (CUDA). Build from the repository root:
#   docker build -f docker/cloud.Dockerfile -t specthink-cloud:cuda .
# The model is NOT baked in: mount it (read-only) at /models and pass --model /models/<name>.
#
# Base: the official PyTorch runtime image, which pins torch (and its CUDA/cuDNN) by tag.
# Bump TORCH_VERSION and the tag together; the build fails if they disagree.
ARG TORCH_VERSION=2.6.0
ARG BASE_IMAGE=pytorch/pytorch:2.6.0-cuda12.4-cudnn9-runtime
FROM ${BASE_IMAGE}

ARG TORCH_VERSION
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    SPECTHINK_CACHE_DIR=/cache/specthink \
    HF_HOME=/cache/huggingface \
    HOME=/home/specthink

# Fail early on a base image that does not carry the torch/python we expect.
RUN python -c "import sys, torch; assert sys.version_info >= (3, 11), sys.version; \
assert torch.__version__.split('+')[0] == '${TORCH_VERSION}', torch.__version__"

WORKDIR /src
# Only the sources the cloud needs (no models, no virtualenvs, no tests).
COPY pyproject.toml README.md ./
COPY shared/ shared/
COPY cloud/ cloud/
# Passing the torch pin alongside the extra keeps pip from replacing the image's CUDA build.
RUN pip install "torch==${TORCH_VERSION}" ".[cloud]" \
 && python -c "import torch; assert torch.__version__.split('+')[0] == '${TORCH_VERSION}'" \
 && rm -rf /src

RUN groupadd --gid 10001 specthink \
 && useradd --uid 10001 --gid 10001 --home-dir /home/specthink --create-home \
      --shell /usr/sbin/nologin specthink \
 && mkdir -p /models /cache/specthink /cache/huggingface \
 && chown -R 10001:10001 /cache

# /models: model weights (mount read-only). /cache: converted-weights and HF cache
# (an emptyDir/volume in k8s, where the root filesystem is read-only).
VOLUME ["/models", "/cache"]
WORKDIR /home/specthink
USER 10001:10001

# 50051: gRPC (SpecThink service, grpc.health.v1, reflection). 9400: Prometheus /metrics.
EXPOSE 50051 9400
# On SIGTERM the server reports NOT_SERVING, drains in-flight work (--drain-grace-s), exits 0.
STOPSIGNAL SIGTERM
ENTRYPOINT ["specthink-cloud", "serve"]
CMD ["--model", "/models/cloud", "--host", "0.0.0.0", "--port", "50051", "--device", "auto", \
     "--metrics-port", "9400"]
