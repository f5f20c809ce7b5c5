"""The learner's options on top of the PMD step: micro-batches with gradient accumulation (by count
and by token budget), ZeRO CPU offload, gradient checkpointing, the KL loss to the frozen initial
policy, and the entropy bonus.

The contracts: a mini-batch cut into micro-batches gives the gradient of the whole mini-batch in
one forward (exactly, on a plain model; to float tolerance through DeepSpeed's accumulation);
every rank runs the same number of micro-batches; offload and checkpointing change memory, not the
update; the KL term is 0 while π_θ = π_ref and grows after an update; the entropy bonus subtracts
`entropy_coeff` × the aggregated entropy. DeepSpeed runs in this process (ZeRO-2 and ZeRO-3 on
one rank; engines built from the same weights, compared before/after); two ranks under ZeRO-3 are
in test_learner_step.py.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from async_pmd import ds_engine
from async_pmd.algos import agg_loss, compute_policy_loss_opmd, compute_policy_loss_vanilla, get_policy_loss_fn
from async_pmd.algos.losses import micro_batch_share
from async_pmd.config import ActorConfig, ConfigError, LearnerConfig, ModelConfig, PolicyLossConfig, build_config
from async_pmd.ds_engine import full_state_dict, init_engine, setup_deepspeed_env
from async_pmd.models import build_tiny_model, load_model
from async_pmd.ports import find_free_port
from async_pmd.pmd_step import (
    _to_torch,
    micro_batch,
    micro_batch_loss,
    plan_micro_batches,
    row_extents,
    split_micro_batches,
    train_on_batch,
)
from tests.async_pmd.test_learner_step import PROMPTS, batch_log_probs, make_batch

# (loss_mode, loss_agg_mode): opmd's two modes and verl's four through the vanilla loss.
LOSS_CASES = [("opmd", "seq-mean-token-mean"), ("opmd", "seq-mean-token-sum-norm"),
              ("vanilla", "token-mean"), ("vanilla", "seq-mean-token-sum"),
              ("vanilla", "seq-mean-token-mean"), ("vanilla", "seq-mean-token-sum-norm")]


# ---------------------------------------------------------------- helpers


def actor_config(loss_mode="opmd", loss_agg_mode="seq-mean-token-mean", **kw) -> ActorConfig:
    return ActorConfig(policy_loss=PolicyLossConfig(loss_mode=loss_mode, pmd_tau=1.0),
                       loss_agg_mode=loss_agg_mode, **{"lr": 1e-2, "grad_clip": 100.0, **kw})


def ragged_batch(model=None, learner_step=0):
    """Six rows in three groups, ragged prompts and responses, one empty response; π_old = π_θ +
    noise (so PPO's ratio is near 1 and both branches carry gradient)."""
    prompts = [PROMPTS[0], PROMPTS[0], PROMPTS[1], PROMPTS[1], PROMPTS[2], PROMPTS[2]]
    responses = [[10, 14, 18, 1], [11], [12, 16], [], [13, 17, 19], [15, 1]]
    advantages = [1.0, -0.5, 0.7, -1.0, 0.3, -0.2]
    batch = make_batch(prompts, responses, list("aabbcc"), advantages, learner_step=learner_step)
    if model is None:
        return batch
    noise = np.random.default_rng(0).normal(0, 0.1, batch.response_mask.shape).astype(np.float32)
    old = (batch_log_probs(model, batch).numpy() + noise) * batch.response_mask
    return make_batch(prompts, responses, list("aabbcc"), advantages, old_log_probs=old, learner_step=learner_step)


def batch_tensors(batch, ref_shift=0.0):
    data = _to_torch(batch, torch.device("cpu"))
    data["rollout_log_probs"] = data["old_log_probs"]
    data["ref_log_probs"] = data["old_log_probs"] + ref_shift
    extents = row_extents(np.asarray(batch.attention_mask), np.asarray(batch.response_mask), batch.prompts.shape[1])
    return data, extents


def accumulated(model, data, extents, micro_rows, actor, whole_rows, norm_length=None):
    """(Σ micro losses, {param: accumulated grad}) after backward on each micro-batch of `micro_rows`."""
    model.zero_grad(set_to_none=True)
    whole_mask = data["response_mask"][torch.as_tensor(whole_rows)]
    loss_fn = get_policy_loss_fn(actor.policy_loss.loss_mode)
    total = 0.0
    for rows in micro_rows:
        mb = micro_batch(data, rows, *extents)
        loss, _, _ = micro_batch_loss(model, mb, whole_mask, actor, loss_fn, norm_length=norm_length,
                                      real=len(rows) > 0)
        loss.backward()
        total += loss.item()
    return total, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("learner_options") / "tiny")


