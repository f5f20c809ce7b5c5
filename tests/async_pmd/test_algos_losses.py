"""Policy losses `opmd` and `vanilla` and their helpers, against plain float64 references.

References loop over rows and tokens on Python floats; the loss code is vectorised torch.
"""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import async_pmd.algos as algos
from async_pmd.algos import agg_loss, entropy_from_logits, masked_mean

TAUS = (0.01, 0.1, 1.0, 5.0)


def actor_config(tau=1.0, clip=0.2, low=None, high=None, clip_c=3.0):
    """Duck-typed ActorConfig (the losses read `policy_loss.*` attributes only)."""
    return SimpleNamespace(
        loss_agg_mode="seq-mean-token-mean",
        policy_loss=SimpleNamespace(loss_mode="opmd", pmd_tau=tau, clip_ratio=clip, clip_ratio_low=low,
                                    clip_ratio_high=high, clip_ratio_c=clip_c),
    )


def make_inputs(seed, batch=6, width=5, empty_row=True):
    """Random float64 (old, new, adv, mask, weights) [B,T]; row 0 is empty when `empty_row`.

    Padding positions hold NaN / -inf, which a correct loss must never read.
    """
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, width + 1, size=batch)
    if empty_row:
        lengths[0] = 0
    mask = (np.arange(width)[None, :] < lengths[:, None]).astype(np.float64)
    old = rng.normal(-1.0, 0.5, (batch, width))
    new = old + rng.normal(0.0, 0.3, (batch, width))
    adv = np.repeat(rng.normal(0.0, 1.0, (batch, 1)), width, axis=1) * mask
    weights = np.repeat(rng.uniform(0.0, 2.0, (batch, 1)), width, axis=1) * mask
    new[mask == 0], old[mask == 0] = np.nan, -np.inf
    return tuple(torch.tensor(x) for x in (old, new, adv, mask, weights))


def rows(t):
    return t.tolist()


# ----------------------------------------------------------------------------- references


def ref_opmd(old, new, adv, mask, weights, tau, mode):
    old, new, adv, mask = rows(old), rows(new), rows(adv), rows(mask)
    batch, width = len(mask), len(mask[0])
    total = 0.0
    for i in range(batch):
        toks = [t for t in range(width) if mask[i][t] > 0]
        length = max(len(toks), 1)
        s = sum(new[i][t] - old[i][t] for t in toks)
        a = sum(adv[i][t] for t in toks) / length
        w = 1.0 if weights is None else sum(rows(weights)[i][t] for t in toks) / length
        seq_loss = 0.5 * tau * w * (a / tau - s) ** 2
        total += seq_loss / length if mode == "seq-mean-token-mean" else seq_loss / width
    return total / batch


def ref_agg(loss, mask, mode):
    batch, width = len(mask), len(mask[0])
    row_sums = [sum(loss[i][t] for t in range(width) if mask[i][t] > 0) for i in range(batch)]
    row_lens = [sum(mask[i]) for i in range(batch)]
    nonempty = sum(n > 0 for n in row_lens)  # verl's seq-means leave fully masked rows out
    if mode == "token-mean":
        return sum(row_sums) / sum(row_lens)
    if mode == "seq-mean-token-sum":
        return sum(row_sums) / nonempty
    if mode == "seq-mean-token-mean":
        return sum(s / (n + 1e-8) for s, n in zip(row_sums, row_lens)) / nonempty
    return sum(row_sums) / width  # seq-mean-token-sum-norm: verl sums over rows


def ref_vanilla(old, new, adv, mask, weights, low, high, mode, clip_c=3.0):
    old, new, adv, mask = rows(old), rows(new), rows(adv), rows(mask)
    loss = [[0.0] * len(mask[0]) for _ in mask]
    for i, row in enumerate(mask):
        for t, m in enumerate(row):
            if m > 0:
                ratio = math.exp(new[i][t] - old[i][t])
                clipped = min(max(ratio, 1 - low), 1 + high)
                loss[i][t] = max(-adv[i][t] * ratio, -adv[i][t] * clipped)
                if adv[i][t] < 0:  # verl's dual clip
                    loss[i][t] = min(loss[i][t], -adv[i][t] * clip_c)
                loss[i][t] *= 1.0 if weights is None else rows(weights)[i][t]
    return ref_agg(loss, mask, mode)


# ----------------------------------------------------------------------------- opmd


