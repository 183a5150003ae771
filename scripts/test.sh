#!/usr/bin/env bash
# Sets up what is missing, then builds and runs every test of the workspace
# (unit tests, the real model, real node processes over real sockets).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --release --workspace --all-targets
cargo test --release --workspace
