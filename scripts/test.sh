#!/usr/bin/env bash
# Sets up what is missing, then builds and runs every test of the workspace
# (unit tests, the real model, real node processes over real sockets).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The tests' Python (.venv: the generated client's runtime, the OpenAI SDK),
# and the generated Python client still what mesh.proto generates.
bash scripts/python-env.sh
bash scripts/gen-python-client.sh --check
cargo build --release --workspace --all-targets
# One test at a time: the end-to-end tests run whole meshes of processes
# and compare latencies, which is only fair on an otherwise quiet machine.
cargo test --release --workspace -- --test-threads=1
# The CUDA build must not rot: mesh-node and mesh-bench with --features
# cuda, on this machine without a GPU or CUDA toolkit (scripts/build-cuda.sh).
bash scripts/build-cuda.sh
