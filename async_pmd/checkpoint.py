"""Checkpoint directories that are never half-written.

A checkpoint is `<run_dir>/checkpoints/step_<k>/` holding the learner's DeepSpeed state
(`learner/`) and `trainer_state.json` (step, data cursor, pending prompts, accounting). Everything
is written into `step_<k>.tmp/` first and renamed when complete; a crash mid-write leaves only a
`.tmp` directory, which `latest()` never returns and the next save clears.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

STATE_FILE = "trainer_state.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def checkpoint_root(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "checkpoints"


def begin(run_dir: str | os.PathLike, step: int) -> Path:
    """A fresh temporary directory for the checkpoint of `step`."""
    tmp = checkpoint_root(run_dir) / f"step_{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def commit(tmp: Path, state: dict, max_to_keep: int) -> Path:
    """Write the trainer state, then atomically publish the directory and prune old ones."""
    state_path = tmp / STATE_FILE
    with open(state_path, "w") as f:
        json.dump(state, f)
        f.flush()
        os.fsync(f.fileno())
    final = tmp.with_name(tmp.name.removesuffix(".tmp"))
    old = final.with_name(final.name + ".old")
    if final.exists():  # the same step saved again (the end of a run): never a half-deleted one
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    _prune(final.parent, max_to_keep)
    return final


def latest(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    steps = _complete(checkpoint_root(run_dir))
    return steps[-1][1] if steps else None


def resolve_resume(resume: str, run_dir: str | os.PathLike) -> Path | None:
    """`disable` -> None; `auto` -> latest checkpoint or None; a path -> that checkpoint (checked)."""
    if resume == "disable":
        return None
    if resume == "auto":
        return latest(run_dir)
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"trainer.resume={resume!r}: no complete checkpoint there (no {STATE_FILE})")
    return path


def read_state(checkpoint: Path) -> dict:
    with open(checkpoint / STATE_FILE) as f:
        return json.load(f)


def _complete(root: Path) -> list[tuple[int, Path]]:
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        m = _STEP_DIR.match(child.name)
        if m and (child / STATE_FILE).is_file():
            found.append((int(m.group(1)), child))
    return sorted(found)


def _prune(root: Path, max_to_keep: int) -> None:
    for _, path in _complete(root)[:-max_to_keep]:
        shutil.rmtree(path, ignore_errors=True)
