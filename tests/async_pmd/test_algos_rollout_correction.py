"""Rollout correction (truncated IS weights, mismatch metrics) and the KL penalty, against hand-worked values.

Contract: weights are min(exp(lr), C) per token or min(exp(Σ_t lr), C) per row, lr = log π_learner −
log π_engine clamped to ±20 before exp, detached, 0 on padding (whatever padding holds); metrics are
token means over the response; `kl_penalty` is verl's per-token estimator for each of its type names.
"""

import math
from types import SimpleNamespace

import pytest
import torch

import async_pmd.algos as algos

NAN = float("nan")
LN3, LN_HALF, LN1_5 = math.log(3.0), math.log(0.5), math.log(1.5)


def two_rows():
    """Engine log-probs, learner log-probs and mask with lr = [[ln 3, ln 0.5, 0], [ln 1.5, pad, pad]].

    Padding holds NaN on the learner side and -inf on the engine side: neither may leak out.
    """
    rollout = torch.tensor([[-1.0, -2.0, -0.5], [-0.7, -float("inf"), -float("inf")]], dtype=torch.float64)
    learner = rollout + torch.tensor([[LN3, LN_HALF, 0.0], [LN1_5, 0.0, 0.0]], dtype=torch.float64)
    learner[1, 1:] = NAN
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    return learner, rollout, mask


# ----------------------------------------------------------------------------- IS weights


def test_token_level_weights_truncate_at_the_threshold():
    """Token level, C = 2: raw [[3, 0.5, 1], [1.5, 0, 0]] -> [[2, 0.5, 1], [1.5, 0, 0]].
    Before truncation: mean (3 + 0.5 + 1 + 1.5)/4 = 1.5, max 3, share above C 1/4."""
    learner, rollout, mask = two_rows()
    learner.requires_grad_(True)
    weights, metrics = algos.compute_rollout_correction_weights(learner, rollout, mask, "token", 2.0)
    torch.testing.assert_close(weights, torch.tensor([[2.0, 0.5, 1.0], [1.5, 0.0, 0.0]], dtype=torch.float64))
    assert not weights.requires_grad, "IS weights change the measure, not the objective: detached"
    assert metrics == pytest.approx({"rollout_corr/rollout_is_mean": 1.5, "rollout_corr/rollout_is_max": 3.0,
                                     "rollout_corr/rollout_is_ratio_fraction_high": 0.25})


@pytest.mark.parametrize("threshold, value, fraction_high", [(2.0, 1.5, 0.0), (1.2, 1.2, 1.0)])
def test_sequence_level_weights_are_the_row_product(threshold, value, fraction_high):
    """Sequence level: row 0 exp(ln 3 + ln 0.5 + 0) = 1.5 on its 3 tokens, row 1 exp(ln 1.5) = 1.5 on
    its 1 token; C = 2 keeps 1.5, C = 1.2 truncates both rows to 1.2 (share of rows above C: 1)."""
    learner, rollout, mask = two_rows()
    weights, metrics = algos.compute_rollout_correction_weights(learner, rollout, mask, "sequence", threshold)
    torch.testing.assert_close(weights, value * mask.to(torch.float64))
    assert metrics["rollout_corr/rollout_is_mean"] == pytest.approx(1.5)
    assert metrics["rollout_corr/rollout_is_ratio_fraction_high"] == fraction_high


def test_log_ratio_is_clamped_before_exp():
    """A row whose Σ lr = 40 would overflow nothing (exp(±20) at most) and is truncated to C;
    one whose Σ lr = −40 gets exp(−20) = 2.06e-9, not 0."""
    rollout = torch.zeros(2, 4, dtype=torch.float64)
    learner = torch.tensor([[10.0] * 4, [-10.0] * 4], dtype=torch.float64)
    weights, metrics = algos.compute_rollout_correction_weights(learner, rollout, torch.ones(2, 4), "sequence", 5.0)
    assert weights[0].tolist() == [5.0] * 4
    assert weights[1].tolist() == pytest.approx([math.exp(-20)] * 4, rel=1e-12)
    assert metrics["rollout_corr/rollout_is_max"] == pytest.approx(math.exp(20))


def test_bad_level_or_threshold_raise():
    learner, rollout, mask = two_rows()
    with pytest.raises(ValueError, match="token"):
        algos.compute_rollout_correction_weights(learner, rollout, mask, "geometric", 2.0)
    with pytest.raises(ValueError, match="threshold"):
        algos.compute_rollout_correction_weights(learner, rollout, mask, "token", 0.0)


# ----------------------------------------------------------------------------- mismatch metrics


def test_mismatch_metrics_hand_worked():
    """lr on the 4 response tokens = [ln 3, ln 0.5, 0, ln 1.5] = [1.098612, −0.693147, 0, 0.405465]:
    mean 0.810930/4 = 0.202733; kl = −0.202733; k3 terms e^lr − lr − 1 = [0.901388, 0.193147, 0,
    0.094535], mean 1.189070/4 = 0.297267; max |lr| = ln 3 = 1.098612."""
    learner, rollout, mask = two_rows()
    metrics = algos.compute_rollout_mismatch_metrics(learner, rollout, mask)
    assert metrics == pytest.approx({
        "rollout_corr/log_ratio_mean": 0.2027325541, "rollout_corr/kl": -0.2027325541,
        "rollout_corr/k3_kl": 0.2972674460, "rollout_corr/log_ratio_abs_max": LN3}, abs=1e-9)


