"""The prompt record, and how a prompt is prepared for a tokenizer.

Every source (synthetic task or file) yields `Prompt`s. Once, at load time, `filter_by_length`
formats and tokenizes each (`format_prompt`), drops or cuts the over-long ones, and keeps the
token ids on the prompt, so the RolloutDriver and validation send them (`generation_request`)
without tokenizing again.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np

from async_pmd import wire

logger = logging.getLogger(__name__)

LengthPolicy = Literal["filter", "truncate", "error"]


@dataclasses.dataclass(frozen=True)
class Prompt:
    """One prompt of a source.

    `index` is the record's position in its source (stable across runs and resumes; filtering
    keeps the original index). `answer` is the ground truth the reward function receives.
    `extra` holds msgpack/JSON-native values only (the task name, a file row's other columns).
    `token_ids` are the formatted prompt's tokens, set by `filter_by_length` (a derived value:
    not part of equality).
    """

    index: int
    text: str
    answer: str
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    token_ids: tuple[int, ...] = dataclasses.field(default=(), compare=False)


def format_prompt(
    text: str,
    tokenizer: Any,
    apply_chat_template: bool,
    *,
    messages: list[dict[str, str]] | None = None,
) -> str:
    """The string to tokenize for generation.

    With `apply_chat_template` on and a tokenizer that has a `chat_template`, the text becomes a
    single user turn followed by the generation prompt; `messages` (a file row's full chat, see
    `files.py`) replaces that single turn when given. Otherwise the text is returned unchanged,
    which is what the character-level tiny model of the embedded default wants.
    """
    if not apply_chat_template or getattr(tokenizer, "chat_template", None) is None:
        return text
    chat = messages if messages is not None else [{"role": "user", "content": text}]
    return tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)


def filter_by_length(
    prompts: Sequence[Prompt],
    tokenize_fn: Callable[[str], Sequence[int]],
    max_prompt_length: int,
    policy: LengthPolicy = "filter",
) -> tuple[list[Prompt], int]:
    """Apply the prompt length limit; returns (kept prompts with their `token_ids`, number
    filtered or truncated).

    `tokenize_fn(text)` gives the token ids the engine will see, so pass one that formats first
    (`lambda t: tok(format_prompt(t, tok, True))["input_ids"]`) when a chat template is used.
    Policies:
      - "filter": drop prompts longer than `max_prompt_length` tokens;
      - "truncate": keep the LEFT part of the text, the longest character prefix whose tokens
        fit (found by bisection). This keeps instructions that lead a prompt but cuts a question
        at its end, so prefer "filter" for question-last data;
      - "error": raise ValueError naming the first over-long prompt's index and length.
    """
    if max_prompt_length < 1:
        raise ValueError(f"max_prompt_length must be >= 1, got {max_prompt_length}")
    if policy not in ("filter", "truncate", "error"):
        raise ValueError(f"policy must be 'filter', 'truncate' or 'error', got {policy!r}")
    kept: list[Prompt] = []
    n_affected = 0
    for prompt in prompts:
        ids = tuple(tokenize_fn(prompt.text))
        length = len(ids)
        if length <= max_prompt_length:
            kept.append(dataclasses.replace(prompt, token_ids=ids))
            continue
        if policy == "error":
            raise ValueError(
                f"prompt index {prompt.index} is {length} tokens long, over max_prompt_length="
                f"{max_prompt_length}; set the length policy to 'filter' or 'truncate'"
            )
        n_affected += 1
        if policy == "truncate":
            cut = _longest_fitting_prefix(prompt.text, tokenize_fn, max_prompt_length)
            cut_ids = tuple(tokenize_fn(cut))
            if len(cut_ids) > max_prompt_length:  # the template alone is too long
                raise ValueError(
                    f"prompt index {prompt.index}: even an empty text is over max_prompt_length="
                    f"{max_prompt_length} tokens after formatting; raise the limit"
                )
            kept.append(dataclasses.replace(_with_text(prompt, cut), token_ids=cut_ids))
    if n_affected:
        logger.info("length policy %r affected %d of %d prompts", policy, n_affected, len(prompts))
    return kept, n_affected


def _with_text(prompt: Prompt, text: str) -> Prompt:
    """The prompt with new text; a file row's chat (extra["messages"]) gets it as its last user turn."""
    extra = prompt.extra
    if "messages" in extra:
        messages = [dict(m) for m in extra["messages"]]
        last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
        messages[last_user]["content"] = text
        extra = {**extra, "messages": messages}
    return dataclasses.replace(prompt, text=text, extra=extra)


def _longest_fitting_prefix(
    text: str, tokenize_fn: Callable[[str], Sequence[int]], max_len: int
) -> str:
    # Bisection on the character count: token counts of prefixes grow (almost) monotonically;
    # whatever bisection returns is checked to fit, so a BPE wobble can only make it shorter.
    lo, hi = 0, len(text)  # invariant: text[:lo] fits, text[:hi + 1] does not
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if len(tokenize_fn(text[:mid])) <= max_len:
            lo = mid
        else:
            hi = mid - 1
    return text[:lo]


_SCALARS = (bool, int, float, str)


def generation_request(request_id: int, attempt: int, uids: Sequence[str], prompts: Sequence[Prompt],
                       sampling: dict[str, Any]) -> wire.GenerationRequest:
    """The wire request for `prompts` (which carry their `token_ids`), one uid each; only the
    scalar extras travel (the reward function's side inputs)."""
    for p in prompts:
        if not p.token_ids:
            raise ValueError(f"prompt index {p.index} has no token_ids: build sources with a tokenize_fn")
    return wire.GenerationRequest(
        request_id=request_id, attempt=attempt, uids=list(uids),
        prompt_ids=[np.asarray(p.token_ids, np.int32) for p in prompts], prompt_texts=[p.text for p in prompts],
        answers=[p.answer for p in prompts], sample_indices=[p.index for p in prompts],
        extras=[{k: v for k, v in p.extra.items() if isinstance(v, _SCALARS)} for p in prompts],
        sampling=dict(sampling),
    )
