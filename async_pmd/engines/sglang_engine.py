"""The SGLang inference engine (GPU machines): `InferenceEngine` over an in-process `sglang.Engine`.

Written against SGLang 0.5.23 (`srt/entrypoints/engine.py`, `srt/managers/io_struct.py`); not yet
run on hardware here. sglang is imported only when an `SGLangEngine` is built, and the
translation in both directions (our `SamplingParams` → SGLang request, SGLang output dict →
`GenerationOutput`) lives in pure functions that the CPU tests cover.

Differences from the torch engine worth knowing:
- Log-probs are SGLang's: log_softmax(logits / T) of the sampled token, taken *before* top-k /
  top-p renormalisation (greedy: untempered). With top_k/top_p off, as RL runs use, they equal
  the torch engine's; with them on, they are not the truncated distribution's (a warning says so).
- n responses per prompt are sent as n requests with seeds seed+row (SGLang's own `n` would give
  every copy the same `sampling_seed`, i.e. n identical responses).
- `update_weights` without `pause` waits for in-flight requests (SGLang's model-update writer
  lock), so every response comes from one weight version. `pause(mode="abort")`, the default,
  returns in-flight requests at once with finish_reason "abort" (the caller retries them);
  "retract" / "in_place" keep them, and they then finish on the new weights.
- SGLang's engine lives on the event loop that was current when it was built (`Engine.loop`; in a
  Serve replica, the replica's loop). Sync methods run their coroutine on that loop: directly when
  it is idle, thread-safely when it runs in another thread (`asyncio.to_thread(engine.generate,
  ...)` works); called on the loop's own thread they raise instead of deadlocking: there, use
  `async_generate` or `to_thread`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import struct
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import torch

from async_pmd.engines.base import GenerationOutput, SamplingParams

logger = logging.getLogger(__name__)

PauseMode = Literal["abort", "retract", "in_place"]
_FINISH_REASONS = {"stop": "stop", "length": "length", "abort": "abort"}


# ---------------------------------------------------------------- pure translation


def to_sglang_sampling_params(params: SamplingParams, row: int) -> dict[str, Any]:
    """Our params → one SGLang request's `sampling_params` dict (row = i*n + j of the batch)."""
    request: dict[str, Any] = {
        "max_new_tokens": params.max_new_tokens,
        "temperature": params.temperature,  # SGLang maps 0 to greedy itself
        "top_p": params.top_p,
        "top_k": params.top_k if params.top_k_enabled else -1,
        "n": 1,
        "ignore_eos": params.ignore_eos,
        "no_stop_trim": True,  # keep the stop token: it is part of the sampled response
    }
    if params.stop_token_ids:
        request["stop_token_ids"] = list(params.stop_token_ids)
    if params.seed is not None:
        request["sampling_seed"] = params.seed + row
    return request


def build_requests(
    prompt_ids: Sequence[Sequence[int]], params: SamplingParams
) -> tuple[list[list[int]], list[dict[str, Any]]]:
    """Prompts × n → (input_ids, sampling_params), one request per response, prompt-major."""
    input_ids = [list(map(int, p)) for p in prompt_ids for _ in range(params.n)]
    return input_ids, [to_sglang_sampling_params(params, row) for row in range(len(input_ids))]


def parse_output(output: Mapping[str, Any], prompt_index: int, version: int) -> GenerationOutput:
    """One SGLang output dict (`skip_tokenizer_init=True`, `return_logprob=True`) → GenerationOutput.

    Tokens and log-probs both come from `meta_info.output_token_logprobs` = [(logprob, token_id,
    text|None), ...], so they are aligned by construction; `output_ids` must agree with them
    (possibly without the final stop token). ValueError on anything else.
    """
    meta = output.get("meta_info") or {}
    triples = meta.get("output_token_logprobs")
    if triples is None:
        raise ValueError("SGLang output has no meta_info.output_token_logprobs (was return_logprob set?)")
    token_ids = [int(t[1]) for t in triples]
    logprobs = [t[0] for t in triples]
    if any(lp is None for lp in logprobs):
        raise ValueError(f"SGLang output for prompt {prompt_index} has a missing log-prob")
    output_ids = list(output.get("output_ids", token_ids))
    if output_ids != token_ids and output_ids != token_ids[:-1]:
        raise ValueError(
            f"SGLang output_ids ({len(output_ids)}) disagree with output_token_logprobs ({len(token_ids)}) "
            f"for prompt {prompt_index}"
        )
    reason = meta.get("finish_reason")
    kind = reason.get("type") if isinstance(reason, Mapping) else reason
    return GenerationOutput(
        prompt_index=prompt_index,
        token_ids=token_ids,
        logprobs=logprobs,
        finish_reason=_FINISH_REASONS.get(kind, "abort"),
        policy_version=version,
    )


