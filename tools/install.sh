#!/usr/bin/env bash
# Set up the project's virtual environment: torch first (the CPU 2.13.0 wheel where no torch is
# present; a CUDA torch already in the environment is kept), then normscale, then mup without its
# torchvision dependency (see README.md).
set -euo pipefail
venv=${1:-.venv}
[ -x "$venv/bin/python" ] || "${PYTHON:-python3}" -m venv "$venv"
py="$venv/bin/python"
"$py" -m pip install --quiet --disable-pip-version-check uv
# --compile-bytecode: uv writes no .pyc by default and PYTHONDONTWRITEBYTECODE=1 machines never cache them, so
# every process would recompile torch's Python sources on import (import torch: 4 s instead of under 2 here)
install=("$venv/bin/uv" pip install --quiet --compile-bytecode --python "$py")
[ -d /opt/wheels ] && install+=(--find-links /opt/wheels)
"$py" -c "import torch" 2>/dev/null || "${install[@]}" "torch==2.13.0"
"${install[@]}" -e ".[dev]"
"${install[@]}" --no-deps "mup==1.0.0"
"$py" - <<'PY'
import importlib.util, sys, torch
assert importlib.util.find_spec("torchvision") is None, "torchvision is installed: it breaks transformers (uninstall it)"
print(f"normscale environment ready: python {sys.version.split()[0]}, torch {torch.__version__}")
PY
