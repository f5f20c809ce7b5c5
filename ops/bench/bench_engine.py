"""Rollout throughput of the torch engine on the tiny model: generated tokens/s by batch and threads.

    python ops/bench/bench_engine.py [--batch-sizes 1 4 16 64] [--threads 1 2] [--max-new-tokens 16]

Responses ignore EOS, so every row generates exactly max_new_tokens and tokens/s counts real work.
Each cell is the median of --repeats timed calls after one warm-up. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from async_pmd import models  # noqa: E402
from async_pmd.engines import SamplingParams  # noqa: E402
from async_pmd.engines.torch_engine import TorchEngine  # noqa: E402


def synthetic_prompts(tokenizer, count: int) -> list[list[int]]:
    """`a+b=` prompts of 4 to 6 characters, so batches are left-padded as in training."""
    return [tokenizer.encode(f"{i % 97}+{(7 * i) % 13}=") for i in range(count)]


def time_generate(engine: TorchEngine, prompts, params: SamplingParams, repeats: int) -> tuple[float, int]:
    """Median seconds per call and generated tokens per call."""
    engine.generate(prompts, params)  # warm-up: allocator, kernels
    seconds, tokens = [], 0
    for _ in range(repeats):
        start = time.perf_counter()
        outputs = engine.generate(prompts, params)
        seconds.append(time.perf_counter() - start)
        tokens = sum(len(o.token_ids) for group in outputs for o in group)
    return statistics.median(seconds), tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--model", type=Path, default=None, help="model dir (default: a fresh tiny model)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        path = args.model or models.build_tiny_model(Path(tmp) / "tiny")
        tokenizer = models.load_tokenizer(path)
        engine = TorchEngine(path, device=args.device)
        params = SamplingParams(max_new_tokens=args.max_new_tokens, ignore_eos=True, seed=0)
        results = {}
        for threads in args.threads:
            torch.set_num_threads(threads)
            for batch in args.batch_sizes:
                results[threads, batch] = time_generate(engine, synthetic_prompts(tokenizer, batch), params, args.repeats)

    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, device {args.device}, "
          f"max_new_tokens {args.max_new_tokens}, median of {args.repeats}\n")
    header = " | ".join(f"{t} thread{'s' * (t > 1)}: tok/s (ms/step)" for t in args.threads)
    print(f"| batch | {header} |")
    print("|---:|" + "---:|" * len(args.threads))
    for batch in args.batch_sizes:
        cells = []
        for threads in args.threads:
            seconds, tokens = results[threads, batch]
            cells.append(f"{tokens / seconds:,.0f} ({1000 * seconds / args.max_new_tokens:.2f})")
        print(f"| {batch} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
