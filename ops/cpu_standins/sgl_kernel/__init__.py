"""STAND-IN for `sgl_kernel`, SGLang's compiled kernel package: NOT the real thing.

Why it exists: SGLang 0.5.23's CPU engine (`SGLANG_USE_CPU_ENGINE=1`) calls one op from
`sgl_kernel` for a dense model, `assign_req_to_token_pool_cpu` (`sglang/srt/mem_cache/
allocation.py`), and PyPI has no CPU build of sgl-kernel (its CUDA wheel needs libcuda). This
package gives that one op in plain torch, so that the real SGLang engine, scheduler, tokenizer
manager, sampler and weight-update API run on a CPU machine.

Everything else raises NotImplementedError saying what it stands in for: the names in
`_IMPORTED_AT_STARTUP`, which SGLang imports when its modules load but calls only for features
off here (speculative decoding, KV-cache moves between cache tiers), exist as functions that
raise when called; any other name raises as soon as it is looked up.

Where it is used: only in `.venv-sglang`, the CPU setup, where `bash ops/setup.sh --sglang` puts
this folder on the path (a .pth file) because the real `sgl_kernel` cannot be imported. A real
`sgl_kernel` installed in site-packages comes first on the path and wins.
"""

from __future__ import annotations

import torch

STAND_IN = True
"""Marker: this is async-pmd's CPU stand-in, not sgl-kernel."""


class NotInStandIn(NotImplementedError, ImportError):
    """A kernel the stand-in does not provide (also an ImportError, so `from sgl_kernel import x`
    inside SGLang's own try/except-ImportError fallbacks still falls back)."""


def assign_req_to_token_pool_cpu(
    req_pool_indices: torch.Tensor,
    req_to_token: torch.Tensor,
    start_offset: torch.Tensor,
    end_offset: torch.Tensor,
    out_cache_loc: torch.Tensor,
    pool_len: int,
) -> None:
    """For each request i, write its new KV slots into its row of the token pool.

    Same effect as SGLang's triton kernel `assign_req_to_token_pool`: request i owns
    `out_cache_loc[sum_{j<i} (end_j - start_j) :][: end_i - start_i]`, written to
    `req_to_token[req_pool_indices[i], start_offset[i] : end_offset[i]]`. `pool_len` is
    req_to_token's row length (the kernel's stride), implied here by the 2-D indexing.
    """
    starts = start_offset.tolist()
    ends = end_offset.tolist()
    rows = req_pool_indices.tolist()
    offset = 0
    for row, start, end in zip(rows, starts, ends):
        length = end - start
        req_to_token[row, start:end] = out_cache_loc[offset : offset + length].to(req_to_token.dtype)
        offset += length


def _not_provided(name: str) -> str:
    return (
        f"sgl_kernel.{name}: async-pmd's CPU stand-in for sgl_kernel (ops/cpu_standins) provides only "
        "assign_req_to_token_pool_cpu; the real op needs the sgl-kernel package (CUDA wheel, or the "
        "CPU build from SGLang's sgl-kernel/pyproject_cpu.toml)"
    )


def _raises_when_called(name: str):
    def stand_in(*args, **kwargs):
        raise NotImplementedError(_not_provided(name))

    stand_in.__name__ = stand_in.__qualname__ = name
    return stand_in


# Imported by SGLang 0.5.23 module bodies under `if _is_cpu:` (found by starting its CPU engine
# with this package on the path), never called for a dense model without speculative decoding.
_IMPORTED_AT_STARTUP = (
    "copy_all_layer_kv_cache_cpu",  # kernels/ops/kvcache/cache_move.py
    "build_tree_kernel_efficient_cpu",  # speculative decoding (EAGLE trees)
    "verify_tree_greedy_cpu",
    "assign_draft_cache_locs_contiguous_cpu",
    "assign_extend_cache_locs_cpu",
    "fill_accept_out_cache_loc_cpu",
    "fill_bonus_tokens_cpu",
)
globals().update({name: _raises_when_called(name) for name in _IMPORTED_AT_STARTUP})


def __getattr__(name: str):
    if name.startswith("__"):  # keep hasattr / copy / pickle probes working
        raise AttributeError(name)
    raise NotInStandIn(_not_provided(name))