@pytest.fixture(scope="module")
def ds_env():
    """The DeepSpeed env for this module's one-rank engines (undone when the module ends)."""
    with pytest.MonkeyPatch.context() as mp:
        for key in ("DS_ACCELERATOR", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            mp.setenv(key, "")
        setup_deepspeed_env(0, 1, find_free_port())
        yield


def record_step_grads(engine) -> list[torch.Tensor]:
    """The gradients the optimizer steps on (ZeRO's flat fp32 partitions), one flat copy per step."""
    optimizer, seen = ds_engine.base_optimizer(engine), []
    step = optimizer.step

    def recording_step(*args, **kwargs):
        seen.append(torch.cat([p.grad.detach().flatten().clone() for g in optimizer.param_groups
                               for p in g["params"] if p.grad is not None]))
        return step(*args, **kwargs)

    optimizer.step = recording_step
    return seen


def engine_for(tiny_path, actor, learner=None, model_cfg=None):
    model = ds_engine.load_policy(model_cfg or ModelConfig(path=str(tiny_path)))
    return init_engine(model, actor, learner or LearnerConfig(zero_stage=2), 1, total_steps=100)


# ---------------------------------------------------------------- pure parts


@pytest.mark.parametrize("loss_mode,mode", LOSS_CASES)
def test_micro_batch_shares_sum_micro_losses_to_the_whole_loss(loss_mode, mode):
    """Σ_i share_i · loss(micro i) = loss(whole) for the policy losses and for agg_loss (the KL and
    entropy terms), with an empty row and micro-batches cut to their own widths."""
    g = torch.Generator().manual_seed(0)
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.float32)
    old, new, adv, pw = (torch.randn(5, 4, generator=g) for _ in range(4))
    fn = compute_policy_loss_opmd if loss_mode == "opmd" else compute_policy_loss_vanilla
    pw = pw.abs()

    def policy(rows, width):
        return fn(old[rows, :width], new[rows, :width], adv[rows, :width], mask[rows, :width], loss_agg_mode=mode,
                  partition_weights=pw[rows, :width], max_response_length=6)[0]

    def agg(rows, width):
        return agg_loss(new[rows, :width], mask[rows, :width], mode, loss_scale_factor=6)

    whole = torch.arange(5)
    parts = [(torch.tensor([0, 2]), 3), (torch.tensor([1]), 1), (torch.tensor([3, 4]), 4)]
    for loss, row_mean in ((policy, loss_mode == "opmd"), (agg, False)):
        total = sum(micro_batch_share(mode, mask[rows, :w], mask, row_mean=row_mean) * loss(rows, w)
                    for rows, w in parts)
        torch.testing.assert_close(total, loss(whole, 4), atol=1e-6, rtol=1e-6)


def test_split_micro_batches_by_count_and_by_token_budget():
    """Count: plan order, k rows at a time. Budget: longest first, packed while rows × (max prompt +
    max response) <= budget; a row over the budget goes alone."""
    rows = np.array([4, 1, 3, 0])
    prompt = np.array([2, 4, 3, 1, 2])
    response = np.array([3, 4, 1, 2, 6])  # totals: row0 5, row1 8, row3 3, row4 8
    assert [m.tolist() for m in split_micro_batches(rows, prompt, response, 3)] == [[4, 1, 3], [0]]
    assert [m.tolist() for m in split_micro_batches(rows, prompt, response)] == [[4, 1, 3, 0]]
    # longest first: 4 (2+6), 1 (4+4), 0 (2+3), 3 (3+1). Budget 20: {4,1} costs 2 × (4+6) = 20;
    # adding 0 costs 3 × 10 = 30 > 20 -> new; {0,3} costs 2 × (3+3) = 12.
    assert [m.tolist() for m in split_micro_batches(rows, prompt, response, max_token_len=20)] == [[4, 1], [0, 3]]
    # budget 6: 4 alone (8 > 6, but never dropped), 1 alone, {0}: 5, then 0+3: 2 × (3+3) = 12 > 6.
    assert [m.tolist() for m in split_micro_batches(rows, prompt, response, max_token_len=6)] == [[4], [1], [0], [3]]
    assert split_micro_batches(np.zeros(0, np.int64), prompt, response, 2) == []


