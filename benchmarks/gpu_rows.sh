#!/usr/bin/env bash
# Issue 35's GPU rows in one run (< 10 minutes on one H100): benchmarks/gpu_rows.py, with the wheels the device
# machine lacks (it has torch, accelerate, peft and transformers, not diffusers) installed from .whl/ when present.
#
#   bash benchmarks/gpu_rows.sh            # on the GPU machine; writes $OUT/gpu_rows.md when OUT is set
#   bash benchmarks/gpu_rows.sh --sd35     # and the SD3.5-Medium-shaped step of issue 38 (its memory target)
#   bash benchmarks/gpu_rows.sh --dry      # here: the tiny pipeline on the CPU (tests/test_gpu_rows.py runs it)
#
# Wheels, fetched here beforehand (see the device README): diffusers and what it needs that the machine lacks, e.g.
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 -d .whl \
#       diffusers==0.42.1 importlib_metadata zipp bitsandbytes   # bitsandbytes: the SD3.5 row's 8-bit AdamW
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import diffusers" 2>/dev/null; then
    if ls .whl/*.whl >/dev/null 2>&1; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
        export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    else
        echo "error: diffusers is not installed and no wheels are in .whl/ (see this script's header)" >&2
        exit 2
    fi
fi
if [ -n "${OUT:-}" ]; then
    "$PY" benchmarks/gpu_rows.py "$@" | tee "$OUT/gpu_rows.md"
else
    "$PY" benchmarks/gpu_rows.py "$@"
fi
