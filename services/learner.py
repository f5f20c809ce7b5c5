"""Learner: DeepSpeed ranks as Ray actors in one placement group, applying the PMD update.

`LearnerRank` is one data-parallel rank (ZeRO stage and CPU offload from config; gloo on CPU, NCCL
on GPU); with `actor.use_kl_loss` it also holds the frozen reference policy, loaded from
`model.path` at construction, so a resumed run compares against the initial weights. It
takes `TrainBatch` bytes (the same object ref for every rank; each trains on its share of rows),
and on request gathers the full weights and, on rank 0, publishes them to the WeightStore as a
`NamedTensors` message (`weight_sync.transport: object_store`) or keeps them and announces
itself as their sender (`collective`): replicas then open a broadcast group with rank 0 and
receive each tensor from it (`async_pmd.weight_broadcast`). That rank is a threaded actor so
that replicas are served while it trains. `LearnerGroup` owns the fan-out: every collective call
is sent to all ranks before any result is awaited, or the ranks' rendezvous would hang.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

import numpy as np
import ray
from ray.exceptions import RayActorError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from async_pmd import names, ports, telemetry, wire
from async_pmd.config import (
    ActorConfig,
    ClusterConfig,
    LearnerConfig,
    ModelConfig,
    WeightSyncConfig,
)

# The torch and DeepSpeed modules (`ds_engine`, `pmd_step`, `weight_broadcast`) are imported in
# the rank's methods, not here: the launcher loads this module to create the ranks, and torch is
# seconds of CPU at start-up that only the ranks' own processes need.
if TYPE_CHECKING:
    from async_pmd.weight_broadcast import Manifest

logger = logging.getLogger(__name__)
# How long rank 0 waits for a replica to answer whether it lives, before closing its weight group.
RECEIVER_CHECK_S = 10.0


class LearnerDied(RuntimeError):
    """A learner rank's process is gone; the group is unusable (the trainer rebuilds it)."""