def test_mismatch_metrics_of_identical_log_probs_and_of_an_empty_mask_are_zero():
    learner, rollout, mask = two_rows()
    same = algos.compute_rollout_mismatch_metrics(rollout.clamp(min=-5), rollout.clamp(min=-5), mask)
    empty = algos.compute_rollout_mismatch_metrics(learner, rollout, torch.zeros_like(mask))
    assert set(same.values()) == {0.0} and set(empty.values()) == {0.0}


def test_compute_rollout_correction_reads_the_actor_config():
    """rollout_is None (verl's default): metrics only, weights None; set: weights and both metric sets."""
    learner, rollout, mask = two_rows()
    weights, metrics = algos.compute_rollout_correction(learner, rollout, mask, None)
    assert weights is None and set(metrics) == {"rollout_corr/log_ratio_mean", "rollout_corr/kl",
                                                "rollout_corr/k3_kl", "rollout_corr/log_ratio_abs_max"}
    cfg = SimpleNamespace(rollout_is="token", rollout_is_threshold=2.0)
    weights, metrics = algos.compute_rollout_correction(learner, rollout, mask, cfg)
    torch.testing.assert_close(weights, algos.compute_rollout_correction_weights(learner, rollout, mask, "token", 2.0)[0])
    assert metrics["rollout_corr/rollout_is_max"] == pytest.approx(3.0) and "rollout_corr/k3_kl" in metrics


# ----------------------------------------------------------------------------- KL penalty


def plain_kl(lp, ref, kl_type):
    """verl's formulas on Python floats."""
    if kl_type in ("kl", "k1"):
        return lp - ref
    if kl_type == "abs":
        return abs(lp - ref)
    if kl_type in ("mse", "k2"):
        return 0.5 * (lp - ref) ** 2
    kl = min(max(ref - lp, -20.0), 20.0)
    return min(max(math.exp(kl) - kl - 1, -10.0), 10.0)


@pytest.mark.parametrize("kl_type", algos.KL_TYPES)
def test_kl_penalty_matches_plain_formulas(kl_type):
    """Every type on random log-probs, plus pairs that hit low_var_kl's clamps (ref − lp = ±30)."""
    gen = torch.Generator().manual_seed(0)
    lp = -torch.rand(4, 6, generator=gen, dtype=torch.float64) * 3
    ref = lp + torch.randn(4, 6, generator=gen, dtype=torch.float64) * 0.7
    lp[0, 0], ref[0, 0], lp[0, 1], ref[0, 1] = -31.0, -1.0, -1.0, -31.0
    got = algos.kl_penalty(lp, ref, kl_type)
    want = [[plain_kl(a, b, kl_type) for a, b in zip(ra, rb)] for ra, rb in zip(lp.tolist(), ref.tolist())]
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=1e-12)


def test_kl_penalty_hand_worked():
    """lp = −1, ref = −1.5: k1 0.5, abs 0.5, k2 ½·0.25 = 0.125, k3 e^−0.5 + 0.5 − 1 = 0.106531."""
    lp, ref = torch.tensor([-1.0], dtype=torch.float64), torch.tensor([-1.5], dtype=torch.float64)
    got = {t: algos.kl_penalty(lp, ref, t).item() for t in ("k1", "abs", "k2", "k3")}
    assert got == pytest.approx({"k1": 0.5, "abs": 0.5, "k2": 0.125, "k3": 0.1065306597})


@pytest.mark.parametrize("kl_type", ["k1+", "k3+", "low_var_kl+"])
def test_straight_through_keeps_the_value_and_takes_k2s_gradient(kl_type):
    """`k3+`: the value of k3, the gradient of ½(lp − ref)², i.e. lp − ref."""
    lp = torch.tensor([-1.0, -2.0], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([-1.5, -1.0], dtype=torch.float64)
    value = algos.kl_penalty(lp, ref, kl_type)
    torch.testing.assert_close(value.detach(), algos.kl_penalty(lp.detach(), ref, kl_type.rstrip("+")))
    value.sum().backward()
    torch.testing.assert_close(lp.grad, (lp - ref).detach())


def test_unknown_kl_type_raises():
    with pytest.raises(ValueError, match="low_var_kl"):
        algos.kl_penalty(torch.zeros(1), torch.zeros(1), "full")


def test_kl_loss_term_hand_worked():
    """lp [−1, −2, pad], ref [−1.5, −2, pad], low_var_kl: per token [0.106531, 0]; seq-mean-token-mean
    (one row, L = 2) 0.053265; seq-mean-token-sum-norm with L_max 4: 0.106531/4 = 0.026633."""
    lp = torch.tensor([[-1.0, -2.0, NAN]], dtype=torch.float64)
    ref, mask = torch.tensor([[-1.5, -2.0, 0.0]], dtype=torch.float64), torch.tensor([[1.0, 1.0, 0.0]])
    loss, metrics = algos.compute_kl_loss(lp, ref, mask, "low_var_kl", "seq-mean-token-mean")
    assert loss.item() == pytest.approx(0.0532653299) and metrics["actor/kl_loss"] == pytest.approx(loss.item())
    assert metrics["actor/ref_kl"] == pytest.approx(0.0532653299)
    loss, _ = algos.compute_kl_loss(lp, ref, mask, "low_var_kl", "seq-mean-token-sum-norm", max_response_length=4)
    assert loss.item() == pytest.approx(0.1065306597 / 4)
