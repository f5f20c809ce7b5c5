"""Prompts from local jsonl / parquet files, read through `datasets` (no hub access needed).

Rows are verl-compatible: `prompt_key` names a string or a chat list
(`[{"role": "user", "content": ...}]`), and `answer_key` may be dotted to reach a nested field
(`reward_model.ground_truth`). The other top-level columns go to `Prompt.extra`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from async_pmd.data.prompt import Prompt

logger = logging.getLogger(__name__)

BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def load_prompts(
    files: str | Sequence[str],
    *,
    prompt_key: str = "prompt",
    answer_key: str = "answer",
    size: int | None = None,
    cache_dir: str | None = None,
    expect_format: str | None = None,
) -> list[Prompt]:
    """Read the files (all jsonl/json or all parquet) in order; `index` is the row number.

    `size` keeps the first `size` rows. `cache_dir` is where `datasets` writes its Arrow cache
    (default: its own, ~/.cache/huggingface/datasets). `expect_format` ("jsonl" or "parquet")
    refuses files of the other format. Raises FileNotFoundError for a missing file, ValueError
    for a mixed, unknown or unexpected format, a missing key or an empty answer.
    """
    import datasets  # deferred: a second to import, and only file sources need it

    paths = [files] if isinstance(files, str) else list(files)
    builder = _builder_for(paths)
    if expect_format is not None and BUILDERS.get(f".{expect_format}") != builder:
        raise ValueError(f"data files {paths} are not {expect_format}")
    ds = datasets.load_dataset(builder, data_files=paths, split="train", cache_dir=cache_dir)
    for key in (prompt_key, answer_key):
        if key not in ds.column_names and key.split(".")[0] not in ds.column_names:
            raise ValueError(f"key {key!r} is not in {paths}; the columns are {ds.column_names}")
    if size is not None:
        ds = ds.select(range(min(size, len(ds))))
    prompts = [_to_prompt(i, row, prompt_key, answer_key) for i, row in enumerate(ds)]
    logger.info("loaded %d prompts from %s", len(prompts), paths)
    return prompts


def get_dotted(row: dict[str, Any], key: str) -> Any:
    """`row[key]` if that column exists, else the nested lookup `row["a"]["b"]` for "a.b"."""
    if key in row:
        return row[key]
    value: Any = row
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            raise ValueError(f"key {key!r} not found (missing part {part!r})")
        value = value[part]
    return value


def _builder_for(paths: list[str]) -> str:
    if not paths:
        raise ValueError("no data files given")
    builders = set()
    for p in paths:
        if not Path(p).is_file():
            raise FileNotFoundError(f"data file {p!r} does not exist")
        suffix = Path(p).suffix.lower()
        if suffix not in BUILDERS:
            raise ValueError(f"data file {p!r}: unknown format; use one of {sorted(BUILDERS)}")
        builders.add(BUILDERS[suffix])
    if len(builders) > 1:
        raise ValueError(f"data files mix formats {sorted(builders)}; give one format per source")
    return builders.pop()


def _to_prompt(index: int, row: dict[str, Any], prompt_key: str, answer_key: str) -> Prompt:
    try:
        raw_prompt = get_dotted(row, prompt_key)
        answer = get_dotted(row, answer_key)
    except ValueError as e:
        raise ValueError(f"row {index}: {e}") from None
    if answer is None:
        raise ValueError(f"row {index}: answer {answer_key!r} is empty")
    text, messages = _prompt_text(index, raw_prompt)
    used = {prompt_key.split(".")[0], answer_key.split(".")[0], prompt_key, answer_key}
    extra = {k: v for k, v in row.items() if k not in used}
    if messages is not None:
        extra["messages"] = messages
    return Prompt(index, text, str(answer), extra)


def _prompt_text(index: int, raw: Any) -> tuple[str, list[dict[str, str]] | None]:
    """(text, the full chat when it is more than one user turn, else None)."""
    if isinstance(raw, str):
        return raw, None
    if isinstance(raw, list) and raw and all(isinstance(m, dict) and "content" in m for m in raw):
        users = [m for m in raw if m.get("role") == "user"]
        if not users:
            raise ValueError(f"row {index}: the chat prompt has no user turn")
        messages = [{"role": m["role"], "content": m["content"]} for m in raw]
        return users[-1]["content"], (messages if len(raw) > 1 else None)
    kind = type(raw).__name__
    raise ValueError(f"row {index}: the prompt must be a string or a chat list, got {kind}")