def test_row_extents_follow_the_padding():
    batch = ragged_batch()
    prompt, response = row_extents(np.asarray(batch.attention_mask), np.asarray(batch.response_mask), 4)
    assert prompt.tolist() == [4, 4, 4, 4, 2, 2] and response.tolist() == [4, 1, 2, 0, 3, 2]


def test_plan_micro_batches_gives_every_rank_the_same_count():
    """3 rows in one group over 2 ranks, 1 row per micro-batch: rank 0 has rows 0, 2 (2 micro-
    batches), rank 1 row 1 plus one dummy (empty) micro-batch; one optimizer step each."""
    actor = actor_config(ppo_micro_batch_size_per_gpu=1)
    lens = np.array([3, 3, 3]), np.array([2, 2, 2])
    plans = [plan_micro_batches(["a"] * 3, *lens, r, 2, actor, seed=0) for r in range(2)]
    assert [[m.tolist() for m in p[0][0]] for p in plans] == [[[0], [2]], [[1], []]]
    dynamic = actor_config(use_dynamic_bsz=True, ppo_max_token_len_per_gpu=10)  # 2 rows × 5 tokens fit
    plans = [plan_micro_batches(["a"] * 3, *lens, r, 2, dynamic, seed=0) for r in range(2)]
    assert [[m.tolist() for m in p[0][0]] for p in plans] == [[[0, 2]], [[1]]]


@pytest.mark.parametrize("loss_mode,mode", LOSS_CASES)
def test_micro_batch_gradient_equals_one_big_batch_on_a_plain_model(tiny_path, loss_mode, mode):
    """Accumulated over micro-batches of 1, 2 rows and of a token budget (KL and entropy terms on),
    the loss and every parameter's gradient equal the whole mini-batch's in one forward."""
    model = load_model(tiny_path)
    batch = ragged_batch(model)
    data, extents = batch_tensors(batch, ref_shift=0.3)
    actor = actor_config(loss_mode, mode, use_kl_loss=True, kl_loss_coef=0.5, entropy_coeff=0.1)
    rows = np.arange(6)
    norm = 8 if mode == "seq-mean-token-sum-norm" else None
    loss, grads = accumulated(model, data, extents, [rows], actor, rows, norm)
    for split in (split_micro_batches(rows, *extents, 1), split_micro_batches(rows, *extents, 2),
                  split_micro_batches(rows, *extents, max_token_len=16)):
        assert len(split) > 1
        got_loss, got = accumulated(model, data, extents, split + [np.zeros(0, np.int64)], actor, rows, norm)
        assert got_loss == pytest.approx(loss, rel=1e-5, abs=1e-7)
        for name, grad in grads.items():
            torch.testing.assert_close(got[name], grad, atol=1e-6, rtol=1e-4, msg=name)


