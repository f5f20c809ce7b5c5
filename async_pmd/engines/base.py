"""The inference-engine contract shared by the torch engine (CPU default) and SGLang (GPU).

A generator service owns one engine: it calls `generate` with token ids (engines never see text),
swaps weights with `update_weights` between batches, and tags each rollout with the version that
sampled it. Log-probs returned here are the behaviour policy π_old of the PMD loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol, runtime_checkable

import numpy as np

if TYPE_CHECKING:
    import torch

FinishReason = Literal["stop", "length", "abort"]


@dataclass(frozen=True)
class SamplingParams:
    """How to sample; one set per `generate` call, shared by every prompt in it."""

    temperature: float = 1.0
    """Softmax temperature; 0 means greedy."""
    top_p: float = 1.0
    """Nucleus mass kept, in (0, 1]; 1 = off."""
    top_k: int = 0
    """Keep the k most likely tokens; 0 or -1 = off."""
    max_new_tokens: int = 16
    """Tokens generated per response at most (the stop token included)."""
    stop_token_ids: tuple[int, ...] = ()
    """Extra stop tokens besides the model's EOS; a stop token ends and is kept in the response."""
    n: int = 1
    """Responses per prompt (one PMD group)."""
    seed: int | None = None
    """Same seed, prompts, params and weights → same responses; None = fresh randomness."""
    ignore_eos: bool = False
    """Do not stop at the model's EOS (benchmarks); `stop_token_ids` still stop."""
    row_seeds: tuple[int, ...] | None = None
    """One sampling key per output row (prompt-major, prompts × n), each in [0, 2**63); None =
    derived from `seed` and the row. The torch engine draws the token at response position t of
    a row from (its key, t) alone, so a row continued later (partial rollouts) from its prompt +
    the tokens so far, with the same key, samples what the uninterrupted row would have."""
    start_positions: tuple[int, ...] | None = None
    """Per output row, the response tokens already generated (the prefix a continuation carries,
    appended to its prompt); None = all 0."""

    def __post_init__(self) -> None:
        if not self.temperature >= 0.0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < -1:
            raise ValueError(f"top_k must be >= 1, or 0/-1 for off; got {self.top_k}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        for name in ("row_seeds", "start_positions"):
            values = getattr(self, name)
            if values is not None:
                values = tuple(int(v) for v in values)
                if any(not 0 <= v < 2**63 for v in values):
                    raise ValueError(f"{name} must be in [0, 2**63)")
                object.__setattr__(self, name, values)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def top_k_enabled(self) -> bool:
        return self.top_k > 0


@dataclass
class GenerationOutput:
    """One response. Invariant: `len(token_ids) == len(logprobs) >= 1` unless aborted.

    `logprobs[t]` is log π(token_ids[t] | prompt, token_ids[:t]) under the distribution actually
    sampled from (see each engine for how temperature and top-k/top-p enter it).
    """

    prompt_index: int
    """Which prompt of the `generate` batch this answers."""
    token_ids: np.ndarray
    """(L,) int32 response tokens, the stop token included when finish_reason == 'stop'."""
    logprobs: np.ndarray
    """(L,) float32 sampling log-probs of `token_ids`."""
    finish_reason: FinishReason
    policy_version: int = 0
    """Engine weight version that sampled this response."""

    def __post_init__(self) -> None:
        self.token_ids = np.asarray(self.token_ids, dtype=np.int32)
        self.logprobs = np.asarray(self.logprobs, dtype=np.float32)
        if self.token_ids.shape != self.logprobs.shape or self.token_ids.ndim != 1:
            raise ValueError(
                f"token_ids {self.token_ids.shape} and logprobs {self.logprobs.shape} must be equal-length 1-D"
            )


@runtime_checkable
class InferenceEngine(Protocol):
    """What a generator needs from an engine. All token ids, no text."""

    def generate(self, prompt_ids: list[list[int]], params: SamplingParams) -> list[list[GenerationOutput]]:
        """Per prompt, `params.n` responses (in prompt order). Raises ValueError on an empty or
        over-long prompt, naming its index, before generating anything."""
        ...

    def update_weights(self, named_tensors: dict[str, torch.Tensor], version: int) -> None:
        """Load new weights (names as in the model's state_dict) and set `version`. Waits for an
        in-flight batch; never interleaves with one."""
        ...

    @property
    def version(self) -> int:
        """Version of the weights now loaded (0 = as built/loaded)."""
        ...

    def pause(self) -> None:
        """Stop taking new batches (an in-flight batch finishes or is aborted, per engine)."""
        ...

    def resume(self) -> None:
        """Undo `pause`."""
        ...

    def shutdown(self) -> None:
        """Release the model and any subprocesses; the engine is unusable afterwards."""
        ...
