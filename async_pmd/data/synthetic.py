"""Built-in synthetic tasks, generated deterministically from a seed (no files, no network).

  add_mod10  "{a}+{b}=" -> str((a + b) % 10), a and b single digits (100 distinct prompts)
  reverse    "rev {s}=" -> s reversed, s of 3-5 letters from "abcde" (3,875 distinct prompts)
  gsm_tiny   templated grade-school word problems with integer answers (see gsm_tiny.py)
  longtail   "{c}*{k}=" -> c repeated k times, c in "abcde", k from 1 to 48 with a long tail: 7 in
             8 prompts have k <= 6, the rest k in 7..48 (partial rollouts' benchmark task)

Every character of every prompt and answer is in `SYNTHETIC_ALPHABET`, so one character-level
vocabulary (the tiny model of the embedded default) covers all three tasks.

The "val" split is disjoint from "train" whatever the seeds: membership is a fixed rule of the
prompt itself, and the seed only picks and orders prompts inside a split. A split's prompts are
distinct unless `size` asks for more than it holds (add_mod10 train has 80): then they repeat,
evenly.
"""

from __future__ import annotations

import itertools
import random
import zlib
from collections.abc import Callable

from async_pmd.data import gsm_tiny
from async_pmd.data.prompt import Prompt

# Digits, the operators and separators the tasks use, lowercase letters and space.
SYNTHETIC_ALPHABET = "0123456789+-*=, abcdefghijklmnopqrstuvwxyz"

SPLITS = ("train", "val")
REVERSE_LETTERS = "abcde"
REVERSE_LENGTHS = (3, 4, 5)
GSM_TINY_DEFAULT_SIZE = {"train": 200, "val": 50}
LONGTAIL_LETTERS = "abcde"
LONGTAIL_SHORT, LONGTAIL_MAX = 6, 48  # answer lengths: 1..SHORT mostly, up to MAX in the tail
LONGTAIL_TAIL_SHARE = 1 / 8
LONGTAIL_DEFAULT_SIZE = {"train": 4096, "val": 64}


def add_mod10_in_val(a: int, b: int) -> bool:
    """add_mod10's held-out pairs: a ≡ b (mod 5), 20 of the 100 pairs.

    For each answer r exactly two pairs qualify (a+b ≡ r mod 10 and a-b ≡ 0 mod 5 give
    2a ≡ r mod 5, two digits a), so both splits have every answer equally often (chance = 1/10).
    """
    return (a - b) % 5 == 0


def text_in_val(text: str) -> bool:
    """Held-out rule for reverse and gsm_tiny: a fixed hash of the prompt text, about 1 in 5."""
    return zlib.crc32(text.encode("utf-8")) % 5 == 0


def _in_split(in_val: bool, split: str) -> bool:
    return in_val == (split == "val")


def make_add_mod10(split: str, seed: int, size: int | None) -> list[Prompt]:
    """All pairs of the split (80 train, 20 val) in a seeded order, or `size` of them."""
    pairs = [
        (a, b)
        for a, b in itertools.product(range(10), repeat=2)
        if _in_split(add_mod10_in_val(a, b), split)
    ]
    rng = random.Random(seed)
    rng.shuffle(pairs)
    pairs = _take(pairs, size, rng)
    return [
        Prompt(i, f"{a}+{b}=", str((a + b) % 10), {"task": "add_mod10"})
        for i, (a, b) in enumerate(pairs)
    ]


def make_reverse(split: str, seed: int, size: int | None) -> list[Prompt]:
    """The split's strings (3,098 train, 777 val) in a seeded order, or `size` of them; drawn
    uniformly over strings, so about 4 in 5 have five letters."""
    pool = [
        "".join(letters)
        for n in REVERSE_LENGTHS
        for letters in itertools.product(REVERSE_LETTERS, repeat=n)
    ]
    pool = [s for s in pool if _in_split(text_in_val(f"rev {s}="), split)]
    rng = random.Random(seed)
    rng.shuffle(pool)
    pool = _take(pool, size, rng)
    return [Prompt(i, f"rev {s}=", s[::-1], {"task": "reverse"}) for i, s in enumerate(pool)]


def make_gsm_tiny(split: str, seed: int, size: int | None) -> list[Prompt]:
    """`size` distinct word problems of the split (default 200 train, 50 val; the templates
    hold tens of thousands)."""
    size = GSM_TINY_DEFAULT_SIZE[split] if size is None else size
    rng = random.Random(seed)
    seen: set[str] = set()
    prompts: list[Prompt] = []
    # The cap only guards against a size the templates cannot fill.
    for _ in range(100 * size + 1000):
        if len(prompts) == size:
            return prompts
        text, answer, template = gsm_tiny.sample_problem(rng)
        if text in seen or not _in_split(text_in_val(text), split):
            continue
        seen.add(text)
        extra = {"task": "gsm_tiny", "template": template}
        prompts.append(Prompt(len(prompts), text, answer, extra))
    raise ValueError(f"gsm_tiny could not generate {size} distinct {split} problems; ask for fewer")


def make_longtail(split: str, seed: int, size: int | None) -> list[Prompt]:
    """`size` prompts (default 4,096 train, 64 val) drawn with replacement from the split's
    (letter, k) pairs: a share LONGTAIL_TAIL_SHARE from the tail k > LONGTAIL_SHORT, the rest
    short, so a batch of 32 groups holds about 4 long answers among short ones."""
    size = LONGTAIL_DEFAULT_SIZE[split] if size is None else size
    pairs = [(c, k) for c in LONGTAIL_LETTERS for k in range(1, LONGTAIL_MAX + 1)
             if _in_split(text_in_val(f"{c}*{k}="), split)]
    short = [p for p in pairs if p[1] <= LONGTAIL_SHORT]
    tail = [p for p in pairs if p[1] > LONGTAIL_SHORT]
    rng = random.Random(seed)
    drawn = [rng.choice(tail if rng.random() < LONGTAIL_TAIL_SHARE else short) for _ in range(size)]
    return [Prompt(i, f"{c}*{k}=", c * k, {"task": "longtail"}) for i, (c, k) in enumerate(drawn)]


TASKS: dict[str, Callable[[str, int, int | None], list[Prompt]]] = {
    "add_mod10": make_add_mod10,
    "reverse": make_reverse,
    "gsm_tiny": make_gsm_tiny,
    "longtail": make_longtail,
}


def make_task(task: str, split: str = "train", seed: int = 0, size: int | None = None) -> list[Prompt]:
    """The prompts of a built-in task; the same arguments always give the same list."""
    if task not in TASKS:
        raise ValueError(f"unknown synthetic task {task!r}; choose one of {sorted(TASKS)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r} for task {task!r}; choose one of {SPLITS}")
    if size is not None and size < 1:
        raise ValueError(f"size must be >= 1 or None (the task's default), got {size}")
    return TASKS[task](split, seed, size)


def _take(items: list, size: int | None, rng: random.Random) -> list:
    """The first `size` items; a size past the distinct count repeats them, each pass in a new
    seeded order, so every prompt appears size // len(items) or one more times."""
    if size is None:
        return items
    taken = items[:size]
    while len(taken) < size:
        again = list(items)
        rng.shuffle(again)
        taken.extend(again[: size - len(taken)])
    return taken
