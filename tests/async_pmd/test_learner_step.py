"""The learner rank's parts on real DeepSpeed (CPU, gloo): `ds_engine` and `pmd_step`: the forward agrees with the sampler, an update
moves log-probs the way the advantages say, weights gather whole, the optimizer resets, and a
checkpoint round-trips exactly.

One process can join a process group only once, so ZeRO-2 runs in this process on one
module-scoped engine (tests that train on it compare before/after, never absolute values), and
ZeRO-3 runs as two real ranks in subprocesses.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

from async_pmd.config import ActorConfig, LearnerConfig, PolicyLossConfig
from async_pmd.engines import SamplingParams
from async_pmd.engines.torch_engine import TorchEngine
from async_pmd.ds_engine import (
    base_optimizer,
    ds_config,
    full_state_dict,
    init_engine,
    load_checkpoint,
    lr_factor,
    reset_optimizer_state,
    save_checkpoint,
    setup_deepspeed_env,
)
from async_pmd.pmd_step import plan_mini_batches, response_log_probs, train_on_batch
from async_pmd.models import build_tiny_model, load_model
from async_pmd.ports import find_free_port
from async_pmd.wire import TrainBatch

PAD = 0
PROMPTS = [[4, 23, 5, 27], [6, 23, 7, 27], [9, 27]]  # "0+1=", "2+3=", "5=" in the char vocabulary


# ---------------------------------------------------------------- helpers


def make_batch(prompts, responses, uids, advantages, old_log_probs=None, learner_step=0) -> TrainBatch:
    """Pad ragged rows the way the GroupBuffer does (prompts left, responses right)."""
    batch, p_len, r_len = len(prompts), max(map(len, prompts)), max(map(len, responses))
    prompt_arr = np.full((batch, p_len), PAD, np.int32)
    response_arr = np.full((batch, r_len), PAD, np.int32)
    response_mask = np.zeros((batch, r_len), np.float32)
    attention = np.zeros((batch, p_len + r_len), np.int8)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        prompt_arr[i, p_len - len(p):] = p
        attention[i, p_len - len(p): p_len] = 1
        response_arr[i, : len(r)] = r
        response_mask[i, : len(r)] = 1
        attention[i, p_len: p_len + len(r)] = 1
    olp = np.zeros((batch, r_len), np.float32) if old_log_probs is None else old_log_probs
    arrays = dict(
        prompts=prompt_arr, responses=response_arr, response_mask=response_mask, attention_mask=attention,
        old_log_probs=olp.astype(np.float32),
        advantages=np.repeat(np.asarray(advantages, np.float32)[:, None], r_len, 1) * response_mask,
        partition_weights=response_mask.copy(), rewards=np.asarray(advantages, np.float32),
        policy_versions=np.zeros(batch, np.int64),
    )
    for a in arrays.values():
        a.setflags(write=False)  # as decoded from the wire
    return TrainBatch(**arrays, uids=list(uids), learner_step=learner_step)


def batch_log_probs(model, batch: TrainBatch, temperature=1.0) -> torch.Tensor:
    with torch.no_grad():
        lp, _ = response_log_probs(
            model, torch.tensor(np.array(batch.prompts)), torch.tensor(np.array(batch.responses)),
            torch.tensor(np.array(batch.attention_mask)), temperature,
        )
    return lp


def seq_log_probs(model, batch: TrainBatch) -> np.ndarray:
    return (batch_log_probs(model, batch) * torch.tensor(np.array(batch.response_mask))).sum(-1).numpy()


def actor_config(**kw) -> ActorConfig:
    kw.setdefault("policy_loss", PolicyLossConfig(loss_mode="opmd", pmd_tau=1.0))
    return ActorConfig(**{"lr": 1e-2, "grad_clip": 1.0, **kw})


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("learner_step") / "tiny")


@pytest.fixture(scope="module")
def engine(tiny_path):
    """One ZeRO-2 engine for the module; its env changes are undone when the module ends."""
    with pytest.MonkeyPatch.context() as mp:
        for key in ("DS_ACCELERATOR", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            mp.setenv(key, "")  # records the original value (or its absence) for the undo
        setup_deepspeed_env(0, 1, find_free_port())
        start = time.perf_counter()
        eng = init_engine(load_model(tiny_path), actor_config(), LearnerConfig(zero_stage=2), 1, total_steps=100)
        print(f"\nZeRO-2 init_engine: {time.perf_counter() - start:.2f} s")
        yield eng


@pytest.fixture
def pos_neg_batch():
    """Two groups; in each, responses with advantage +1 and -1 (no token shared between them, so
    the effect of the update on each is first-order and cannot be masked by a shared EOS)."""
    responses = [[10, 14, 18], [11, 15], [12, 16], [13, 17, 19]]
    prompts = [PROMPTS[0]] * 2 + [PROMPTS[1]] * 2
    return make_batch(prompts, responses, ["a", "a", "b", "b"], [1.0, -1.0, 1.0, -1.0])


# ---------------------------------------------------------------- pure parts


def test_lr_factor_by_hand():
    """Warmup (step+1)/w reaches 1 at step w-1; cosine is ½(1+cos(π·progress)) after warmup."""
    assert [lr_factor(s, 4, 100, "constant") for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    # warmup 2, total 10: progress = (s-2)/8 -> s=2: 1, s=6: ½(1+cos(π/2)) = 0.5, s=10: 0, s=20: 0
    assert lr_factor(2, 2, 10, "cosine") == pytest.approx(1.0)
    assert lr_factor(6, 2, 10, "cosine") == pytest.approx(0.5)
    assert lr_factor(10, 2, 10, "cosine") == pytest.approx(0.0)
    assert lr_factor(20, 2, 10, "cosine") == pytest.approx(0.0)


def test_ds_config_fields():
    actor = actor_config(grad_clip=0.5)
    cfg = ds_config(actor, LearnerConfig(zero_stage=3), world_size=2)
    assert cfg["zero_optimization"]["stage"] == 3 and cfg["gradient_clipping"] == 0.5
    assert cfg["train_micro_batch_size_per_gpu"] == 1 and cfg["gradient_accumulation_steps"] == 1
    assert cfg["zero_allow_untested_optimizer"] and not cfg["bf16"]["enabled"]
    assert ds_config(actor, LearnerConfig(), 1, "bfloat16")["bf16"]["enabled"]
    with pytest.raises(ValueError, match="float16"):
        ds_config(actor, LearnerConfig(), 1, "float16")


def test_plan_mini_batches_same_steps_on_every_rank():
    """Each global mini-batch is whole groups; rank r holds its rows i ≡ r (mod world); every
    rank gets the same count, a row is used once per epoch, and the shuffle follows the seed."""
    uids = ["a"] * 3 + ["b"] * 3 + ["c"] * 3  # 9 rows, 3 groups
    plans = [plan_mini_batches(uids, r, 2, groups_per_mini_batch=2, epochs=2, seed=7) for r in range(2)]
    assert [len(p) for p in plans] == [2, 2] and all(len(e) == 2 for p in plans for e in p)  # ceil(3/2)
    for epoch in range(2):
        rows = np.concatenate([mb for p in plans for mb in p[epoch]])
        assert sorted(rows.tolist()) == list(range(9))
        for mb_index in range(2):
            both = np.concatenate([plans[r][epoch][mb_index] for r in range(2)])
            assert len({uids[i] for i in both}) <= 2  # at most 2 groups per global mini-batch
            assert all(i % 2 == r for r in range(2) for i in plans[r][epoch][mb_index])
    again = plan_mini_batches(uids, 0, 2, 2, 2, seed=7)
    assert all(np.array_equal(x, y) for e1, e2 in zip(plans[0], again) for x, y in zip(e1, e2))
    assert len(plan_mini_batches(uids, 0, 1, None, 1, seed=0)[0]) == 1  # None = one mini-batch


def test_setup_refuses_another_accelerator_after_import(engine):
    """deepspeed is imported (CPU) by now: asking for the GPU must fail loudly, env untouched."""
    before = dict(os.environ)
    with pytest.raises(RuntimeError, match="call setup_deepspeed_env first"):
        setup_deepspeed_env(0, 1, 12345, use_gpu=True)
    assert dict(os.environ) == before


# ---------------------------------------------------------------- forward


def test_response_log_probs_match_unpadded_per_row_reference(tiny_path):
    """Left-padded prompts + right-padded responses give, on the response tokens, the log-probs
    of a plain forward over each unpadded row (within 1e-5), tempered by T."""
    model = load_model(tiny_path)
    responses = [[10, 11, 1], [12], [13, 14]]
    batch = make_batch(PROMPTS, responses, ["a", "b", "c"], [0, 0, 0])
    for temperature in (1.0, 0.7):
        got = batch_log_probs(model, batch, temperature)
        for i, (p, r) in enumerate(zip(PROMPTS, responses)):
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([p + r])).logits[0].float() / temperature
            ref = torch.log_softmax(logits[len(p) - 1: len(p) + len(r) - 1], -1)
            ref = ref.gather(-1, torch.tensor(r)[:, None]).squeeze(-1)
            torch.testing.assert_close(got[i, : len(r)], ref, atol=1e-5, rtol=0)


def test_response_log_probs_equal_torch_engine_sampling_log_probs(tiny_path):
    """At θ = θ_old the learner's log-probs are the generator's π_old (same temperature rule)."""
    model = load_model(tiny_path)
    params = SamplingParams(temperature=0.8, max_new_tokens=6, n=2, seed=3)
    outputs = [o for group in TorchEngine(model).generate(PROMPTS, params) for o in group]
    responses = [o.token_ids.tolist() for o in outputs]
    sampled = np.zeros((len(outputs), max(map(len, responses))), np.float32)
    for i, o in enumerate(outputs):
        sampled[i, : len(o.logprobs)] = o.logprobs
    batch = make_batch([p for p in PROMPTS for _ in range(2)], responses, list("aabbcc"), [0] * 6)
    got = batch_log_probs(model, batch, temperature=0.8) * torch.tensor(np.array(batch.response_mask))
    torch.testing.assert_close(got, torch.tensor(sampled), atol=1e-5, rtol=0)


def test_entropy_is_masked_token_entropy_of_tempered_distribution(tiny_path):
    model = load_model(tiny_path)
    batch = make_batch(PROMPTS[:1], [[10, 11]], ["a"], [0])
    args = [torch.tensor(np.array(getattr(batch, k))) for k in ("prompts", "responses", "attention_mask")]
    with torch.no_grad():
        _, entropy = response_log_probs(model, *args, temperature=0.5, with_entropy=True)
        logits = model(input_ids=torch.tensor([PROMPTS[0] + [10, 11]])).logits[0, 3:5].float() / 0.5
    probs = torch.softmax(logits, -1)
    torch.testing.assert_close(entropy[0], -(probs * probs.log()).sum(-1), atol=1e-5, rtol=0)


# ---------------------------------------------------------------- training (ZeRO-2, in process)


def test_training_raises_log_probs_of_positive_responses(engine, pos_neg_batch):
    """OPMD with A = ±1: after updates, sequence log-probs of A>0 rise and of A<0 fall; metrics are
    finite and the step count is mini-batches × epochs (2 groups / 1 per mini-batch × 2 epochs)."""
    before = seq_log_probs(engine.module, pos_neg_batch)
    old = batch_log_probs(engine.module, pos_neg_batch).numpy() * pos_neg_batch.response_mask
    batch = make_batch(
        [PROMPTS[0]] * 2 + [PROMPTS[1]] * 2, [[10, 14, 18], [11, 15], [12, 16], [13, 17, 19]],
        pos_neg_batch.uids, pos_neg_batch.rewards, old_log_probs=old, learner_step=5,
    )
    actor = actor_config(ppo_mini_batch_size=1, ppo_epochs=2)
    for _ in range(3):
        metrics = train_on_batch(engine, batch, actor, rank=0, world_size=1)
    delta = seq_log_probs(engine.module, batch) - before
    positive = batch.rewards > 0
    assert (delta[positive] > 0).all() and (delta[~positive] < 0).all(), delta
    expected = {"actor/loss", "actor/pmd_kl", "actor/grad_norm", "actor/entropy", "actor/lr",
                "actor/partition_weight_mean", "actor/num_optimizer_steps"}
    assert expected <= set(metrics) and all(np.isfinite(v) for v in metrics.values()), metrics
    assert metrics["actor/num_optimizer_steps"] == 4.0
    assert metrics["actor/partition_weight_mean"] == pytest.approx(1.0)
    assert metrics["actor/grad_norm"] > 0 and metrics["actor/entropy"] > 0
    assert metrics["actor/lr"] == pytest.approx(1e-2)


def test_recompute_old_log_prob_gives_zero_kl_on_first_step(engine, pos_neg_batch):
    """With π_old recomputed, the first mini-batch sees log π_θ − log π_old = 0; with one mini-batch
    and one epoch, pmd_kl is exactly that first-step value."""
    metrics = train_on_batch(engine, pos_neg_batch, actor_config(recompute_old_log_prob=True), 0, 1)
    assert metrics["actor/pmd_kl"] == pytest.approx(0.0, abs=1e-6)
    assert metrics["actor/num_optimizer_steps"] == 1.0


def test_every_step_reports_the_engine_learner_mismatch(engine, pos_neg_batch):
    """The engine's log-probs set to the learner's + 0.3 nats per token: with π_old recomputed on
    the learner, rollout_corr/log_ratio_mean is −0.3 (learner minus engine) and the max |ratio|
    0.3, reported with or without the correction. The opmd loss at the first mini-batch (s = 0,
    τ 1, A = ±1, lengths 3, 2, 2, 3) is mean_i ½/L_i = (1/6 + 1/4 + 1/4 + 1/6)/4 = 0.208333; with
    `rollout_is: token` each row's loss is scaled by its truncated weight exp(−0.3)."""
    mask = np.array(pos_neg_batch.response_mask)
    prompts = [list(p[p != PAD]) for p in np.array(pos_neg_batch.prompts)]
    responses = [list(r[m > 0]) for r, m in zip(np.array(pos_neg_batch.responses), mask)]
    by_hand = (1 / 6 + 1 / 4 + 1 / 4 + 1 / 6) / 4
    for extra, factor in (({}, 1.0), ({"rollout_is": "token", "rollout_is_threshold": 2.0}, math.exp(-0.3))):
        engine_lp = (batch_log_probs(engine, pos_neg_batch).detach().numpy() + 0.3) * mask  # at today's weights
        shifted = make_batch(prompts, responses, pos_neg_batch.uids, [1.0, -1.0, 1.0, -1.0], old_log_probs=engine_lp)
        metrics = train_on_batch(engine, shifted, actor_config(recompute_old_log_prob=True, **extra), 0, 1)
        assert metrics["rollout_corr/log_ratio_mean"] == pytest.approx(-0.3, abs=1e-4)
        assert metrics["rollout_corr/log_ratio_abs_max"] == pytest.approx(0.3, abs=1e-4)
        assert metrics["actor/loss"] == pytest.approx(by_hand * factor, rel=1e-4)


