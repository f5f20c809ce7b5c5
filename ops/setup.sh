#!/usr/bin/env bash
# Create .venv in the repo root and install async-pmd with its test extras, CPU build.
# torch and the stack are pinned through constraints-cpu.txt (an unpinned torch pulls GBs of CUDA).
# DeepSpeed is built from its sdist with the shared-memory comm op precompiled, so the first
# learner start does not spend ~40 s compiling it. Idempotent: a second run checks and exits fast.
#
# `bash ops/setup.sh --sglang` / `--vllm` build `.venv-sglang` / `.venv-vllm` instead: the whole
# project plus that inference engine, pinned through constraints-sglang.txt / constraints-vllm.txt
# (ops/setup_engine.sh; README "Real inference engines").
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
  "") ;;
  --sglang) exec bash ops/setup_engine.sh sglang ;;
  --vllm) exec bash ops/setup_engine.sh vllm ;;
  *) echo "usage: bash ops/setup.sh [--sglang | --vllm]" >&2; exit 2 ;;
esac
PY=${PYTHON:-python3}
C=constraints-cpu.txt
stamp=.venv/.installed-$(cat pyproject.toml "$C" | sha1sum | cut -c1-12)
if [ -f "$stamp" ]; then exit 0; fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/pip install -q -U pip setuptools wheel
.venv/bin/pip install -q -c "$C" torch==2.13.0 ninja
if ! .venv/bin/python -c "import deepspeed.ops.op_builder" 2>/dev/null || \
   ! ls .venv/lib/python*/site-packages/deepspeed/ops/comm/deepspeed_shm_comm_op*.so >/dev/null 2>&1; then
  DS_ACCELERATOR=cpu DS_BUILD_SHM_COMM=1 .venv/bin/pip install -q -c "$C" \
    --no-build-isolation --no-binary deepspeed deepspeed
fi
.venv/bin/pip install -q -c "$C" -e ".[test,plot,loggers]"
touch "$stamp"
