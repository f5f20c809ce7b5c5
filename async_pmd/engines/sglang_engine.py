"""The SGLang inference engine: `InferenceEngine` over an in-process `sglang.Engine`.

Checked against SGLang 0.5.23's source (`srt/entrypoints/engine.py`, `srt/managers/io_struct.py`,
`srt/managers/tokenizer_control_mixin.py`, `srt/managers/scheduler_components/weight_updater.py`)
and run on this CPU by `tests/engines/test_sglang_real.py` (`.venv-sglang`, `device="cpu"`; README
"Real inference engines"). sglang is imported only when an `SGLangEngine` is built, and the
translation in both directions (our `SamplingParams` → SGLang request, SGLang output dict →
`GenerationOutput`) lives in pure functions that the CPU tests cover.

Differences from the torch engine worth knowing:
- Log-probs are SGLang's: log_softmax(logits / T) of the sampled token, taken *before* top-k /
  top-p renormalisation (greedy: untempered). With top_k/top_p off, as RL runs use, they equal
  the torch engine's; with them on, they are not the truncated distribution's (a warning says so).
- n responses per prompt are sent as n requests with seeds seed+row (SGLang's own `n` would give
  every copy the same `sampling_seed`, i.e. n identical responses). SGLang honours
  `sampling_seed` only with `enable_deterministic_inference`, which this adapter turns on for
  GPU devices; SGLang's CPU attention backends refuse it, so on CPU a seed does not fix the sample.
- Weight loads run inside SGLang's weight-update session (`begin_weight_update` … load …
  `end_weight_update`): 0.5.23 refuses tensor and distributed updates outside one.
- `update_weights` without `pause` waits for in-flight requests (SGLang's model-update writer
  lock), so every response comes from one weight version. `pause(mode="abort")`, the default,
  returns in-flight requests at once with finish_reason "abort" (the caller retries them);
  "retract" / "in_place" keep them, and they then finish on the new weights.
- SGLang's engine lives on the event loop that is current when it is built (`Engine.loop`), and
  its tokenizer manager receives results only while that loop runs. The adapter builds it in a
  thread of its own, so that loop is a private one, and runs the loop in that thread: any thread
  may then call any method (a `pause` while another thread waits on a batch reaches a live
  loop), and a caller's own loop is never borrowed. (A Serve replica's sync `__init__` runs on
  the replica's user-code loop: an engine built there would live on a loop blocked by that very
  `__init__`, and the first weight load from it would deadlock.) `async_generate` awaits the
  engine's loop from whichever loop it is called on; sync methods called on the engine's own
  loop thread raise instead of deadlocking.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import torch

from async_pmd.engines.base import GenerationOutput, SamplingParams
from async_pmd.engines.checks import check_named_shapes, check_named_tensors, check_prompts, checkpoint_shapes

__all__ = ["SGLangEngine", "build_requests", "check_named_tensors", "check_prompts", "checkpoint_shapes",
           "group_outputs", "parse_output", "run_on_loop", "to_sglang_sampling_params"]

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


# ---------------------------------------------------------------- the engine


class SGLangEngine:
    """An in-process `sglang.Engine` (its scheduler runs in subprocesses) behind `InferenceEngine`.

    Owns the SGLang engine and our weight `version`, which is also sent to SGLang as its
    `weight_version` string on every weight load (it then shows in SGLang's metrics and
    `get_model_info()`).
    """

    def __init__(
        self,
        model_path: str | os.PathLike,
        tokenizer=None,
        *,
        device: str | None = None,
        tp_size: int = 1,
        dp_size: int = 1,
        mem_fraction_static: float = 0.8,
        random_seed: int = 0,
        dtype: str = "auto",
        deterministic: bool | None = None,
        pause_mode: PauseMode = "abort",
        max_prompt_length: int | None = None,
        extra: Mapping[str, Any] | None = None,
        **engine_kwargs: Any,
    ):
        """`tokenizer` is accepted for symmetry with TorchEngine and unused (ids in, ids out).
        `device` "cpu" selects SGLang's CPU engine (`SGLANG_USE_CPU_ENGINE=1`, set here before
        sglang is imported); None lets SGLang pick (CUDA). `deterministic` is SGLang's
        `enable_deterministic_inference` (what makes `sampling_seed` fix a sample); None = on
        unless the device is the CPU, whose attention backends refuse it. `extra` and any other
        keywords go to `sglang.Engine` (ServerArgs fields). `dtype` "auto" is SGLang's: fp16 for
        an fp32 checkpoint."""
        from async_pmd.engines import SGLANG_INSTALL_HINT

        if dp_size != 1:
            raise ValueError(
                "SGLang 0.5.23 cannot update weights from tensors with dp_size > 1; "
                "scale with more generator replicas instead"
            )
        kwargs = {**dict(extra or {}), **engine_kwargs}
        device = kwargs.pop("device", device)  # also accepted inside `extra` (generator.sglang.extra)
        on_cpu = device == "cpu"
        if on_cpu:
            # Read once, at sglang's import (`srt/utils/common.py: is_cpu`), by this process and
            # the scheduler processes it spawns.
            os.environ["SGLANG_USE_CPU_ENGINE"] = "1"
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
        self._deterministic = (not on_cpu) if deterministic is None else bool(deterministic)
        self._warned_truncation = False
        self._warned_seed = False
        if device is not None:
            kwargs["device"] = device
        engine_args = dict(
            model_path=str(self._model_path),
            skip_tokenizer_init=True,  # token ids in and out; no detokenizer work
            tp_size=tp_size,
            mem_fraction_static=mem_fraction_static,
            random_seed=random_seed,
            dtype=dtype,
            enable_deterministic_inference=self._deterministic,
            **kwargs,
        )
        self._engine, self._loop_thread = _start_on_own_thread(lambda: sglang.Engine(**engine_args))

    @property
    def version(self) -> int:
        return self._version

    @property
    def sglang_engine(self):
        """The underlying `sglang.Engine` (for SGLang's own API beyond this protocol)."""
        return self._engine

    def generate(self, prompt_ids: list[list[int]], params: SamplingParams) -> list[list[GenerationOutput]]:
        return self._run(self.async_generate(prompt_ids, params))

    async def async_generate(self, prompt_ids: list[list[int]], params: SamplingParams) -> list[list[GenerationOutput]]:
        """`generate` for callers inside an event loop (an async Serve replica)."""
        input_ids, sampling = self._prepare(prompt_ids, params)
        version = self._version
        request = self._engine.async_generate(input_ids=input_ids, sampling_params=sampling, return_logprob=True)
        if asyncio.get_running_loop() is self._engine.loop:
            outputs = await request
        else:  # another loop (a Serve replica's) awaits the engine's
            outputs = await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(request, self._engine.loop))
        return group_outputs(outputs, params.n, version)

    def update_weights(self, named_tensors: Mapping[str, torch.Tensor], version: int) -> None:
        """Checked against the checkpoint's names and shapes first (nothing sent on ValueError),
        then loaded by SGLang inside a weight-update session (it may cast dtype); its radix cache
        is flushed, and a refused flush fails the update (RuntimeError).

        Builds the same request as 0.5.23's `Engine.update_weights_from_tensor` (one serialized
        payload per TP rank, each rank deserializing only its own), so that it can also run on a
        loop busy in another thread.
        """
        from sglang.srt.managers.io_struct import UpdateWeightsFromTensorReqInput
        from sglang.srt.utils import MultiprocessingSerializer

        pairs = [(name, torch.as_tensor(t)) for name, t in named_tensors.items()]
        check_named_tensors(dict(pairs), self._shapes)
        request = UpdateWeightsFromTensorReqInput(
            serialized_named_tensors=[MultiprocessingSerializer.serialize(pairs) for _ in range(self._tp_size)],
            load_format=None,
            flush_cache=True,
            weight_version=str(version),
        )
        manager = self._engine.tokenizer_manager
        self._run(self._in_weight_session(manager.update_weights_from_tensor(request, None), version))
        self._version = int(version)

    def init_weight_sync_group(
        self, *, master_address: str, master_port: int, rank_offset: int, world_size: int,
        group_name: str, backend: str = "nccl",
    ) -> None:
        """Join the learner's weight-broadcast group (SGLang's `init_weights_update_group`): the
        learner is rank 0 and hosts the rendezvous; this engine's TP ranks are rank_offset….
        Blocks until every rank has joined. `backend` gloo on CPU, nccl on GPU."""
        from sglang.srt.managers.io_struct import InitWeightsUpdateGroupReqInput

        request = InitWeightsUpdateGroupReqInput(
            master_address=master_address, master_port=master_port, rank_offset=rank_offset,
            world_size=world_size, group_name=group_name, backend=backend,
        )
        success, message = self._run(self._engine.tokenizer_manager.init_weights_update_group(request, None))
        if not success:
            raise RuntimeError(f"SGLang could not join weight-sync group {group_name!r}: {message}")

    def update_weights_from_distributed(
        self, names: Sequence[str], dtypes: Sequence[str], shapes: Sequence[Sequence[int]],
        version: int, *, group_name: str,
    ) -> None:
        """Receive `names` broadcast by rank 0 of `group_name`, in that order, and load them inside
        a weight-update session. The learner must broadcast each tensor (src 0) meanwhile."""
        from sglang.srt.managers.io_struct import UpdateWeightsFromDistributedReqInput

        check_named_shapes(dict(zip(names, shapes)), self._shapes)
        request = UpdateWeightsFromDistributedReqInput(
            names=list(names), dtypes=[str(d).removeprefix("torch.") for d in dtypes],
            shapes=[list(s) for s in shapes], group_name=group_name, flush_cache=True,
            weight_version=str(version),
        )
        manager = self._engine.tokenizer_manager
        self._run(self._in_weight_session(manager.update_weights_from_distributed(request, None), version))
        self._version = int(version)

    @property
    def weight_sync_ranks(self) -> int:
        """Ranks this engine brings to a weight-broadcast group: one per TP rank."""
        return self._tp_size

    def destroy_weight_sync_group(self, group_name: str) -> None:
        """Leave a weight-broadcast group (SGLang's `destroy_weights_update_group`)."""
        from sglang.srt.managers.io_struct import DestroyWeightsUpdateGroupReqInput

        request = DestroyWeightsUpdateGroupReqInput(group_name=group_name)
        success, message = self._run(self._engine.tokenizer_manager.destroy_weights_update_group(request, None))
        if not success:
            logger.warning("SGLang could not leave weight-sync group %r: %s", group_name, message)

    def update_weights_from_disk(self, model_path: str | os.PathLike, version: int) -> None:
        """Load a whole HF checkpoint directory (e.g. a learner's saved step) in place."""
        from sglang.srt.managers.io_struct import UpdateWeightFromDiskReqInput

        request = UpdateWeightFromDiskReqInput(model_path=str(model_path), weight_version=str(version))
        success, message, *_ = self._run(self._engine.tokenizer_manager.update_weights_from_disk(request, None))
        if not success:
            raise RuntimeError(f"SGLang could not load {model_path}: {message}")
        self._version = int(version)

    def weight_version(self) -> str | None:
        """SGLang's own record of the loaded weight version (our `version`, as a string)."""
        return self._engine.get_model_info()["weight_version"]

    def pause(self) -> None:
        self._run(self._engine.tokenizer_manager.pause_generation(self._pause_request))

    def resume(self) -> None:
        self._run(self._engine.tokenizer_manager.continue_generation(self._continue_request))

    def flush_cache(self) -> None:
        """Drop SGLang's radix (prefix) cache; RuntimeError when SGLang refuses (requests running)."""
        result = self._run(self._engine.tokenizer_manager.flush_cache())
        if not result.success:
            raise RuntimeError(f"SGLang refused to flush its cache: {result.message or 'requests still running'}")

    def shutdown(self) -> None:
        self._engine.shutdown()
        self._engine.loop.call_soon_threadsafe(self._engine.loop.stop)
        self._loop_thread.join(timeout=10)

    # ------------------------------------------------------------ helpers

    async def _in_weight_session(self, load, version: int) -> None:
        """Run the weight-load coroutine `load` between SGLang's begin/end_weight_update.

        The session is closed even when the load fails, so the next update can open one.
        """
        from sglang.srt.managers.io_struct import BeginWeightUpdateReqInput, EndWeightUpdateReqInput

        manager = self._engine.tokenizer_manager
        ok, message = await manager.begin_weight_update(BeginWeightUpdateReqInput(), None)
        if not ok:
            load.close()
            raise RuntimeError(f"SGLang refused to open a weight-update session for version {version}: {message}")
        try:
            ok, message = await load
        finally:
            end_ok, end_message = await manager.end_weight_update(EndWeightUpdateReqInput(), None)
        if not ok:
            raise RuntimeError(f"SGLang refused the weight update to version {version}: {message}")
        if not end_ok:
            raise RuntimeError(f"SGLang could not close the weight-update session of version {version}: {end_message}")

    def _prepare(self, prompt_ids, params: SamplingParams):
        limit = self._max_prompt_length or self._max_positions - params.max_new_tokens
        check_prompts(prompt_ids, limit)
        if (params.top_k_enabled or params.top_p < 1.0) and not self._warned_truncation:
            self._warned_truncation = True
            logger.warning("SGLang log-probs ignore top-k/top-p truncation; the PMD anchor is then approximate")
        if params.seed is not None and not self._deterministic and not self._warned_seed:
            self._warned_seed = True
            logger.warning("SGLang ignores sampling seeds without enable_deterministic_inference "
                           "(which its CPU backends refuse): seeded samples are not reproducible here")
        return build_requests(prompt_ids, params)

    def _run(self, coroutine):
        return run_on_loop(self._engine.loop, coroutine)


def _start_on_own_thread(build):
    """Run `build()` (→ an `sglang.Engine`) in a new thread with no event loop, then that engine's
    loop forever in the same thread; returns (engine, thread), or raises what `build` raised.

    One thread for both on purpose: SGLang's child processes die with the *thread* that started
    them (PR_SET_PDEATHSIG follows the creating thread), so that thread must live as long as the
    engine.
    """
    ready = threading.Event()
    result: dict = {}

    def target():
        try:
            engine = build()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            result["error"] = exc
            ready.set()
            return
        result["engine"] = engine
        ready.set()
        engine.loop.run_forever()

    thread = threading.Thread(target=target, name="sglang-engine-loop", daemon=True)
    thread.start()
    ready.wait()
    if "error" in result:
        raise result["error"]
    return result["engine"], thread


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
