"""The seed's numerics, term for term: plain transcriptions of the seed's (openkimi/pmd) and verl's code.

Each `seed_*` / `verl_*` function below is the seed's or verl's formula written out on Python floats
with loops, in the order that code computes it (the seed's `compute_partition_loo_outcome_advantage`,
`compute_policy_loss_opmd` and `compute_wpmd_weight`; verl's `compute_rloo_outcome_advantage`,
`compute_grpo_outcome_advantage`, `compute_policy_loss_vanilla` and `agg_loss`). Our vectorised
functions must agree with them in float64 on random inputs, including the regimes where the seed
departs from the exact math: the lone winner at small τ, groups of one, all-equal rewards, and a
band-filtered group that stays in the batch with weight 0.
"""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import async_pmd.algos as algos

TAUS = (0.01, 0.1, 1.0, 5.0)
TOL = {"rtol": 1e-9, "atol": 1e-9}


def algo_config(tau=1.0, lb=None, ub=None):
    return SimpleNamespace(partition_tau=tau, partition_reward_lb=lb, partition_reward_ub=ub,
                           norm_adv_by_std_in_grpo=True)


def actor_config(tau=1.0, clip=0.2, clip_c=3.0):
    return SimpleNamespace(policy_loss=SimpleNamespace(pmd_tau=tau, clip_ratio=clip, clip_ratio_low=None,
                                                       clip_ratio_high=None, clip_ratio_c=clip_c))


# ----------------------------------------------------------------------------- transcriptions


def by_group(index):
    groups = {}
    for i, uid in enumerate(index):
        groups.setdefault(uid, []).append(i)
    return groups


def seed_ploo(scores, index, tau):
    """The seed's ploo: group of one -> baseline 0; else m + τ·log(clamp((Z − e_i)/(n − 1), 1e-8))."""
    groups = by_group(index)
    baseline = [0.0] * len(scores)
    for i in range(len(scores)):
        members = [scores[j] for j in groups[index[i]]]
        n = len(members)
        if n > 1:
            m = max(members)
            partition = sum(math.exp((s - m) / tau) for s in members)
            loo = partition - math.exp((scores[i] - m) / tau)
            baseline[i] = m + tau * math.log(max(loo / (n - 1), 1e-8))
    return [s - b for s, b in zip(scores, baseline)]


def verl_rloo(scores, index):
    """verl's rloo: group of one keeps its score; else s·n/(n−1) − mean·n/(n−1)."""
    groups = by_group(index)
    out = []
    for i, s in enumerate(scores):
        members = [scores[j] for j in groups[index[i]]]
        n = len(members)
        out.append(s * n / (n - 1) - (sum(members) / n) * n / (n - 1) if n > 1 else s)
    return out


def verl_grpo(scores, index, eps=1e-6):
    """verl's grpo: group of one has mean 0 and std 1; else torch.std (unbiased)."""
    groups = by_group(index)
    out = []
    for i, s in enumerate(scores):
        members = [scores[j] for j in groups[index[i]]]
        n = len(members)
        mean, std = 0.0, 1.0
        if n > 1:
            mean = sum(members) / n
            std = math.sqrt(sum((x - mean) ** 2 for x in members) / (n - 1))
        out.append((s - mean) / (std + eps))
    return out


def seed_wpmd_weight(scores, index, tau, lb=None, ub=None, use_is=False):
    """The seed's compute_wpmd_weight per row: IS weight (or 1) × [lb < group mean < ub]."""
    lb = -math.inf if lb is None else lb
    ub = math.inf if ub is None else ub
    groups = by_group(index)
    out = []
    for i, s in enumerate(scores):
        members = [scores[j] for j in groups[index[i]]]
        in_range = lb < sum(members) / len(members) < ub
        w = 1.0
        if use_is:
            m = max(members)
            w = math.exp((s - m) / tau) / (sum(math.exp((x - m) / tau) for x in members) / len(members))
        out.append(w * (1.0 if in_range else 0.0))
    return out


def seed_opmd(old, new, adv, mask, tau, mode, weights=None, is_weights=None, max_len=None):
    """The seed's compute_policy_loss_opmd on nested lists; max_len = L_max (the mask width if None)."""
    seq_loss, lengths = [], []
    for i, row in enumerate(mask):
        toks = [t for t, m in enumerate(row) if m > 0]
        length = max(len(toks), 1)
        ratio = sum(new[i][t] for t in toks) - sum(old[i][t] for t in toks)
        a = sum(adv[i][t] for t in toks) / length
        w = sum(weights[i][t] for t in toks) / length if weights is not None else 1.0
        rho = sum(is_weights[i][t] for t in toks) / length if is_weights is not None else 1.0
        seq_loss.append(rho * 0.5 * tau * w * (a / tau - ratio) ** 2)
        lengths.append(length)
    if mode == "seq-mean-token-mean":
        return sum(s / n for s, n in zip(seq_loss, lengths)) / len(seq_loss)
    return (sum(seq_loss) / len(seq_loss)) / (len(mask[0]) if max_len is None else max_len)


