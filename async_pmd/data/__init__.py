"""Prompt sources: built-in synthetic tasks and local jsonl/parquet files, with a resumable cursor.

    source = build_source("synthetic", task="add_mod10", split="train", seed=0)
    batch = source.next_batch(32)          # list[Prompt]
    ckpt["data"] = source.state_dict()     # later: source.load_state_dict(ckpt["data"])
"""

from async_pmd.data.files import load_prompts
from async_pmd.data.prompt import LengthPolicy, Prompt, filter_by_length, format_prompt, generation_request
from async_pmd.data.source import PromptSource, build_prompts, build_source, configured_source
from async_pmd.data.synthetic import SYNTHETIC_ALPHABET, TASKS, make_task

__all__ = [
    "SYNTHETIC_ALPHABET",
    "TASKS",
    "LengthPolicy",
    "Prompt",
    "PromptSource",
    "build_prompts",
    "build_source",
    "configured_source",
    "filter_by_length",
    "format_prompt",
    "generation_request",
    "load_prompts",
    "make_task",
]
