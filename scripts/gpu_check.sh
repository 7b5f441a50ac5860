#!/usr/bin/env bash
# Every GPU test in one call, for a machine with CUDA (run once per device session, then give
# the machine back). Installs ferry over the machine's own torch without fetching anything.
set -uo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet --no-deps --no-build-isolation -e . >/dev/null 2>&1 \
    || echo "warning: editable install failed; using the checkout as is"
python - <<'PY'
import torch
print(f"torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}",
      f"({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else "")
PY
python -m pytest -m "gpu or tensorrt" -q -rA -p no:cacheprovider 2>&1 | tail -30