@ray.remote(max_restarts=0)
class LearnerRank:
    """Owns one DeepSpeed engine (model + optimizer shard), the reference policy of the KL loss (or
    None), and the step counter it has applied."""

    def __init__(self, *, actor: ActorConfig, learner: LearnerConfig, model: ModelConfig, rank: int,
                 world_size: int, master_addr: str, master_port: int, total_optimizer_steps: int, temperature: float,
                 max_response_length: int, seed: int,
                 max_wire_bytes: int, weight_sync: WeightSyncConfig, namespace: str, rendezvous_file: str | None = None):
        self._actor, self._learner, self._model = actor, learner, model
        self._rank, self._world_size = rank, world_size
        self._temperature, self._max_response_length = temperature, max_response_length
        self._max_wire_bytes, self._weight_sync = max_wire_bytes, weight_sync
        import torch

        from async_pmd import ds_engine

        ds_engine.setup_deepspeed_env(rank, world_size, master_port, use_gpu=learner.num_gpus_per_rank > 0,
                                      master_addr=master_addr)
        torch.set_num_threads(max(1, int(learner.num_cpus_per_rank)))
        torch.manual_seed(seed)
        self._engine = ds_engine.init_engine(ds_engine.load_policy(model), actor, learner, world_size,
                                             model.dtype, total_optimizer_steps,
                                             init_method=rendezvous_file and f"file://{rendezvous_file}")
        # Always the weights at model.path: `load` restores the policy only, never this.
        self._reference = ds_engine.load_reference(model, self._engine.device) if actor.use_kl_loss else None
        self._store = ray.get_actor(names.WEIGHT_STORE, namespace=namespace)
        self._optimizer_resets = 0
        self._refused = 0  # TrainBatch messages refused as malformed wire bytes
        self._metrics = telemetry.RoleMetrics("actor", rank=rank)
        # `collective` (rank 0): the newest weights, the broadcast groups opened by replicas (each
        # forms in a thread of its own) with the replica that opened each, and the weights pinned
        # for each group's next send.
        self._sending = threading.Lock()
        self._latest: tuple[Manifest, dict] | None = None
        self._groups: dict[str, Future] = {}
        self._receivers: dict[str, ray.actor.ActorHandle | None] = {}
        self._pinned: dict[str, tuple[Manifest, dict]] = {}
        self._group_threads = ThreadPoolExecutor(thread_name_prefix="weight-group")

    def train_step(self, payload: np.ndarray, publish_version: int | None = None) -> dict:
        """One learner step on this rank's rows, then, with `publish_version`, `publish` (one call
        instead of two per step); returns the step's metrics (rank-local)."""
        from async_pmd import ds_engine, pmd_step

        start = time.perf_counter()
        try:
            batch = wire.decode(payload, max_bytes=self._max_wire_bytes, expect=wire.TrainBatch)
        except wire.WireError as exc:  # refused before the engine is touched: no state changes
            self._refused += 1
            logger.warning("rank %d refused a train batch: %s", self._rank, exc)
            raise
        metrics = pmd_step.train_on_batch(self._engine, batch, self._actor, self._rank, self._world_size,
                                          temperature=self._temperature, max_response_length=self._max_response_length,
                                          reference=self._reference)
        freq = self._actor.reset_optimizer_states_freq
        if freq and (batch.learner_step + 1) % freq == 0:
            ds_engine.reset_optimizer_state(self._engine)
            self._optimizer_resets += 1
        metrics["actor/optimizer_resets"] = float(self._optimizer_resets)
        metrics["learner/refused_batches"] = float(self._refused)
        telemetry.record_learner_step(self._metrics, metrics, batch.rewards, batch.learner_step,
                                      time.perf_counter() - start)
        if publish_version is not None:
            metrics.update(self.publish(publish_version))
        return metrics

    def publish(self, version: int) -> dict:
        """Gather the full weights (a collective) and, on rank 0, publish them as `version`."""
        from async_pmd import ds_engine, weight_broadcast

        start = time.perf_counter()
        # `object_store` puts the weights' bytes into shared memory at once (a copy): no clone.
        state = ds_engine.full_state_dict(self._engine, self._learner.zero_stage,
                                          clone=self._weight_sync.transport == "collective")
        gather_s = time.perf_counter() - start
        if state is None:
            return {}
        if self._weight_sync.transport == "collective":
            # The gathered tensors are fresh clones that training never writes, so a send in
            # flight may keep using the previous set while this one replaces it.
            with self._sending:
                self._latest = (weight_broadcast.Manifest.of(state, version), state)
            context = ray.get_runtime_context()
            ray.get(self._store.announce.remote(version, context.current_actor, context.get_actor_id()))
            nbytes, store_s = sum(t.nbytes for t in state.values()), 0.0
        else:
            msg = wire.named_tensors_to_wire(state, version)
            parts = wire.encode_parts(msg, max_bytes=self._weight_sync.max_bytes)
            ref = ray.put(parts)  # the one copy: the parameters' bytes into shared memory, owned here
            store_s = ray.get(self._store.publish.remote(version, [ref]))
            nbytes = sum(p.nbytes for p in parts)
        self._metrics.observe("weight_publish_seconds", time.perf_counter() - start)
        return {"timing/weight_gather_s": gather_s, "timing/weight_publish_s": time.perf_counter() - start,
                "timing/weight_store_s": store_s, "weights/bytes": float(nbytes)}

    # ------------------------------------------------ `collective`: rank 0 as the weights' sender

    def open_weight_group(self, world_size: int, receiver: ray.actor.ActorHandle | None = None) -> tuple[str, int, str]:
        """Host a new broadcast group for one replica (`receiver`; its engine ranks are
        1…world_size-1) and return (address, port, group name) for it to join; the group forms in
        the background. Replicas open groups when they come (a restart, a scale-up), so that is
        when rank 0 closes the groups of replicas that died since, in the background too
        (`_close_dead_weight_groups`)."""
        from async_pmd import weight_broadcast

        name = f"async_pmd_weights_{uuid.uuid4().hex[:12]}"
        timeout_s = self._weight_sync.timeout_s
        address = ray.util.get_node_ip_address()
        store = weight_broadcast.host_store(address, world_size, timeout_s)
        with self._sending:
            others = dict(self._receivers)
            self._groups[name] = self._group_threads.submit(
                weight_broadcast.open_group, store=store, master_address=address, master_port=store.port, rank=0,
                world_size=world_size, group_name=name, backend=self._backend(), timeout_s=timeout_s)
            self._receivers[name] = receiver
        if others:
            self._group_threads.submit(self._close_dead_weight_groups, others)
        return address, store.port, name

    def close_weight_group(self, name: str) -> None:
        """A replica that stops leaves its group (`Generator.__del__`)."""
        self._close_weight_group(name, "its replica stopped")

    def weight_groups(self) -> list[str]:
        """The broadcast groups rank 0 holds (formed or forming)."""
        with self._sending:
            return sorted(self._groups)

    def _close_dead_weight_groups(self, receivers: dict[str, ray.actor.ActorHandle | None]) -> None:
        """Close each group whose replica is dead, or that failed to form. Each of those holds a
        communicator (on NCCL, GPU memory) and its store's port until the job ends otherwise. A
        replica that does not answer within `RECEIVER_CHECK_S` (busy sampling) counts as alive."""
        for name, receiver in receivers.items():
            with self._sending:
                forming = self._groups.get(name)
            if forming is None:
                continue
            if forming.done() and forming.exception() is not None:
                self._close_weight_group(name, "it never formed")
            elif receiver is not None:
                try:
                    ray.get(receiver.__ray_ready__.remote(), timeout=RECEIVER_CHECK_S)
                except RayActorError:
                    self._close_weight_group(name, "its replica died")
                except ray.exceptions.GetTimeoutError:
                    pass

    def _close_weight_group(self, name: str, why: str) -> None:
        import torch.distributed as dist

        with self._sending:
            forming = self._groups.pop(name, None)
            self._receivers.pop(name, None)
            self._pinned.pop(name, None)
        if forming is None:
            return
        logger.info("closing weight group %s: %s", name, why)
        if forming.done() and forming.exception() is None:
            dist.destroy_process_group(forming.result())

    def reserve_weights(self, group_name: str) -> dict:
        """Pin the newest weights for `group_name`'s next `send_weights` and return their manifest
        (version, names, dtypes, shapes): what the replica's engine receives into."""
        with self._sending:
            if self._latest is None:
                raise RuntimeError("no weights published yet")
            self._pinned[group_name] = self._latest
            manifest = self._latest[0]
        return {"version": manifest.version, "names": list(manifest.names), "dtypes": list(manifest.dtypes),
                "shapes": [list(s) for s in manifest.shapes]}

    def send_weights(self, group_name: str) -> float:
        """Broadcast the weights pinned for `group_name`, tensor by tensor; returns the seconds."""
        from async_pmd import weight_broadcast

        with self._sending:
            forming = self._groups[group_name]
            _, state = self._pinned.pop(group_name)
        group = forming.result(timeout=self._weight_sync.timeout_s)
        start = time.perf_counter()
        try:
            weight_broadcast.send(state, group, device="cuda" if self._backend() == "nccl" else "cpu")
        except Exception:
            # Half a broadcast leaves the group unusable; the replica opens a new one.
            self._close_weight_group(group_name, "a broadcast failed")
            raise
        self._metrics.observe("weight_broadcast_seconds", time.perf_counter() - start)
        return time.perf_counter() - start

    def _backend(self) -> str:
        from async_pmd import weight_broadcast

        return weight_broadcast.backend_for(self._learner.num_gpus_per_rank > 0)

    def save(self, directory: str, client_state: dict) -> None:
        from async_pmd import ds_engine

        ds_engine.save_checkpoint(self._engine, directory, client_state)

    def load(self, directory: str) -> dict:
        from async_pmd import ds_engine

        return ds_engine.load_checkpoint(self._engine, directory)

    def export_hf(self, out_dir: str) -> str | None:
        """Write the policy as a Hugging Face directory (rank 0; a collective under ZeRO-3)."""
        from async_pmd import ds_engine
        from async_pmd.models import load_tokenizer

        path = ds_engine.export_hf(self._engine, self._learner.zero_stage, out_dir,
                                   load_tokenizer(self._model.path))
        return None if path is None else str(path)

    def pid(self) -> int:
        return os.getpid()


