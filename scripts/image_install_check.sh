#!/usr/bin/env bash
# The GPU machine's install path, rehearsed on a CPU machine: `make gpu-check` from a Python whose environment
# already holds torch and the image's other packages, with only the small `make gpu-wheels` folder and no index.
#
#   scripts/image_install_check.sh [WORKDIR]     # default: a new temporary folder; needs pip's index once
#
# 1. "image": a venv (as the GPU image's python3 is one) holding torch (TORCH_SPEC, default torch==2.13.0) and,
#    at scripts/gpu_image.txt's versions where the index has them, every package of that list the project
#    reaches (`.[peft]`);
# 2. its `pip freeze` becomes the image list, and scripts/wheelhouse.py --image writes what the project needs
#    beyond it (for this Python and machine, as `make gpu-wheels` does for the GPU's CPython 3.12);
# 3. `make gpu-check` with the device call's variables, pip configuration off and no index: a new venv over
#    the image's, this package and the carried wheels, then the dry run (`--device cpu`) of every stage.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
WORK="${1:-$(mktemp -d -t image-install-check-XXXX)}"
mkdir -p "$WORK" && WORK="$(cd "$WORK" && pwd)"
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" MKL_NUM_THREADS="${MKL_NUM_THREADS:-1}"
IMAGE="$WORK/image"
cd "$REPO"

if [ ! -x "$IMAGE/bin/python" ]; then
    echo "== 1. the image: $IMAGE"
    "$PYTHON" -m venv "$IMAGE"
    "$IMAGE/bin/python" -m pip install -q $TORCH_SPEC
    "$IMAGE/bin/python" - "$WORK/image-packages.txt" <<'PY'
import json, subprocess, sys
from scripts.wheelhouse import normalized, read_image
image = read_image(__import__("pathlib").Path("scripts/gpu_image.txt"))
caps = [f"{name}<={version}" for name, version in image.items() if version and name != "torch"]
with open(sys.argv[1] + ".caps", "w") as f:
    f.write("\n".join(caps) + "\n")
report = subprocess.run(
    [sys.executable, "-m", "pip", "install", "--dry-run", "-q", "--report", "-", "-c", sys.argv[1] + ".caps", ".[peft]"],
    capture_output=True, text=True, check=True,
).stdout
wanted = [f"{i['metadata']['name']}=={i['metadata']['version']}" for i in json.loads(report)["install"]
          if normalized(i["metadata"]["name"]) in image and normalized(i["metadata"]["name"]) != "dvpo-lightning"]
open(sys.argv[1], "w").write("\n".join(wanted) + "\n")
PY
    "$IMAGE/bin/python" -m pip install -q -r "$WORK/image-packages.txt"
fi

echo "== 2. what the image lacks: $WORK/wheels"
"$IMAGE/bin/python" -m pip freeze --all >"$WORK/image-freeze.txt"
"$IMAGE/bin/python" scripts/wheelhouse.py --image "$WORK/image.txt" --refresh-image "$WORK/image-freeze.txt"
torch_version="$("$IMAGE/bin/python" -c 'import torch; print(torch.__version__.split("+")[0])')"
"$IMAGE/bin/python" scripts/wheelhouse.py --dest "$WORK/wheels" --image "$WORK/image.txt" --extras peft \
    --torch-version "$torch_version" --max-mib 64

echo "== 3. make install, then make gpu-check, from the image's Python with no index"
rm -rf "$WORK/venv"
export PIP_CONFIG_FILE=/dev/null PIP_NO_INDEX=1
variables=(PYTHON="$IMAGE/bin/python" VENV="$WORK/venv" TORCH_SPEC= WHEELHOUSE="$WORK/wheels" EXTRAS=peft)
make install "${variables[@]}" 2>&1 | tee "$WORK/install.log"
if grep -i -E "deprecat|2027" "$WORK/install.log"; then
    echo "image-install-check: FAILED: the install printed the deprecation warnings above" && exit 1
fi
"$WORK/venv/bin/python" - "$IMAGE" "$WORK/venv" <<'PY'
import sys
import datasets, jsonargparse, torch, transformers
image, venv = sys.argv[1:]
assert torch.__file__.startswith(image) and transformers.__file__.startswith(image), (torch.__file__, transformers.__file__)
assert datasets.__file__.startswith(venv) and jsonargparse.__file__.startswith(venv), (datasets.__file__, jsonargparse.__file__)
print(f"image-install-check: torch {torch.__version__} and transformers {transformers.__version__} from the image; "
      f"datasets {datasets.__version__} and jsonargparse {jsonargparse.__version__} from the carried wheels")
PY
make gpu-check "${variables[@]}" GPU_CHECK_ARGS="--device cpu --output $WORK/report"
echo "image-install-check: passed; report in $WORK/report/gpu.md"
