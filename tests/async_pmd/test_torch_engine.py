"""TorchEngine: the InferenceEngine contract on a tiny random Qwen2, checked against teacher forcing."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import threading
import time

import numpy as np
import pytest
import torch

from async_pmd import models
from async_pmd.engines import GenerationOutput, InferenceEngine, SamplingParams, create_engine
from async_pmd.engines.torch_engine import TorchEngine

EOS = 1


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return models.build_tiny_model(tmp_path_factory.mktemp("engine") / "tiny", seed=0)


@pytest.fixture(scope="module")
def tok(tiny_path):
    return models.load_tokenizer(tiny_path)


@pytest.fixture(scope="module")
def engine(tiny_path):
    """A shared engine for tests that do not change its weights."""
    return TorchEngine(tiny_path)


@pytest.fixture
def fresh_engine(tiny_path):
    """An engine of its own, for tests that update weights."""
    return TorchEngine(tiny_path)


@pytest.fixture(scope="module")
def prompts(tok):
    # Different lengths, so the batch is left-padded.
    return [tok.encode(s) for s in ["3+4=", "12+30=", "1=", "a b c d e f="]]


def reference_logprobs(model, prompt, response, temperature=1.0, top_k=0, top_p=1.0):
    """Teacher-forced log-probs of `response`, one unpadded row, masking written out per row.

    Greedy (temperature 0) scores under the untempered, unmasked distribution.
    """
    ids = torch.tensor([list(prompt) + list(response)])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double()  # (T, V)
    steps = logits[len(prompt) - 1 : len(prompt) - 1 + len(response)]  # position t predicts token t+1
    if temperature == 0:
        return torch.log_softmax(steps, -1)[torch.arange(len(response)), torch.tensor(response)].numpy()
    out = []
    for row, token in zip(steps / temperature, response):
        keep = torch.ones_like(row, dtype=torch.bool)
        if top_k > 0:
            keep &= row >= torch.sort(row, descending=True).values[top_k - 1]
        probs = torch.softmax(row.masked_fill(~keep, float("-inf")), -1)
        if top_p < 1.0:
            mass = 0.0
            for i in torch.argsort(probs, descending=True).tolist():
                if mass > top_p:
                    keep[i] = False
                mass += probs[i].item()
        out.append(torch.log_softmax(row.masked_fill(~keep, float("-inf")), -1)[token].item())
    return np.array(out)


def assert_matches_teacher_forcing(engine, prompts, params, atol=1e-4):
    outputs = engine.generate(prompts, params)
    checked = 0
    for prompt, group in zip(prompts, outputs):
        for out in group:
            ref = reference_logprobs(
                engine.model, prompt, out.token_ids.tolist(), params.temperature, params.top_k, params.top_p
            )
            np.testing.assert_allclose(out.logprobs, ref, atol=atol, rtol=0)
            checked += len(ref)
    assert checked > len(prompts)  # something was actually compared


def test_engine_satisfies_the_protocol(engine):
    assert isinstance(engine, InferenceEngine)
    assert engine.version == 0


def test_n_responses_per_prompt_with_consistent_fields(engine, prompts):
    """n outputs per prompt, in order; tokens and log-probs equal length; stop token only last."""
    params = SamplingParams(n=3, max_new_tokens=6, seed=0)
    outputs = engine.generate(prompts, params)
    assert [len(group) for group in outputs] == [3] * len(prompts)
    for index, group in enumerate(outputs):
        for out in group:
            assert isinstance(out, GenerationOutput) and out.prompt_index == index
            assert out.token_ids.dtype == np.int32 and out.logprobs.dtype == np.float32
            assert 1 <= len(out.token_ids) == len(out.logprobs) <= 6
            assert np.all(out.logprobs <= 0)
            assert EOS not in out.token_ids[:-1]
            if out.finish_reason == "stop":
                assert out.token_ids[-1] == EOS
            else:
                assert out.finish_reason == "length" and len(out.token_ids) == 6


def test_stop_token_ids_end_responses_and_are_kept(engine, prompts):
    """A response ends at the first stop token, which is its last token; finish_reason 'stop'."""
    everything = tuple(range(engine.model.config.vocab_size))
    outputs = engine.generate(prompts, SamplingParams(n=2, max_new_tokens=5, stop_token_ids=everything, seed=0))
    assert all(len(o.token_ids) == 1 and o.finish_reason == "stop" for g in outputs for o in g)

    half = tuple(range(0, 46, 2))
    outputs = engine.generate(prompts, SamplingParams(n=4, max_new_tokens=8, stop_token_ids=half, seed=1))
    flat = [o for g in outputs for o in g]
    assert {o.finish_reason for o in flat} == {"stop"}  # 8 draws at ~1/2 each: a length finish is ~1e-3
    for out in flat:
        assert int(out.token_ids[-1]) in half + (EOS,)
        assert not set(out.token_ids[:-1].tolist()) & set(half + (EOS,))


def test_max_new_tokens_gives_length(engine, prompts):
    outputs = engine.generate(prompts, SamplingParams(n=2, max_new_tokens=7, ignore_eos=True, seed=0))
    assert all(o.finish_reason == "length" and len(o.token_ids) == 7 for g in outputs for o in g)


def test_logprobs_match_teacher_forcing_at_temperature_one(engine, prompts):
    """Sampling log-probs (left-padded batch, KV cache) equal an unpadded full forward, fp32."""
    assert_matches_teacher_forcing(engine, prompts, SamplingParams(n=2, max_new_tokens=8, seed=0))


def test_logprobs_match_teacher_forcing_with_temperature_and_top_k(engine, prompts):
    """log_softmax(top_k(logits / T)): the distribution actually sampled from."""
    params = SamplingParams(n=2, max_new_tokens=8, temperature=0.7, top_k=5, seed=0)
    assert_matches_teacher_forcing(engine, prompts, params)


def test_logprobs_match_teacher_forcing_with_top_p(engine, prompts):
    params = SamplingParams(n=2, max_new_tokens=8, temperature=0.7, top_k=20, top_p=0.8, seed=0)
    assert_matches_teacher_forcing(engine, prompts, params)


def test_greedy_takes_the_argmax_and_scores_it_untempered(engine, prompts):
    params = SamplingParams(n=2, max_new_tokens=8, temperature=0.0, ignore_eos=True)
    outputs = engine.generate(prompts, params)
    for group in outputs:
        assert np.array_equal(group[0].token_ids, group[1].token_ids)  # no randomness
    assert_matches_teacher_forcing(engine, prompts, params)


def test_same_seed_same_output(engine, prompts):
    params = SamplingParams(n=2, max_new_tokens=8, seed=7)
    a, b = engine.generate(prompts, params), engine.generate(prompts, params)
    c = engine.generate(prompts, SamplingParams(n=2, max_new_tokens=8, seed=8))
    tokens = lambda outs: [o.token_ids.tolist() for g in outs for o in g]  # noqa: E731
    assert tokens(a) == tokens(b) and tokens(a) != tokens(c)
    assert all(np.array_equal(x.logprobs, y.logprobs) for ga, gb in zip(a, b) for x, y in zip(ga, gb))


def test_update_weights_copies_in_place_and_bumps_version(fresh_engine, prompts):
    """New weights change the outputs; storage is reused; the version follows."""
    params = SamplingParams(max_new_tokens=8, temperature=0.0, ignore_eos=True)
    before = [g[0].token_ids.tolist() for g in fresh_engine.generate(prompts, params)]
    state = fresh_engine.model.state_dict()
    pointers = {name: t.data_ptr() for name, t in state.items()}
    gen = torch.Generator().manual_seed(0)
    new = {name: t + torch.randn(t.shape, generator=gen) for name, t in state.items()}

    fresh_engine.update_weights(new, version=3)

    assert fresh_engine.version == 3
    after_state = fresh_engine.model.state_dict()
    assert all(torch.equal(after_state[name], new[name]) for name in new)
    assert {name: t.data_ptr() for name, t in after_state.items()} == pointers
    outputs = fresh_engine.generate(prompts, params)
    assert [g[0].token_ids.tolist() for g in outputs] != before
    assert all(o.policy_version == 3 for g in outputs for o in g)


def test_partial_update_touches_only_the_named_tensors(fresh_engine):
    state = {k: v.clone() for k, v in fresh_engine.model.state_dict().items()}
    name = "model.layers.1.mlp.down_proj.weight"
    fresh_engine.update_weights({name: torch.zeros_like(state[name]).numpy()}, version=1)  # numpy accepted
    after = fresh_engine.model.state_dict()
    assert torch.count_nonzero(after[name]) == 0
    assert all(torch.equal(after[k], state[k]) for k in state if k != name)


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"model.layers.9.mlp.up_proj.weight": torch.zeros(128, 64)}, "unknown tensor 'model.layers.9"),
        ({"model.norm.weight": torch.zeros(65)}, "'model.norm.weight' has shape"),
    ],
)
def test_bad_update_raises_and_changes_nothing(fresh_engine, bad, message):
    """Validation runs before any copy: a good tensor listed first is not applied either."""
    state = {k: v.clone() for k, v in fresh_engine.model.state_dict().items()}
    good = {"lm_head.weight": torch.zeros_like(state["lm_head.weight"])}
    with pytest.raises(ValueError, match=message):
        fresh_engine.update_weights({**good, **bad}, version=5)
    assert fresh_engine.version == 0
    assert all(torch.equal(v, state[k]) for k, v in fresh_engine.model.state_dict().items())


def test_tied_lm_head_updates_the_shared_embedding(tmp_path):
    engine = TorchEngine(models.build_tiny_model(tmp_path / "tied", tie_word_embeddings=True))
    embed = engine.model.model.embed_tokens.weight
    engine.update_weights({"lm_head.weight": torch.ones_like(embed)}, version=1)
    assert torch.equal(embed, torch.ones_like(embed))
    engine.update_weights({"model.embed_tokens.weight": torch.zeros_like(embed)}, version=2)
    assert torch.count_nonzero(engine.model.lm_head.weight) == 0


def test_bad_prompts_raise_before_generating(engine, prompts):
    too_long = [5] * 120  # max_position_embeddings 128 - max_new_tokens 16 = 112
    with pytest.raises(ValueError, match="prompt 1 has 120 tokens, more than max_prompt_length=112"):
        engine.generate([prompts[0], too_long], SamplingParams())
    with pytest.raises(ValueError, match="prompt 2 is empty"):
        engine.generate([prompts[0], prompts[1], []], SamplingParams())
    with pytest.raises(ValueError, match="prompt 0 has a token id outside"):
        engine.generate([[46]], SamplingParams())
    capped = TorchEngine(engine.model, max_prompt_length=4)
    with pytest.raises(ValueError, match="prompt 0 has 6 tokens, more than max_prompt_length=4"):
        capped.generate([prompts[1]], SamplingParams())


def test_pause_holds_new_batches_until_resume(engine, prompts):
    engine.pause()
    done = threading.Event()
    worker = threading.Thread(
        target=lambda: (engine.generate(prompts, SamplingParams(max_new_tokens=2)), done.set())
    )
    worker.start()
    time.sleep(0.2)
    assert not done.is_set()
    engine.resume()
    worker.join(timeout=10)
    assert done.is_set()


def test_create_engine_builds_torch_and_rejects_unknown_kinds(tiny_path, prompts):
    engine = create_engine("torch", str(tiny_path))
    assert isinstance(engine, TorchEngine)
    assert len(engine.generate(prompts[:1], SamplingParams(max_new_tokens=2))[0]) == 1
    engine.shutdown()
    with pytest.raises(RuntimeError, match="shut down"):
        engine.generate(prompts[:1], SamplingParams())
    with pytest.raises(ValueError, match="unknown engine kind 'tgi'"):
        create_engine("tgi", str(tiny_path))
    with pytest.raises(FileNotFoundError):
        create_engine("torch", str(tiny_path.parent / "missing"))


def test_untrained_model_scores_at_chance_on_add_mod10(engine, tok):
    """Before training, the sampled reward on `a+b=` is what the model's own probabilities predict:
    P(answer digit, then EOS), worked out by teacher forcing, which for a random-init model is close
    to uniform guessing over the vocabulary (1/V² ≈ 0.05%), far below the 10% of guessing a digit.
    So the learning run's climb starts honest."""
    from async_pmd.data import make_task
    from async_pmd.rewards import add_mod10_reward

    task = make_task("add_mod10", split="train", seed=0)
    ids = [tok.encode(p.text) for p in task]
    outs = engine.generate(ids, SamplingParams(n=16, max_new_tokens=4, seed=0))
    texts = [[tok.decode(o.token_ids, skip_special_tokens=True) for o in group] for group in outs]
    sampled = np.mean([add_mod10_reward(p.text, t, p.answer, {}) for p, group in zip(task, texts) for t in group])
    # Exact chance of reward 1 under the model: log π(digit | prompt) + log π(EOS | prompt, digit).
    expected = np.mean([
        np.exp(reference_logprobs(engine.model, prompt, [tok.convert_tokens_to_ids(p.answer), EOS]).sum())
        for p, prompt in zip(task, ids)
    ])
    vocab = len(tok)
    assert 0.1 / vocab**2 < expected < 10 / vocab**2
    n = 16 * len(task)
    assert abs(sampled - expected) <= 4 * np.sqrt(expected / n) + 2 / n  # a binomial band
    assert sampled < 0.05