class LearnerGroup:
    """The fan-out to `learner.num_ranks` LearnerRank actors packed in one placement group."""

    def __init__(self, cfg: ClusterConfig):
        lc = cfg.learner
        bundle = {"CPU": lc.num_cpus_per_rank, **({"GPU": lc.num_gpus_per_rank} if lc.num_gpus_per_rank else {})}
        self._pg = placement_group([bundle] * lc.num_ranks, strategy="PACK")
        ray.get(self._pg.ready())
        port = lc.master_port or ports.find_free_port()
        # Ranks that share a node (always on a private Ray, usually under PACK) rendezvous through
        # a fresh file there, so nothing listens for it; ranks spread over nodes through a TCPStore
        # that rank 0 hosts on its node's address only (`async_pmd.rendezvous`).
        bundle_nodes = ray.util.placement_group_table(self._pg)["bundles_to_node_id"]
        one_node = len(set(bundle_nodes.values())) == 1
        self._rendezvous = os.path.join(tempfile.gettempdir(), f"async_pmd_rendezvous_{uuid.uuid4().hex}") \
            if one_node else None
        master_addr = "127.0.0.1" if one_node else _node_address(bundle_nodes[0])
        # Rank 0 serves replicas' weight groups while it trains (`collective`): one thread per
        # concurrent call, the group fan-out's own calls included.
        sender_threads = 16 if cfg.weight_sync.transport == "collective" else 1
        self.ranks = [
            LearnerRank.options(
                num_cpus=lc.num_cpus_per_rank, num_gpus=lc.num_gpus_per_rank, max_concurrency=1 if r else sender_threads,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self._pg, placement_group_bundle_index=r),
            ).remote(actor=cfg.actor, learner=lc, model=cfg.model, rank=r, world_size=lc.num_ranks,
                     master_addr=master_addr, master_port=port, total_optimizer_steps=cfg.total_optimizer_steps,
                     temperature=cfg.generator.temperature, max_response_length=cfg.generator.response_length,
                     seed=cfg.trainer.seed, max_wire_bytes=cfg.wire.max_bytes,
                     weight_sync=cfg.weight_sync, namespace=cfg.ray.namespace,
                     rendezvous_file=self._rendezvous)
            for r in range(lc.num_ranks)
        ]
        self.ready()

    def ready(self) -> None:
        ray.get([r.pid.remote() for r in self.ranks])

    def train_step(self, payload_ref: ray.ObjectRef, publish_version: int | None = None) -> dict:
        """Metrics averaged over the ranks that report each (the publish's: rank 0)."""
        return self.finish_train(self.start_train(payload_ref, publish_version))

    def start_train(self, payload_ref: ray.ObjectRef, publish_version: int | None = None) -> list[ray.ObjectRef]:
        """Send one learner step (and the publish of its weights as `publish_version`) to every
        rank; `finish_train` waits for it. Ray does not cancel a rank's task, so a caller that is
        interrupted meanwhile must still wait for these refs."""
        return self._send("train_step", payload_ref, publish_version)

    def finish_train(self, refs: list[ray.ObjectRef]) -> dict:
        results = self._gather("train_step", refs)
        keys = dict.fromkeys(k for r in results for k in r)
        return {k: float(np.mean([r[k] for r in results if k in r])) for k in keys}

    def publish(self, version: int) -> dict:
        return self._all("publish", version)[0]

    def save(self, directory: str, client_state: dict) -> None:
        self._all("save", directory, client_state)

    def load(self, directory: str) -> dict:
        return self._all("load", directory)[0]

    def export_hf(self, out_dir: str) -> str | None:
        return self._all("export_hf", out_dir)[0]

    def pids(self) -> list[int]:
        return self._all("pid")

    def shutdown(self) -> None:
        """Kill the ranks and free their placement group; a second call does nothing."""
        if self._pg is None:
            return
        for r in self.ranks:
            ray.kill(r)
        remove_placement_group(self._pg)
        self._pg = None
        if self._rendezvous and os.path.exists(self._rendezvous):
            os.remove(self._rendezvous)  # left behind when a rank died holding it

    def _all(self, method: str, *args):
        return self._gather(method, self._send(method, *args))

    def _send(self, method: str, *args) -> list[ray.ObjectRef]:
        # Send to every rank before waiting on any: the calls are collectives.
        return [getattr(r, method).remote(*args) for r in self.ranks]

    def _gather(self, method: str, refs: list[ray.ObjectRef]) -> list:
        try:
            # In completion order: when one rank dies its peers may hang in the collective, so
            # waiting on the ranks in index order could never reach the dead one.
            pending = refs
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                ray.get(done)
            return ray.get(refs)
        except RayActorError as exc:
            raise LearnerDied(f"a learner rank died during {method}: {exc}") from exc


def _node_address(node_id: str) -> str:
    return next(n["NodeManagerAddress"] for n in ray.nodes() if n["NodeID"] == node_id)
