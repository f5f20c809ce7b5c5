"""Engine choice in the run config, checkable in any venv: the seed's `rollout.name` spelling, the
engine/model pairs that cannot run (refused by name before any actor starts), and the two
real-engine configs; plus the vLLM adapter's pure translation of params and outputs."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from async_pmd import models
from async_pmd.config import ConfigError, build_config, load_config
from async_pmd.engines import SamplingParams, engine_available
from async_pmd.preflight import check_runnable
from async_pmd.engines import vllm_engine as vl

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def vllm_installed(monkeypatch):
    """The launcher's checks as in .venv-vllm, whatever this venv holds (only the install check looks)."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "vllm" else real(name, *a))


def test_the_seeds_rollout_name_selects_the_engine():
    assert build_config({}, ["actor_rollout_ref.rollout.name=torch"]).generator.engine == "torch"
    assert build_config({}, ["actor_rollout_ref.rollout.name=vllm"]).generator.engine == "vllm"  # valid; runnable is checked at start


@pytest.mark.skipif(engine_available("vllm"), reason="vllm is installed here: the not-installed refusal cannot run")
def test_vllm_not_installed_is_refused_by_name_with_the_install_command():
    with pytest.raises(ConfigError, match=r"generator.engine: .*engine 'vllm' is not installed here.*setup.sh --vllm"):
        check_runnable(build_config({}, ["actor_rollout_ref.rollout.name=vllm"]))


def test_vllm_with_a_head_dim_16_model_is_refused_naming_both(vllm_installed, tmp_path):
    with pytest.raises(ConfigError, match=r"generator.engine: 'vllm' on CPU cannot run model.tiny .*head dim 16"):
        check_runnable(build_config({"generator": {"engine": "vllm"}, "model": {"path": str(tmp_path / "m")}}))
    built = models.build_tiny_model(tmp_path / "built")  # an existing model is read from its config.json
    with pytest.raises(ConfigError, match=rf"cannot run model.path '{built}': head dim 16"):
        check_runnable(build_config({"generator": {"engine": "vllm"}, "model": {"path": str(built), "build_tiny": False}}))
    ok = build_config({"generator": {"engine": "vllm"},
                       "model": {"path": str(tmp_path / "m"), "tiny": models.TINY_HEAD_DIM_64}})
    check_runnable(ok)
    assert models.head_dim(ok.model.tiny.hidden_size, ok.model.tiny.num_heads) == 64
    # On a GPU the CPU kernels' limits do not apply.
    check_runnable(build_config({"generator": {"engine": "vllm", "num_gpus": 1}, "model": {"path": str(tmp_path / "m")}}))


def test_the_real_engine_configs_validate_where_their_engine_is_installed():
    for kind in ("sglang", "vllm"):
        cfg = load_config(REPO / "configs" / f"cluster_{kind}.yaml")
        assert cfg.generator.engine == kind and models.head_dim(cfg.model.tiny.hidden_size, cfg.model.tiny.num_heads) == 64
        if engine_available(kind):
            check_runnable(cfg)
        else:
            with pytest.raises(ConfigError, match=rf"engine '{kind}' is not installed here"):
                check_runnable(cfg)


def test_vllm_sampling_params_give_row_seeds_like_sglang():
    params = SamplingParams(temperature=0.7, top_p=0.9, top_k=0, max_new_tokens=12, stop_token_ids=(5,), n=3, seed=10)
    first, second = (vl.to_vllm_sampling_kwargs(params, i) for i in range(2))
    assert first == {"n": 3, "max_tokens": 12, "temperature": 0.7, "top_p": 0.9, "top_k": 0, "ignore_eos": False,
                     "logprobs": 0, "detokenize": False, "skip_special_tokens": False, "stop_token_ids": [5],
                     "seed": 10}
    assert second["seed"] == 13  # vLLM seeds sample j with seed + j: rows 3..5 get 13..15
    assert "seed" not in vl.to_vllm_sampling_kwargs(SamplingParams(top_k=4), 0)


def _completion(index, tokens, logprobs, finish="stop"):
    positions = [{t: SimpleNamespace(logprob=lp), 99: SimpleNamespace(logprob=-9.0)} for t, lp in zip(tokens, logprobs)]
    return SimpleNamespace(index=index, token_ids=tokens, logprobs=positions, finish_reason=finish)


def test_vllm_outputs_parse_per_prompt_in_sample_order():
    outputs = [SimpleNamespace(outputs=[_completion(1, [4], [-0.5], "length"), _completion(0, [7, 1], [-1.0, -0.25])])]
    (group,) = vl.group_request_outputs(outputs, n=2, version=5)
    assert [o.token_ids.tolist() for o in group] == [[7, 1], [4]]
    np.testing.assert_array_equal(group[0].logprobs, np.array([-1.0, -0.25], np.float32))
    assert [o.finish_reason for o in group] == ["stop", "length"] and {o.policy_version for o in group} == {5}
    with pytest.raises(ValueError, match="expected n=3"):
        vl.group_request_outputs(outputs, n=3, version=0)
    missing = SimpleNamespace(index=0, token_ids=[7], logprobs=[{8: SimpleNamespace(logprob=-1.0)}], finish_reason="stop")
    with pytest.raises(ValueError, match="lacks the log-prob of sampled token 7"):
        vl.parse_completion(missing, 0, 0)
