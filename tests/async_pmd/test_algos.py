"""Advantage estimators, weighted-PMD weights and the registries, against plain float64 references.

The references below loop over samples and groups with math.exp / math.log on Python floats:
slow and obvious on purpose, so that the vectorised segment-op code has something to disagree with.
"""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import async_pmd.algos as algos

TAUS = (0.01, 0.1, 1.0, 5.0)


def algo_config(tau=1.0, lb=None, ub=None, norm_by_std=True):
    """Duck-typed AlgorithmConfig (the estimators read attributes only)."""
    return SimpleNamespace(
        adv_estimator="ploo", partition_tau=tau, partition_reward_lb=lb, partition_reward_ub=ub,
        norm_adv_by_std_in_grpo=norm_by_std,
    )


def make_batch(seed, sizes=(4, 1, 3, 5, 2), width=6, binary=False, int_ids=False):
    """Shuffled (non-contiguous) groups of the given sizes, including a group of one.

    Returns (token_level_rewards [B,T] f64, response_mask [B,T] f64, index [B], scores list[float]).
    The score sits on the row's last response token, as a reward manager writes it.
    """
    rng = np.random.default_rng(seed)
    ids = [g if int_ids else f"prompt-{g}" for g, n in enumerate(sizes) for _ in range(n)]
    index = np.array(ids)[rng.permutation(len(ids))]
    batch = len(index)
    lengths = rng.integers(1, width + 1, size=batch)
    mask = (np.arange(width)[None, :] < lengths[:, None]).astype(np.float64)
    scores = rng.integers(0, 2, batch).astype(np.float64) if binary else rng.uniform(0.0, 1.0, batch)
    rewards = np.zeros((batch, width))
    rewards[np.arange(batch), lengths - 1] = scores
    return torch.tensor(rewards), torch.tensor(mask), index, [float(s) for s in scores]


# ----------------------------------------------------------------------------- references


def members(index, i):
    return [j for j in range(len(index)) if index[j] == index[i]]


def ref_ploo_exact(scores, index, tau):
    out = []
    for i, r in enumerate(scores):
        others = [scores[j] for j in members(index, i) if j != i]
        if not others:
            out.append(r)  # b = 0
            continue
        mean = sum(math.exp(x / tau) for x in others) / len(others)  # scores in [0,1]: no overflow
        out.append(r - tau * math.log(max(mean, 1e-8)))
    return out


def ref_ploo_seed(scores, index, tau):
    """The seed's ploo: b_i = m + τ·log clamp((Z − e_i)/(n − 1), 1e-8), m the group max, Z = Σ_j e_j."""
    out = []
    for i, r in enumerate(scores):
        group = [scores[j] for j in members(index, i)]
        if len(group) == 1:
            out.append(r)  # b = 0
            continue
        m = max(group)
        z = sum(math.exp((x - m) / tau) for x in group)
        loo = (z - math.exp((r - m) / tau)) / (len(group) - 1)
        out.append(r - (m + tau * math.log(max(loo, 1e-8))))
    return out


def ref_partition(scores, index, tau):
    out = []
    for i, r in enumerate(scores):
        group = [scores[j] for j in members(index, i)]
        out.append(r - tau * math.log(sum(math.exp(x / tau) for x in group) / len(group)))
    return out


def ref_rloo(scores, index):
    out = []
    for i, r in enumerate(scores):
        others = [scores[j] for j in members(index, i) if j != i]
        out.append(r - sum(others) / len(others) if others else r)  # verl: a group of one keeps r
    return out


def ref_grpo(scores, index, norm_by_std):
    out = []
    for i, r in enumerate(scores):
        group = [scores[j] for j in members(index, i)]
        if len(group) == 1:
            out.append(r / (1 + 1e-6) if norm_by_std else r)  # verl: mean 0, std 1
            continue
        mean = sum(group) / len(group)
        std = math.sqrt(sum((x - mean) ** 2 for x in group) / (len(group) - 1))
        out.append((r - mean) / (std + 1e-6) if norm_by_std else r - mean)
    return out


def ref_weights(scores, index, tau, lb, ub, use_is):
    out = []
    for i, r in enumerate(scores):
        group = [scores[j] for j in members(index, i)]
        mean = sum(group) / len(group)
        keep = (lb is None or mean > lb) and (ub is None or mean < ub)
        w = 1.0 if keep else 0.0
        if use_is:
            m = max(group)
            w *= math.exp((r - m) / tau) / (sum(math.exp((x - m) / tau) for x in group) / len(group))
        out.append(w)
    return out


def assert_rows(actual, per_row, mask, rtol=1e-9, atol=1e-9):
    expected = torch.tensor(per_row, dtype=torch.float64).unsqueeze(-1) * mask
    torch.testing.assert_close(actual.to(torch.float64), expected, rtol=rtol, atol=atol)


# ----------------------------------------------------------------------------- estimators


