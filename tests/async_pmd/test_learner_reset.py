"""`actor.reset_optimizer_states_freq`: the optimizer state is really zeroed under every ZeRO stage
the config allows (0-3), and training goes on from Adam step 1. ZeRO-2 and ZeRO-3 over two ranks
are also covered in test_learner_step.py; here each stage runs on one rank, all four engines in
one subprocess (one process group). The learner service's cadence and its `actor/optimizer_resets`
counter are checked end to end in tests/services/test_math_tiny.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np, torch
    from async_pmd import ds_engine, pmd_step, wire
    from async_pmd.config import ActorConfig, LearnerConfig, PolicyLossConfig
    from async_pmd.models import build_tiny_model, load_model
    from async_pmd.wire import TrainBatch

    ds_engine.setup_deepspeed_env(0, 1, int(sys.argv[1]))
    path = build_tiny_model(sys.argv[2] + "/tiny")
    # one group: "0+1=" answered twice, advantages +1 / -1, so every step has a real gradient
    prompts = np.array([[4, 23, 5, 27]] * 2, np.int32)
    responses = np.array([[10, 14], [11, 0]], np.int32)
    mask = np.array([[1, 1], [1, 0]], np.float32)
    batch = TrainBatch(prompts=prompts, responses=responses, response_mask=mask,
                       attention_mask=np.concatenate([np.ones((2, 4)), mask], 1).astype(np.int8),
                       old_log_probs=np.zeros((2, 2), np.float32), advantages=np.array([[1, 1], [-1, 0]], np.float32),
                       partition_weights=mask.copy(), rewards=np.array([1, 0], np.float32),
                       policy_versions=np.zeros(2, np.int64), uids=["a", "a"], learner_step=0)
    actor = ActorConfig(lr=1e-2, policy_loss=PolicyLossConfig(loss_mode="opmd", pmd_tau=1.0))
    report = {}
    for stage in (0, 1, 2, 3):
        engine = ds_engine.init_engine(load_model(path), actor, LearnerConfig(zero_stage=stage), 1, total_steps=10)
        pmd_step.train_on_batch(engine, batch, actor, 0, 1)
        pmd_step.train_on_batch(engine, batch, actor, 0, 1)
        state = ds_engine.base_optimizer(engine).state
        nonzero_before = sum(bool(v.abs().sum() > 0) for s in state.values() for v in s.values())
        zeroed = ds_engine.reset_optimizer_state(engine)
        all_zero = all(float(v.abs().sum()) == 0.0 for s in state.values() for v in s.values())
        before = {k: v.clone() for k, v in ds_engine.full_state_dict(engine, stage).items()}
        metrics = pmd_step.train_on_batch(engine, batch, actor, 0, 1)
        after = ds_engine.full_state_dict(engine, stage)
        report[stage] = {
            "tensors": sum(len(s) for s in state.values()), "nonzero_before": nonzero_before,
            "zeroed": zeroed, "all_zero": all_zero,
            "steps_after": sorted({float(s["step"]) for s in state.values()}),
            "loss_finite": bool(np.isfinite(metrics["actor/loss"])),
            "moved": any(not torch.equal(before[n], after[n]) for n in after),
        }
        if stage < 3:  # the object-store publish's parts: views of ZeRO's flat buffer, no clone
            state = ds_engine.full_state_dict(engine, stage, clone=False)
            parts = wire.encode_parts(wire.named_tensors_to_wire(state, 1))
            back = wire.decode(parts, expect=wire.NamedTensors).to_torch()
            report[stage]["publish_parts"] = len(parts)
            report[stage]["publish_same"] = all(torch.equal(back[n], t) for n, t in state.items())
            report[stage]["publish_zero_copy"] = parts[1].ctypes.data == next(iter(state.values())).data_ptr()
        engine.destroy()
    print(json.dumps(report))
    """
)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    from async_pmd.ports import find_free_port

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(find_free_port()), str(tmp_path_factory.mktemp("reset"))],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_reset_zeroes_state_under_every_zero_stage_and_training_continues(report):
    """Stages 0-3: after two steps Adam's state is non-zero; reset zeroes every tensor of it
    (exp_avg, exp_avg_sq, step); the next step runs from Adam step 1 and moves the weights."""
    assert sorted(report) == ["0", "1", "2", "3"]
    for stage, r in report.items():
        assert r["tensors"] > 0 and r["nonzero_before"] > 0, (stage, r)
        assert r["zeroed"] == r["tensors"] and r["all_zero"], (stage, r)
        assert r["steps_after"] == [1.0], (stage, r)  # bias correction restarts
        assert r["loss_finite"] and r["moved"], (stage, r)



@pytest.mark.slow
def test_zero_1_and_2_parameters_publish_as_one_part(report):
    """ZeRO-1/2 keep the parameters as views of one flat buffer, back to back: the object-store
    publish hands Ray the head and one part, a view of that buffer (no copy), which decodes to the
    same weights. ZeRO-0 keeps them apart: one part each. (What `wire.encode_parts` relies on for
    fewer, larger copies into shared memory; README "Weight sync as the model grows".)"""
    for stage in ("1", "2"):
        assert report[stage]["publish_parts"] == 2, report[stage]
        assert report[stage]["publish_same"] and report[stage]["publish_zero_copy"], report[stage]
    assert report["0"]["publish_parts"] > 2 and report["0"]["publish_same"], report["0"]