def test_full_state_dict_is_a_detached_copy_of_the_model_params(engine, tiny_path):
    state = full_state_dict(engine, zero_stage=2)
    names = [n for n, _ in load_model(tiny_path).named_parameters()]
    assert list(state) == names
    for name, param in engine.module.named_parameters():
        tensor = state[name]
        assert tensor.device.type == "cpu" and tensor.is_contiguous() and not tensor.requires_grad
        assert tensor.data_ptr() != param.data_ptr()
        torch.testing.assert_close(tensor, param.detach(), atol=0, rtol=0)
    TorchEngine(load_model(tiny_path)).update_weights(state, version=1)  # loads by the same names
    # clone=False (what the object-store publish asks for, its encode being the copy): views.
    views = full_state_dict(engine, zero_stage=2, clone=False)
    for name, param in engine.module.named_parameters():
        assert views[name].data_ptr() == param.data_ptr() and not views[name].requires_grad


def test_reset_optimizer_state_zeroes_adam_and_training_continues(engine, pos_neg_batch):
    train_on_batch(engine, pos_neg_batch, actor_config(), 0, 1)  # make sure there is state
    optimizer = base_optimizer(engine)
    assert any(v.abs().sum() > 0 for s in optimizer.state.values() for v in s.values())
    count = reset_optimizer_state(engine)
    assert count == 3 * len(optimizer.state)  # step, exp_avg, exp_avg_sq per (flat) parameter
    assert all(float(v.abs().sum()) == 0.0 for s in optimizer.state.values() for v in s.values())
    metrics = train_on_batch(engine, pos_neg_batch, actor_config(), 0, 1)
    assert np.isfinite(metrics["actor/loss"])
    assert all(float(s["step"]) == 1.0 for s in optimizer.state.values())  # Adam restarted at step 1


