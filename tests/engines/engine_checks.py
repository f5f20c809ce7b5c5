"""What the real-engine tests share: the skip rule, the tiny head-dim-64 model, and the learner's
teacher-forced log-probs that an engine's sampling log-probs must equal."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from async_pmd import models
from async_pmd.engines import engine_available

EOS = 1
PROMPTS = ["3+4=", "12+30=", "1=", "a b c d e f="]  # different lengths: batched unevenly
# A real engine reads float32 weights and computes in float32; the learner's log-softmax of the
# same weights agrees to this (2.4e-7 measured for SGLang on this CPU).
ATOL = 1e-5


def needs(kind: str) -> pytest.MarkDecorator:
    """Skip unless `kind` is installed, with the reason and the command that installs it. With
    ASYNC_PMD_REQUIRE_ENGINES naming it (CI does, in that engine's venv) a missing engine fails
    instead: a CI run that skipped the real engine would pass without testing anything."""
    required = kind in os.environ.get("ASYNC_PMD_REQUIRE_ENGINES", "").split(",")
    if required and not engine_available(kind):
        raise RuntimeError(f"ASYNC_PMD_REQUIRE_ENGINES names {kind}, but {kind} is not installed in this venv")
    return pytest.mark.skipif(
        not engine_available(kind),
        reason=f"{kind} is not installed in this venv: bash ops/setup.sh --{kind}, then "
               f".venv-{kind}/bin/python -m pytest tests/engines/test_{kind}_real.py",
    )


def build_model(path) -> "os.PathLike":
    """The head-dim-64 tiny model (vLLM's CPU attention has no head-dim-16 kernel), built once."""
    return models.ensure_tiny_model(path, **models.TINY_HEAD_DIM_64, seed=0)


def encode(tokenizer, texts=PROMPTS) -> list[list[int]]:
    return [tokenizer.encode(t) for t in texts]


def teacher_forced(model, prompt, response, temperature=1.0) -> np.ndarray:
    """log π(response[t] | prompt, response[:t]) as the learner computes it: one unpadded float32
    forward pass, log_softmax(logits / T) (greedy, T = 0: untempered)."""
    ids = torch.tensor([list(prompt) + list(response)])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()  # (T, V)
    steps = logits[len(prompt) - 1 : len(prompt) - 1 + len(response)]  # position t predicts t+1
    if temperature > 0:
        steps = steps / temperature
    return torch.log_softmax(steps, -1)[torch.arange(len(response)), torch.tensor(response)].numpy()


def greedy_reference(model, prompt, steps: int, stop=(EOS,)) -> list[int]:
    """The learner model's own greedy continuation (what a greedy engine must sample)."""
    ids = list(prompt)
    out = []
    with torch.no_grad():
        for _ in range(steps):
            token = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
            out.append(token)
            ids.append(token)
            if token in stop:
                break
    return out


def assert_logprobs_match(model, prompts, outputs, temperature=1.0, atol=ATOL) -> int:
    """Every response's log-probs equal teacher forcing; returns how many tokens were checked."""
    checked = 0
    for prompt, group in zip(prompts, outputs):
        for out in group:
            assert len(out.token_ids) == len(out.logprobs) >= 1
            want = teacher_forced(model, prompt, out.token_ids.tolist(), temperature)
            np.testing.assert_allclose(out.logprobs, want, atol=atol, rtol=0)
            checked += len(out.token_ids)
    return checked


def perturbed_state(model, seed: int = 1, scale: float = 0.5) -> dict[str, torch.Tensor]:
    """The model's state_dict with every tensor moved by seeded noise: a policy far enough from
    the original that its log-probs differ by much more than ATOL."""
    gen = torch.Generator().manual_seed(seed)
    return {k: v + scale * v.std().clamp(min=0.02) * torch.randn(v.shape, generator=gen)
            for k, v in model.state_dict().items()}


def assert_segments_continue(engine, model, prompts, segment: int = 3, total: int = 9) -> None:
    """Partial rollouts on a real engine: a response generated `segment` tokens at a time, each
    segment sent back with prompt + tokens so far as its prompt, (a) greedy: equals the one
    uninterrupted greedy generation; (b) sampled: every segment's log-probs equal teacher forcing
    of the whole response so far from the original prompt. (Seeded sampled continuations do not
    reproduce an uninterrupted sample on SGLang or vLLM: their seeds start a stream per request,
    where the torch engine keys each draw by response and position.)"""
    from async_pmd.engines import SamplingParams

    for temperature in (0.0, 1.0):
        whole = [g[0].token_ids.tolist() for g in engine.generate(
            prompts, SamplingParams(max_new_tokens=total, temperature=temperature, ignore_eos=True, seed=3))]
        so_far = [[] for _ in prompts]
        for _ in range(total // segment):
            rows = [list(p) + s for p, s in zip(prompts, so_far)]
            outs = engine.generate(rows, SamplingParams(max_new_tokens=segment, temperature=temperature,
                                                        ignore_eos=True, seed=4))
            for i, group in enumerate(outs):
                out = group[0]
                want = teacher_forced(model, prompts[i], so_far[i] + out.token_ids.tolist(), temperature)
                np.testing.assert_allclose(out.logprobs, want[len(so_far[i]):], atol=ATOL, rtol=0)
                so_far[i] += out.token_ids.tolist()
        assert all(len(s) == total for s in so_far)
        if temperature == 0.0:
            assert so_far == whole
