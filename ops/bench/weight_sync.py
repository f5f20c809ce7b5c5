"""Weight sync as the model grows: publish → every replica current, against one memcpy.

    .venv/bin/python ops/bench/weight_sync.py [--sizes tiny 25m 150m] [--replicas 2] [--repeats 5]
        [--transport object_store|collective] [--load adopt|copy] [--layout flat|separate]

For random Qwen2 models of each size (float32), the object-store path the job takes every
`weight_sync.interval` steps, timed from the learner's side until every replica is current:

- publish (in this process, standing for learner rank 0): the parameters as CPU views, as
  `ds_engine.full_state_dict(clone=False)` gives them at ZeRO ≤ 2, `wire.named_tensors_to_wire` +
  `encode_parts` (views, no copy), one `ray.put` of the parts (the one copy on this side, into
  shared memory) and `WeightStore.publish` of its ref. `--layout flat` (the default) keeps the
  parameters in one flat buffer, back to back, as ZeRO-1/2 do (`tests/async_pmd/test_learner_reset.py`),
  so the put gets the head and one part; `--layout separate`, one allocation per parameter (ZeRO-0,
  or weights copied off a GPU one tensor at a time), one part each. The table also counts the
  syncs whose put touched fresh shared-memory pages (page faults in this process during the put
  for at least half the message's 4 KiB pages: the object store placed it where no object was
  before), the slow mode of the put;
- pull (in each of `--replicas` Ray actors, each a `TorchEngine` of the same architecture, as in a
  generator replica's `_fetch`): `WeightStore.latest`, fetch, `wire.decode`, `to_torch` sharing
  the message's read-only memory, `engine.adopt_weights` (the message's memory becomes the
  model's, no copy); all replicas pull at once. `--load copy`: `engine.update_weights` instead
  (an in-place copy into the model, what the replica did before `adopt_weights`).
- then each replica runs one forward pass (4 × 32 tokens) and another: an adopted message is
  mapped into the replica page by page as the first pass reads it, so the table prints the first
  pass after the load and the second one, to show where that cost went.

With `--transport collective` (`weight_sync.transport: collective`): publish is the clone alone;
each replica has joined a gloo group with this process (rank 0, as learner rank 0 is) through the
torch engine's `init_weight_sync_group`, and receives every tensor by broadcast through its
`update_weights_from_distributed` while this process sends to all replicas at once (a thread per
group, as rank 0 serves replicas' calls in threads).

The baseline is one plain `torch` memcpy of the same number of bytes (one flat float32 buffer
into another) in this process, measured in the same run: the cost of moving the bytes once. The
table prints medians over `--repeats` syncs and the ratio to the memcpy.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# name -> Qwen2 shape; parameter counts are printed from the built model.
SIZES = {
    "tiny": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
             "intermediate_size": 128, "vocab_size": 32},
    "25m": {"hidden_size": 512, "num_hidden_layers": 6, "num_attention_heads": 8, "num_key_value_heads": 4,
            "intermediate_size": 1408, "vocab_size": 8192},
    "150m": {"hidden_size": 1024, "num_hidden_layers": 10, "num_attention_heads": 16, "num_key_value_heads": 8,
             "intermediate_size": 2816, "vocab_size": 16384},
}


def build_model(shape: dict, seed: int):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(**shape, max_position_embeddings=64, tie_word_embeddings=True,
                         bos_token_id=0, eos_token_id=1, pad_token_id=0)
    return Qwen2ForCausalLM(config).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--transport", choices=["object_store", "collective"], default="object_store")
    parser.add_argument("--load", choices=["adopt", "copy"], default="adopt")
    parser.add_argument("--layout", choices=["flat", "separate"], default="flat")
    args = parser.parse_args()

    import ray
    import torch

    from concurrent.futures import ThreadPoolExecutor

    from async_pmd import weight_broadcast, wire
    from services.weights import WeightStore

    torch.set_num_threads(1)
    ray.init(address="local", num_cpus=args.replicas + 1, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_WAIT_POLICY": "PASSIVE"}})

    @ray.remote(num_cpus=1)
    class Replica:
        """A generator replica's weight path: fetch → decode → in-place load into a TorchEngine."""

        def __init__(self, shape: dict, store):
            import torch

            from async_pmd.engines.torch_engine import TorchEngine

            torch.set_num_threads(1)
            self._engine = TorchEngine(build_model(shape, seed=1))
            self._store = store

        def join(self, port: int, group: str) -> None:
            self._engine.init_weight_sync_group(master_address="127.0.0.1", master_port=port, rank_offset=1,
                                                world_size=2, group_name=group, backend="gloo")
            self._group = group

        def receive(self, manifest: dict) -> float:
            start = time.perf_counter()
            self._engine.update_weights_from_distributed(manifest["names"], manifest["dtypes"], manifest["shapes"],
                                                         manifest["version"], group_name=self._group)
            return time.perf_counter() - start

        def pull(self, load: str) -> float:
            start = time.perf_counter()
            version, refs, _ = ray.get(self._store.latest.remote())
            msg = wire.decode(ray.get(refs[0]), max_bytes=2**34, expect=wire.NamedTensors)
            tensors = msg.to_torch(share_readonly=True)
            if load == "adopt":
                self._engine.adopt_weights(tensors, version)
            else:
                self._engine.update_weights(tensors, version)
            return time.perf_counter() - start

        def forward(self) -> float:
            ids = torch.arange(4 * 32).reshape(4, 32) % self._engine.model.config.vocab_size
            start = time.perf_counter()
            with torch.inference_mode():
                self._engine.model(input_ids=ids)
            return time.perf_counter() - start

    rows = []
    try:
        for size in args.sizes:
            model = build_model(SIZES[size], seed=0)
            if args.layout == "flat":  # as DeepSpeed ZeRO-1/2: every parameter a view of one flat buffer
                buffer = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
                at = 0
                for p in model.parameters():
                    p.data = buffer[at:at + p.numel()].view_as(p)
                    at += p.numel()
            params = sum(p.numel() for p in model.parameters())
            store = WeightStore.remote()
            replicas = [Replica.remote(SIZES[size], store) for _ in range(args.replicas)]
            groups = []
            if args.transport == "collective":
                for i, replica in enumerate(replicas):
                    rendezvous, name = weight_broadcast.host_store("127.0.0.1", 2, 300), f"bench_{size}_{i}"
                    joined = replica.join.remote(rendezvous.port, name)
                    groups.append(weight_broadcast.open_group(
                        store=rendezvous, master_address="127.0.0.1", master_port=rendezvous.port, rank=0,
                        world_size=2, group_name=name, backend="gloo", timeout_s=300))
                    ray.get(joined)
            senders = ThreadPoolExecutor(max(1, len(groups)))
            syncs, publishes, pulls, firsts, seconds, fresh, nbytes = [], [], [], [], [], 0, 0
            for version in range(1, args.repeats + 2):  # the first sync warms the path: left out
                start = time.perf_counter()
                # As `ds_engine.full_state_dict`: clones for the broadcast, views for the object
                # store (its encode is the copy).
                state = {n: p.detach().to("cpu", copy=bool(groups)).contiguous() for n, p in model.named_parameters()}
                if groups:
                    m = weight_broadcast.Manifest.of(state, version)
                    manifest = {"version": version, "names": list(m.names), "dtypes": list(m.dtypes),
                                "shapes": [list(x) for x in m.shapes]}
                    published = time.perf_counter()
                    receiving = [r.receive.remote(manifest) for r in replicas]
                    list(senders.map(lambda g: weight_broadcast.send(state, g), groups))
                    pull_s = ray.get(receiving)
                    nbytes, nparts, faults = sum(t.nbytes for t in state.values()), 0, 0
                    del state
                else:
                    parts = wire.encode_parts(wire.named_tensors_to_wire(state, version), max_bytes=2**34)
                    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                    ref = ray.put(parts)  # as learner rank 0: the one copy, owned by the publisher
                    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
                    ray.get(store.publish.remote(version, [ref]))
                    published = time.perf_counter()
                    pull_s = ray.get([r.pull.remote(args.load) for r in replicas])
                    nbytes, nparts = sum(p.nbytes for p in parts), len(parts)
                    del state, parts, ref
                done = time.perf_counter()
                first = ray.get([r.forward.remote() for r in replicas])
                second = ray.get([r.forward.remote() for r in replicas])
                if version > 1:
                    syncs.append(done - start)
                    publishes.append(published - start)
                    pulls.append(max(pull_s))
                    firsts.append(max(first))
                    seconds.append(max(second))
                    fresh += faults >= nbytes / 4096 / 2
            flat = torch.empty(nbytes // 4, dtype=torch.float32).normal_()
            into = torch.empty_like(flat)
            copies = []
            for _ in range(args.repeats + 1):
                start = time.perf_counter()
                into.copy_(flat)
                copies.append(time.perf_counter() - start)
            memcpy = statistics.median(copies[1:])
            rows.append((size, params, nbytes, nparts, fresh, statistics.median(publishes), statistics.median(pulls),
                         statistics.median(syncs), memcpy, statistics.median(firsts), statistics.median(seconds)))
            for group in groups:
                weight_broadcast.close(group)
            senders.shutdown()
            for actor in (*replicas, store):
                ray.kill(actor)
            del model, flat, into
    finally:
        ray.shutdown()

    load = f", {args.load}, {args.layout} parameters" if args.transport == "object_store" else ""
    print(f"\n{args.transport}{load}, {args.replicas} replicas, float32, median of {args.repeats} syncs; load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}\n")
    print("| model | parameters | MB | parts | puts on fresh pages | publish ms | slowest replica's pull ms "
          "| publish → all current ms | one memcpy ms | ratio | first forward after it ms | next forward ms |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for size, params, nbytes, nparts, fresh, pub, pull, sync, memcpy, first, second in rows:
        print(f"| {size} | {params / 1e6:.2f} M | {nbytes / 2**20:.1f} | {nparts} | {fresh} of {args.repeats} | "
              f"{pub * 1e3:.1f} | {pull * 1e3:.1f} | {sync * 1e3:.1f} | {memcpy * 1e3:.2f} | {sync / memcpy:.1f}x | "
              f"{first * 1e3:.1f} | {second * 1e3:.1f} |")


if __name__ == "__main__":
    main()