def test_checkpoint_round_trip_restores_params_and_optimizer_exactly(engine, pos_neg_batch, tmp_path):
    train_on_batch(engine, pos_neg_batch, actor_config(), 0, 1)
    params = full_state_dict(engine, 2)
    optim = {k: {n: v.clone() for n, v in s.items()} for k, s in enumerate(base_optimizer(engine).state.values())}
    lr_state = engine.lr_scheduler.state_dict()
    save_checkpoint(engine, tmp_path, {"learner_step": 7, "cursor": [1, 2]})

    train_on_batch(engine, pos_neg_batch, actor_config(), 0, 1)  # move everything away
    assert not torch.equal(full_state_dict(engine, 2)["lm_head.weight"], params["lm_head.weight"])
    client = load_checkpoint(engine, tmp_path)

    assert client["learner_step"] == 7 and client["cursor"] == [1, 2]
    for name, tensor in full_state_dict(engine, 2).items():
        torch.testing.assert_close(tensor, params[name], atol=0, rtol=0)
    for k, state in enumerate(base_optimizer(engine).state.values()):
        for n, v in state.items():
            torch.testing.assert_close(v, optim[k][n], atol=0, rtol=0)
    assert engine.lr_scheduler.state_dict()["last_epoch"] == lr_state["last_epoch"]
    with pytest.raises(FileNotFoundError):
        load_checkpoint(engine, tmp_path / "nothing-here")


