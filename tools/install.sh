#!/usr/bin/env bash
# Set up the project's virtual environment: torch first (the CPU 2.13.0 wheel where no torch is
# present; a CUDA torch already in the environment is kept), then normscale, then mup without its
# torchvision dependency (see README.md).
#
# Versions come from tools/constraints.txt, the tested environment (every package at the version the test suite
# passed with; torch as 2.13.0, which its CUDA builds of that version satisfy), so that a fresh install months from
# now reproduces it. A torch already present at another version is kept, with a warning (the other packages stay
# pinned). NORMSCALE_UNCONSTRAINED=1 installs without the constraints: the newest versions setup.py allows.
set -euo pipefail
venv=${1:-.venv}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
[ -x "$venv/bin/python" ] || "${PYTHON:-python3}" -m venv "$venv"
py="$venv/bin/python"
constraints=()
if [[ -z ${NORMSCALE_UNCONSTRAINED:-} ]]; then
  constraints=(-c "$here/constraints.txt")
  present=$("$py" -c "import torch; print(torch.__version__.split('+')[0])" 2>/dev/null || true)
  tested=$(sed -n 's/^torch==//p' "$here/constraints.txt")
  if [[ -n $present && $present != "$tested" ]]; then  # keep the environment's own (CUDA) torch
    echo "normscale: keeping torch $present (tested with $tested; tools/constraints.txt pins the rest)" >&2
    kept=$(mktemp)
    trap 'rm -f "$kept"' EXIT
    grep -v '^torch==' "$here/constraints.txt" > "$kept"
    constraints=(-c "$kept")
  fi
else
  echo "normscale: NORMSCALE_UNCONSTRAINED=1: installing the newest versions setup.py allows, not the tested ones" >&2
fi
"$py" -m pip install --quiet --disable-pip-version-check uv "${constraints[@]}"
# --compile-bytecode: uv writes no .pyc by default and PYTHONDONTWRITEBYTECODE=1 machines never cache them, so
# every process would recompile torch's Python sources on import (import torch: 4 s instead of under 2 here)
install=("$venv/bin/uv" pip install --quiet --compile-bytecode --python "$py" "${constraints[@]}")
[ -d /opt/wheels ] && install+=(--find-links /opt/wheels)
"$py" -c "import torch" 2>/dev/null || "${install[@]}" "torch==2.13.0"
"${install[@]}" -e ".[dev]"
"${install[@]}" --no-deps "mup==1.0.0"
"$py" - <<'PY'
import importlib.util, sys, torch
assert importlib.util.find_spec("torchvision") is None, "torchvision is installed: it breaks transformers (uninstall it)"
print(f"normscale environment ready: python {sys.version.split()[0]}, torch {torch.__version__}")
PY