def verl_agg_loss(loss, mask, mode, scale=None):
    """verl's agg_loss (dp_size 1); seq-mean modes average over rows with at least one token."""
    row_sums = [sum(x * m for x, m in zip(lr, mr)) for lr, mr in zip(loss, mask)]
    row_lens = [sum(mr) for mr in mask]
    nonempty = [n > 0 for n in row_lens]
    if mode == "token-mean":
        return sum(row_sums) / sum(row_lens)
    if mode == "seq-mean-token-sum":
        return sum(s for s, k in zip(row_sums, nonempty) if k) / sum(nonempty)
    if mode == "seq-mean-token-mean":
        return sum(s / (n + 1e-8) for s, n, k in zip(row_sums, row_lens, nonempty) if k) / sum(nonempty)
    return sum(row_sums) / (len(mask[0]) if scale is None else scale)


def verl_vanilla(old, new, adv, mask, mode, clip=0.2, clip_c=3.0, is_weights=None, scale=None):
    """verl's compute_policy_loss_vanilla: PPO clip, dual clip for A < 0, × rollout_is_weights, agg_loss."""
    loss = []
    for i, row in enumerate(mask):
        out = []
        for t in range(len(row)):
            a = adv[i][t]
            ratio = math.exp(min(max(new[i][t] - old[i][t], -20.0), 20.0))
            clip_loss = max(-a * ratio, -a * min(max(ratio, 1 - clip), 1 + clip))
            value = min(-a * clip_c, clip_loss) if a < 0 else clip_loss
            out.append(value * (is_weights[i][t] if is_weights is not None else 1.0))
        loss.append(out)
    return verl_agg_loss(loss, mask, mode, scale)


# ----------------------------------------------------------------------------- inputs


def make_groups(seed, sizes=(8, 1, 4, 8, 3, 1, 6), binary=False, leader_gap=None):
    """Shuffled groups (two of size one); scores on the last response token. `leader_gap` lifts one
    response per group that far above the group's others (the lone-winner regime for continuous scores)."""
    rng = np.random.default_rng(seed)
    ids = [f"p{g}" for g, n in enumerate(sizes) for _ in range(n)]
    perm = rng.permutation(len(ids))
    index = [ids[p] for p in perm]
    scores = rng.integers(0, 2, len(ids)).astype(float) if binary else rng.uniform(0.0, 1.0, len(ids))
    if leader_gap is not None:
        for members in by_group(index).values():
            others = [scores[j] for j in members[1:]]
            if others:
                scores[members[0]] = max(others) + leader_gap
    width = 5
    lengths = rng.integers(1, width + 1, len(ids))
    mask = (np.arange(width)[None, :] < lengths[:, None]).astype(np.float64)
    rewards = np.zeros((len(ids), width))
    rewards[np.arange(len(ids)), lengths - 1] = scores
    return torch.tensor(rewards), torch.tensor(mask), index, [float(s) for s in scores]


def per_row(values, mask):
    return torch.tensor(values, dtype=torch.float64).unsqueeze(-1) * mask


def loss_inputs(seed, batch=7, width=6, big_ratios=False):
    """Random float64 (old, new, adv, mask, weights, is_weights) [B,T]; row 0 is empty (the seed's opmd
    counts it in its mean as 0, verl's agg_loss leaves it out of its seq-means). `big_ratios` spreads
    the log-ratio so that some ratios pass 3 (the dual clip) and 1 ± ε."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, width + 1, batch)
    lengths[0] = 0
    mask = (np.arange(width)[None, :] < lengths[:, None]).astype(np.float64)
    old = rng.normal(-1.0, 0.5, (batch, width))
    new = old + rng.normal(0.0, 1.0 if big_ratios else 0.3, (batch, width))
    adv = np.repeat(rng.normal(0.0, 1.0, (batch, 1)), width, axis=1) * mask
    weights = np.repeat(rng.uniform(0.0, 2.0, (batch, 1)), width, axis=1) * mask
    is_weights = rng.uniform(0.0, 2.0, (batch, width)) * mask
    return [torch.tensor(x) for x in (old, new, adv, mask, weights, is_weights)]


# ----------------------------------------------------------------------------- estimators


@pytest.mark.parametrize("tau", TAUS)
@pytest.mark.parametrize("kind", ["continuous", "binary", "leader_20tau", "leader_40tau"])
def test_estimators_are_the_seeds_on_random_groups(tau, kind):
    """ploo = the seed's, rloo / grpo = verl's, on shuffled groups with two groups of one; leader_*
    puts one response per group 20τ / 40τ above the rest, where the seed's clamp (and past 37τ its
    cancellation) decides the leader's advantage."""
    gap = {"leader_20tau": 20 * tau, "leader_40tau": 40 * tau}.get(kind)
    rewards, mask, index, scores = make_groups(seed=int(tau * 100), binary=kind == "binary", leader_gap=gap)
    cfg = algo_config(tau)
    expected = {"ploo": seed_ploo(scores, index, tau), "rloo": verl_rloo(scores, index),
                "grpo": verl_grpo(scores, index)}
    for name, want in expected.items():
        adv, returns = algos.get_adv_estimator_fn(name)(rewards, mask, index, cfg)
        torch.testing.assert_close(adv, per_row(want, mask), **TOL)
        assert torch.equal(adv, returns)