def generate_in_segments(engine, prompt, seed, total, segment, **sampling):
    """One response generated `segment` tokens at a time, each segment a new `generate` call on
    prompt + the tokens so far (as the driver re-requests a partial rollout), in a batch beside an
    unrelated row so the padding and batch differ from the uninterrupted call."""
    tokens, logprobs, finish = [], [], "length"
    while len(tokens) < total and finish == "length":
        params = SamplingParams(max_new_tokens=min(segment, total - len(tokens)),
                                row_seeds=(seed, 12345), start_positions=(len(tokens), 0), **sampling)
        out = engine.generate([list(prompt) + tokens, [5, 6, 7, 8, 9, 10, 11]], params)[0][0]
        tokens += out.token_ids.tolist()
        logprobs += out.logprobs.tolist()
        finish = out.finish_reason
    return tokens, np.array(logprobs, np.float32), finish


@pytest.mark.parametrize("segment", [1, 3, 5])
@pytest.mark.parametrize("sampling", [{}, {"temperature": 0.7, "top_k": 5}, {"top_p": 0.8}])
def test_a_response_continued_in_segments_equals_the_uninterrupted_one(engine, prompts, segment, sampling):
    """Partial rollouts: k segments, each continued from prompt + prefix in a later call with the
    same row key, give the same tokens and (within fp32 prefill-vs-decode rounding) the same
    log-probs as one uninterrupted generation under the same weights and key."""
    total, compared = 12, 0
    for index, prompt in enumerate(prompts):
        seed = 1000 + index
        whole = engine.generate([prompt], SamplingParams(max_new_tokens=total, row_seeds=(seed,), ignore_eos=True,
                                                         **sampling))[0][0]
        tokens, logprobs, finish = generate_in_segments(engine, prompt, seed, total, segment, ignore_eos=True,
                                                        **sampling)
        assert tokens == whole.token_ids.tolist()
        np.testing.assert_allclose(logprobs, whole.logprobs, atol=1e-5, rtol=0)
        assert finish == whole.finish_reason == "length"
        compared += len(tokens)
    assert compared == total * len(prompts)


