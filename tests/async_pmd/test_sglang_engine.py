"""The SGLang engine's parts checkable in the CPU venv: the not-installed path and the pure
translation helpers.

sglang pins a CUDA torch, so it never shares the CPU venv: the real engine runs on CPU in
.venv-sglang (tests/engines/test_sglang_real.py) and on a GPU below; both skip with the reason.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import subprocess
import sys

import numpy as np
import pytest
import torch

from async_pmd import models
from async_pmd.engines import SamplingParams, create_engine, sglang_available
from async_pmd.engines import sglang_engine as sg

needs_no_sglang = pytest.mark.skipif(sglang_available(), reason="sglang is installed: the not-installed path cannot run")
needs_sglang_gpu = pytest.mark.skipif(
    not (sglang_available() and torch.cuda.is_available()),
    reason="needs sglang (pip install 'async-pmd[sglang]') and a CUDA GPU; the CPU stack cannot hold it",
)


def _meta(triples, finish="stop"):
    return {"finish_reason": {"type": finish, "matched": 1} if finish else None, "output_token_logprobs": triples}


def test_importing_engines_never_imports_sglang():
    code = "import sys, async_pmd.engines, async_pmd.engines.sglang_engine; print('sglang' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@needs_no_sglang
def test_sglang_kind_without_sglang_names_the_extra(tmp_path):
    assert sglang_available() is False
    with pytest.raises(ImportError, match=r"pip install 'async-pmd\[sglang\]'"):
        create_engine("sglang", str(tmp_path))
    with pytest.raises(ImportError, match=r"async-pmd\[sglang\]"):
        sg.SGLangEngine(tmp_path)


def test_sampling_params_translate_to_sglang_keys():
    """top_k 0 → -1 (SGLang's 'off'); stop token kept; one request per response with seed + row."""
    params = SamplingParams(temperature=0.7, top_p=0.9, top_k=0, max_new_tokens=12, stop_token_ids=(5, 6), n=2, seed=10)
    input_ids, requests = sg.build_requests([[1, 2], [3]], params)
    assert input_ids == [[1, 2], [1, 2], [3], [3]]
    assert requests[0] == {
        "max_new_tokens": 12,
        "temperature": 0.7,
        "top_p": 0.9,
        "top_k": -1,
        "n": 1,
        "ignore_eos": False,
        "no_stop_trim": True,
        "stop_token_ids": [5, 6],
        "sampling_seed": 10,
    }
    assert [r["sampling_seed"] for r in requests] == [10, 11, 12, 13]
    unseeded = sg.to_sglang_sampling_params(SamplingParams(top_k=4, ignore_eos=True), row=0)
    assert "sampling_seed" not in unseeded and "stop_token_ids" not in unseeded
    assert unseeded["top_k"] == 4 and unseeded["ignore_eos"] is True


def test_outputs_parse_into_groups_per_prompt():
    outputs = [
        {"output_ids": [7, 1], "meta_info": _meta([(-0.5, 7, None), (-0.25, 1, None)])},
        {"output_ids": [8, 9], "meta_info": _meta([(-1.0, 8, None), (-2.0, 9, None)], "length")},
        {"output_ids": [4], "meta_info": _meta([(-0.125, 4, None), (-0.5, 1, None)])},  # stop trimmed
        {"output_ids": [], "meta_info": _meta([], "abort")},
    ]
    groups = sg.group_outputs(outputs, n=2, version=4)
    assert [[o.prompt_index for o in g] for g in groups] == [[0, 0], [1, 1]]
    first, second, third, aborted = (o for g in groups for o in g)
    assert first.token_ids.tolist() == [7, 1] and first.finish_reason == "stop"
    np.testing.assert_array_equal(first.logprobs, np.array([-0.5, -0.25], np.float32))
    assert second.finish_reason == "length" and third.token_ids.tolist() == [4, 1]
    assert aborted.finish_reason == "abort" and len(aborted.token_ids) == 0
    assert all(o.policy_version == 4 for g in groups for o in g)


def test_malformed_outputs_are_refused():
    with pytest.raises(ValueError, match="return_logprob"):
        sg.parse_output({"output_ids": [1], "meta_info": {}}, 0, 0)
    with pytest.raises(ValueError, match="disagree"):
        sg.parse_output({"output_ids": [2, 3], "meta_info": _meta([(-1.0, 5, None)])}, 0, 0)
    with pytest.raises(ValueError, match="not a multiple of n=2"):
        sg.group_outputs([{"output_ids": [], "meta_info": _meta([])}], n=2, version=0)


def test_checkpoint_shapes_read_from_safetensors_headers(tmp_path):
    """Names and shapes match the model's state_dict; a tied lm_head is an accepted alias."""
    path = models.build_tiny_model(tmp_path / "untied")
    state = models.load_model(path).state_dict()
    assert sg.checkpoint_shapes(path) == {k: tuple(v.shape) for k, v in state.items()}
    tied = sg.checkpoint_shapes(models.build_tiny_model(tmp_path / "tied", tie_word_embeddings=True))
    assert tied["lm_head.weight"] == tied["model.embed_tokens.weight"] == (46, 64)
    sg.check_named_tensors({"lm_head.weight": torch.zeros(46, 64)}, tied)
    with pytest.raises(ValueError, match="unknown tensor 'lm_head.bias'"):
        sg.check_named_tensors({"lm_head.bias": torch.zeros(46)}, tied)
    with pytest.raises(ValueError, match="'model.norm.weight' has shape"):
        sg.check_named_tensors({"model.norm.weight": torch.zeros(3)}, tied)
    with pytest.raises(FileNotFoundError):
        sg.checkpoint_shapes(tmp_path)


def test_prompt_checks_match_the_torch_engine():
    sg.check_prompts([[1, 2, 3]], max_prompt_length=3)
    with pytest.raises(ValueError, match="prompt 1 has 4 tokens, more than max_prompt_length=3"):
        sg.check_prompts([[1], [1, 2, 3, 4]], max_prompt_length=3)
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        sg.check_prompts([[]], max_prompt_length=3)


@needs_sglang_gpu
def test_sglang_engine_generates_on_gpu(tmp_path):
    """On a GPU box with sglang: n responses per prompt, finish reasons, weight version bump."""
    path = models.build_tiny_model(tmp_path / "tiny")
    engine = create_engine("sglang", str(path), mem_fraction_static=0.2, dtype="float32")
    try:
        outputs = engine.generate([[5, 14, 6, 17]], SamplingParams(n=2, max_new_tokens=4, seed=0))
        assert len(outputs[0]) == 2 and all(o.finish_reason in ("stop", "length") for o in outputs[0])
        state = models.load_model(path).state_dict()
        engine.update_weights({"model.norm.weight": torch.zeros_like(state["model.norm.weight"])}, version=1)
        assert engine.version == 1
    finally:
        engine.shutdown()


def test_run_on_loop_from_idle_busy_and_own_threads():
    """Sync engine calls work on an idle loop and from a worker thread; on the loop thread they raise."""
    import asyncio

    async def answer():
        return 42

    loop = asyncio.new_event_loop()
    try:
        assert sg.run_on_loop(loop, answer()) == 42

        async def main():
            assert await asyncio.to_thread(sg.run_on_loop, loop, answer()) == 42
            with pytest.raises(RuntimeError, match="asyncio.to_thread"):
                sg.run_on_loop(loop, answer())

        loop.run_until_complete(main())
    finally:
        loop.close()
