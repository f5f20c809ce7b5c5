"""gsm_tiny: grade-school word problems generated from templates, one or two arithmetic steps.

A stand-in for GSM8K that needs no download: integer answers (graded with math-verify, see
`async_pmd.rewards.builtin.gsm_tiny_reward`) and text inside `SYNTHETIC_ALPHABET` (lowercase,
digits, commas, spaces), so a problem ends in " =" rather than a question mark.
"""

from __future__ import annotations

import random
from collections.abc import Callable

NAMES = ("tom", "ann", "sam", "mia", "ben", "lily", "max", "zoe")
ITEMS = ("apple", "pencil", "card", "marble", "cookie", "sticker")

# Each template draws its numbers from rng and returns (text, answer); answers stay positive.
Template = Callable[[random.Random, str, str, str], tuple[str, int]]


def _buy_more(rng: random.Random, n: str, m: str, it: str) -> tuple[str, int]:
    a, b = rng.randint(2, 30), rng.randint(2, 30)
    return f"{n} has {a} {it}s and buys {b} more, how many {it}s does {n} have now =", a + b


def _give_away(rng: random.Random, n: str, m: str, it: str) -> tuple[str, int]:
    a = rng.randint(5, 40)
    b = rng.randint(1, a - 1)
    return f"{n} has {a} {it}s and gives {b} to {m}, how many {it}s does {n} have left =", a - b


def _bags(rng: random.Random, n: str, m: str, it: str) -> tuple[str, int]:
    a, b = rng.randint(2, 9), rng.randint(2, 12)
    return f"{n} buys {a} bags with {b} {it}s in each bag, how many {it}s does {n} buy =", a * b


def _more_than(rng: random.Random, n: str, m: str, it: str) -> tuple[str, int]:
    a, b = rng.randint(2, 20), rng.randint(1, 15)
    text = f"{n} has {a} {it}s and {m} has {b} more than {n}, how many {it}s do they have together ="
    return text, a + (a + b)


def _share(rng: random.Random, n: str, m: str, it: str) -> tuple[str, int]:
    a, b = rng.randint(2, 12), rng.randint(2, 6)
    text = f"{n} shares {a * b} {it}s equally among {b} friends, how many {it}s does each friend get ="
    return text, a


def _boxes(rng: random.Random, n: str, m: str, it: str) -> tuple[str, int]:
    a, b = rng.randint(2, 10), rng.randint(2, 6)
    c = rng.randint(1, a * b - 1)
    text = f"a box holds {a} {it}s, {n} fills {b} boxes and gives {c} away, how many {it}s are left ="
    return text, a * b - c


def _pages(rng: random.Random, n: str, m: str, it: str) -> tuple[str, int]:
    a, b = rng.randint(2, 25), rng.randint(2, 9)
    return f"{n} reads {a} pages a day for {b} days, how many pages does {n} read in all =", a * b


def _coins(rng: random.Random, n: str, m: str, it: str) -> tuple[str, int]:
    a = rng.randint(10, 50)
    b, c = rng.randint(1, a - 1), rng.randint(1, 20)
    text = f"{n} had {a} coins, spent {b} and then found {c}, how many coins does {n} have now ="
    return text, a - b + c


TEMPLATES: dict[str, Template] = {
    "buy_more": _buy_more,
    "give_away": _give_away,
    "bags": _bags,
    "more_than": _more_than,
    "share": _share,
    "boxes": _boxes,
    "pages": _pages,
    "coins": _coins,
}


def sample_problem(rng: random.Random) -> tuple[str, str, str]:
    """One problem drawn from rng: (text, answer as a decimal string, template name)."""
    name = rng.choice(sorted(TEMPLATES))
    n, m = rng.sample(NAMES, 2)
    text, answer = TEMPLATES[name](rng, n, m, rng.choice(ITEMS))
    return text, str(answer), name
