#!/usr/bin/env bash
# The node benchmark with a fair yardstick: candle's upstream quantized_llama
# at its fastest on this CPU (a target-cpu=native build in target/native),
# against the node as shipped (the portable build, kernels chosen at run
# time). Extra arguments go to `mesh-bench node` (e.g. --kernels avx2).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/fetch-model.sh
RUSTFLAGS="-C target-cpu=native" cargo build --release -p bench --target-dir target/native
cargo build --release -p bench
exec target/release/mesh-bench node --upstream-bin target/native/release/mesh-bench "$@"
