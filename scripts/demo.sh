#!/usr/bin/env bash
# Sets up what is missing, builds, and runs a local mesh: etcd, a model node
# (the default GGUF), its sidecar and a client-side sidecar; then streams a
# chat completion through client sidecar -> node sidecar -> node.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --release -p node -p sidecar -p meshctl -p bench

work=$(mktemp -d)
mesh_pid=""
cleanup() {
  [ -n "$mesh_pid" ] && kill -TERM "$mesh_pid" 2>/dev/null || true # it stops what it started
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

# `mesh-bench up` starts etcd, the node, its sidecar and a client sidecar on
# free ports (the launcher the tests and benchmarks use) and prints one JSON
# line once the client sidecar routes to the node.
target/release/mesh-bench up --model models/SmolLM2-135M-Instruct.Q4_1.gguf --node-arg=--model-name=chat \
  >"$work/mesh.json" 2>"$work/mesh.log" &
mesh_pid=$!
for _ in $(seq 1800); do
  [ "$(wc -l <"$work/mesh.json")" -ge 1 ] && break
  kill -0 "$mesh_pid" 2>/dev/null || { cat "$work/mesh.log" >&2; exit 1; }
  sleep 0.1
done
[ "$(wc -l <"$work/mesh.json")" -ge 1 ] || { echo "the mesh did not come up" >&2; cat "$work/mesh.log" >&2; exit 1; }
read -r etcd_url node_addr client_addr http_addr < <(python3 -c '
import json, sys
m = json.loads(open(sys.argv[1]).readline())
print(m["etcd"], m["nodes"][0]["grpc"], m["addresses"]["outbound"], m["addresses"]["http"])' "$work/mesh.json")
echo "etcd at $etcd_url"
echo "node (SmolLM2-135M) at $node_addr"
echo "node sidecar registered the node in etcd"
echo "client sidecar at $client_addr (gRPC) and http://$http_addr/v1 (OpenAI's API)"

target/release/meshctl status --etcd "$etcd_url"
echo
target/release/meshctl --addr "http://$client_addr" generate --model chat \
  "${1:-Explain in two sentences why batching makes LLM serving cheaper.}"
echo
echo "the same mesh through the HTTP edge (server-sent events):"
curl -sN "http://$http_addr/v1/chat/completions" -H 'Content-Type: application/json' \
  -d '{"model": "chat", "messages": [{"role": "user", "content": "Name three colors."}], "max_tokens": 24, "temperature": 0, "stream": true}'
echo
target/release/meshctl status --sidecar "http://$client_addr"
