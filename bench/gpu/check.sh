#!/usr/bin/env bash
# The GPU check (bench/gpu/check.py): every CUDA path of RLHF Studio in one run of under
# 8 minutes on one H100; writes bench/gpu/README.md. Without a CUDA GPU it says so and exits.
cd "$(dirname "$0")/../.." || exit 1
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
PYTHONUNBUFFERED=1 exec "$PYTHON" -m bench.gpu.check "$@"