def test_lone_winner_at_tau_001():
    """One correct answer in 8 binary rewards at τ = 0.01 (the seed's 7B setting).

    Leader: the others' e_j = e^-100 vanish next to its own 1, Z − e_0 = 0 exactly, the clamp gives
    b = 1 + 0.01·ln 1e-8 = 1 − 0.184207 -> A_0 = 0.184207 (exact leave-one-out: 1.0, `ploo_exact`).
    Others: Z − e_i = 1 + 6e^-100 = 1 -> b = 1 + 0.01·ln(1/7) = 1 − 0.019459 -> A = −0.980541.
    """
    rewards = torch.tensor([[1.0]] + [[0.0]] * 7, dtype=torch.float64)
    mask, index = torch.ones(8, 1, dtype=torch.float64), ["q"] * 8
    adv, _ = algos.compute_ploo_advantage(rewards, mask, index, algo_config(0.01))
    assert adv[:, 0].tolist() == pytest.approx([0.184207] + [-0.980541] * 7, abs=1e-6)
    assert adv[:, 0].tolist() == pytest.approx(seed_ploo([1.0] + [0.0] * 7, index, 0.01), rel=1e-12)
    exact, _ = algos.compute_ploo_exact_advantage(rewards, mask, index, algo_config(0.01))
    assert exact[0, 0].item() == pytest.approx(1.0, abs=1e-12)


def test_groups_of_one_and_all_equal_groups():
    """Groups of one: ploo A = r (b = 0), rloo A = r, grpo r/(1 + 1e-6), as the seed / verl.
    All-equal groups: Z − e_i = n − 1, so b = m = r and every advantage is 0 (rloo, grpo too)."""
    rewards = torch.tensor([[0.7], [0.3], [0.3], [0.3], [0.25], [0.25]], dtype=torch.float64)
    index, mask = ["solo", "eq", "eq", "eq", "eq2", "eq2"], torch.ones(6, 1, dtype=torch.float64)
    for name, solo in (("ploo", 0.7), ("rloo", 0.7), ("grpo", 0.7 / (1 + 1e-6))):
        adv, _ = algos.get_adv_estimator_fn(name)(rewards, mask, index, algo_config(0.01))
        assert adv[:, 0].tolist() == pytest.approx([solo, 0, 0, 0, 0, 0], abs=1e-12), name


# ----------------------------------------------------------------------------- weights and the band


@pytest.mark.parametrize("use_is", [False, True])
@pytest.mark.parametrize("band", [(None, None), (0.0, 1.0), (0.3, 0.8)])
def test_wpmd_weights_are_the_seeds(use_is, band):
    rewards, mask, index, scores = make_groups(seed=4, binary=band == (0.0, 1.0))
    weights = algos.compute_wpmd_weight(rewards, mask, index, algo_config(0.1, *band), use_is=use_is)
    torch.testing.assert_close(weights, per_row(seed_wpmd_weight(scores, index, 0.1, *band, use_is), mask), **TOL)


