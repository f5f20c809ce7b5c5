"""Checks every engine adapter runs before handing work to its engine: prompts and weight names/shapes.

Pure functions over token ids and a safetensors checkpoint's headers, so an adapter refuses bad
input with a clear ValueError before the engine (a subprocess, often) sees it.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any, Mapping, Sequence


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
    check_named_shapes({name: tuple(t.shape) for name, t in named_tensors.items()}, shapes)


def check_named_shapes(named_shapes: Mapping[str, Sequence[int]], shapes: Mapping[str, tuple[int, ...]]) -> None:
    """`check_named_tensors` for shapes alone (a broadcast announced before its tensors arrive)."""
    for name, shape in named_shapes.items():
        if name not in shapes:
            raise ValueError(f"update_weights: unknown tensor {name!r} (not in the checkpoint)")
        if tuple(shape) != shapes[name]:
            raise ValueError(f"update_weights: tensor {name!r} has shape {tuple(shape)}, the model's is {shapes[name]}")


def check_prompts(prompt_ids: Sequence[Sequence[int]], max_prompt_length: int) -> None:
    """ValueError naming the first empty or over-long prompt."""
    if not prompt_ids:
        raise ValueError("generate() needs at least one prompt")
    for index, prompt in enumerate(prompt_ids):
        if len(prompt) == 0:
            raise ValueError(f"prompt {index} is empty")
        if len(prompt) > max_prompt_length:
            raise ValueError(f"prompt {index} has {len(prompt)} tokens, more than max_prompt_length={max_prompt_length}")
