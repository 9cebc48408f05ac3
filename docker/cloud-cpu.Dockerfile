# syntax=docker/dockerfile:1
# SpecThink cloud, CPU-only variant (for docker compose, CI and laptops). Build from the repo root:
#   docker build -f docker/cloud-cpu.Dockerfile -t specthink-cloud:cpu .
# The model is NOT baked in: mount it (read-only) at /models and pass --model /models/<name>.
FROM python:3.11-slim-bookworm

# torch comes from the CPU-only index (no CUDA download), at the version constraints.txt
# pins; so does transformers: the versions the tests run.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    SPECTHINK_CACHE_DIR=/cache/specthink \
    HF_HOME=/cache/huggingface \
    HOME=/home/specthink

WORKDIR /src
COPY constraints.txt pyproject.toml README.md ./
COPY shared/ shared/
COPY cloud/ cloud/
# The constraint keeps pip from swapping in a CUDA build of torch from PyPI afterwards.
RUN pip install -c constraints.txt --index-url "${TORCH_INDEX_URL}" torch \
 && pip install -c constraints.txt ".[cloud]" \
 && python -c "import importlib.metadata as md; \
pins = dict(l.split('#')[0].strip().split('==') for l in open('constraints.txt') if '==' in l.split('#')[0]); \
got = {name: md.version(name).split('+')[0] for name in pins}; \
assert got == pins, f'installed {got}, constraints.txt pins {pins}'; print(got)" \
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
