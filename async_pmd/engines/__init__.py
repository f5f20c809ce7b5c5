"""Inference engines behind one protocol: `torch` (CPU default, any device) and `sglang` (GPU).

`create_engine("torch" | "sglang", model_path, **kwargs)` is the one builder. SGLang is an optional
extra that cannot share a venv with the CPU stack, so nothing here imports it: only building an
SGLang engine does.
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
    "create_engine",
    "sglang_available",
]

ENGINE_KINDS = ("torch", "sglang")
SGLANG_INSTALL_HINT = "pip install 'async-pmd[sglang]' (GPU machines only; it pins a CUDA build of torch)"


def sglang_available() -> bool:
    """Whether sglang is installed, found without importing it (its import is slow and heavy)."""
    return importlib.util.find_spec("sglang") is not None


def create_engine(kind: str, model_path: str, **kwargs) -> InferenceEngine:
    """Build the engine `kind` over the local HF model at `model_path`; kwargs go to its constructor."""
    if kind == "torch":
        from async_pmd.engines.torch_engine import TorchEngine

        return TorchEngine(model_path, **kwargs)
    if kind == "sglang":
        if not sglang_available():
            raise ImportError(f"engine 'sglang' needs the sglang package, which is not installed: {SGLANG_INSTALL_HINT}")
        from async_pmd.engines.sglang_engine import SGLangEngine

        return SGLangEngine(model_path, **kwargs)
    raise ValueError(f"unknown engine kind {kind!r}; expected one of {ENGINE_KINDS}")
