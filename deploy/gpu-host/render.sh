#!/usr/bin/env bash
# Renders the configs of a host with N GPUs: one node per GPU
# (mesh-node@gpuI on CUDA device I) and one sidecar beside each
# (mesh-sidecar@gpuI), from deploy/config/{node,sidecar}-chat.*, and, with
# --units, each node's systemd drop-in (deploy/gpu-host/gpu.conf).
#
#   deploy/gpu-host/render.sh 8 10.77.0.11 /etc/mesh --units /etc/systemd/system
#
# Ports of GPU I: node 127.0.0.1:5006I (metrics 127.0.0.1:911I), sidecar
# outbound 127.0.0.1:720I, inbound 0.0.0.0:730I advertised at ADDRESS:730I
# (metrics 127.0.0.1:912I). Node I runs on MESH_NODE_DEVICE=cuda:I, never on
# the CPU. Every node serves the same service, so the mesh balances across
# the GPUs of all hosts. Then:
#   systemctl daemon-reload
#   systemctl enable --now mesh-node@gpu{0..7} mesh-sidecar@gpu{0..7}
set -euo pipefail
units=
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --units) units=${2:?--units needs a directory}; shift 2 ;;
    --*) echo "unknown option: $1" >&2; exit 2 ;;
    *) args+=("$1"); shift ;;
  esac
done
set -- "${args[@]}"
gpus=${1:?number of GPUs}
address=${2:?the address other hosts dial}
out=${3:-/etc/mesh}
here=$(cd "$(dirname "$0")/../config" && pwd)
dropin=$(cd "$(dirname "$0")" && pwd)/gpu.conf
[ "$gpus" -ge 1 ] && [ "$gpus" -le 10 ] || { echo "GPUs: 1 to 10 (one port digit each)" >&2; exit 2; }
mkdir -p "$out"
for i in $(seq 0 $((gpus - 1))); do
  sed -e "s/^MESH_NODE_LISTEN=.*/MESH_NODE_LISTEN=127.0.0.1:5006$i/" \
      -e "s/^MESH_NODE_METRICS_LISTEN=.*/MESH_NODE_METRICS_LISTEN=127.0.0.1:911$i/" \
      -e '/^MESH_NODE_MAX_\(RUNNING\|QUEUED\)=/d' \
      -e "s/^MESH_NODE_DEVICE=.*/MESH_NODE_DEVICE=cuda:$i/" \
      -e '/^MESH_NODE_CUDA_DEVICE=/d' \
      "$here/node-chat.env" >"$out/node-gpu$i.env"
  grep -q "^MESH_NODE_DEVICE=cuda:$i\$" "$out/node-gpu$i.env" || echo "MESH_NODE_DEVICE=cuda:$i" >>"$out/node-gpu$i.env"
  cat >>"$out/node-gpu$i.env" <<ENV
# GPU $i. The KV pool is allocated at start from MESH_NODE_MAX_KV_TOKENS
# (46 KiB per token for SmolLM2-135M: 1,048,576 tokens = 45 GiB); a budget
# the GPU cannot hold stops the node at start, never in a step.
MESH_NODE_MAX_RUNNING=256
MESH_NODE_MAX_QUEUED=512
MESH_NODE_MAX_KV_TOKENS=1048576
MESH_NODE_MAX_STEP_TOKENS=512
ENV
  sed -e "s/^metrics_listen = .*/metrics_listen = \"127.0.0.1:912$i\"/" \
      -e "s/^outbound = .*/outbound = \"127.0.0.1:720$i\"/" \
      -e "s/^inbound = .*/inbound = \"0.0.0.0:730$i\"/" \
      -e "s/^address = \"127.0.0.1:50051\"/address = \"127.0.0.1:5006$i\"/" \
      "$here/sidecar-chat.toml" >"$out/sidecar-gpu$i.toml"
  echo "MESH_SIDECAR_ADVERTISE=$address:730$i" >"$out/sidecar-gpu$i.env"
  if [ -n "$units" ]; then
    mkdir -p "$units/mesh-node@gpu$i.service.d"
    sed "s/@GPU@/$i/g" "$dropin" >"$units/mesh-node@gpu$i.service.d/gpu.conf"
  fi
done
echo "rendered $gpus nodes and sidecars into $out"
if [ -n "$units" ]; then
  echo "and their drop-ins into $units/mesh-node@gpu{0..$((gpus - 1))}.service.d/gpu.conf"
else
  echo "no drop-ins written (--units /etc/systemd/system): without them the nodes lack the GPU's libraries and device nodes" >&2
fi
