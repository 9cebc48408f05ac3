# syntax=docker/dockerfile:1
# SpecThink edge (llama.cpp on CPU). Build from the repository root:
#   docker build -f docker/edge.Dockerfile -t specthink-edge .
# The GGUF model is NOT baked in: mount a models folder at /models (SPECTHINK_MODELS_DIR).
#
# Stage 1 compiles llama-cpp-python (and builds every wheel the edge needs) with a toolchain;
# stage 2 installs those wheels into a slim image without compilers.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS builder
ARG LLAMA_CPP_PYTHON_VERSION=0.3.36
ARG TARGETARCH
# The image runs on CPUs we never see, so llama.cpp is built portable, never for the build
# host (GGML_NATIVE=OFF), with AMX off (a native build segfaults on AMX CPUs in its first
# decode; see scripts/llama_build.sh). amd64: the x86-64-v3 level (AVX2/FMA/F16C: every
# Intel since Haswell, every AMD since Zen 1), measured in docs/benchmarks.md against the
# native build; arm64: llama.cpp's portable defaults. Override with --build-arg CMAKE_ARGS=...
ARG CMAKE_ARGS=""
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential cmake git \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY shared/ shared/
COPY edge/ edge/
RUN if [ -z "$CMAKE_ARGS" ]; then \
      case "${TARGETARCH:-$(uname -m)}" in \
        amd64|x86_64) CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF" ;; \
        *) CMAKE_ARGS="-DGGML_NATIVE=OFF" ;; \
      esac; \
    fi \
 && echo "llama.cpp CMAKE_ARGS: $CMAKE_ARGS" \
 && CMAKE_ARGS="$CMAKE_ARGS" pip wheel --wheel-dir /wheels \
      "llama-cpp-python==${LLAMA_CPP_PYTHON_VERSION}" ".[edge]"

FROM ${PYTHON_IMAGE}
ARG LLAMA_CPP_PYTHON_VERSION=0.3.36
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    SPECTHINK_MODELS_DIR=/models \
    HOME=/home/specthink
# libgomp1: llama.cpp's OpenMP runtime.
RUN apt-get update \
 && apt-get install -y --no-install-recommends libgomp1 \
 && rm -rf /var/lib/apt/lists/*
COPY --from=builder /wheels /wheels
RUN pip install --no-index --find-links /wheels \
      "llama-cpp-python==${LLAMA_CPP_PYTHON_VERSION}" "specthink[edge]" \
 && rm -rf /wheels \
 && python -c "import llama_cpp; print('llama-cpp-python', llama_cpp.__version__)"

RUN groupadd --gid 10001 specthink \
 && useradd --uid 10001 --gid 10001 --home-dir /home/specthink --create-home \
      --shell /usr/sbin/nologin specthink \
 && mkdir -p /models
VOLUME ["/models"]
WORKDIR /home/specthink
USER 10001:10001

# Usage: docker run --rm -v "$PWD/models:/models:ro" -e SPECTHINK_CLOUD=host:50051 \
#          -e SPECTHINK_API_KEY=... specthink-edge ask "What is 17*23?"
ENTRYPOINT ["specthink-edge"]
CMD ["--help"]