def test_segments_stop_where_the_uninterrupted_response_stops(engine, prompts):
    """With EOS on, a segmented response ends on the same stop token as the uninterrupted one."""
    for index, prompt in enumerate(prompts):
        whole = engine.generate([prompt], SamplingParams(max_new_tokens=16, row_seeds=(77 + index,)))[0][0]
        tokens, _, finish = generate_in_segments(engine, prompt, 77 + index, 16, 2)
        assert tokens == whole.token_ids.tolist() and finish == whole.finish_reason


def test_row_keys_decide_the_sample_and_are_checked(engine, prompts):
    """Rows with equal keys and positions sample the same tokens; a different key or start
    position samples other ones; a key list of the wrong length is refused."""
    params = SamplingParams(n=3, max_new_tokens=10, ignore_eos=True, row_seeds=(5, 5, 6))
    a, b, c = (o.token_ids.tolist() for o in engine.generate([prompts[0]], params)[0])
    assert a == b != c
    shifted = SamplingParams(max_new_tokens=10, ignore_eos=True, row_seeds=(5,), start_positions=(1,))
    assert engine.generate([prompts[0]], shifted)[0][0].token_ids.tolist() != a
    with pytest.raises(ValueError, match="row_seeds has 1 entries for 2 rows"):
        engine.generate([prompts[0]], SamplingParams(n=2, row_seeds=(5,)))


