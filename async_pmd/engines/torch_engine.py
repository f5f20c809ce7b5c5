"""The torch inference engine: batched sampling with a KV cache over a transformers causal LM.

The default engine of the embedded (CPU) setup; it runs unchanged on a GPU. One `generate` call is
one batch: prompts × n rows, left-padded, decoded token by token with the model's own KV cache
until every row has stopped or `max_new_tokens` is reached. The token loop does only batched
tensor ops; per-row Python work happens once, after it.

Log-probs are those of the distribution each token was drawn from (π_old of the PMD loss):
    sampling:  log_softmax(mask_top_p(mask_top_k(logits / T)))[token]
    greedy (T = 0):  log_softmax(logits)[argmax]   (untempered, unmasked: the SGLang convention)
Top-k keeps every token tied with the k-th value; top-p keeps the smallest prefix of the sorted
distribution whose mass reaches p (a token is dropped when the mass before it exceeds p).

Randomness is keyed, not streamed: row r's token at response position t is drawn by inverse CDF
at a uniform that is a hash of (the row's key, t), so a response continued later from its prompt
+ tokens so far (partial rollouts) samples what it would have sampled uninterrupted.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import os
import threading
from contextlib import contextmanager
from typing import Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from async_pmd import weight_broadcast
from async_pmd.engines.base import GenerationOutput, SamplingParams
from async_pmd.engines.checks import check_named_shapes, check_prompts

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------- sampling (pure tensor functions)


def mask_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """(B, V) logits with tokens outside top-k / top-p set to -inf (top_k <= 0, top_p == 1: off)."""
    vocab = logits.shape[-1]
    if 0 < top_k < vocab:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, V) each
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs
        drop_sorted = mass_before > top_p  # the most likely token always stays
        drop = drop_sorted.scatter(-1, order, drop_sorted)  # back to vocabulary order
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


_M32 = 0xFFFFFFFF
_HASH_MUL = 0x45D9F3B  # < 2**27: every product of a 32-bit value stays inside int64


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (xorshift-multiply) of int64 values in [0, 2**32), elementwise."""
    x = x ^ (x >> 16)
    x = (x * _HASH_MUL) & _M32
    x = x ^ (x >> 16)
    x = (x * _HASH_MUL) & _M32
    return x ^ (x >> 16)