def group_outputs(outputs: Sequence[Mapping[str, Any]], n: int, version: int) -> list[list[GenerationOutput]]:
    """The flat, prompt-major list SGLang returns for `build_requests` → per prompt, n outputs."""
    if len(outputs) % n:
        raise ValueError(f"{len(outputs)} SGLang outputs is not a multiple of n={n}")
    parsed = [parse_output(out, row // n, version) for row, out in enumerate(outputs)]
    return [parsed[i : i + n] for i in range(0, len(parsed), n)]


def checkpoint_shapes(model_path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Tensor name → shape of the safetensors checkpoint at `model_path`, from the file headers only.

    With tied embeddings the checkpoint holds no lm_head.weight; it is added as an alias so that a
    learner sending its full state_dict validates.
    """
    path = Path(model_path)
    shapes: dict[str, tuple[int, ...]] = {}
    for file in sorted(path.glob("*.safetensors")):
        with open(file, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(header_len))
        shapes.update({k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"})
    if not shapes:
        raise FileNotFoundError(f"no *.safetensors checkpoint under {str(path)!r}")
    config = json.loads((path / "config.json").read_text())
    if config.get("tie_word_embeddings") and "lm_head.weight" not in shapes:
        shapes["lm_head.weight"] = shapes["model.embed_tokens.weight"]
    return shapes


def check_named_tensors(named_tensors: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]]) -> None:
    """ValueError naming the first tensor whose name is unknown or whose shape differs."""
    for name, tensor in named_tensors.items():
        if name not in shapes:
            raise ValueError(f"update_weights: unknown tensor {name!r} (not in the checkpoint)")
        if tuple(tensor.shape) != shapes[name]:
            raise ValueError(f"update_weights: tensor {name!r} has shape {tuple(tensor.shape)}, the model's is {shapes[name]}")


def check_prompts(prompt_ids: Sequence[Sequence[int]], max_prompt_length: int) -> None:
    """ValueError naming the first empty or over-long prompt."""
    if not prompt_ids:
        raise ValueError("generate() needs at least one prompt")
    for index, prompt in enumerate(prompt_ids):
        if len(prompt) == 0:
            raise ValueError(f"prompt {index} is empty")
        if len(prompt) > max_prompt_length:
            raise ValueError(f"prompt {index} has {len(prompt)} tokens, more than max_prompt_length={max_prompt_length}")


# ---------------------------------------------------------------- the engine


class SGLangEngine:
    """An in-process `sglang.Engine` (its scheduler runs in subprocesses) behind `InferenceEngine`.

    Owns the SGLang engine and our weight `version` (SGLang's own version string is not used).
    """

    def __init__(
        self,
        model_path: str | os.PathLike,
        tokenizer=None,
        *,
        tp_size: int = 1,
        dp_size: int = 1,
        mem_fraction_static: float = 0.8,
        random_seed: int = 0,
        dtype: str = "auto",
        pause_mode: PauseMode = "abort",
        max_prompt_length: int | None = None,
        extra: Mapping[str, Any] | None = None,
        **engine_kwargs: Any,
    ):
        """`tokenizer` is accepted for symmetry with TorchEngine and unused (ids in, ids out).
        `extra` and any other keywords go to `sglang.Engine` (ServerArgs fields). `dtype` "auto"
        is SGLang's: fp16 for an fp32 checkpoint."""
        from async_pmd.engines import SGLANG_INSTALL_HINT

        if dp_size != 1:
            raise ValueError(
                "SGLang 0.5.23 cannot update weights from tensors with dp_size > 1; "
                "scale with more generator replicas instead"
            )

        try:
            import sglang
            from sglang.srt.managers.io_struct import ContinueGenerationReqInput, PauseGenerationReqInput
        except ImportError as err:
            raise ImportError(f"the sglang engine needs sglang: {SGLANG_INSTALL_HINT}") from err

        self._model_path = Path(model_path)
        config = json.loads((self._model_path / "config.json").read_text())
        self._max_positions: int = config["max_position_embeddings"]
        self._max_prompt_length = max_prompt_length
        self._shapes = checkpoint_shapes(self._model_path)
        self._pause_request = PauseGenerationReqInput(mode=pause_mode)
        self._continue_request = ContinueGenerationReqInput()
        self._tp_size = tp_size
        self._version = 0
        self._warned_truncation = False
        self._engine = sglang.Engine(
            model_path=str(self._model_path),
            skip_tokenizer_init=True,  # token ids in and out; no detokenizer work
            tp_size=tp_size,
            mem_fraction_static=mem_fraction_static,
            random_seed=random_seed,
            dtype=dtype,
            **{**dict(extra or {}), **engine_kwargs},
        )

    @property
    def version(self) -> int:
        return self._version

    def generate(self, prompt_ids: list[list[int]], params: SamplingParams) -> list[list[GenerationOutput]]:
        input_ids, sampling = self._prepare(prompt_ids, params)
        version = self._version
        outputs = self._run(
            self._engine.async_generate(input_ids=input_ids, sampling_params=sampling, return_logprob=True)
        )
        return group_outputs(outputs, params.n, version)

    async def async_generate(self, prompt_ids: list[list[int]], params: SamplingParams) -> list[list[GenerationOutput]]:
        """`generate` for callers inside an event loop (an async Serve replica)."""
        input_ids, sampling = self._prepare(prompt_ids, params)
        version = self._version
        outputs = await self._engine.async_generate(input_ids=input_ids, sampling_params=sampling, return_logprob=True)
        return group_outputs(outputs, params.n, version)

    def update_weights(self, named_tensors: Mapping[str, torch.Tensor], version: int) -> None:
        """Checked against the checkpoint's names and shapes first (nothing sent on ValueError),
        then loaded by SGLang (which may cast dtype); its radix cache is flushed.

        Builds the same request as 0.5.23's `Engine.update_weights_from_tensor` (one serialized
        copy per TP rank), so that it can also run on a loop busy in another thread.
        """
        from sglang.srt.managers.io_struct import UpdateWeightsFromTensorReqInput
        from sglang.srt.utils import MultiprocessingSerializer

        incoming = {name: torch.as_tensor(t) for name, t in named_tensors.items()}
        check_named_tensors(incoming, self._shapes)
        payload = MultiprocessingSerializer.serialize(list(incoming.items()))
        request = UpdateWeightsFromTensorReqInput(
            serialized_named_tensors=[payload] * self._tp_size,
            load_format=None,
            flush_cache=True,
            weight_version=str(version),  # shows in SGLang's meta_info / metrics
        )
        success, message = self._run(self._engine.tokenizer_manager.update_weights_from_tensor(request, None))
        if not success:
            raise RuntimeError(f"SGLang refused the weight update to version {version}: {message}")
        self._version = int(version)

    def update_weights_from_disk(self, model_path: str | os.PathLike, version: int) -> None:
        """Load a whole HF checkpoint directory (e.g. a learner's saved step) in place."""
        from sglang.srt.managers.io_struct import UpdateWeightFromDiskReqInput

        request = UpdateWeightFromDiskReqInput(model_path=str(model_path))
        success, message, *_ = self._run(self._engine.tokenizer_manager.update_weights_from_disk(request, None))
        if not success:
            raise RuntimeError(f"SGLang could not load {model_path}: {message}")
        self._version = int(version)

    def pause(self) -> None:
        self._run(self._engine.tokenizer_manager.pause_generation(self._pause_request))

    def resume(self) -> None:
        self._run(self._engine.tokenizer_manager.continue_generation(self._continue_request))

    def flush_cache(self) -> None:
        self._run(self._engine.tokenizer_manager.flush_cache())

    def shutdown(self) -> None:
        self._engine.shutdown()

    # ------------------------------------------------------------ helpers

    def _prepare(self, prompt_ids, params: SamplingParams):
        limit = self._max_prompt_length or self._max_positions - params.max_new_tokens
        check_prompts(prompt_ids, limit)
        if (params.top_k_enabled or params.top_p < 1.0) and not self._warned_truncation:
            self._warned_truncation = True
            logger.warning("SGLang log-probs ignore top-k/top-p truncation; the PMD anchor is then approximate")
        return build_requests(prompt_ids, params)

    def _run(self, coroutine):
        return run_on_loop(self._engine.loop, coroutine)


def run_on_loop(loop: asyncio.AbstractEventLoop, coroutine):
    """Run `coroutine` on `loop` from a synchronous caller and return its result.

    An idle loop runs it here; a loop running in another thread gets it thread-safely (the caller
    blocks); the loop's own thread gets RuntimeError, since blocking there would deadlock.
    """
    if not loop.is_running():
        return loop.run_until_complete(coroutine)
    if _running_loop() is loop:
        coroutine.close()
        raise RuntimeError(
            "SGLangEngine's sync methods block; on the engine's own event loop call them through "
            "asyncio.to_thread, or use async_generate"
        )
    return asyncio.run_coroutine_threadsafe(coroutine, loop).result()


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None
