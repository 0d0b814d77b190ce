#!/usr/bin/env bash
# Build the separate venv that runs TorchServe's STOCK image_classifier for the benchmarks.
#
# Stock's vision_handler imports torchvision and captum at module level, which our library
# deliberately does not depend on, so the baseline lives in its own venv (about 5 GB with
# torch's CUDA wheels). Usage:
#   bash benchmarks/stock_venv.sh [VENV_DIR]      (default: benchmarks/.venv-stock)
# Idempotent: an existing venv whose import check passes is left as it is.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="${1:-$here/.venv-stock}"
python="${PYTHON:-python3}"

check() {
  "$venv/bin/python" - <<'PY'
from ts.torch_handler.image_classifier import ImageClassifier  # noqa: F401
import torch, torchvision
print(f"stock venv ok: torch {torch.__version__}, torchvision {torchvision.__version__}")
PY
}

if [ -x "$venv/bin/python" ] && check 2>/dev/null; then
  exit 0
fi

"$python" -m venv "$venv"
"$venv/bin/pip" install --quiet --upgrade pip
# captum: imported at module level by ts.torch_handler.vision_handler.
# pyyaml: the torchserve wheel omits it but its worker imports it.
# psutil: optional in base_handler; installed so stock runs as users usually have it.
"$venv/bin/pip" install --quiet \
  "torch==2.14.1" "torchvision==0.29.1" \
  "torchserve==0.12.0" "torch-model-archiver==0.12.0" \
  pyyaml captum pillow psutil
check
