"""Benchmark: vectorised ploo advantages + wPMD weights vs per-sample Python loops.

    python ops/bench/bench_algos.py [--prompts 512] [--n 16] [--tokens 256] [--device cpu] [--threads 1] [--int-ids]

Times `compute_ploo_advantage` + `compute_wpmd_weight` (band (0, 1), use_is) on binary rewards
with shuffled group ids, against two loop implementations of the same formulas written here:
`torch-loop` (per-sample torch scalar ops, the shape of verl's / the seed's estimators: the seed's
leave-one-out sum Z − e_i with its 1e-8 clamp, which `ploo` reproduces) and
`python-loop` (per-sample arithmetic on Python floats, the fastest loop one can write). Prints a
markdown table of median (and min) milliseconds and speed-ups, and checks that all three agree.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections import defaultdict
from types import SimpleNamespace

import numpy as np
import torch

from async_pmd.algos import compute_ploo_advantage, compute_wpmd_weight

LB, UB = 0.0, 1.0  # the band that drops all-wrong and all-right groups under binary rewards


def make_batch(prompts: int, n: int, tokens: int, device: str, seed: int = 0, int_ids: bool = False):
    """Binary rewards on the last response token, random lengths, shuffled string (or int) uids."""
    rng = np.random.default_rng(seed)
    batch = prompts * n
    uids = [p if int_ids else f"uid-{p}" for p in range(prompts) for _ in range(n)]
    index = np.array(uids)[rng.permutation(batch)]
    lengths = rng.integers(1, tokens + 1, size=batch)
    mask = torch.as_tensor(np.arange(tokens)[None, :] < lengths[:, None], dtype=torch.float32)
    rewards = torch.zeros(batch, tokens)
    rewards[torch.arange(batch), torch.as_tensor(lengths - 1)] = torch.as_tensor(rng.integers(0, 2, batch), dtype=torch.float32)
    return rewards.to(device), mask.to(device), index


def vectorised(rewards, mask, index, tau):
    config = SimpleNamespace(partition_tau=tau, partition_reward_lb=LB, partition_reward_ub=UB)
    adv, _ = compute_ploo_advantage(rewards, mask, index, config)
    return adv, compute_wpmd_weight(rewards, mask, index, config, use_is=True)


def torch_loop(rewards, mask, index, tau):
    """Per-sample torch scalar ops, grouped through a dict: the loop the vectorised code replaces."""
    scores = rewards.sum(dim=-1)
    groups = defaultdict(list)
    for i in range(scores.shape[0]):
        groups[index[i]].append(i)
    baseline, weight = torch.zeros_like(scores), torch.zeros_like(scores)
    for members in groups.values():
        group = scores[members]
        m, kept = group.max(), LB < group.mean().item() < UB
        e = torch.exp((group - m) / tau)
        z, z_mean = e.sum(), e.mean()
        for k, i in enumerate(members):
            weight[i] = e[k] / z_mean if kept else 0.0
            if len(members) > 1:
                baseline[i] = m + tau * torch.log(((z - e[k]) / (len(members) - 1)).clamp(min=1e-8))
    return (scores - baseline).unsqueeze(-1) * mask, weight.unsqueeze(-1) * mask


def python_loop(rewards, mask, index, tau):
    """Per-sample arithmetic on Python floats (scores pulled to the host once)."""
    scores = rewards.sum(dim=-1).tolist()
    groups = defaultdict(list)
    for i, uid in enumerate(index.tolist()):
        groups[uid].append(i)
    adv, weight = [0.0] * len(scores), [0.0] * len(scores)
    for members in groups.values():
        group = [scores[i] for i in members]
        m, kept = max(group), LB < sum(group) / len(group) < UB
        e = [math.exp((r - m) / tau) for r in group]
        z = sum(e)
        for k, i in enumerate(members):
            weight[i] = e[k] / (z / len(group)) if kept else 0.0
            if len(group) > 1:
                adv[i] = scores[i] - (m + tau * math.log(max((z - e[k]) / (len(group) - 1), 1e-8)))
            else:
                adv[i] = scores[i]
    as_rows = lambda v: torch.tensor(v, dtype=rewards.dtype, device=rewards.device).unsqueeze(-1) * mask  # noqa: E731
    return as_rows(adv), as_rows(weight)


def time_ms(fn, args, repeats: int, device: str) -> tuple[float, float]:
    """(median, min) wall milliseconds; min is the steadier figure on a shared machine."""
    fn(*args)  # warm-up: allocator, lazy CUDA init, numpy's unique on first call
    times = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn(*args)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=512)
    parser.add_argument("--n", type=int, default=16, help="responses per prompt")
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--tau", type=float, default=0.01)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--loop-repeats", type=int, default=5, help="the loops are slow; fewer repeats")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads; 1 because the loops are single-threaded and, on a shared "
                             "machine, extra OpenMP threads spin against other jobs (timings swing 10x)")
    parser.add_argument("--int-ids", action="store_true", help="integer uids instead of strings")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    rewards, mask, index = make_batch(args.prompts, args.n, args.tokens, args.device, int_ids=args.int_ids)
    batch_args = (rewards, mask, index, args.tau)
    reference = vectorised(*batch_args)
    impls = {"vectorised": (vectorised, args.repeats), "torch-loop": (torch_loop, args.loop_repeats),
             "python-loop": (python_loop, args.loop_repeats)}
    for name, (fn, _) in impls.items():
        for got, want, what in zip(fn(*batch_args), reference, ("advantages", "weights")):
            if not torch.allclose(got, want, rtol=1e-5, atol=1e-5):
                raise SystemExit(f"{name} disagrees with vectorised on {what}: max |diff| {(got - want).abs().max():.3g}")

    print(f"B = {args.prompts} prompts x {args.n} responses = {rewards.shape[0]} rows, T = {args.tokens}, "
          f"tau = {args.tau}, {'int' if args.int_ids else 'string'} uids, device = {args.device}, "
          f"torch threads = {torch.get_num_threads()}; all three agree (1e-5)\n")
    times = {name: time_ms(fn, batch_args, reps, args.device) for name, (fn, reps) in impls.items()}
    (vec_median, vec_min) = times["vectorised"]
    print("| impl | median ms | min ms | speed-up of vectorised (median) | (min) |")
    print("|---|---:|---:|---:|---:|")
    for name, (median, fastest) in times.items():
        print(f"| {name} | {median:.2f} | {fastest:.2f} | {median / vec_median:.0f}x | {fastest / vec_min:.0f}x |")


if __name__ == "__main__":
    main()