def _readonly_message(state: dict, version: int) -> dict:
    """`state` as a generator replica gets it: read-only views of a decoded wire message."""
    from async_pmd import wire

    msg = wire.NamedTensors(version=version, names=list(state), arrays=[t.numpy() for t in state.values()])
    return wire.decode(wire.encode_parts(msg), expect=wire.NamedTensors).to_torch(share_readonly=True)


def test_adopt_weights_keeps_the_message_memory_and_a_later_update_never_writes_it(fresh_engine, prompts):
    params = SamplingParams(max_new_tokens=8, temperature=0.0, ignore_eos=True)
    before = [g[0].token_ids.tolist() for g in fresh_engine.generate(prompts, params)]
    gen = torch.Generator().manual_seed(1)
    new = {n: t + torch.randn(t.shape, generator=gen) for n, t in fresh_engine.model.state_dict().items()}
    new["model.norm.weight"] = new["model.norm.weight"].double()  # another dtype: copied, not adopted
    message = _readonly_message(new, version=4)
    kept = {n: t.clone() for n, t in message.items()}

    fresh_engine.adopt_weights(message, version=4)

    after = fresh_engine.model.state_dict()
    assert fresh_engine.version == 4
    assert all(after[n].data_ptr() == message[n].data_ptr() for n in message if n != "model.norm.weight")
    assert after["model.norm.weight"].dtype == torch.float32
    assert all(torch.equal(after[n], kept[n].to(after[n].dtype)) for n in kept)
    outputs = fresh_engine.generate(prompts, params)
    assert [g[0].token_ids.tolist() for g in outputs] != before
    assert all(o.policy_version == 4 for g in outputs for o in g)

    # An in-place update after the adoption copies into memory of the engine's own: the
    # message (read-only shared memory in a replica) is left as it was.
    zeros = {n: torch.zeros_like(t) for n, t in after.items()}
    fresh_engine.update_weights(zeros, version=5)
    assert all(torch.count_nonzero(t) == 0 for t in fresh_engine.model.state_dict().values())
    assert all(torch.equal(message[n], kept[n]) for n in message)
    fresh_engine.update_weights(new, version=6)  # and the engine's storage is reused from then on
    pointers = {n: t.data_ptr() for n, t in fresh_engine.model.state_dict().items()}
    fresh_engine.update_weights(zeros, version=7)
    assert {n: t.data_ptr() for n, t in fresh_engine.model.state_dict().items()} == pointers


def test_adopting_one_name_of_a_tied_pair_loads_both(tmp_path):
    engine = TorchEngine(models.build_tiny_model(tmp_path / "tied", tie_word_embeddings=True))
    state = engine.model.state_dict()
    assert state["lm_head.weight"].data_ptr() == state["model.embed_tokens.weight"].data_ptr()
    message = _readonly_message({"lm_head.weight": torch.ones_like(state["lm_head.weight"])}, version=1)
    engine.adopt_weights(message, version=1)
    after = engine.model.state_dict()
    assert after["model.embed_tokens.weight"].data_ptr() == message["lm_head.weight"].data_ptr()
    engine.update_weights({"model.embed_tokens.weight": torch.zeros_like(state["lm_head.weight"])}, version=2)
    assert torch.count_nonzero(engine.model.state_dict()["lm_head.weight"]) == 0
    assert torch.count_nonzero(message["lm_head.weight"]) == message["lm_head.weight"].numel()