# ---------------------------------------------------------------- ZeRO-3, two ranks in subprocesses

ZERO3_RANK = textwrap.dedent(
    """
    import json, sys, time
    rank, port, model_path, work = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    from async_pmd.ds_engine import setup_deepspeed_env
    setup_deepspeed_env(rank, 2, port)
    import numpy as np, torch
    from async_pmd import ds_engine, pmd_step
    from async_pmd.config import ActorConfig, LearnerConfig
    from async_pmd.models import load_model
    from tests.async_pmd.test_learner_step import make_batch, PROMPTS

    torch.set_num_threads(1)
    reference = dict(load_model(model_path).named_parameters())
    actor = ActorConfig(lr=1e-2, ppo_mini_batch_size=1)
    start = time.perf_counter()
    # Persistence threshold 0: even tiny tensors are partitioned, so the gather is real.
    engine = ds_engine.init_engine(load_model(model_path), actor, LearnerConfig(zero_stage=3), 2, total_steps=10,
                            config_overrides={"zero_optimization": {"stage3_param_persistence_threshold": 0}})
    init_s = time.perf_counter() - start
    assert all(p.numel() == 0 for p in engine.module.parameters()), "parameters not partitioned"
    import psutil
    listening = sorted({(c.laddr.ip, c.laddr.port) for c in psutil.Process().net_connections("inet")
                        if c.status == psutil.CONN_LISTEN})

    state = ds_engine.full_state_dict(engine, 3)
    if rank == 0:
        assert list(state) == list(reference)
        for name, t in state.items():
            assert torch.equal(t, reference[name].detach()), name
    else:
        assert state is None

    # 3 rows, 2 ranks: rank 1 owns only row 1, so in one of the 2 mini-batches it trains a dummy row.
    batch = make_batch(PROMPTS[:2] + [PROMPTS[1]], [[10, 1], [11], [12, 1]], ["a", "b", "b"], [1.0, -1.0, 1.0])
    metrics = pmd_step.train_on_batch(engine, batch, actor, rank, 2)
    assert metrics["actor/num_optimizer_steps"] == 2.0 and all(np.isfinite(list(metrics.values())))
    assert ds_engine.reset_optimizer_state(engine) > 0
    pmd_step.train_on_batch(engine, batch, actor, rank, 2)

    trained = ds_engine.full_state_dict(engine, 3)
    ds_engine.save_checkpoint(engine, work + "/ckpt", {"step": 2})
    pmd_step.train_on_batch(engine, batch, actor, rank, 2)
    assert ds_engine.load_checkpoint(engine, work + "/ckpt")["step"] == 2
    restored = ds_engine.full_state_dict(engine, 3)
    exported = ds_engine.export_hf(engine, 3, work + "/hf")
    if rank == 0:
        assert any(not torch.equal(trained[n], reference[n]) for n in trained)
        assert all(torch.equal(restored[n], trained[n]) for n in trained)
        reloaded = dict(load_model(exported).named_parameters())
        assert all(torch.equal(reloaded[n].detach(), trained[n]) for n in trained)

    # Micro-batches under ZeRO-3: rank 0 cuts rows 0, 2 into two micro-batches, rank 1 runs row 1
    # and a dummy; the accumulated step equals the whole mini-batch's (KL and entropy terms on).
    options = dict(lr=1e-2, use_kl_loss=True, kl_loss_coef=0.5, entropy_coeff=0.01)
    reference = load_model(model_path).requires_grad_(False)
    runs = {}
    for name, extra in {"whole": {}, "count": {"ppo_micro_batch_size_per_gpu": 1},
                        "tokens": {"use_dynamic_bsz": True, "ppo_max_token_len_per_gpu": 8}}.items():
        run_actor = ActorConfig(**options, **extra)
        eng = ds_engine.init_engine(load_model(model_path), run_actor, LearnerConfig(zero_stage=3), 2, total_steps=10)
        run_metrics = pmd_step.train_on_batch(eng, batch, run_actor, rank, 2, reference=reference)
        runs[name] = (run_metrics, ds_engine.full_state_dict(eng, 3))
        eng.destroy()
    assert runs["whole"][0]["actor/num_micro_batches"] == 1.0
    for name in ("count", "tokens"):
        run_metrics, state = runs[name]
        assert run_metrics["actor/num_micro_batches"] == 2.0, name
        for key in ("actor/grad_norm", "actor/loss", "actor/kl_loss", "actor/entropy_loss"):
            want = runs["whole"][0][key]
            assert abs(run_metrics[key] - want) <= 1e-4 * abs(want) + 1e-7, (name, key, run_metrics[key], want)
        if rank == 0:
            for n, t in state.items():
                assert torch.allclose(t, runs["whole"][1][n], atol=1e-4, rtol=0), (name, n)
    print(json.dumps({"rank": rank, "init_s": init_s, "metrics": metrics, "listening": listening}))
    """
)


