# Sourced by tools/test.sh and tools/demo.sh: a virtualenv in .venv with wds-ocr installed.
# torch: an existing install is kept (users with GPUs bring their CUDA build); otherwise the
# CPU build 2.13.0 is installed first, so pip never pulls a multi-GB CUDA build by accident.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  .venv/bin/python -m pip install -q "torch==2.13.0"
fi
.venv/bin/python -m pip install -q -e ".[dev,plot]"
