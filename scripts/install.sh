#!/usr/bin/env bash
# Install rlhfkit (editable) with its test extras.
# A torch that is already importable (a CUDA build, say) is left alone; only when there is
# none is torch installed first, so pip does not pick one for us mid-resolution.
# Set RLHFKIT_TORCH_INDEX (e.g. https://download.pytorch.org/whl/cpu) to choose where it comes from.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
    echo "no torch found: installing torch 2.13.0"
    "$PY" -m pip install -q "torch==2.13.0" ${RLHFKIT_TORCH_INDEX:+--index-url "$RLHFKIT_TORCH_INDEX"}
fi
"$PY" -m pip install -q -e ".[test]"
"$PY" -c "import rlhfkit, torch; print(f'rlhfkit {rlhfkit.__version__} with torch {torch.__version__}')"
