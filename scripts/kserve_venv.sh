#!/usr/bin/env bash
# The virtual environment for the tests that drive real KServe / NVIDIA clients and check the
# deploy/ manifests against the Kubernetes and KServe API models (the `kserve` extra):
#   tests/integration/test_protocols_server.py, tests/deploy/test_manifests.py
# kserve 0.21 pins psutil<6 and protobuf<7, which the main .venv does not, so it gets its own.
#   ./scripts/kserve_venv.sh && .venv-kserve/bin/python -m pytest tests/deploy tests/integration/test_protocols_server.py
set -euo pipefail
cd "$(dirname "$0")/.."
if ! .venv-kserve/bin/python -m pip --version >/dev/null 2>&1; then
  rm -rf .venv-kserve
  "${PYTHON:-python3}" -m venv .venv-kserve
fi
.venv-kserve/bin/pip install -q -c constraints.txt -e ".[dev,gateway,kserve]"
