#!/usr/bin/env bash
# Builds mesh-node and mesh-bench with `--features cuda` on a machine with
# neither a GPU nor a system CUDA toolkit: the CUDA 13.0 compiler and
# libraries come from NVIDIA's PyPI wheels, and the driver library is a link
# stub (the real libcuda.so.1 of the GPU host replaces it at run time).
#
# Output: target/cuda/release/{mesh-node,mesh-bench}. CUDA_COMPUTE_CAP picks
# the GPU generation the kernels are compiled for (default 90: H100/H200).
# The toolkit is kept in $MESH_CUDA_HOME (default ~/.cache/mesh-cuda), outside
# the repository; re-runs reuse it and the build.
set -euo pipefail
cd "$(dirname "$0")/.."

home=${MESH_CUDA_HOME:-$HOME/.cache/mesh-cuda}
venv=$home/venv
link=$home/link
mkdir -p "$home"

# Versions match the driver's CUDA 13.0: a newer nvvm emits PTX that the
# 13.0 assembler (and driver) reject ("Unsupported .version").
if [ ! -f "$venv/.complete" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check \
    "nvidia-cuda-nvcc==13.0.*" "nvidia-nvvm==13.0.*" "nvidia-cuda-crt==13.0.*" \
    "nvidia-cuda-runtime==13.0.*" "nvidia-cuda-cccl==13.0.*" "nvidia-cublas==13.0.*" \
    "nvidia-curand==10.4.0.*" "nvidia-cuda-nvrtc==13.0.*"
  touch "$venv/.complete"
fi
cu=$(echo "$venv"/lib/python3*/site-packages/nvidia/cu13)
[ -x "$cu/bin/nvcc" ] || { echo "no nvcc under $cu" >&2; exit 1; }
# nvcc looks for its nvvm and crt next to itself, where the wheels put them.
export PATH=$cu/bin:$PATH CUDA_ROOT=$cu CUDA_PATH=$cu CUDA_HOME=$cu
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
export CARGO_TARGET_DIR=target/cuda

# Every crate but the final links: the libraries are only needed to link.
cargo build --release -p node --features cuda --lib

# Link folder: unversioned names for the wheels' libraries, and a stub
# libcuda.so (soname libcuda.so.1) defining the driver symbols cudarc uses.
mkdir -p "$link"
for lib in cublas cublasLt curand nvrtc cudart; do
  so=$(ls "$cu"/lib/lib$lib.so.* | head -1)
  ln -sf "$so" "$link/lib$lib.so"
done
rlib=$(ls -t target/cuda/release/deps/libcudarc-*.rlib | head -1)
nm -u "$rlib" 2>/dev/null | grep -oE '\bcu[A-Z][A-Za-z0-9_]*$' | sort -u |
  sed 's/.*/void &(void) {}/' >"$link/stub.c"
gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$link/libcuda.so" "$link/stub.c"

# The folder goes to the final links only (RUSTFLAGS would rebuild every crate).
cargo rustc --release -p node --features cuda --bin mesh-node -- -L "$link"
cargo rustc --release -p bench --features cuda --bin mesh-bench -- -L "$link"
ls -l target/cuda/release/mesh-node target/cuda/release/mesh-bench
