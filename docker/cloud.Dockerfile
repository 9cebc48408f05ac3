# syntax=docker/dockerfile:1
# SpecThink cloud (CUDA). Build from the repository root:
#   docker build -f docker/cloud.Dockerfile -t specthink-cloud:cuda .
# The model is NOT baked in: mount it (read-only) at /models and pass --model /models/<name>.
#
# torch and transformers are the versions the tests run: constraints.txt at the repository
# root pins both (the build fails if pip installs anything else). PyPI's Linux torch wheel
# is a CUDA build that brings its CUDA runtime as pip packages, so the base image needs no
# CUDA of its own; the host's driver comes in through the NVIDIA container runtime (the
# Kubernetes device plugin, or `docker run --gpus`). For an older driver, take the same
# torch version built for an older CUDA, e.g.
#   --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
FROM ${PYTHON_IMAGE}

ARG TORCH_INDEX_URL=""
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    SPECTHINK_CACHE_DIR=/cache/specthink \
    HF_HOME=/cache/huggingface \
    HOME=/home/specthink \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
# expandable_segments: the KV cache grows and shrinks with the sessions; expandable
# segments let the allocator map more memory into one segment instead of fragmenting.

WORKDIR /src
# Only the sources the cloud needs (no models, no virtualenvs, no tests).
COPY constraints.txt pyproject.toml README.md ./
COPY shared/ shared/
COPY cloud/ cloud/
RUN if [ -n "$TORCH_INDEX_URL" ]; then \
      pip install -c constraints.txt --index-url "$TORCH_INDEX_URL" torch; \
    fi \
 && pip install -c constraints.txt ".[cloud]" \
 && python -c "import importlib.metadata as md, torch; \
pins = dict(l.split('#')[0].strip().split('==') for l in open('constraints.txt') if '==' in l.split('#')[0]); \
got = {name: md.version(name).split('+')[0] for name in pins}; \
assert got == pins, f'installed {got}, constraints.txt pins {pins}'; \
assert torch.version.cuda, 'torch is not a CUDA build'; \
print('torch', torch.__version__, 'CUDA', torch.version.cuda, '| transformers', got['transformers'])" \
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
