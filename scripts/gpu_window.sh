#!/usr/bin/env bash
# A short GPU window in one command, on a machine running the GPU image (scripts/gpu_image.txt) with this
# repository and `.gpu-wheels/` (`make gpu-wheels`) copied over: `make gpu-check` installed from those wheels
# alone over the image's packages, its report and log copied to OUT with the image's `pip freeze` (which
# refreshes scripts/gpu_image.txt: see the README).
#
#   scripts/gpu_window.sh OUT [gpu-check options]       # e.g. scripts/gpu_window.sh "$OUT" --devices 8
#
# The check starts no run after 420 s; LIMIT_S (default 510) ends it regardless, leaving time to copy the report.
set -uo pipefail
OUT="${1:?usage: scripts/gpu_window.sh OUT [gpu-check options]}"
shift
cd "$(dirname "$0")/.." || exit 2
mkdir -p "$OUT"
command -v make >/dev/null || { echo "gpu_window: no make on this machine" >&2; exit 2; }
python3 -m pip freeze --all >"$OUT/image-freeze.txt"
nvidia-smi -L || echo "gpu_window: nvidia-smi found no GPU"
timeout "${LIMIT_S:-510}" make gpu-check TORCH_SPEC= WHEELHOUSE=.gpu-wheels EXTRAS=peft GPU_CHECK_ARGS="$*" 2>&1 |
    tee "$OUT/gpu-check.log"
status=$?
cp benchmarks/results/gpu.md benchmarks/results/gpu.json "$OUT/" || echo "gpu_window: no report was written"
exit "$status"