@pytest.mark.parametrize("tau", TAUS)
@pytest.mark.parametrize("binary", [False, True])
@pytest.mark.parametrize("int_ids", [False, True])
def test_estimators_match_float64_references(tau, binary, int_ids):
    """ploo (the seed's) / ploo_exact / partition / rloo / grpo equal their plain definitions on
    shuffled groups (one of size 1)."""
    rewards, mask, index, scores = make_batch(seed=int(tau * 100) + binary, binary=binary, int_ids=int_ids)
    cfg = algo_config(tau)
    expected = {
        "ploo": ref_ploo_seed(scores, index, tau),
        "ploo_exact": ref_ploo_exact(scores, index, tau),
        "partition": ref_partition(scores, index, tau),
        "rloo": ref_rloo(scores, index),
        "grpo": ref_grpo(scores, index, True),
    }
    for name, per_row in expected.items():
        adv, returns = algos.get_adv_estimator_fn(name)(rewards, mask, index, cfg)
        assert_rows(adv, per_row, mask)
        assert torch.equal(adv, returns), "returns are the advantages, as in verl"


def test_grpo_without_std_normalisation():
    """norm_adv_by_std_in_grpo=False gives r_i − mean_g (Dr. GRPO)."""
    rewards, mask, index, scores = make_batch(seed=7)
    adv, _ = algos.compute_grpo_advantage(rewards, mask, index, algo_config(norm_by_std=False))
    assert_rows(adv, ref_grpo(scores, index, False), mask)


def test_hand_worked_group_of_three():
    """Rewards [1, 0, 0] in one group, τ = 1: every estimator against arithmetic done by hand."""
    rewards = torch.tensor([[1.0], [0.0], [0.0]], dtype=torch.float64)
    mask, index, cfg = torch.ones(3, 1, dtype=torch.float64), np.array(["a", "a", "a"]), algo_config(1.0)
    adv = lambda name: algos.get_adv_estimator_fn(name)(rewards, mask, index, cfg)[0][:, 0].tolist()  # noqa: E731
    # ploo: b_0 = log mean(e^0, e^0) = 0 -> A_0 = 1; b_1 = log((e^1 + e^0)/2) = log 1.859141 = 0.620115.
    # (No cancellation at τ = 1: the seed's form and the exact one agree.)
    assert adv("ploo") == pytest.approx([1.0, -0.620115, -0.620115], abs=1e-6)
    assert adv("ploo_exact") == pytest.approx([1.0, -0.620115, -0.620115], abs=1e-6)
    # partition: b = log((e + 2)/3) = log 1.572761 = 0.452832 -> A = [0.547168, -0.452832, -0.452832].
    assert adv("partition") == pytest.approx([0.547168, -0.452832, -0.452832], abs=1e-6)
    # rloo: A_0 = 1 − (0+0)/2 = 1; A_1 = 0 − (1+0)/2 = −0.5.
    assert adv("rloo") == pytest.approx([1.0, -0.5, -0.5], abs=1e-12)
    # grpo: mean 1/3, unbiased std sqrt((4/9 + 1/9 + 1/9)/2) = sqrt(1/3) = 0.577350 -> (2/3)/0.577350 = 1.154700.
    assert adv("grpo") == pytest.approx([1.154700, -0.577350, -0.577350], abs=1e-5)


def test_ploo_exact_tiny_tau_is_exact_for_the_lone_winner():
    """ploo_exact, τ = 0.01, rewards [1, 0, 0]: A_0 = 1 − 0.01·log mean(e^0, e^0) = 1 exactly.

    The naive Z − e_0 around the group max cancels to 0 here (e^-100 vanishes next to 1), and the
    1e-8 clamp then gives A_0 = −0.01·log 1e-8 = 0.184 (the seed's `ploo`); the stable form does not.
    A_1 = −0.01·log((e^100 + e^0)/2) = −(1 − 0.01·log 2) = −0.993069.
    """
    rewards = torch.tensor([[1.0], [0.0], [0.0]])
    adv, _ = algos.compute_ploo_exact_advantage(rewards, torch.ones(3, 1), ["u", "u", "u"], algo_config(0.01))
    assert adv[:, 0].tolist() == pytest.approx([1.0, -0.993069, -0.993069], abs=1e-6)
    seed, _ = algos.compute_ploo_advantage(rewards, torch.ones(3, 1), ["u", "u", "u"], algo_config(0.01))
    assert seed[:, 0].tolist() == pytest.approx([0.184207, -0.993069, -0.993069], abs=1e-6)


