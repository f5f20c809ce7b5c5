"""async_pmd.validation: verl's val_kwargs as sampling overrides, val requests encoded as the
driver encodes training prompts, and val/reward/mean, val/mean@n, val/pass@n worked out by hand."""

import math

import numpy as np
import pytest

from async_pmd import wire
from async_pmd.config import DataConfig, ValKwargs, build_config
from async_pmd.data import configured_source, make_task
from async_pmd.models import build_char_tokenizer
from async_pmd.validation import build_requests, summarize, val_sampling


def scored(uid: str, rewards, statuses=None, lengths=None, version=3) -> wire.ScoredGroup:
    n = len(rewards)
    lengths = lengths or [2] * n
    group = wire.RolloutGroup(
        uid=uid, prompt_ids=np.array([4, 23, 5, 27], np.int32),
        response_ids=[np.full(k, 10, np.int32) for k in lengths],
        logprobs=[np.zeros(k, np.float32) for k in lengths], finish_reasons=["stop"] * n,
        policy_version=version, prompt_text="0+1=", response_texts=["1"] * n, answer="1",
        sample_index=0, extra={},
    )
    return wire.ScoredGroup.from_rollout(group, rewards, statuses or ["ok"] * n)


def test_val_sampling_follows_verl_do_sample():
    """do_sample=false is greedy whatever the temperature; do_sample=true passes T and top_p."""
    assert val_sampling(ValKwargs()) == {"n": 1, "temperature": 0.0}
    assert val_sampling(ValKwargs(n=4, temperature=1.0, top_p=0.7, do_sample=False)) == {"n": 4, "temperature": 0.0}
    assert val_sampling(ValKwargs(n=32, temperature=1.0, top_p=0.7, do_sample=True)) == {
        "n": 32, "temperature": 1.0, "top_p": 0.7}
    assert val_sampling(ValKwargs(n=2, temperature=0.0, do_sample=True))["temperature"] == 0.0


def test_summarize_by_hand():
    """Three prompts, n = 4 (a 0.5 is partial credit, as the reverse task gives):
        p0: 1 0 0 0    mean 0.25, passes
        p1: 0 0 0 0    mean 0,    fails
        p2: 1 1 .5 NaN (a failed reward under drop_group: counts as 0) mean 0.625, passes
    reward/mean = (1 + 0 + 2.5) / 12 = 0.291666..., mean@n = (0.25 + 0 + 0.625) / 3 = 0.291666...,
    pass@n = 2/3; response lengths 1..4 each row, mean 2.5; policy version = the oldest group's."""
    groups = [
        scored("a", [1, 0, 0, 0], lengths=[1, 2, 3, 4]),
        scored("b", [0, 0, 0, 0], lengths=[1, 2, 3, 4], version=2),
        scored("c", [1, 1, 0.5, math.nan], ["ok", "ok", "ok", "failed:timeout"], lengths=[1, 2, 3, 4]),
    ]
    m = summarize(groups)
    assert m["val/reward/mean"] == pytest.approx(3.5 / 12)
    assert m["val/mean@n"] == pytest.approx((0.25 + 0 + 0.625) / 3)
    assert m["val/pass@n"] == pytest.approx(2 / 3)
    assert m["val/n"] == 4 and m["val/prompts"] == 3 and m["val/reward_failures"] == 1
    assert m["val/response_length/mean"] == pytest.approx(2.5)
    assert m["val/policy_version"] == 2


def test_pass_needs_full_marks():
    """A correct answer cut by the overlong penalty (1 - 0.25) does not pass; the threshold moves it."""
    groups = [scored("a", [0.75, 0.0])]
    assert summarize(groups)["val/pass@n"] == 0.0
    assert summarize(groups, pass_score=0.5)["val/pass@n"] == 1.0
    with pytest.raises(ValueError, match="no groups"):
        summarize([])


def test_requests_carry_the_val_split_through_the_wire():
    """Every val prompt lands in exactly one request (chunks of prompts_per_request), with the
    driver's encoding (character ids, task extra for the synthetic reward) and the overrides."""
    tokenizer = build_char_tokenizer()
    # 20 held-out prompts, tokenized once at load as the job's val source does
    prompts = configured_source(DataConfig(), tokenizer, split="val").next_batch(20)
    prompts.sort(key=lambda p: p.index)
    sampling = val_sampling(ValKwargs(n=2, do_sample=True, temperature=0.5, top_p=0.9))
    requests = build_requests(prompts, sampling=sampling, prompts_per_request=8, tag="val7")
    assert [len(r.uids) for r in requests] == [8, 8, 4]
    decoded = [wire.decode(wire.encode(r), expect=wire.GenerationRequest) for r in requests]
    uids = [u for r in decoded for u in r.uids]
    assert len(set(uids)) == 20 and all(u.startswith("val7-") for u in uids)
    texts = [t for r in decoded for t in r.prompt_texts]
    assert texts == [p.text for p in prompts]
    first = decoded[0]
    assert tokenizer.decode(first.prompt_ids[0].tolist()) == prompts[0].text  # no chat template here
    assert first.answers[0] == prompts[0].answer and first.extras[0] == {"task": "add_mod10"}
    assert first.sampling == {"n": 2, "temperature": 0.5, "top_p": 0.9}
    with pytest.raises(ValueError, match="prompts_per_request"):
        build_requests(prompts, sampling={}, prompts_per_request=0, tag="x")


def test_val_split_is_never_the_train_split():
    """The prompts validation sends are the task's held-out split: none of them is trained on."""
    for task in ("add_mod10", "gsm_tiny"):
        train = {p.text for p in make_task(task, split="train", size=10_000 if task == "add_mod10" else None)}
        assert not train & {p.text for p in make_task(task, split="val")}


def test_seed_spelling_of_val_kwargs_and_file_sources_need_val_files():
    cfg = build_config({}, ["actor_rollout_ref.rollout.val_kwargs.n=32", "actor_rollout_ref.rollout.val_kwargs.do_sample=True",
                            "actor_rollout_ref.rollout.val_kwargs.temperature=1.0",
                            "actor_rollout_ref.rollout.val_kwargs.top_p=0.7", "trainer.test_freq=5"])
    assert cfg.generator.val_kwargs == ValKwargs(n=32, temperature=1.0, top_p=0.7, do_sample=True)
    from async_pmd.config import ConfigError

    with pytest.raises(ConfigError, match="data.val_files"):
        build_config({}, ["data.source=jsonl", "data.train_files=[t.jsonl]", "trainer.val_before_train=true"])
    assert build_config({}, ["data.source=jsonl", "data.train_files=[t.jsonl]"]).trainer.test_freq == 0
