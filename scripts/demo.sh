#!/usr/bin/env bash
# Sets up what is missing, builds, starts a node serving the default model
# on a free port, and streams a chat completion through it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --release -p node -p meshctl
log=$(mktemp)
target/release/mesh-node --model models/SmolLM2-135M-Instruct.Q4_1.gguf --listen 127.0.0.1:0 2>"$log" &
node=$!
trap 'kill -TERM $node 2>/dev/null; wait $node 2>/dev/null; rm -f "$log"' EXIT
for _ in $(seq 600); do
  addr=$(sed -n 's/.*listening on \([0-9.:]*\).*/\1/p' "$log")
  [ -n "$addr" ] && break
  kill -0 $node 2>/dev/null || { cat "$log"; exit 1; }
  sleep 0.1
done
[ -n "$addr" ] || { echo "node did not start" >&2; cat "$log"; exit 1; }
echo "node listening on $addr"
target/release/meshctl --addr "http://$addr" models
target/release/meshctl --addr "http://$addr" generate "${1:-Explain in two sentences why batching makes LLM serving cheaper.}"
