#!/usr/bin/env bash
# Install ferry for development into a virtual environment (default: .venv).
#
# torch is installed first, explicitly: a CPU machine gets the CPU build (torch==2.13.0, a local
# wheel on ferry's build machines), a machine with an NVIDIA driver gets the CUDA build from the
# default index. Override with FERRY_TORCH_SPEC (e.g. "torch==2.13.0+cpu" with your own index).
set -euo pipefail
VENV="${1:-.venv}"
PYTHON="${PYTHON:-python3}"

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check --quiet)

if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    if [ -n "${FERRY_TORCH_SPEC:-}" ]; then
        "${PIP[@]}" "$FERRY_TORCH_SPEC"
    elif command -v nvidia-smi >/dev/null 2>&1; then
        "${PIP[@]}" "torch>=2.4"
    else
        "${PIP[@]}" "torch==2.13.0"
    fi
fi
"${PIP[@]}" -e ".[train,serve,ray,test]"
echo "ferry installed in $VENV"
