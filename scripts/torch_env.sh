#!/usr/bin/env bash
# The suite and the GPU check's smoke run on another torch, in a venv of its own outside the
# repository (for whoever changes a torch-facing line; docs/compatibility.md):
#
#   scripts/torch_env.sh 2.11.0                  # build the venv once, then pytest + gpu_check --smoke
#   scripts/torch_env.sh 2.11.0 tests/test_ddp.py -n 0    # pytest's arguments after the version
#
# Environment: PYTHON (default python3; e.g. python3.12 for the GPU machine's Python),
# D2R_TORCH_VENVS (default ~/.cache/d2r-torch: one venv per torch and Python),
# EXTRA_CONSTRAINTS (more pins, e.g. "numpy<2" for a torch built against numpy 1),
# SMOKE=0 (skip benchmarks/gpu_check.py --smoke), SUITE=0 (skip pytest).
# torch from PyPI is a CUDA build: the first run downloads a few GB into the venv.
set -euo pipefail
version="${1:?usage: scripts/torch_env.sh TORCH_VERSION [PYTEST_ARGS...]}"
shift
cd "$(dirname "$0")/.."
repo="$PWD"
python="${PYTHON:-python3}"
py_tag="$("$python" -c 'import sys; print(f"py{sys.version_info[0]}{sys.version_info[1]}")')"
venv="${D2R_TORCH_VENVS:-$HOME/.cache/d2r-torch}/torch-$version-$py_tag"
case "$venv" in
  "$repo"/*) echo "torch_env.sh: keep the venv out of the repository ($venv)" >&2; exit 2 ;;
esac

constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
{ echo "torch==$version"; for pin in ${EXTRA_CONSTRAINTS:-}; do echo "$pin"; done; } >"$constraints"
export PIP_CONSTRAINT="$constraints"  # in place of CI's constraints/ci.txt

if [ ! -x "$venv/bin/python" ]; then
  echo "torch_env.sh: building $venv (torch $version)" >&2
  "$python" -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip
fi
# every time: cheap once installed, and it follows pyproject.toml's dependencies
"$venv/bin/python" -m pip install -q -e ".[dev]"
"$venv/bin/python" - "$version" <<'EOF'
import sys

import torch

found = torch.__version__.split("+")[0]
if found != sys.argv[1]:
    sys.exit(f"torch_env.sh: the venv holds torch {torch.__version__}, not {sys.argv[1]}")
print(f"torch_env.sh: torch {torch.__version__} on Python {sys.version.split()[0]}")
EOF

export PYTHONPATH="$repo/src${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's code, whatever else
status=0
if [ "${SUITE:-1}" != 0 ]; then
  "$venv/bin/python" -m pytest "$@" || status=$?
fi
if [ "${SMOKE:-1}" != 0 ]; then
  out="$(mktemp -d)"
  "$venv/bin/python" benchmarks/gpu_check.py --smoke --out "$out/check" || status=$?
  cat "$out/check/results.md" 2>/dev/null || true
  rm -rf "$out"
fi
exit "$status"
