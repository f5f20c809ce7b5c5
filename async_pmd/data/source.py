"""PromptSource: the RolloutDriver's view of a dataset, an endless stream of prompts in epochs.

The cursor (epoch, position, shuffle seed) is the whole state; a checkpoint stores
`state_dict()` and a resumed run continues with exactly the prompts the original would have
read next.
"""

from __future__ import annotations

import logging
import random
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

from async_pmd.data.files import load_prompts
from async_pmd.data.prompt import LengthPolicy, Prompt, filter_by_length, format_prompt
from async_pmd.data.synthetic import make_task

if TYPE_CHECKING:
    from async_pmd.config import DataConfig

logger = logging.getLogger(__name__)

STATE_VERSION = 1
_STATE_TYPES = {"version": int, "epoch": int, "position": int, "shuffle_seed": int,
                "shuffle": bool, "num_prompts": int, "fingerprint": int}  # fmt: skip


class PromptSource:
    """A fixed list of prompts read in order, epoch after epoch.

    Epoch e reads the prompts in the permutation drawn by `random.Random(shuffle_seed + e)`
    (or in list order when `shuffle` is off). Invariants: 0 <= position < len(self); the
    prompts never change after construction (the state's fingerprint checks that on load).
    """

    def __init__(self, prompts: Sequence[Prompt], *, shuffle_seed: int = 0, shuffle: bool = True):
        if not prompts:
            raise ValueError("a PromptSource needs at least one prompt")
        self._prompts = list(prompts)
        self._fingerprint = _fingerprint(self._prompts)
        self._shuffle_seed = shuffle_seed
        self._shuffle = shuffle
        self._epoch = 0
        self._position = 0
        self._order = self._order_for(0)

    def __len__(self) -> int:
        return len(self._prompts)

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def consumed(self) -> int:
        """Prompts handed out since the start of epoch 0."""
        return self._epoch * len(self) + self._position

    def next_batch(self, k: int) -> list[Prompt]:
        """The next k prompts, crossing into the next epoch (and its new order) as needed."""
        if k < 0:
            raise ValueError(f"batch size must be >= 0, got {k}")
        batch: list[Prompt] = []
        while len(batch) < k:
            take = min(k - len(batch), len(self) - self._position)
            batch.extend(self._prompts[i] for i in self._order[self._position : self._position + take])
            self._position += take
            if self._position == len(self):
                self._epoch += 1
                self._position = 0
                self._order = self._order_for(self._epoch)
        return batch

    def state_dict(self) -> dict[str, Any]:
        """The cursor as plain ints and bools (JSON and msgpack native)."""
        return {
            "version": STATE_VERSION,
            "epoch": self._epoch,
            "position": self._position,
            "shuffle_seed": self._shuffle_seed,
            "shuffle": self._shuffle,
            "num_prompts": len(self),
            "fingerprint": self._fingerprint,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume from `state_dict()`; raises ValueError if it is malformed or from other data.

        The state's shuffle seed wins over the constructor's: resuming must replay the order the
        saved run was using.
        """
        _validate_state(state, len(self), self._fingerprint)
        if (state["shuffle_seed"], state["shuffle"]) != (self._shuffle_seed, self._shuffle):
            logger.info(
                "resuming with the saved shuffle (seed=%d, shuffle=%s), not the configured one",
                state["shuffle_seed"], state["shuffle"],
            )
        self._shuffle_seed = state["shuffle_seed"]
        self._shuffle = state["shuffle"]
        self._epoch = state["epoch"]
        self._position = state["position"]
        self._order = self._order_for(self._epoch)

    def _order_for(self, epoch: int) -> list[int]:
        order = list(range(len(self)))
        if self._shuffle:
            random.Random(self._shuffle_seed + epoch).shuffle(order)
        return order


def _fingerprint(prompts: list[Prompt]) -> int:
    crc = 0
    for p in prompts:
        crc = zlib.crc32(f"{p.index}\x1f{p.text}\x1f{p.answer}\x1e".encode("utf-8"), crc)
    return crc


def _validate_state(state: Mapping[str, Any], num_prompts: int, fingerprint: int) -> None:
    if not isinstance(state, Mapping):
        raise ValueError(f"PromptSource state must be a mapping, got {type(state).__name__}")
    for key, kind in _STATE_TYPES.items():
        value = state.get(key)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ValueError(f"PromptSource state: {key!r} must be {kind.__name__}, got {value!r}")
    if state["version"] != STATE_VERSION:
        raise ValueError(f"PromptSource state version {state['version']}, expected {STATE_VERSION}")
    if state["num_prompts"] != num_prompts or state["fingerprint"] != fingerprint:
        raise ValueError(
            f"PromptSource state was saved over other data ({state['num_prompts']} prompts, "
            f"fingerprint {state['fingerprint']}; this source has {num_prompts}, {fingerprint}): "
            "check the data files, task, split, seed and length limit"
        )
    if state["epoch"] < 0 or not 0 <= state["position"] < num_prompts:
        raise ValueError(
            f"PromptSource state: epoch {state['epoch']} / position {state['position']} out of "
            f"range for {num_prompts} prompts"
        )


SourceKind = Literal["synthetic", "files", "jsonl", "parquet"]


def build_prompts(
    kind: SourceKind,
    *,
    task: str | None = None,
    files: str | Sequence[str] | Mapping[str, str | Sequence[str]] | None = None,
    split: str = "train",
    seed: int = 0,
    size: int | None = None,
    prompt_key: str = "prompt",
    answer_key: str = "answer",
    cache_dir: str | None = None,
) -> list[Prompt]:
    """The prompt list of a source.

    kind "files" reads jsonl or parquet by suffix; "jsonl" / "parquet" also insist on that
    format. `files` may map split names to files ({"train": ..., "val": ...}).
    """
    if kind == "synthetic":
        if task is None:
            raise ValueError("a synthetic source needs task= (add_mod10, reverse or gsm_tiny)")
        return make_task(task, split=split, seed=seed, size=size)
    if kind in ("files", "jsonl", "parquet"):
        if files is None:
            raise ValueError("a files source needs files= (a path, a list, or {split: paths})")
        if isinstance(files, Mapping):
            if split not in files:
                raise ValueError(f"no files for split {split!r}; the splits given are {sorted(files)}")
            files = files[split]
        return load_prompts(
            files, prompt_key=prompt_key, answer_key=answer_key, size=size, cache_dir=cache_dir,
            expect_format=None if kind == "files" else kind,
        )  # fmt: skip
    raise ValueError(f"unknown source kind {kind!r}; use 'synthetic', 'files', 'jsonl' or 'parquet'")


def build_source(
    kind: SourceKind,
    *,
    task: str | None = None,
    files: str | Sequence[str] | Mapping[str, str | Sequence[str]] | None = None,
    split: str = "train",
    seed: int = 0,
    size: int | None = None,
    prompt_key: str = "prompt",
    answer_key: str = "answer",
    cache_dir: str | None = None,
    shuffle: bool = True,
    tokenize_fn: Callable[[str], Sequence[int]] | None = None,
    max_prompt_length: int | None = None,
    length_policy: LengthPolicy = "filter",
) -> PromptSource:
    """The prompts of `build_prompts`, length-limited when `tokenize_fn` and `max_prompt_length`
    are both given (see `filter_by_length`), in a PromptSource whose shuffle seed is `seed`."""
    prompts = build_prompts(
        kind, task=task, files=files, split=split, seed=seed, size=size,
        prompt_key=prompt_key, answer_key=answer_key, cache_dir=cache_dir,
    )  # fmt: skip
    if tokenize_fn is not None and max_prompt_length is not None:
        n_before = len(prompts)
        prompts, _ = filter_by_length(prompts, tokenize_fn, max_prompt_length, length_policy)
        if not prompts:
            raise ValueError(
                f"all {n_before} prompts are over max_prompt_length={max_prompt_length} tokens; "
                "raise it or use the 'truncate' policy"
            )
    return PromptSource(prompts, shuffle_seed=seed, shuffle=shuffle)


def configured_source(data: DataConfig, tokenizer, split: str) -> PromptSource:
    """The `data` section's prompts of `split`, formatted, tokenized once and length-limited with
    the tokens the engine will see."""
    synthetic = data.source == "synthetic"
    return build_source(
        "synthetic" if synthetic else "files", task=data.task if synthetic else None,
        files=None if synthetic else {"train": data.train_files, "val": data.val_files}, split=split,
        seed=data.seed, size=data.synthetic_size if synthetic and split == "train" else None,
        prompt_key=data.prompt_key, answer_key=data.answer_key, shuffle=data.shuffle,
        tokenize_fn=lambda t: tokenizer(format_prompt(t, tokenizer, data.apply_chat_template),
                                        add_special_tokens=False)["input_ids"],
        max_prompt_length=data.max_prompt_length, length_policy=data.overlong_prompts,
    )