def test_entropy_bonus_subtracts_coeff_times_aggregated_entropy(tiny_path):
    """Two rows, responses of 2 and 1 tokens. With entropy_coeff c the loss is the policy loss
    − c·H, H aggregated by loss_agg_mode from the hand entropy −Σ_v p log p of each position:
    token-mean (H₀₀ + H₀₁ + H₁₀)/3; seq-mean-token-mean ((H₀₀ + H₀₁)/2 + H₁₀)/2. The bonus has a
    gradient (entropy is not detached)."""
    model = load_model(tiny_path)
    batch = make_batch(PROMPTS[:2], [[10, 11], [12]], ["a", "a"], [1.0, -1.0])
    data, extents = batch_tensors(batch)
    with torch.no_grad():
        ent = []
        for p, r in zip(PROMPTS[:2], [[10, 11], [12]]):
            logits = model(input_ids=torch.tensor([p + r])).logits[0, len(p) - 1: len(p) - 1 + len(r)].float()
            probs = torch.softmax(logits, -1)
            ent.append((-(probs * probs.log()).sum(-1)).tolist())
    hand = {"token-mean": (ent[0][0] + ent[0][1] + ent[1][0]) / 3,
            "seq-mean-token-mean": ((ent[0][0] + ent[0][1]) / 2 + ent[1][0]) / 2}
    mb = micro_batch(data, np.arange(2), *extents)
    for mode, h in hand.items():
        loss_fn = get_policy_loss_fn("vanilla")
        plain, _, _ = micro_batch_loss(model, mb, mb["response_mask"], actor_config("vanilla", mode), loss_fn)
        bonus_actor = actor_config("vanilla", mode, entropy_coeff=0.25)
        with_bonus, terms, _ = micro_batch_loss(model, mb, mb["response_mask"], bonus_actor, loss_fn)
        assert terms["actor/entropy_loss"] == pytest.approx(h, rel=1e-5)
        assert (plain - with_bonus).item() == pytest.approx(0.25 * h, rel=1e-5)
        model.zero_grad(set_to_none=True)
        (with_bonus - plain).backward()
        assert sum(p.grad.abs().sum().item() for p in model.parameters() if p.grad is not None) > 0


def test_kl_loss_is_zero_at_the_reference_and_its_coefficient_changes_the_gradient(tiny_path):
    """π_ref = π_θ: the low_var_kl term is 0 and so is its gradient (the KL's minimum). π_ref
    elsewhere: the term is > 0 and the gradient with kl_loss_coef 1 differs from coef 0."""
    model = load_model(tiny_path)
    batch = ragged_batch(model)
    rows = np.arange(6)
    at_ref, extents = batch_tensors(batch)
    at_ref["ref_log_probs"] = batch_log_probs(model, batch)
    actor = actor_config(use_kl_loss=True, kl_loss_coef=1.0)
    mb = micro_batch(at_ref, rows, *extents)
    _, terms, _ = micro_batch_loss(model, mb, mb["response_mask"], actor, compute_policy_loss_opmd)
    assert terms["actor/kl_loss"] == pytest.approx(0.0, abs=1e-7)
    _, g_kl = accumulated(model, at_ref, extents, [rows], actor, rows)
    _, g_plain = accumulated(model, at_ref, extents, [rows], actor_config(), rows)
    for name in g_plain:
        torch.testing.assert_close(g_kl[name], g_plain[name], atol=1e-6, rtol=1e-5)

    moved, _ = batch_tensors(batch, ref_shift=0.5)
    mb = micro_batch(moved, rows, *extents)
    _, terms, _ = micro_batch_loss(model, mb, mb["response_mask"], actor, compute_policy_loss_opmd)
    assert terms["actor/kl_loss"] > 0
    _, g_kl = accumulated(model, moved, extents, [rows], actor, rows)
    _, g_plain = accumulated(model, moved, extents, [rows], actor_config(), rows)
    assert any(not torch.allclose(g_kl[n], g_plain[n], atol=1e-6) for n in g_plain)


def test_offload_keys_are_checked_against_the_zero_stage():
    with pytest.raises(ConfigError, match="learner.offload_param needs learner.zero_stage 3"):
        build_config({"learner": {"zero_stage": 2, "offload_param": True}})
    with pytest.raises(ConfigError, match="learner.offload_optimizer needs learner.zero_stage 1, 2 or 3"):
        build_config({"learner": {"zero_stage": 0, "offload_optimizer": True}})
    cfg = ds_engine.ds_config(actor_config(), LearnerConfig(zero_stage=3, offload_param=True,
                                                            offload_optimizer=True), 1)
    zero = cfg["zero_optimization"]
    assert zero["offload_optimizer"]["device"] == "cpu" and zero["offload_param"]["device"] == "cpu"
    assert cfg["zero_force_ds_cpu_optimizer"] is False
    assert "offload_optimizer" not in ds_engine.ds_config(actor_config(), LearnerConfig(), 1)["zero_optimization"]