def test_tiny_tau_large_rewards_do_not_overflow():
    """τ = 0.01 with rewards 100 (exp(10^4) overflows float64): results stay finite (and exact for ploo_exact).

    ploo_exact: A_0 = 100 − 0 = 100; A_1 = −0.01·log((e^10000 + 1)/2) = −(100 − 0.01·log 2) = −99.993069.
    ploo (the seed's): the same A_1; A_0 = −0.01·log 1e-8 = 0.184207 (Z − e_0 = 0, then the clamp).
    partition: b = 100 + 0.01·log((1 + 2e^-10000)/3) = 100 − 0.010986 -> A_0 = 0.010986.
    """
    rewards = torch.tensor([[100.0], [0.0], [0.0]], dtype=torch.float32)
    mask, index, cfg = torch.ones(3, 1), np.array([5, 5, 5]), algo_config(0.01)
    ploo, _ = algos.compute_ploo_exact_advantage(rewards, mask, index, cfg)
    seed, _ = algos.compute_ploo_advantage(rewards, mask, index, cfg)
    part, _ = algos.compute_partition_advantage(rewards, mask, index, cfg)
    weights = algos.compute_wpmd_weight(rewards, mask, index, cfg, use_is=True)
    assert ploo.dtype == seed.dtype == torch.float32, "returned in the rewards' dtype"
    assert ploo[:, 0].tolist() == pytest.approx([100.0, -99.993069, -99.993069], abs=1e-4)
    assert seed[:, 0].tolist() == pytest.approx([0.184207, -99.993069, -99.993069], abs=1e-4)
    assert part[:, 0].tolist() == pytest.approx([0.010986, -99.989014, -99.989014], abs=1e-4)
    # use_is: e = [1, 0, 0] -> mean 1/3 -> w = [3, 0, 0].
    assert weights[:, 0].tolist() == pytest.approx([3.0, 0.0, 0.0], abs=1e-6)


@pytest.mark.parametrize("name", ["ploo", "ploo_exact", "partition", "rloo", "grpo"])
def test_all_equal_rewards_give_zero_advantage(name):
    """A group whose responses all scored the same carries no signal: A = 0 for every estimator."""
    rewards = torch.full((4, 3), 0.25)
    adv, _ = algos.get_adv_estimator_fn(name)(rewards, torch.ones(4, 3), np.array(["g"] * 4), algo_config(0.01))
    torch.testing.assert_close(adv, torch.zeros(4, 3), atol=1e-6, rtol=0)


def test_group_of_one():
    """A lone response, as verl / the seed: ploo has b = 0 (A = r), rloo A = r, grpo (r − 0)/(1 + 1e-6);
    partition gives r − r = 0."""
    rewards, mask, index = torch.tensor([[0.7]], dtype=torch.float64), torch.ones(1, 1), np.array(["solo"])
    got = {n: algos.get_adv_estimator_fn(n)(rewards, mask, index, None)[0].item() for n in algos.list_adv_estimators()}
    assert got == pytest.approx({"ploo": 0.7, "ploo_exact": 0.7, "rloo": 0.7, "grpo": 0.7 / (1 + 1e-6),
                                 "partition": 0.0}, rel=1e-12)


def test_index_may_be_list_numpy_or_tensor():
    """Group uids may come as a list, a numpy array (str, int or object) or a torch tensor."""
    rewards, mask, index, scores = make_batch(seed=3, int_ids=True)
    expected, _ = algos.compute_ploo_advantage(rewards, mask, index)
    for same in (index.tolist(), index.astype(object), torch.as_tensor(index), index.astype(str)):
        torch.testing.assert_close(algos.compute_ploo_advantage(rewards, mask, same)[0], expected)


# ----------------------------------------------------------------------------- weights


@pytest.mark.parametrize("tau", TAUS)
@pytest.mark.parametrize("band", [(None, None), (0.0, 1.0), (0.3, None), (None, 0.6)])
@pytest.mark.parametrize("use_is", [False, True])
def test_wpmd_weights_match_reference(tau, band, use_is):
    """compute_wpmd_weight: open-band group filter times optional in-group IS weights, on the mask."""
    rewards, mask, index, scores = make_batch(seed=11, binary=band == (0.0, 1.0), sizes=(3, 1, 4, 2, 4))
    weights = algos.compute_wpmd_weight(rewards, mask, index, algo_config(tau, *band), use_is=use_is)
    assert_rows(weights, ref_weights(scores, index, tau, *band, use_is), mask)


def test_band_is_open_interval():
    """Groups with mean exactly lb or ub are dropped: means 1, 0, 0.5 with band (0, 1) keep only 0.5."""
    scores = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 0.0])
    index = np.array(["all", "none", "all", "none", "half", "half"])
    assert algos.group_band_mask(scores, index, 0.0, 1.0).tolist() == [False, False, False, False, True, True]
    assert algos.group_band_mask(scores, index, 0.5, None).tolist() == [True, False, True, False, False, False]
    assert algos.group_band_mask(scores, index, None, None).all()


def test_importance_weights_hand_worked():
    """Rewards [1, 0, 0], τ = 1: e = [1, e^-1, e^-1], mean = (1 + 2·0.367879)/3 = 0.578586,
    so w = [1/0.578586, 0.367879/0.578586] = [1.728351, 0.635825, 0.635825] (mean 1)."""
    w = algos.compute_wpmd_weight(torch.tensor([[1.0], [0.0], [0.0]]), torch.ones(3, 1), ["p"] * 3, None, use_is=True)
    assert w[:, 0].tolist() == pytest.approx([1.728351, 0.635825, 0.635825], abs=1e-6)