@pytest.mark.parametrize("tau", TAUS)
@pytest.mark.parametrize("mode", algos.OPMD_AGG_MODES)
@pytest.mark.parametrize("use_weights", [False, True])
def test_opmd_matches_reference(tau, mode, use_weights):
    """opmd = mean_i ½τ w_i (a_i/τ − s_i)² / L_i (or / T), incl. an empty row and NaN padding."""
    old, new, adv, mask, weights = make_inputs(seed=3)
    weights = weights if use_weights else None
    loss, metrics = algos.compute_policy_loss_opmd(old, new, adv, mask, mode, actor_config(tau), weights)
    assert loss.item() == pytest.approx(ref_opmd(old, new, adv, mask, weights, tau, mode), rel=1e-10)
    assert metrics["actor/pg_loss"] == pytest.approx(loss.item())
    assert all(math.isfinite(v) for v in metrics.values())


def test_opmd_hand_worked():
    """One response, mask [1, 1, 0], log-ratio [0.1, 0.2] -> s = 0.3, advantage 0.5 -> a = 0.5.

    τ = 1:   ℓ = ½·1·(0.5/1 − 0.3)² = 0.02;  token-mean 0.02/2 = 0.01;  sum-norm 0.02/3 = 0.006667.
    τ = 0.5: ℓ = ½·0.5·(0.5/0.5 − 0.3)² = 0.25·0.49 = 0.1225;  token-mean 0.1225/2 = 0.06125.
    Weight 2 doubles it. pmd_kl = −s = −0.3.
    """
    old = torch.tensor([[-1.0, -2.0, 0.0]], dtype=torch.float64)
    new, adv, mask = old + torch.tensor([[0.1, 0.2, 9.0]]), torch.tensor([[0.5, 0.5, 0.0]]), torch.tensor([[1.0, 1.0, 0.0]])
    opmd = algos.compute_policy_loss_opmd
    assert opmd(old, new, adv, mask, "seq-mean-token-mean", actor_config(1.0))[0].item() == pytest.approx(0.01)
    assert opmd(old, new, adv, mask, "seq-mean-token-sum-norm", actor_config(1.0))[0].item() == pytest.approx(0.02 / 3)
    loss, metrics = opmd(old, new, adv, mask, "seq-mean-token-mean", actor_config(0.5))
    assert loss.item() == pytest.approx(0.06125)
    assert metrics["actor/pmd_kl"] == pytest.approx(-0.3) and metrics["actor/seq_log_ratio_mean"] == pytest.approx(0.3)
    # target a/τ = 0.5/0.5 = 1, residual |1 − 0.3| = 0.7
    assert metrics["actor/opmd_target_abs_mean"] == pytest.approx(1.0)
    assert metrics["actor/opmd_residual_abs_mean"] == pytest.approx(0.7)
    weighted, metrics = opmd(old, new, adv, mask, "seq-mean-token-mean", actor_config(0.5), 2.0 * mask)
    assert weighted.item() == pytest.approx(0.1225) and metrics["actor/partition_weight_mean"] == pytest.approx(2.0)


def test_opmd_sum_norm_divides_by_the_configured_length():
    """seq-mean-token-sum-norm divides by L_max = max_response_length, not the batch's mask width.

    The hand-worked row above (ℓ = 0.02 at τ = 1) in a batch 3 tokens wide: L_max 8 -> 0.02/8 = 0.0025,
    and the same 0.0025 when the batch is padded to 5 tokens: the scale no longer moves with the
    longest response. An L_max below the width (a response longer than configured) is refused.
    """
    old = torch.tensor([[-1.0, -2.0, 0.0]], dtype=torch.float64)
    new, adv, mask = old + torch.tensor([[0.1, 0.2, 9.0]]), torch.tensor([[0.5, 0.5, 0.0]]), torch.tensor([[1.0, 1.0, 0.0]])
    opmd = algos.compute_policy_loss_opmd
    mode, cfg = "seq-mean-token-sum-norm", actor_config(1.0)
    assert opmd(old, new, adv, mask, mode, cfg, max_response_length=8)[0].item() == pytest.approx(0.0025)
    pad = lambda t: torch.nn.functional.pad(t, (0, 2))  # noqa: E731
    assert opmd(pad(old), pad(new), pad(adv), pad(mask), mode, cfg, max_response_length=8)[0].item() == pytest.approx(0.0025)
    with pytest.raises(ValueError, match="response_length"):
        opmd(old, new, adv, mask, mode, cfg, max_response_length=2)
    # vanilla's sum-norm (verl's agg_loss with loss_scale_factor): Σ_b Σ_t ℓ / L_max.
    loss_v, _ = algos.compute_policy_loss_vanilla(old, new, adv, mask, mode, cfg, max_response_length=8)
    ref_v, _ = algos.compute_policy_loss_vanilla(old, new, adv, mask, mode, cfg)
    assert loss_v.item() == pytest.approx(ref_v.item() * 3 / 8)