# ---------------------------------------------------------------- DeepSpeed (one rank, in process)


@pytest.mark.parametrize("stage,loss_mode,mode", [
    (2, "opmd", "seq-mean-token-mean"), (2, "vanilla", "token-mean"),
    pytest.param(0, "vanilla", "token-mean", marks=pytest.mark.slow),
    pytest.param(1, "opmd", "seq-mean-token-mean", marks=pytest.mark.slow),
    pytest.param(3, "vanilla", "seq-mean-token-sum", marks=pytest.mark.slow),
])
def test_micro_batches_match_one_big_batch_under_zero(tiny_path, ds_env, stage, loss_mode, mode):
    """ZeRO-2 (and 0, 1, 3 on one rank). Two mini-batches (2 groups, then 1) × 2 epochs, KL and
    entropy terms on: micro-batches of 1
    row, or of a 16-token budget, take the same 4 optimizer steps as the whole mini-batch: the
    gradient DeepSpeed hands the optimizer at the first step equal to float rounding, grad norms
    and exact loss terms averaged over the steps equal, parameters after equal to 1e-4."""
    batch = ragged_batch(load_model(tiny_path), learner_step=3)
    base = {"loss_mode": loss_mode, "loss_agg_mode": mode, "ppo_mini_batch_size": 2, "ppo_epochs": 2,
            "use_kl_loss": True, "kl_loss_coef": 0.5, "entropy_coeff": 0.01}
    reference = load_model(tiny_path)
    results = {}
    for name, extra in {"whole": {}, "count": {"ppo_micro_batch_size_per_gpu": 1},
                        "tokens": {"use_dynamic_bsz": True, "ppo_max_token_len_per_gpu": 16}}.items():
        actor = actor_config(**base, **extra)
        engine = engine_for(tiny_path, actor, LearnerConfig(zero_stage=stage))
        grads = record_step_grads(engine)
        metrics = train_on_batch(engine, batch, actor, 0, 1, reference=reference)
        results[name] = (metrics, full_state_dict(engine, stage), grads)
        engine.destroy()
    whole, whole_state, whole_grads = results["whole"]
    assert whole["actor/num_optimizer_steps"] == 4.0 and whole["actor/num_micro_batches"] == 4.0
    assert len(whole_grads) == 4
    for name in ("count", "tokens"):
        metrics, state, grads = results[name]
        # The first step starts from the same weights: its gradient is the same to float rounding.
        torch.testing.assert_close(grads[0], whole_grads[0], atol=1e-7, rtol=1e-5, msg=name)
        assert len(grads) == 4 and metrics["actor/num_optimizer_steps"] == 4.0, name
        assert metrics["actor/num_micro_batches"] > 4.0, name
        for key in ("actor/grad_norm", "actor/loss", "actor/pg_loss", "actor/kl_loss", "actor/entropy_loss"):
            assert metrics[key] == pytest.approx(whole[key], rel=1e-4, abs=1e-7), (name, key)
        # Adam turns rounding-level gradient differences of near-zero entries into up to lr-sized
        # moves, so later steps agree to within 1% of one step (lr 1e-2), not to rounding.
        for param, tensor in state.items():
            torch.testing.assert_close(tensor, whole_state[param], atol=1e-4, rtol=0, msg=f"{name}: {param}")
    assert any(not torch.equal(whole_state[n], t) for n, t in load_model(tiny_path).state_dict().items()
               if n in whole_state)


