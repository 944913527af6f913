#!/usr/bin/env bash
# Create .venv (once) and install PromiseSegment's core into it; `--test` adds the test extras.
# Torch is pinned to the CPU/CUDA build these machines carry on local disk; elsewhere pip downloads it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
.venv/bin/python -m pip install -q torch==2.14.1 torchvision==0.29.1 2>&1 | grep -v "is ignored" || true
extra=""
[ "${1:-}" = "--test" ] && extra="[test]"
.venv/bin/python -m pip install -q -e ".${extra}" 2>&1 | grep -v "is ignored" || true
.venv/bin/python -c "import PromiseSegmentLib, segment_anything, torch; print('PromiseSegment ready: torch', torch.__version__)"
