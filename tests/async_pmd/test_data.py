"""Prompt sources: deterministic synthetic tasks with disjoint splits, verl-style file rows,
chat formatting, the prompt length policy, and a cursor that resumes exactly."""

from __future__ import annotations

import collections
import itertools
import json

import numpy as np
import pytest

from async_pmd.data import (
    SYNTHETIC_ALPHABET,
    TASKS,
    Prompt,
    PromptSource,
    build_source,
    filter_by_length,
    format_prompt,
    load_prompts,
    make_task,
)

CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def char_tokenizer(chat_template: str | None = None):
    """A character-level fast tokenizer over the synthetic alphabet, built in-process."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(["<pad>", "<eos>", *SYNTHETIC_ALPHABET])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>", pad_token="<pad>")
    tok.chat_template = chat_template
    return tok


def char_len(text: str) -> list[int]:
    return list(range(len(text)))


# --- synthetic tasks -------------------------------------------------------------------------


@pytest.mark.parametrize("task", sorted(TASKS))
def test_task_is_deterministic_in_the_seed(task):
    """Same (task, split, seed, size) gives the same prompts; another seed another order."""
    assert make_task(task, "train", seed=3) == make_task(task, "train", seed=3)
    assert make_task(task, "train", seed=3) != make_task(task, "train", seed=4)


@pytest.mark.parametrize("task", sorted(TASKS))
def test_train_and_val_are_disjoint_for_any_seeds(task):
    """Split membership is a rule of the prompt, so even different seeds never overlap."""
    train = {p.text for p in make_task(task, "train", seed=0)}
    val = {p.text for p in make_task(task, "val", seed=1)}
    assert train and val and not train & val


@pytest.mark.parametrize("task", sorted(TASKS))
def test_tasks_fit_the_alphabet_and_are_distinct(task):
    for split in ("train", "val"):
        prompts = make_task(task, split)
        assert set("".join(p.text + p.answer for p in prompts)) <= set(SYNTHETIC_ALPHABET)
        if task != "longtail":  # drawn with replacement, for its length mix (next test)
            assert len({p.text for p in prompts}) == len(prompts)
        assert [p.index for p in prompts] == list(range(len(prompts)))
        assert all(p.extra["task"] == task for p in prompts)


def test_longtail_answer_lengths_have_a_long_tail():
    """longtail: the answer is the letter repeated k times; about 1 in 8 prompts has a long
    answer (7 to 48 characters), the rest 1 to 6, so a batch of 32 holds a few long ones."""
    prompts = make_task("longtail", "train", seed=0)
    lengths = np.array([len(p.answer) for p in prompts])
    assert all(p.answer == p.text[0] * int(p.text[2:-1]) for p in prompts)
    assert lengths.min() == 1 and lengths.max() == 48
    assert abs((lengths > 6).mean() - 1 / 8) < 0.02  # 4,096 draws: the std of the share is 0.005
    per_batch = (lengths[: 4096 // 32 * 32].reshape(-1, 32) > 6).sum(1)
    assert per_batch.mean() == pytest.approx(4, abs=0.6) and per_batch.max() >= 8


def test_add_mod10_answers_and_uniform_chance():
    """Each answer digit is 1/10 of both splits (8 of 80 train pairs, 2 of 20 val pairs), so
    always guessing one digit scores exactly 0.1; and every pair covers all 100 once."""
    train, val = make_task("add_mod10", "train"), make_task("add_mod10", "val")
    for p in train + val:
        a, b = int(p.text[0]), int(p.text[2])
        assert p.text == f"{a}+{b}=" and p.answer == str((a + b) % 10)
    assert collections.Counter(p.answer for p in train) == {str(d): 8 for d in range(10)}
    assert collections.Counter(p.answer for p in val) == {str(d): 2 for d in range(10)}
    pairs = {p.text for p in train + val}
    assert pairs == {f"{a}+{b}=" for a, b in itertools.product(range(10), repeat=2)}


def test_reverse_prompts():
    for p in make_task("reverse", "val", size=50):
        s = p.text.removeprefix("rev ").removesuffix("=")
        assert 3 <= len(s) <= 5 and set(s) <= set("abcde") and p.answer == s[::-1]


def test_gsm_tiny_answers_follow_their_templates():
    prompts = make_task("gsm_tiny", "train")
    assert len(prompts) == 200 and len(make_task("gsm_tiny", "val")) == 50
    assert len({p.extra["template"] for p in prompts}) == 8
    # "tom has 3 apples and buys 4 more, ..." -> 7: check the one-step templates by re-deriving
    for p in prompts:
        nums = [int(w.rstrip(",")) for w in p.text.split() if w.rstrip(",").isdigit()]
        expected = {"buy_more": lambda a, b: a + b, "pages": lambda a, b: a * b,
                    "bags": lambda a, b: a * b, "give_away": lambda a, b: a - b}  # fmt: skip
        if p.extra["template"] in expected:
            assert int(p.answer) == expected[p.extra["template"]](*nums)
        assert int(p.answer) > 0


def test_task_errors():
    with pytest.raises(ValueError, match="unknown synthetic task"):
        make_task("sort")
    with pytest.raises(ValueError, match="unknown split"):
        make_task("add_mod10", "test")
    with pytest.raises(ValueError, match="size must be >= 1"):
        make_task("add_mod10", "train", size=0)


def test_a_size_past_the_split_repeats_prompts_evenly():
    """200 prompts from add_mod10's 80 train pairs: two full passes and half a third, so each
    pair appears 2 or 3 times and never one from val."""
    prompts = make_task("add_mod10", "train", size=200, seed=1)
    counts = collections.Counter(p.text for p in prompts)
    assert len(prompts) == 200 and set(counts.values()) == {2, 3} and len(counts) == 80
    assert [p.index for p in prompts] == list(range(200))
    assert prompts[:80] == make_task("add_mod10", "train", seed=1)


# --- file sources ----------------------------------------------------------------------------


ROWS = [
    {"prompt": "1+1=", "reward_model": {"ground_truth": "2"}, "data_source": "toy"},
    {"prompt": [{"role": "user", "content": "2+2="}], "reward_model": {"ground_truth": "4"},
     "data_source": "toy"},  # fmt: skip
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_jsonl_with_nested_answer_key(tmp_path):
    rows = [{"question": "1+1=", "reward_model": {"ground_truth": "2"}, "data_source": "toy"},
            {"question": "2+2=", "reward_model": {"ground_truth": "4"}, "data_source": "toy"}]  # fmt: skip
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    prompts = load_prompts(
        path, prompt_key="question", answer_key="reward_model.ground_truth",
        cache_dir=str(tmp_path / "cache"),
    )  # fmt: skip
    assert prompts == [
        Prompt(0, "1+1=", "2", {"data_source": "toy"}),
        Prompt(1, "2+2=", "4", {"data_source": "toy"}),
    ]


def test_parquet_with_chat_prompts(tmp_path):
    """verl's parquet rows: a chat-list prompt gives its last user turn as the text; a chat of
    more than one turn is kept in extra["messages"] for `format_prompt(messages=...)`."""
    import datasets

    system = {"role": "system", "content": "be brief"}
    rows = [ROWS[1], {**ROWS[1], "prompt": [system, *ROWS[1]["prompt"]]}]
    path = str(tmp_path / "d.parquet")
    datasets.Dataset.from_list(rows).to_parquet(path)
    source = build_source(
        "files", files={"train": path}, answer_key="reward_model.ground_truth",
        cache_dir=str(tmp_path / "cache"), shuffle=False,
    )  # fmt: skip
    single, multi = source.next_batch(2)
    assert (single.index, single.text, single.answer, single.extra) == (0, "2+2=", "4", {"data_source": "toy"})
    assert (multi.index, multi.text) == (1, "2+2=")
    tok = char_tokenizer(CHAT_TEMPLATE)
    formatted = format_prompt(multi.text, tok, True, messages=multi.extra["messages"])
    assert formatted == "<system>be brief<user>2+2=<assistant>"


def test_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_prompts(str(tmp_path / "missing.jsonl"))
    path = write_jsonl(tmp_path / "d.jsonl", ROWS[:1])
    with pytest.raises(ValueError, match="'solution' is not in"):
        load_prompts(path, answer_key="solution", cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ValueError, match="no files for split 'val'"):
        build_source("files", files={"train": path}, split="val")
    with pytest.raises(ValueError, match="are not parquet"):
        build_source("parquet", files=[path])


# --- formatting and length -------------------------------------------------------------------


def test_chat_template_applied_only_when_present_and_asked():
    with_template = char_tokenizer(CHAT_TEMPLATE)
    assert format_prompt("1+2=", with_template, True) == "<user>1+2=<assistant>"
    assert format_prompt("1+2=", with_template, False) == "1+2="
    assert format_prompt("1+2=", char_tokenizer(None), True) == "1+2="


def test_length_policies_with_counts():
    """Limit 4 tokens (one per character): "1+2=" fits, "rev abc=" (8) and "12345" (5) do not."""
    prompts = [Prompt(0, "1+2=", "3"), Prompt(1, "rev abc=", "cba"), Prompt(2, "12345", "x")]
    kept, n = filter_by_length(prompts, char_len, 4, "filter")
    assert ([p.index for p in kept], n) == ([0], 2)
    kept, n = filter_by_length(prompts, char_len, 4, "truncate")
    assert ([(p.index, p.text) for p in kept], n) == ([(0, "1+2="), (1, "rev "), (2, "1234")], 2)
    with pytest.raises(ValueError, match="prompt index 1 is 8 tokens long"):
        filter_by_length(prompts, char_len, 4, "error")


def test_build_source_refuses_a_limit_that_leaves_nothing():
    with pytest.raises(ValueError, match="all 50 prompts are over max_prompt_length=32"):
        build_source("synthetic", task="gsm_tiny", split="val", tokenize_fn=char_len, max_prompt_length=32)
    # "rev abcd=" is 9 characters: a limit of 9 keeps the 3- and 4-letter strings only
    kept = build_source("synthetic", task="reverse", split="val", tokenize_fn=char_len,
                        max_prompt_length=9).next_batch(1000)  # fmt: skip
    short = {p.text for p in make_task("reverse", "val") if len(p.answer) <= 4}
    assert {p.text for p in kept} == short


def test_truncate_measures_the_formatted_prompt():
    """The template adds "<user>" and "<assistant>" (17 characters, one token each here), so a
    limit of 17 + 3 tokens leaves 3 characters of the text."""
    tok = char_tokenizer(CHAT_TEMPLATE)
    markup = len("<user><assistant>")
    def tokenize(t):
        return list(range(len(format_prompt(t, tok, True))))
    kept, n = filter_by_length([Prompt(0, "1+2+3=", "6")], tokenize, markup + 3, "truncate")
    assert (kept[0].text, n) == ("1+2", 1)


# --- cursor ----------------------------------------------------------------------------------


def test_batches_cover_each_epoch_once_in_a_new_order():
    source = PromptSource(make_task("add_mod10", "val"), shuffle_seed=7)
    first, second = source.next_batch(20), source.next_batch(20)
    assert sorted(p.index for p in first) == sorted(p.index for p in second) == list(range(20))
    assert first != second and source.epoch == 2 and source.consumed == 40


def test_resume_is_exact_across_an_epoch_boundary():
    """Save mid-epoch, then both the original and a fresh restored source read the same 50
    prompts, which cross two epoch boundaries (20 prompts per epoch)."""
    original = build_source("synthetic", task="add_mod10", split="val", seed=5)
    original.next_batch(13)
    state = json.loads(json.dumps(original.state_dict()))  # must survive JSON
    expected = original.next_batch(50)
    restored = build_source("synthetic", task="add_mod10", split="val", seed=5)
    restored.load_state_dict(state)
    assert restored.next_batch(50) == expected
    assert restored.state_dict() == original.state_dict()


def test_resume_adopts_the_saved_shuffle_seed():
    saved = PromptSource(make_task("add_mod10", "val"), shuffle_seed=1)
    saved.next_batch(25)
    state = saved.state_dict()
    other = PromptSource(make_task("add_mod10", "val"), shuffle_seed=2)
    other.load_state_dict(state)
    assert other.next_batch(30) == saved.next_batch(30)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"position": 20}, "out of range"),
        ({"epoch": -1}, "out of range"),
        ({"position": "3"}, "'position' must be int"),
        ({"shuffle": 1}, "'shuffle' must be bool"),
        ({"version": 2}, "version"),
        ({"fingerprint": 0}, "other data"),
        ({"num_prompts": 80}, "other data"),
    ],
)
def test_load_state_validates(change, message):
    source = PromptSource(make_task("add_mod10", "val"))
    with pytest.raises(ValueError, match=message):
        source.load_state_dict({**source.state_dict(), **change})


def test_empty_source_and_negative_batch_are_refused():
    with pytest.raises(ValueError, match="at least one prompt"):
        PromptSource([])
    with pytest.raises(ValueError, match=">= 0"):
        PromptSource(make_task("add_mod10", "val")).next_batch(-1)
