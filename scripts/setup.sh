#!/usr/bin/env bash
# Installs what a fresh Debian machine lacks for building and testing the
# mesh (protoc, etcd), and fetches the default model. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v protoc >/dev/null || need+=(protobuf-compiler)
command -v etcd >/dev/null || need+=(etcd-server)
command -v python3 >/dev/null || need+=(python3 python3-pip)
command -v systemd-analyze >/dev/null || need+=(systemd)
command -v systemd-nspawn >/dev/null || need+=(systemd-container)
command -v ip >/dev/null || need+=(iproute2)
command -v curl >/dev/null || need+=(curl)
# jemalloc (the sidecar's allocator) builds from source with make.
command -v make >/dev/null || need+=(make)
if [ ${#need[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "installing: ${need[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null
fi
if ! command -v cargo >/dev/null; then
  echo "cargo not found: install Rust >= 1.85 (https://rustup.rs) and re-run" >&2
  exit 1
fi
bash scripts/fetch-model.sh
# Prometheus and promtool for the alert test, unpacked into .tools/ (no service).
bash scripts/fetch-prometheus.sh
