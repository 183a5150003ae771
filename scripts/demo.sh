#!/usr/bin/env bash
# Sets up what is missing, builds, and runs a local mesh: etcd, a model node
# (the default GGUF), its sidecar and a client-side sidecar; then streams a
# chat completion through client sidecar -> node sidecar -> node.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --release -p node -p sidecar -p meshctl

work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# Waits until $1 (a log file) has a line matching $2; prints the captured group.
wait_log() {
  local log=$1 pattern=$2 pid=$3 value=""
  for _ in $(seq 1200); do
    value=$(sed -n "s/.*$pattern.*/\1/p" "$log" | head -n 1)
    [ -n "$value" ] && { echo "$value"; return 0; }
    kill -0 "$pid" 2>/dev/null || { cat "$log" >&2; return 1; }
    sleep 0.1
  done
  echo "timed out waiting for '$pattern' in $log" >&2; cat "$log" >&2; return 1
}

client_port=$(free_port); peer_port=$(free_port)
etcd --name demo --data-dir "$work/etcd" \
  --listen-client-urls "http://127.0.0.1:$client_port" --advertise-client-urls "http://127.0.0.1:$client_port" \
  --listen-peer-urls "http://127.0.0.1:$peer_port" --initial-advertise-peer-urls "http://127.0.0.1:$peer_port" \
  --initial-cluster "demo=http://127.0.0.1:$peer_port" >"$work/etcd.log" 2>&1 &
pids+=($!)
wait_log "$work/etcd.log" '\(ready\) to serve client requests' $! >/dev/null
etcd_url="http://127.0.0.1:$client_port"
echo "etcd at $etcd_url"

target/release/mesh-node --model models/SmolLM2-135M-Instruct.Q4_1.gguf --model-name chat \
  --listen 127.0.0.1:0 2>"$work/node.log" &
pids+=($!)
node_addr=$(wait_log "$work/node.log" 'listening on \([0-9.:]*\)' $!)
echo "node (SmolLM2-135M) at $node_addr"

cat >"$work/node-sidecar.toml" <<TOML
plaintext = true  # one host, loopback only
[listen]
outbound = "127.0.0.1:0"
inbound = "127.0.0.1:0"
[etcd]
endpoints = ["$etcd_url"]
[node]
address = "$node_addr"
TOML
target/release/mesh-sidecar --config "$work/node-sidecar.toml" 2>"$work/node-sidecar.log" &
pids+=($!)
wait_log "$work/node-sidecar.log" '\(node registered\) in the mesh' $! >/dev/null
echo "node sidecar registered the node in etcd"

cat >"$work/client-sidecar.toml" <<TOML
plaintext = true
[listen]
outbound = "127.0.0.1:0"
inbound = "127.0.0.1:0"
[etcd]
endpoints = ["$etcd_url"]
TOML
target/release/mesh-sidecar --config "$work/client-sidecar.toml" 2>"$work/client-sidecar.log" &
pids+=($!)
client_addr=$(wait_log "$work/client-sidecar.log" 'outbound listening on \([0-9.:]*\)' $!)
echo "client sidecar at $client_addr"

target/release/meshctl status --etcd "$etcd_url"
for _ in $(seq 100); do
  target/release/meshctl --addr "http://$client_addr" status --sidecar "http://$client_addr" | grep -q chat && break
  sleep 0.1
done
echo
target/release/meshctl --addr "http://$client_addr" generate --model chat \
  "${1:-Explain in two sentences why batching makes LLM serving cheaper.}"
echo
target/release/meshctl status --sidecar "http://$client_addr"
