#!/usr/bin/env bash
# Create (or reuse) the virtual environment in $VENV and install plait into it.
#
# torch is handled first and on its own (scripts/torch_install.py decides and installs), because an
# unpinned `pip install torch` on a machine without a GPU pulls several GB of CUDA packages:
#   * a torch that the base Python already has is kept (the venv sees it through
#     --system-site-packages) and is never replaced;
#   * otherwise, on a machine with an NVIDIA driver, pip installs its default (CUDA) build;
#   * otherwise the CPU build $PLAIT_TORCH_SPEC (default torch==2.13.0) is installed: from
#     $PLAIT_TORCH_INDEX if set, else from pip's default index, or, where that wheel is the CUDA
#     build (Linux), from PyTorch's CPU wheel index ($PLAIT_TORCH_CPU_INDEX to override). pip
#     resolves each first, and nothing that brings an nvidia-* package is installed; if no CPU
#     build is found, setup stops with a message saying what was tried and how to fix it.
set -euo pipefail

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
EXTRAS=${EXTRAS:-dev}

if [ ! -x "$VENV/bin/python" ]; then
  echo "plait setup: creating $VENV (sees the base Python's packages, torch included)"
  "$PYTHON" -m venv --system-site-packages "$VENV"
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip --disable-pip-version-check -q)

"$PY" "$(dirname "$0")/torch_install.py" --python "$PY"

echo "plait setup: installing plait[$EXTRAS] (editable)"
"${PIP[@]}" install -e ".[$EXTRAS]"