def keyed_uniforms(keys: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """(B,) float64 in (0, 1), a pure function of each row's (key, response position).

    Counter-based rather than a stream: the draw for position t does not depend on how many
    draws came before it in this batch, so a continuation sampled in another batch, on another
    replica, reproduces the uninterrupted row (partial rollouts)."""
    h = _mix32((keys >> 32) & _M32)
    h = _mix32(h ^ (keys & _M32))
    h = _mix32(h ^ (positions & _M32))
    return (h.double() + 0.5) / 2.0**32


def sample_tokens(
    logits: torch.Tensor, params: SamplingParams, keys: torch.Tensor, positions: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, V) float logits → (tokens (B,) int64, log-probs (B,) float32) per the module docstring.

    Sampling is by inverse CDF at `keyed_uniforms(keys, positions)`: the first token whose
    cumulative probability exceeds u (a masked token, of probability 0, is never the first)."""
    if params.greedy:
        tokens = logits.argmax(dim=-1)
        logprobs = F.log_softmax(logits, dim=-1)
    else:
        logprobs = F.log_softmax(mask_logits(logits / params.temperature, params.top_k, params.top_p), dim=-1)
        cdf = logprobs.double().exp().cumsum(dim=-1)  # (B, V)
        target = keyed_uniforms(keys, positions) * cdf[:, -1]
        tokens = torch.searchsorted(cdf, target[:, None], right=True).squeeze(-1).clamp_(max=cdf.shape[-1] - 1)
    return tokens, logprobs.gather(-1, tokens[:, None]).squeeze(-1)


def left_pad(rows: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Ragged token rows → (input_ids (B, T) int64, attention_mask (B, T) int64), padded on the left."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row) :] = 1
    return ids.to(device), mask.to(device)


# ---------------------------------------------------------------- the engine


class TorchEngine:
    """A transformers causal LM served for rollouts; implements `InferenceEngine`.

    Owns the model (eval mode, no grad), its weight `version`, and a condition variable that keeps
    `generate` batches and `update_weights` from interleaving: each holds the engine exclusively
    for its whole duration, and `pause` blocks new batches until `resume`.
    """

    def __init__(
        self,
        model: str | os.PathLike | torch.nn.Module,
        tokenizer=None,
        *,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "float32",
        num_threads: int | None = None,
        max_prompt_length: int | None = None,
        eos_token_ids: tuple[int, ...] | None = None,
    ):
        """`model` is a local HF directory (loaded with `dtype` onto `device`) or a loaded model
        (used as is). `num_threads` sets torch's intra-op threads for the whole process.
        `max_prompt_length` defaults to max_position_embeddings - max_new_tokens per call.
        EOS ids come from `eos_token_ids`, else the model config, else the tokenizer."""
        from async_pmd.models import load_model

        if num_threads is not None:
            torch.set_num_threads(num_threads)
        if isinstance(model, torch.nn.Module):
            self._model = model.eval()
        else:
            self._model = load_model(model, dtype=dtype, device=device)
        self._device = next(self._model.parameters()).device
        config = self._model.config
        self._vocab_size: int = config.vocab_size
        self._max_positions: int = config.max_position_embeddings
        self._max_prompt_length = max_prompt_length
        self._eos_ids = _resolve_eos_ids(eos_token_ids, config, tokenizer)
        self._pad_id = _first_not_none(config.pad_token_id, getattr(tokenizer, "pad_token_id", None), 0)
        # transformers 5 renamed forward(past_key_values=) to cache=; accept both generations.
        forward_params = inspect.signature(self._model.forward).parameters
        self._cache_kw = "cache" if "cache" in forward_params else "past_key_values"
        # Parameters and persistent buffers by state_dict name, tied aliases (lm_head.weight) included.
        self._tensors: dict[str, torch.Tensor] = dict(self._model.state_dict(keep_vars=True))
        self._adopted: set[int] = set()  # ids of the tensors whose memory `adopt_weights` took
        self._version = 0
        self._weight_groups: dict = {}  # group name -> torch ProcessGroup (`init_weight_sync_group`)
        self._cond = threading.Condition()  # guards the three flags below
        self._busy = False  # a batch or weight update holds the model
        self._paused = False  # new batches wait until resume()
        self._closed = False

    # ------------------------------------------------------------ protocol

    @property
    def version(self) -> int:
        return self._version

    @property
    def model(self) -> torch.nn.Module:
        return self._model

    def generate(self, prompt_ids: list[list[int]], params: SamplingParams) -> list[list[GenerationOutput]]:
        """Per prompt, `params.n` responses. ValueError (before any work) on an empty prompt, an
        over-long one, or a token id outside the vocabulary, naming the prompt index."""
        self._validate_prompts(prompt_ids, params)
        rows = [list(p) for p in prompt_ids for _ in range(params.n)]  # prompt-major: row = i*n + j
        keys, starts = self._row_keys(params, len(rows))
        with self._exclusive(wait_for_resume=True):
            version = self._version
            with torch.inference_mode():
                tokens, logprobs, lengths, stopped = self._decode(rows, params, keys, starts)
        return _to_outputs(tokens, logprobs, lengths, stopped, params.n, version)

    def update_weights(self, named_tensors: Mapping[str, torch.Tensor], version: int) -> None:
        """Copy `named_tensors` into the model in place and set `version`.

        Names are state_dict names; a subset is a partial update (the rest keep their values).
        Every name and shape is checked before anything is copied: on ValueError the old weights
        are intact. Tensors may be of another dtype or device (or numpy arrays); storage is
        reused (`data_ptr` unchanged), except a tensor's that `adopt_weights` took, which may be
        read-only and is replaced by a copy. A tied alias (e.g. lm_head.weight) writes the shared tensor.
        """
        self._load(named_tensors, version, adopt=False)

    def adopt_weights(self, named_tensors: Mapping[str, torch.Tensor], version: int) -> None:
        """As `update_weights`, but a tensor already on the model's device, of its dtype and
        contiguous becomes the model's own (no copy). The caller never writes them afterwards:
        they may be read-only views of a message in shared memory
        (`NamedTensors.to_torch(share_readonly=True)`), kept mapped until the next load. A
        generator replica's pull then moves no bytes; the message is mapped in, page by page,
        by the first batch that reads it."""
        self._load(named_tensors, version, adopt=True)

    def _load(self, named_tensors: Mapping[str, torch.Tensor], version: int, *, adopt: bool) -> None:
        incoming = {name: torch.as_tensor(t) for name, t in named_tensors.items()}
        self._validate_weights(incoming)
        with self._exclusive(wait_for_resume=False), torch.no_grad():
            for name, tensor in incoming.items():
                target = self._tensors[name]  # a Parameter (or buffer): tied aliases are one object
                if adopt and tensor.device == target.device and tensor.dtype == target.dtype \
                        and tensor.is_contiguous():
                    target.data = tensor
                    self._adopted.add(id(target))
                elif id(target) in self._adopted:  # its memory is the caller's: never written
                    target.data = tensor.to(device=target.device, dtype=target.dtype, copy=True)
                    self._adopted.discard(id(target))
                else:
                    target.data.copy_(tensor)
            self._version = int(version)

    # ------------------------------------------------------------ weights by broadcast (`collective`)

    weight_sync_ranks = 1
    """Ranks this engine brings to a weight-broadcast group (SGLang: its TP size)."""

    def init_weight_sync_group(self, *, master_address: str, master_port: int, rank_offset: int, world_size: int,
                               group_name: str, backend: str = "gloo", timeout_s: float = 300.0) -> None:
        """Join the learner's weight-broadcast group as rank `rank_offset` (the learner is rank 0
        and hosts the rendezvous); blocks until every rank has joined. SGLang's signature."""
        self._weight_groups[group_name] = weight_broadcast.open_group(
            store=None, master_address=master_address, master_port=master_port, rank=rank_offset,
            world_size=world_size, group_name=group_name, backend=backend, timeout_s=timeout_s)

    def update_weights_from_distributed(self, names: Sequence[str], dtypes: Sequence[str],
                                        shapes: Sequence[Sequence[int]], version: int, *, group_name: str) -> None:
        """Receive `names` broadcast by rank 0 of `group_name`, in that order, and load them as
        `version`. Names and shapes are checked before the first broadcast is received."""
        check_named_shapes(dict(zip(names, shapes)), {n: tuple(t.shape) for n, t in self._tensors.items()})
        manifest = weight_broadcast.Manifest(version=int(version), names=tuple(names), dtypes=tuple(dtypes),
                                             shapes=tuple(tuple(s) for s in shapes))
        # Received into fresh tensors of the engine's own: kept, not copied again.
        self.adopt_weights(weight_broadcast.receive(manifest, self._weight_groups[group_name], self._device),
                           version)

    def destroy_weight_sync_group(self, group_name: str) -> None:
        group = self._weight_groups.pop(group_name, None)
        if group is not None:
            weight_broadcast.close(group)

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
            self._model = None
            self._tensors = {}
            self._cond.notify_all()

    # ------------------------------------------------------------ decoding

    def _decode(
        self, rows: list[list[int]], params: SamplingParams, keys: torch.Tensor, starts: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        """The token loop. Returns tokens (B, S), logprobs (B, S), lengths (B,), stopped (B,)."""
        batch, steps = len(rows), params.max_new_tokens
        input_ids, attention_mask = left_pad(rows, self._pad_id, self._device)
        positions = (attention_mask.cumsum(-1) - 1).clamp_(min=0)  # (B, T): pads share position 0
        stop_ids = self._stop_ids(params)
        out_tokens = torch.full((batch, steps), self._pad_id, dtype=torch.long, device=self._device)
        out_logprobs = torch.zeros((batch, steps), dtype=torch.float32, device=self._device)
        lengths = torch.zeros(batch, dtype=torch.long, device=self._device)
        done = torch.zeros(batch, dtype=torch.bool, device=self._device)

        logits, cache = self._forward(input_ids, attention_mask, positions, cache=None)
        next_position = positions[:, -1:] + 1  # (B, 1)
        for step in range(steps):
            tokens, logprobs = sample_tokens(logits, params, keys, starts + step)
            tokens = tokens.masked_fill(done, self._pad_id)  # finished rows idle on padding
            out_tokens[:, step] = tokens
            out_logprobs[:, step] = logprobs
            lengths += (~done).long()
            done |= torch.isin(tokens, stop_ids)
            if step == steps - 1 or bool(done.all()):
                break
            attention_mask = F.pad(attention_mask, (0, 1), value=1)
            logits, cache = self._forward(tokens[:, None], attention_mask, next_position, cache=cache)
            next_position += 1
        return out_tokens, out_logprobs, lengths, done  # done: the row ended on a stop token

    def _forward(self, input_ids, attention_mask, position_ids, cache):
        """One model step → (last-position logits (B, V) float32, cache)."""
        out = self._model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=True,
            logits_to_keep=1,
            **{self._cache_kw: cache},
        )
        return out.logits[:, -1, :].float(), getattr(out, self._cache_kw)

    def _stop_ids(self, params: SamplingParams) -> torch.Tensor:
        ids = set(params.stop_token_ids) | (set() if params.ignore_eos else set(self._eos_ids))
        return torch.tensor(sorted(ids), dtype=torch.long, device=self._device)

    def _row_keys(self, params: SamplingParams, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(keys (B,), start positions (B,)) int64: the given ones, else keys derived from the
        seed and the row (a fresh random seed when there is none) and starts at 0."""
        for name in ("row_seeds", "start_positions"):
            given = getattr(params, name)
            if given is not None and len(given) != batch:
                raise ValueError(f"{name} has {len(given)} entries for {batch} rows (prompts × n)")
        if params.row_seeds is not None:
            keys = list(params.row_seeds)
        else:
            seed = params.seed if params.seed is not None else int(torch.randint(0, 2**62, ()).item())
            keys = [derive_row_key(seed, row) for row in range(batch)]
        starts = params.start_positions or (0,) * batch
        as_tensor = lambda v: torch.tensor(v, dtype=torch.long, device=self._device)  # noqa: E731
        return as_tensor(keys), as_tensor(starts)

    # ------------------------------------------------------------ checks and locking

    def _validate_prompts(self, prompt_ids: list[list[int]], params: SamplingParams) -> None:
        limit = self._max_prompt_length
        if limit is None:
            limit = self._max_positions - params.max_new_tokens
        check_prompts(prompt_ids, limit)  # the engines' shared empty / over-long refusals
        for index, prompt in enumerate(prompt_ids):
            if min(prompt) < 0 or max(prompt) >= self._vocab_size:
                raise ValueError(f"prompt {index} has a token id outside [0, {self._vocab_size})")

    def _validate_weights(self, incoming: dict[str, torch.Tensor]) -> None:
        for name, tensor in incoming.items():
            if name not in self._tensors:
                raise ValueError(f"update_weights: unknown tensor {name!r} (not in the model's state_dict)")
            want = tuple(self._tensors[name].shape)
            if tuple(tensor.shape) != want:
                raise ValueError(f"update_weights: tensor {name!r} has shape {tuple(tensor.shape)}, the model's is {want}")

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


# ---------------------------------------------------------------- helpers


def _to_outputs(tokens, logprobs, lengths, stopped, n: int, version: int) -> list[list[GenerationOutput]]:
    tokens = tokens.cpu().numpy().astype(np.int32)
    logprobs = logprobs.cpu().numpy()
    lengths = lengths.cpu().numpy()
    stopped = stopped.cpu().numpy()
    outputs: list[list[GenerationOutput]] = [[] for _ in range(len(tokens) // n)]
    for row, length in enumerate(lengths):
        outputs[row // n].append(
            GenerationOutput(
                prompt_index=row // n,
                token_ids=tokens[row, :length],
                logprobs=logprobs[row, :length],
                finish_reason="stop" if stopped[row] else "length",
                policy_version=version,
            )
        )
    return outputs


def derive_row_key(seed: int, row: int) -> int:
    """A row's sampling key from a request seed and the row's index, in [0, 2**63)."""
    digest = hashlib.blake2b(f"{seed}|{row}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _resolve_eos_ids(explicit, config, tokenizer) -> tuple[int, ...]:
    eos = _first_not_none(explicit, config.eos_token_id, getattr(tokenizer, "eos_token_id", None))
    if eos is None:
        logger.warning("no EOS token id known: responses stop only at stop_token_ids or max_new_tokens")
        return ()
    return tuple(int(e) for e in eos) if isinstance(eos, (list, tuple)) else (int(eos),)


def _first_not_none(*values):
    return next((v for v in values if v is not None), None)
