#!/usr/bin/env bash
# Create (or reuse) the virtual environment in $VENV and install plait into it.
#
# torch is handled first and on its own, because an unpinned `pip install torch` on a machine
# without a GPU pulls several GB of CUDA packages:
#   * a torch that the base Python already has is kept (the venv sees it through
#     --system-site-packages) and is never replaced;
#   * otherwise, on a machine with an NVIDIA driver, pip installs its default (CUDA) build;
#   * otherwise the CPU build $PLAIT_TORCH_SPEC (default torch==2.13.0) is installed, from
#     $PLAIT_TORCH_INDEX if set (point it at PyTorch's CPU wheel index), and the install is
#     refused if pip would bring any nvidia-* package along.
set -euo pipefail

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
EXTRAS=${EXTRAS:-dev}
TORCH_SPEC=${PLAIT_TORCH_SPEC:-torch==2.13.0}

if [ ! -x "$VENV/bin/python" ]; then
  echo "plait setup: creating $VENV (sees the base Python's packages, torch included)"
  "$PYTHON" -m venv --system-site-packages "$VENV"
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip --disable-pip-version-check -q)

if "$PY" -c "import torch" 2>/dev/null; then
  echo "plait setup: keeping the installed torch $("$PY" -c 'import torch; print(torch.__version__)')"
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  echo "plait setup: NVIDIA GPU found, installing torch (CUDA build)"
  "${PIP[@]}" install "torch>=2.11"
else
  index_args=()
  if [ -n "${PLAIT_TORCH_INDEX:-}" ]; then index_args=(--index-url "$PLAIT_TORCH_INDEX"); fi
  report=$(mktemp)
  "${PIP[@]}" install --dry-run --ignore-installed --report "$report" "${index_args[@]}" "$TORCH_SPEC" >/dev/null
  if grep -q '"name": "nvidia-' "$report"; then
    rm -f "$report"
    echo "plait setup: no GPU here, but '$TORCH_SPEC' would install CUDA packages." >&2
    echo "  Install a CPU build of torch first, or set PLAIT_TORCH_INDEX to PyTorch's CPU wheel index" >&2
    echo "  (see the install selector on pytorch.org), then run this again." >&2
    exit 1
  fi
  rm -f "$report"
  echo "plait setup: no GPU found, installing the CPU build $TORCH_SPEC"
  "${PIP[@]}" install "${index_args[@]}" "$TORCH_SPEC"
fi

echo "plait setup: installing plait[$EXTRAS] (editable)"
"${PIP[@]}" install -e ".[$EXTRAS]"