def test_zero3_two_ranks_gather_train_reset_checkpoint_export(tiny_path, tmp_path):
    """Under real ZeRO-3 partitioning over 2 ranks (formed over rank 0's TCPStore, which listens on
    127.0.0.1 only, as gloo does): rank 0 gathers full, correct tensors by the
    model's own names; training (with a rank that has a dummy mini-batch), reset, checkpoint
    round-trip and HF export all complete with matched collectives; micro-batches by count and
    by token budget (a rank padded with a dummy micro-batch) give the whole mini-batch's step."""
    port = find_free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    procs = [
        subprocess.Popen([sys.executable, "-c", ZERO3_RANK, str(r), str(port), str(tiny_path), str(tmp_path)],
                         cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for r in range(2)
    ]
    results = [p.communicate(timeout=240) for p in procs]
    for p, (out, err) in zip(procs, results):
        assert p.returncode == 0, err[-4000:]
    reports = [json.loads(out.strip().splitlines()[-1]) for out, _ in results]
    print("\nZeRO-3 init_engine per rank: " + ", ".join(f"{r['init_s']:.2f} s" for r in reports))
    assert reports[0]["metrics"] == reports[1]["metrics"]  # metrics are reduced over ranks
    # The group formed over rank 0's TCPStore on MASTER_ADDR (127.0.0.1) only: torch's own env://
    # store, which DeepSpeed builds when nothing else did, listens on [::] (tests/async_pmd/test_rendezvous.py).
    assert ["127.0.0.1", port] in reports[0]["listening"], reports[0]["listening"]
    for report in reports:
        assert all(ip == "127.0.0.1" for ip, _ in report["listening"]), report["listening"]