def test_kl_loss_zero_at_first_step_then_positive_and_reference_stays_initial(tiny_path, ds_env, tmp_path):
    """One mini-batch: the first step's KL to the initial weights is 0 (π_θ = π_ref), the next
    step's is > 0; the reference is not trained, and `actor/kl_coef` is reported. After a resume
    (a new engine from `model.path` + the checkpoint, as a restarted LearnerRank builds it) the
    reference is the initial weights again, so the KL goes on from where it was, not from 0."""
    actor = actor_config(use_kl_loss=True, kl_loss_coef=0.1)
    engine = engine_for(tiny_path, actor)
    reference = ds_engine.load_reference(ModelConfig(path=str(tiny_path)), engine.device)
    initial = {n: p.clone() for n, p in reference.named_parameters()}
    batch = ragged_batch(load_model(tiny_path))
    first = train_on_batch(engine, batch, actor, 0, 1, reference=reference)
    second = train_on_batch(engine, batch, actor, 0, 1, reference=reference)
    assert first["actor/kl_loss"] == pytest.approx(0.0, abs=1e-7) and second["actor/kl_loss"] > 1e-7
    assert first["actor/kl_coef"] == pytest.approx(0.1)
    assert all(torch.equal(p, initial[n]) and not p.requires_grad for n, p in reference.named_parameters())
    with pytest.raises(ValueError, match="reference"):
        train_on_batch(engine, batch, actor, 0, 1)
    ds_engine.save_checkpoint(engine, tmp_path, {})
    engine.destroy()

    resumed = engine_for(tiny_path, actor)
    ds_engine.load_checkpoint(resumed, tmp_path)
    fresh_reference = ds_engine.load_reference(ModelConfig(path=str(tiny_path)), resumed.device)
    after_resume = train_on_batch(resumed, batch, actor, 0, 1, reference=fresh_reference)
    assert after_resume["actor/kl_loss"] > 0.5 * second["actor/kl_loss"]
    resumed.destroy()


@pytest.mark.parametrize("stage", [2, 3])
def test_gradient_checkpointing_recomputes_and_gives_the_same_update(tiny_path, ds_env, stage):
    """With model.gradient_checkpointing each decoder layer's attention runs twice per training
    forward/backward (forward, then the recompute) and once without; the loss, grad norm and
    updated parameters are the same (to float tolerance), under ZeRO-2 and ZeRO-3."""
    batch = ragged_batch(load_model(tiny_path))
    actor = actor_config()
    out = {}
    for checkpointing in (False, True):
        engine = engine_for(tiny_path, actor, LearnerConfig(zero_stage=stage),
                            ModelConfig(path=str(tiny_path), gradient_checkpointing=checkpointing))
        calls = []
        layer = engine.module.model.layers[0]
        handle = layer.self_attn.register_forward_hook(lambda *_, calls=calls: calls.append(1))
        metrics = train_on_batch(engine, batch, actor, 0, 1)
        handle.remove()
        assert not layer.self_attn.training  # dropout stays off either way
        out[checkpointing] = (metrics, full_state_dict(engine, stage), len(calls))
        engine.destroy()
    (plain, plain_state, plain_calls), (ckpt, ckpt_state, ckpt_calls) = out[False], out[True]
    assert (plain_calls, ckpt_calls) == (1, 2)
    for key in ("actor/loss", "actor/grad_norm"):
        assert ckpt[key] == pytest.approx(plain[key], rel=1e-5)
    for name, tensor in ckpt_state.items():
        torch.testing.assert_close(tensor, plain_state[name], atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("learner", [LearnerConfig(zero_stage=2, offload_optimizer=True),
                                     LearnerConfig(zero_stage=3, offload_optimizer=True, offload_param=True)],
                         ids=["zero2-offload-optimizer", "zero3-offload-both"])
def test_step_with_cpu_offload_moves_the_weights(tiny_path, ds_env, learner):
    """ZeRO-Offload with the client torch AdamW (no CPU-Adam op compile): a step runs, the loss
    is finite and the gathered weights move."""
    actor = actor_config()
    start = time.perf_counter()
    engine = engine_for(tiny_path, actor, learner)
    print(f"\n{learner.zero_stage=} offload init_engine: {time.perf_counter() - start:.2f} s")
    assert engine.zero_cpu_offload() and type(ds_engine.base_optimizer(engine)) is torch.optim.AdamW
    assert (engine.zero_offload_param() is not None) == learner.offload_param
    before = full_state_dict(engine, learner.zero_stage)
    metrics = train_on_batch(engine, ragged_batch(load_model(tiny_path)), actor, 0, 1)
    after = full_state_dict(engine, learner.zero_stage)
    assert np.isfinite(metrics["actor/loss"]) and metrics["actor/grad_norm"] > 0
    assert any(not torch.equal(before[n], after[n]) for n in after)
    engine.destroy()
