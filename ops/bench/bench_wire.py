"""Throughput of the wire format against a plain memory copy of the same bytes, in one run.

    python ops/bench/bench_wire.py [--batch 1024 --prompt-len 256 --response-len 1024 --repeats 15]

Encode is validation plus one copy of the arrays into the message; decode is validation over
zero-copy views. Targets: encode + decode >= 2 GB/s and within 3x of the copy. Prints a markdown
table of medians for a TrainBatch of the given shape (~22 MiB by default), one of 2x the prompt
and 1.5x the response length (~34 MiB, past glibc's 32 MiB mmap threshold), and a RolloutBatch.
"""
import argparse
import statistics
import time

import numpy as np

from async_pmd.wire import RolloutBatch, RolloutGroup, TrainBatch, decode, encode, encode_array


def train_batch(rng, batch: int, prompt_len: int, response_len: int) -> TrainBatch:
    shape = (batch, response_len)
    lengths = rng.integers(1, response_len + 1, batch)
    response_mask = (np.arange(response_len) < lengths[:, None]).astype(np.float32)  # (B, R)
    prompt_mask = np.ones((batch, prompt_len), np.int8)
    return TrainBatch(
        prompts=rng.integers(0, 150_000, (batch, prompt_len), dtype=np.int32),
        responses=rng.integers(0, 150_000, shape, dtype=np.int32),
        response_mask=response_mask,
        attention_mask=np.concatenate([prompt_mask, response_mask.astype(np.int8)], axis=1),
        old_log_probs=-rng.random(shape, dtype=np.float32) * 5,
        advantages=rng.standard_normal(shape, dtype=np.float32),
        partition_weights=rng.random(shape, dtype=np.float32),
        rewards=rng.random(batch, dtype=np.float32),
        policy_versions=rng.integers(0, 100, batch),
        uids=[f"prompt-{b // 8:06d}" for b in range(batch)],
        learner_step=100,
    )


def rollout_batch(rng, groups: int, n: int, max_len: int) -> RolloutBatch:
    def group(i: int) -> RolloutGroup:
        lengths = rng.integers(0, max_len + 1, n)
        return RolloutGroup(
            uid=f"prompt-{i:06d}", prompt_ids=rng.integers(0, 150_000, 256, dtype=np.int32),
            response_ids=[rng.integers(0, 150_000, k, dtype=np.int32) for k in lengths],
            logprobs=[-rng.random(k, dtype=np.float32) for k in lengths],
            finish_reasons=["stop"] * n, policy_version=3, prompt_text="x" * 800,
            response_texts=["y" * 2000] * n, answer="42", sample_index=i)
    return RolloutBatch(groups=[group(i) for i in range(groups)])


def median_s(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(name: str, msg, to_array: bool, repeats: int) -> str:
    """One row: encode (to bytes, or to a uint8 array) and decode, against copying the same bytes
    into the same kind of object (allocation included on both sides)."""
    produce = encode_array if to_array else encode
    buf = produce(msg)
    source = bytearray(buf)
    copy = (lambda: np.copy(buf)) if to_array else (lambda: bytes(source))
    encode_s = median_s(lambda: produce(msg), repeats)
    decode_s = median_s(lambda: decode(buf), repeats)
    copy_s = median_s(copy, repeats)
    gb = len(buf) / 1e9
    return (f"| {name} | {produce.__name__} | {len(buf) / 2**20:.1f} | {encode_s * 1e3:.2f} | "
            f"{decode_s * 1e3:.2f} | {gb / (encode_s + decode_s):.2f} | {'np.copy' if to_array else 'bytes'} "
            f"{copy_s * 1e3:.2f} | {gb / copy_s:.2f} | {(encode_s + decode_s) / copy_s:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--response-len", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    train = train_batch(rng, args.batch, args.prompt_len, args.response_len)
    # past glibc's 32 MiB mmap threshold every large bytes object is freshly mapped 4 KiB pages
    big = train_batch(rng, args.batch, 2 * args.prompt_len, args.response_len * 3 // 2)
    rollout = rollout_batch(rng, groups=128, n=8, max_len=2048)
    print(f"numpy {np.__version__}; medians of {args.repeats} runs; GB = 1e9 bytes\n")
    print("| message | encoder | MiB | encode ms | decode ms | enc+dec GB/s | copy ms | copy GB/s "
          "| (enc+dec)/copy |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, msg in [(f"TrainBatch B={args.batch} P={args.prompt_len} R={args.response_len}", train),
                      (f"TrainBatch B={args.batch} P={2 * args.prompt_len} R={args.response_len * 3 // 2}", big),
                      (f"RolloutBatch 128 groups x 8 ({rollout.num_responses} responses)", rollout)]:
        for to_array in (False, True):
            print(measure(name, msg, to_array, args.repeats))


if __name__ == "__main__":
    main()
