#!/usr/bin/env bash
# Install llama-cpp-python built for the CPU it will run on, without the kernels that crash.
#
# Why: a default (GGML_NATIVE) build on a CPU that reports AMX (Sapphire Rapids and later)
# segfaults in the first llama_decode. We build with GGML_NATIVE=OFF and switch on, one by
# one, the x86 extensions this CPU has that are known to work (AVX2/FMA/F16C, AVX-512 with
# VNNI and BF16), never AMX. Other architectures (arm64, incl. Apple Silicon with Metal)
# keep llama.cpp's own defaults. CMAKE_ARGS set by the user (Metal, CUDA, ...) wins.
#
# pip's wheel cache does not key on CMAKE_ARGS, so the wheel is built without it
# (--no-cache-dir) into our own cache folder keyed on version + flags + Python: a machine
# that once built a crashing wheel never reuses it, and a rebuild with the same flags is free.
set -euo pipefail
PY=${1:?usage: llama_build.sh PYTHON}
VERSION=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}

cpu_flags() { grep -m1 -E '^(flags|Features)' /proc/cpuinfo 2>/dev/null | cut -d: -f2 || true; }

portable_cmake_args() {
  case "$(uname -m)" in
    x86_64 | amd64)
      local flags args=(-DGGML_NATIVE=OFF)
      flags=" $(cpu_flags) "
      has() { [[ "$flags" == *" $1 "* ]]; }
      if has avx2 && has fma && has f16c; then
        args+=(-DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON)
        has bmi2 && args+=(-DGGML_BMI2=ON)
        if has avx512f && has avx512bw && has avx512vl && has avx512dq; then
          args+=(-DGGML_AVX512=ON)
          has avx512_vnni && args+=(-DGGML_AVX512_VNNI=ON)
          has avx512_bf16 && args+=(-DGGML_AVX512_BF16=ON)
        fi
      elif has avx; then
        args+=(-DGGML_AVX=ON -DGGML_AVX2=OFF -DGGML_FMA=OFF -DGGML_F16C=OFF)
      else
        args+=(-DGGML_AVX=OFF -DGGML_AVX2=OFF -DGGML_FMA=OFF -DGGML_F16C=OFF)
      fi
      # AMX and AVX512-VBMI / AVX-VNNI stay off: the crashing build had them on.
      args+=(-DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF)
      echo "${args[*]}"
      ;;
    *) echo "" ;;  # arm64 and others: llama.cpp's defaults (Metal on Apple Silicon)
  esac
}

if [ "${1:-}" = "--print-args" ]; then portable_cmake_args; exit 0; fi

args=${CMAKE_ARGS-$(portable_cmake_args)}
pytag=$("$PY" -c 'import sys, platform; print(f"cp{sys.version_info[0]}{sys.version_info[1]}-{platform.machine()}")')
key=$(printf '%s|%s|%s' "$VERSION" "$args" "$pytag" | sha256sum | cut -c1-16)
cache=${SPECTHINK_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/specthink/wheels}/llama-cpp-python-$VERSION-$key
installed=$("$PY" -c 'import importlib.metadata as m; print(m.version("llama-cpp-python"))' 2>/dev/null || true)
stamp_file=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/.specthink-llama-build
if [ "$installed" = "$VERSION" ] && [ "$(cat "$stamp_file" 2>/dev/null)" = "$key" ]; then
  exit 0
fi
if ! ls "$cache"/llama_cpp_python-*.whl >/dev/null 2>&1; then
  echo "install: building llama-cpp-python $VERSION with CMAKE_ARGS='$args' (~6-13 min on 2 cores)" >&2
  mkdir -p "$cache"
  tmp=$(mktemp -d "$cache/.build.XXXX")
  CMAKE_ARGS="$args" "$PY" -m pip wheel -q --no-cache-dir --no-deps --no-binary llama-cpp-python \
    -w "$tmp" "llama-cpp-python==$VERSION"
  mv "$tmp"/llama_cpp_python-*.whl "$cache"/ && rm -rf "$tmp"
else
  echo "install: llama-cpp-python $VERSION from $cache (CMAKE_ARGS='$args')" >&2
fi
"$PY" -m pip install -q --force-reinstall --no-deps "$cache"/llama_cpp_python-*.whl
echo "$key" >"$stamp_file"
