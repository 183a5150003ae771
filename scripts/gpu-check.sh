#!/usr/bin/env bash
# The node on a GPU host, self-contained: prints the GPU, runs the node
# benchmark on it (`mesh-bench device`: single stream; aggregate at 8, 64
# and 256 streams; TTFT of a 512-token prompt alone and while 255 streams
# decode; KV pool size; bandwidth against the GPU's peak; the same binary's
# CPU aggregate; greedy output against the CPU) and writes every figure as
# JSON, with the GPU's name and the most memory it used.
#
# Needs: the mesh-bench that scripts/build-cuda.sh builds, the model, the
# NVIDIA driver, and the CUDA 13 runtime libraries (cuBLAS, cuRAND, NVRTC,
# cudart), e.g. from PyTorch's wheels; found through LD_LIBRARY_PATH or a
# Python that has them.
#
#   MESH_BENCH=target/cuda/release/mesh-bench MESH_MODEL=models/...gguf \
#   MESH_CUDA_DEVICE=0 MESH_GPU_REPORT=gpu-check.json scripts/gpu-check.sh [mesh-bench device flags]
set -euo pipefail
bench=${MESH_BENCH:-target/cuda/release/mesh-bench}
model=${MESH_MODEL:-models/SmolLM2-135M-Instruct.Q4_1.gguf}
report=${MESH_GPU_REPORT:-gpu-check.json}
dev=${MESH_CUDA_DEVICE:-0}

if ldd "$bench" | grep -q "not found"; then
  for py in python3 /usr/bin/python3 /opt/conda/bin/python3; do
    lib=$("$py" -c 'import nvidia, os; print(os.path.join(nvidia.__path__[0], "cu13", "lib"))' 2>/dev/null) || continue
    [ -d "$lib" ] && export LD_LIBRARY_PATH=$lib:${LD_LIBRARY_PATH:-} && break
  done
fi
if ldd "$bench" | grep "not found"; then
  echo "missing CUDA 13 libraries (above): put their folder on LD_LIBRARY_PATH" >&2
  exit 1
fi

gpu=$(nvidia-smi -i "$dev" --query-gpu=name,memory.total,driver_version --format=csv,noheader)
echo "GPU $dev: $gpu"
# Peak memory bandwidth (GB/s) from the datasheets, for the printed ratio.
case "$gpu" in
  *H200*) peak=4800 ;;
  *H100*PCIe*) peak=2000 ;;
  *H100*NVL*) peak=3900 ;;
  *H100*) peak=3350 ;;
  *A100*80GB*) peak=2039 ;;
  *A100*) peak=1555 ;;
  *L40S*) peak=864 ;;
  *) peak="" ;;
esac

work=$(mktemp -d)
trap 'kill "$sampler" 2>/dev/null || true; rm -rf "$work"' EXIT
(while sleep 0.2; do nvidia-smi -i "$dev" --query-gpu=memory.used --format=csv,noheader,nounits; done) >"$work/mem" &
sampler=$!
"$bench" device --model "$model" --cuda-device "$dev" ${peak:+--peak-gbs "$peak"} --json "$work/bench.json" "$@"
kill "$sampler" 2>/dev/null || true

python3 - "$work/bench.json" "$work/mem" "$gpu" "$report" <<'EOF'
import json, sys
bench, mem, gpu, out = sys.argv[1:]
report = json.load(open(bench))
used = [int(l) for l in open(mem) if l.strip().isdigit()]
report["gpu"] = gpu
report["memory_used_max_mib"] = max(used) if used else None
json.dump(report, open(out, "w"), indent=2)
print(f"GPU memory used at most: {report['memory_used_max_mib']} MiB; report: {out}")
EOF