@pytest.mark.parametrize("mode", algos.OPMD_AGG_MODES)
def test_out_of_band_group_inside_the_batch(mode):
    """Band (0, 1) on binary rewards: the all-right group gets weight 0 but stays in the batch, so the
    opmd loss (a mean over all B rows) is B_kept/B × the loss of the kept rows alone (drop mode)."""
    rng = np.random.default_rng(0)
    scores = [1.0, 0.0, 0.0, 1.0] + [1.0] * 4 + [0.0, 1.0, 0.0, 0.0]  # groups a, all-right, b
    index = ["a"] * 4 + ["all1"] * 4 + ["b"] * 4
    width, tau = 4, 0.5
    mask = torch.tensor((np.arange(width)[None, :] < rng.integers(1, width + 1, 12)[:, None]), dtype=torch.float64)
    rewards = torch.zeros(12, width, dtype=torch.float64)
    rewards[torch.arange(12), mask.sum(1).long() - 1] = torch.tensor(scores, dtype=torch.float64)
    old = torch.tensor(rng.normal(-1.0, 0.5, (12, width)))
    new = old + torch.tensor(rng.normal(0.0, 0.3, (12, width)))
    cfg = algo_config(tau, 0.0, 1.0)
    adv, _ = algos.compute_ploo_advantage(rewards, mask, index, cfg)
    weights = algos.compute_wpmd_weight(rewards, mask, index, cfg)
    assert weights[4:8].abs().sum() == 0 and (weights.sum(1) > 0).sum() == 8

    loss, _ = algos.compute_policy_loss_opmd(old, new, adv, mask, mode, actor_config(tau), weights,
                                             max_response_length=8)
    as_lists = [t.tolist() for t in (old, new, adv, mask, weights)]
    assert loss.item() == pytest.approx(seed_opmd(*as_lists[:4], tau, mode, weights=as_lists[4], max_len=8), rel=1e-12)
    kept = torch.tensor([i for i in range(12) if not 4 <= i < 8])
    dropped, _ = algos.compute_policy_loss_opmd(old[kept], new[kept], adv[kept], mask[kept], mode, actor_config(tau),
                                                weights[kept], max_response_length=8)
    assert loss.item() == pytest.approx(8 / 12 * dropped.item(), rel=1e-12)


# ----------------------------------------------------------------------------- losses


@pytest.mark.parametrize("tau", TAUS)
@pytest.mark.parametrize("mode", algos.OPMD_AGG_MODES)
@pytest.mark.parametrize("with_is", [False, True])
def test_opmd_is_the_seeds(tau, mode, with_is):
    """opmd with partition weights, optional rollout IS weights, and a constant L_max = 16."""
    old, new, adv, mask, weights, is_weights = loss_inputs(seed=1)
    is_weights = is_weights if with_is else None
    loss, _ = algos.compute_policy_loss_opmd(old, new, adv, mask, mode, actor_config(tau), weights,
                                             rollout_is_weights=is_weights, max_response_length=16)
    want = seed_opmd(old.tolist(), new.tolist(), adv.tolist(), mask.tolist(), tau, mode, weights.tolist(),
                     None if is_weights is None else is_weights.tolist(), max_len=16)
    assert loss.item() == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("mode", algos.LOSS_AGG_MODES)
@pytest.mark.parametrize("clip_c", [3.0, 1.5])
@pytest.mark.parametrize("with_is", [False, True])
def test_vanilla_is_verls(mode, clip_c, with_is):
    """vanilla with the dual clip binding on some tokens, optional rollout IS weights, sum-norm by 16."""
    old, new, adv, mask, _, is_weights = loss_inputs(seed=2, big_ratios=True)
    is_weights = is_weights if with_is else None
    loss, metrics = algos.compute_policy_loss_vanilla(old, new, adv, mask, mode, actor_config(clip_c=clip_c),
                                                      rollout_is_weights=is_weights, max_response_length=16)
    want = verl_vanilla(old.tolist(), new.tolist(), adv.tolist(), mask.tolist(), mode, clip_c=clip_c,
                        is_weights=None if is_weights is None else is_weights.tolist(), scale=16)
    assert loss.item() == pytest.approx(want, rel=1e-9)
    assert metrics["actor/pg_clipfrac_lower"] > 0, "the inputs must exercise the dual clip"


@pytest.mark.parametrize("tau", [0.1, 1.0])
def test_seed_and_exact_ploo_agree_on_binary_rewards_unless_tau_is_small(tau):
    """0/1 rewards put the leader at most 1 = 10τ (τ 0.1) ahead, short of the ~18τ where the
    seed's clamp bites: on every group composition of n = 8 the two forms agree to 1e-9, so the
    learning study compares them at τ 0.01 only (where they differ: 0.184 against 1.0)."""
    for correct in range(9):
        rewards = torch.tensor([[1.0]] * correct + [[0.0]] * (8 - correct), dtype=torch.float64)
        mask, index = torch.ones(8, 1, dtype=torch.float64), ["q"] * 8
        seed, _ = algos.compute_ploo_advantage(rewards, mask, index, algo_config(tau))
        exact, _ = algos.compute_ploo_exact_advantage(rewards, mask, index, algo_config(tau))
        torch.testing.assert_close(seed, exact, rtol=0, atol=1e-9)
