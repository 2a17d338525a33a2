#!/usr/bin/env bash
# Create (or reuse) .venv and install LiverTumorSeg with the extras named in $1
# (comma-separated, e.g. "cli" or "test,train"). torch is pinned here, and only here,
# to the version this project is tested with; the package itself declares a floor.
# Which build pip takes depends on its index: this project's machines provide the CPU
# build; from plain PyPI, Linux torch is the CUDA build (several GB). Set
# TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu to take the CPU build there.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="${1:-cli}"
PYTHON="${PYTHON:-python3}"
TORCH_PIN="torch==2.13.0"

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# torch first, pinned, so nothing below pulls another (possibly multi-GB CUDA) build.
.venv/bin/python -m pip install -q ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "$TORCH_PIN"
echo "$TORCH_PIN" > .venv/torch-constraint.txt
.venv/bin/python -m pip install -q -c .venv/torch-constraint.txt -e ".[${EXTRAS}]"
echo "setup: .venv ready with extras [${EXTRAS}]" >&2