def test_opmd_rollout_is_weights_scale_each_row():
    """ℓ_i is multiplied by ρ_i = the row's mean rollout IS weight over its tokens (the seed's).

    Row of the hand-worked case (ℓ = 0.02, L = 2, token-mean 0.01) with token weights [1.5, 0.5]:
    ρ = 1.0 -> 0.01; with [2, 2] -> 0.02; padding weights (here 7) are never read.
    """
    old = torch.tensor([[-1.0, -2.0, 0.0]], dtype=torch.float64)
    new, adv, mask = old + torch.tensor([[0.1, 0.2, 9.0]]), torch.tensor([[0.5, 0.5, 0.0]]), torch.tensor([[1.0, 1.0, 0.0]])
    opmd = algos.compute_policy_loss_opmd
    for weights, want in (([1.5, 0.5, 7.0], 0.01), ([2.0, 2.0, 7.0], 0.02)):
        loss, _ = opmd(old, new, adv, mask, "seq-mean-token-mean", actor_config(1.0),
                       rollout_is_weights=torch.tensor([weights], dtype=torch.float64))
        assert loss.item() == pytest.approx(want)


@pytest.mark.parametrize("name", ["opmd", "vanilla"])
def test_gradient_is_finite_and_correct(name):
    """autograd through log_prob: finite, zero on padding (NaN there), and matching finite differences."""
    old, new, adv, mask, weights = make_inputs(seed=5)
    fn = algos.get_policy_loss_fn(name)
    new.requires_grad_(True)
    loss, _ = fn(old, new, adv, mask, "seq-mean-token-mean", actor_config(0.1), weights)
    loss.backward()
    assert torch.isfinite(new.grad).all() and (new.grad[mask == 0] == 0).all()

    clean_old, clean_new = torch.where(mask > 0, old, 0.0), torch.where(mask > 0, new.detach(), 0.0)
    clean_new.requires_grad_(True)
    check = lambda lp: fn(clean_old, lp, adv, mask, "seq-mean-token-mean", actor_config(0.1), weights)[0]  # noqa: E731
    assert torch.autograd.gradcheck(check, (clean_new,))


@pytest.mark.parametrize("name", ["opmd", "vanilla"])
def test_unknown_agg_mode_raises(name):
    """An unknown loss_agg_mode raises ValueError naming the allowed modes (opmd allows two)."""
    old, new, adv, mask, _ = make_inputs(seed=1)
    with pytest.raises(ValueError, match="seq-mean-token-mean"):
        algos.get_policy_loss_fn(name)(old, new, adv, mask, "token-sum")
    if name == "opmd":
        with pytest.raises(ValueError, match="allowed"):
            algos.compute_policy_loss_opmd(old, new, adv, mask, "token-mean")


def test_all_empty_masks_give_zero_not_nan():
    """A batch whose every row has an empty mask yields loss 0 and finite metrics in every mode."""
    old, new, adv, _, _ = make_inputs(seed=2)
    mask = torch.zeros_like(old)
    for name, modes in (("opmd", algos.OPMD_AGG_MODES), ("vanilla", algos.LOSS_AGG_MODES)):
        for mode in modes:
            loss, metrics = algos.get_policy_loss_fn(name)(old, new, adv, mask, mode)
            assert loss.item() == 0.0 and all(math.isfinite(v) for v in metrics.values()), (name, mode)


# ----------------------------------------------------------------------------- vanilla


@pytest.mark.parametrize("mode", algos.LOSS_AGG_MODES)
@pytest.mark.parametrize("clip", [(0.2, None, None), (0.2, 0.1, 0.3)])
@pytest.mark.parametrize("use_weights", [False, True])
def test_vanilla_matches_reference(mode, clip, use_weights):
    """PPO-clip with per-token partition weights, in each verl aggregation mode."""
    old, new, adv, mask, weights = make_inputs(seed=8)
    weights = weights if use_weights else None
    low, high = clip[1] or clip[0], clip[2] or clip[0]
    loss, metrics = algos.compute_policy_loss_vanilla(old, new, adv, mask, mode, actor_config(1.0, *clip), weights)
    assert loss.item() == pytest.approx(ref_vanilla(old, new, adv, mask, weights, low, high, mode), rel=1e-10)
    assert 0.0 <= metrics["actor/pg_clipfrac"] <= 1.0 and math.isfinite(metrics["actor/ppo_kl"])


