#!/usr/bin/env bash
# README command (a): a local cloud (Qwen2.5-Coder-1.5B, transformers) on loopback and the
# edge (Qwen2.5-Coder-0.5B, llama.cpp) answering a real question together; the cloud's parts
# are marked. The first start converts the cloud's GGUF once (a few minutes), later ones
# load in seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
EDGE_MODEL=models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf
CLOUD_MODEL=models/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf
QUESTION=${QUESTION:-"A shop sells pencils at 3 for 45 cents. How much do 12 pencils cost? Explain step by step."}
log=$(mktemp)
echo "demo: starting the cloud on 127.0.0.1 with $CLOUD_MODEL ..." >&2
"$BIN/specthink-cloud" serve --model "$CLOUD_MODEL" --host 127.0.0.1 --port 0 >"$log.out" 2>"$log" &
cloud_pid=$!
trap 'kill -TERM $cloud_pid 2>/dev/null; wait $cloud_pid 2>/dev/null; rm -f "$log" "$log.out"' EXIT
for _ in $(seq 1 1800); do  # up to 15 min: the first start converts the GGUF
  grep -q "listening on" "$log.out" 2>/dev/null && break
  kill -0 $cloud_pid 2>/dev/null || { cat "$log" >&2; echo "demo: the cloud failed to start" >&2; exit 1; }
  sleep 0.5
done
address=$(sed -n 's#.*listening on grpc://##p' "$log.out")
echo "demo: cloud ready at $address" >&2
echo "demo: question: $QUESTION" >&2
echo "demo: edge = Qwen2.5-Coder-0.5B (llama.cpp), cloud = Qwen2.5-Coder-1.5B (transformers); the cloud's text is marked [cloud]...[/cloud]" >&2
echo "----------------------------------------------------------------------" >&2
mark=brackets; [ -t 1 ] && mark=color
"$BIN/specthink-edge" ask "$QUESTION" --model "$EDGE_MODEL" --cloud "$address" \
  --temperature 0 --max-tokens 300 --mark "$mark" --verbose
echo "----------------------------------------------------------------------" >&2
echo "demo: stopping the cloud" >&2