def test_vanilla_dual_clip_hand_worked():
    """verl's dual clip, c = 3, ε = 0.2, A = −1 on every token, ρ = [4, 2, 0.5]:
    ρ = 4: max(4, 1.2) = 4 > 3·1 -> min(4, 3) = 3 (dual clip binds); ρ = 2: max(2, 1.2) = 2 < 3 -> 2;
    ρ = 0.5: max(0.5, 0.8) = 0.8. token-mean (3 + 2 + 0.8)/3 = 1.933333; pg_clipfrac_lower = 1/3;
    pg_clipfrac (clipped branch larger) = 1/3 (the ρ = 0.5 token). With c = 5 nothing binds: (4 + 2 + 0.8)/3.
    An A > 0 token is never dual-clipped: A = +1, ρ = 4 -> max(−4, −1.2) = −1.2."""
    old = torch.zeros(1, 3, dtype=torch.float64)
    new = torch.log(torch.tensor([[4.0, 2.0, 0.5]], dtype=torch.float64))
    adv, mask = -torch.ones(1, 3, dtype=torch.float64), torch.ones(1, 3)
    vanilla = algos.compute_policy_loss_vanilla
    loss, metrics = vanilla(old, new, adv, mask, "token-mean", actor_config())
    assert loss.item() == pytest.approx(5.8 / 3)
    assert metrics["actor/pg_clipfrac_lower"] == pytest.approx(1 / 3) and metrics["actor/pg_clipfrac"] == pytest.approx(1 / 3)
    assert vanilla(old, new, adv, mask, "token-mean", actor_config(clip_c=5.0))[0].item() == pytest.approx(6.8 / 3)
    assert vanilla(old[:, :1], new[:, :1], -adv[:, :1], mask[:, :1], "token-mean", actor_config())[0].item() == pytest.approx(-1.2)
    with pytest.raises(ValueError, match="clip_ratio_c"):
        vanilla(old, new, adv, mask, "token-mean", actor_config(clip_c=1.0))


def test_vanilla_rollout_is_weights_multiply_each_token():
    """verl multiplies the per-token loss by rollout_is_weights before agg_loss: ρ = 1 (loss −A = −1 per
    token at A = 1), weights [2, 0.5] -> token-mean (−2 − 0.5)/2 = −1.25."""
    old = new = torch.zeros(1, 2, dtype=torch.float64)
    loss, _ = algos.compute_policy_loss_vanilla(old, new, torch.ones(1, 2), torch.ones(1, 2), "token-mean",
                                                rollout_is_weights=torch.tensor([[2.0, 0.5]]))
    assert loss.item() == pytest.approx(-1.25)


def test_vanilla_hand_worked_clipping():
    """ε = 0.2. Token 1: A = +1, ρ = 1.5 -> max(−1.5, −1.2) = −1.2 (clipped).
    Token 2: A = −1, ρ = 0.5 -> max(0.5, 0.8) = 0.8 (clipped). token-mean = (−1.2 + 0.8)/2 = −0.2,
    clipfrac = 1, ppo_kl = mean(−log 1.5, −log 0.5) = (−0.405465 + 0.693147)/2 = 0.143841."""
    old = torch.zeros(1, 2, dtype=torch.float64)
    new = torch.log(torch.tensor([[1.5, 0.5]], dtype=torch.float64))
    loss, metrics = algos.compute_policy_loss_vanilla(old, new, torch.tensor([[1.0, -1.0]]), torch.ones(1, 2), "token-mean")
    assert loss.item() == pytest.approx(-0.2)
    assert metrics["actor/pg_clipfrac"] == 1.0 and metrics["actor/ppo_kl"] == pytest.approx(0.143841, abs=1e-6)


# ----------------------------------------------------------------------------- helpers


def test_agg_loss_modes_hand_worked():
    """loss [[1, 2, 3], [4, 0, 0]], mask [[1, 1, 1], [1, 0, 0]]: token-mean 10/4 = 2.5;
    seq-mean-token-sum (6 + 4)/2 = 5; seq-mean-token-mean (6/3 + 4/1)/2 = 3; sum-norm (6 + 4)/3 = 3.333."""
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    expected = {"token-mean": 2.5, "seq-mean-token-sum": 5.0, "seq-mean-token-mean": 3.0, "seq-mean-token-sum-norm": 10 / 3}
    assert {m: agg_loss(loss, mask, m).item() for m in expected} == pytest.approx(expected)
    with pytest.raises(ValueError, match="token-mean"):
        agg_loss(loss, mask, "bogus")


def test_masked_mean_and_entropy():
    """masked_mean ignores padding and is 0 on an empty mask; uniform logits over V have entropy log V."""
    x, mask = torch.tensor([[1.0, float("nan")], [3.0, 5.0]]), torch.tensor([[1, 0], [1, 1]])
    assert masked_mean(x, mask).item() == pytest.approx(3.0)
    assert masked_mean(x, mask, dim=-1).tolist() == pytest.approx([1.0, 4.0])
    assert masked_mean(x, torch.zeros_like(mask)).item() == 0.0
    ent = entropy_from_logits(torch.zeros(2, 3, 7))
    assert ent.shape == (2, 3) and torch.allclose(ent, torch.full((2, 3), math.log(7)))
    peaked = torch.tensor([[[100.0, 0.0, 0.0]]])
    assert entropy_from_logits(peaked).item() == pytest.approx(0.0, abs=1e-6)
