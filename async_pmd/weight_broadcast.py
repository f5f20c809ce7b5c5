"""Weights over a collective: the learner's rank 0 broadcasts each tensor to a generator replica.

The `weight_sync.transport: collective` path. One process group per (learner rank 0, replica):
the learner is rank 0 and hosts the rendezvous, the replica's engine ranks (its TP ranks) are
1…world_size-1. Every tensor goes out as its own broadcast, in manifest order, so nothing holds a
second serialized copy of the model (the object-store path encodes one and stores it).

The group lives outside each process's default `torch.distributed` world (the learner's default
world is its DeepSpeed ranks), and torch has no public constructor for such a group. SGLang's
engine builds its side with `_new_process_group_helper` over a `tcp://` rendezvous prefixed by the
group name; `open_group` builds the learner's side (and the torch engine's) the same way, so both
ends derive the same store keys. gloo on CPU, NCCL on GPU.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from async_pmd import rendezvous


@dataclass(frozen=True)
class Manifest:
    """What a receiver must allocate before the broadcasts start, and the version they carry."""

    version: int
    names: tuple[str, ...]
    dtypes: tuple[str, ...]  # "float32", "bfloat16", …: torch dtype names without the prefix
    shapes: tuple[tuple[int, ...], ...]

    @classmethod
    def of(cls, state: Mapping[str, torch.Tensor], version: int) -> Manifest:
        return cls(version=int(version), names=tuple(state),
                   dtypes=tuple(str(t.dtype).removeprefix("torch.") for t in state.values()),
                   shapes=tuple(tuple(t.shape) for t in state.values()))


def host_store(address: str, world_size: int, timeout_s: float) -> dist.TCPStore:
    """The rendezvous server rank 0 hosts on its node's `address`, on a free port (`store.port`).
    It does not wait for the other ranks: they connect when their engine joins. It listens on that
    address only (`rendezvous.tcp_store`); the object-store transport opens no port at all."""
    return rendezvous.tcp_store(address, 0, world_size, is_master=True, timeout_s=timeout_s, wait_for_workers=False)


def open_group(*, store: dist.Store | None, master_address: str, master_port: int, rank: int, world_size: int,
               group_name: str, backend: str, timeout_s: float) -> dist.ProcessGroup:
    """Join `group_name` as `rank`; blocks until all `world_size` ranks have joined. Rank 0 passes
    the store it hosts, the others connect to master_address:master_port."""
    from torch.distributed.distributed_c10d import (
        Backend,
        PrefixStore,
        _new_process_group_helper,
        _world,
    )

    if store is None:
        store = rendezvous.tcp_store(master_address, master_port, world_size, is_master=False, timeout_s=timeout_s)
    group, _ = _new_process_group_helper(world_size, rank, [], Backend(backend), PrefixStore(group_name, store),
                                         group_name=group_name, timeout=timedelta(seconds=timeout_s))
    # Ranks outside the default world map to themselves (SGLang registers its side so too);
    # destroy_process_group needs the entry.
    _world.pg_group_ranks[group] = {i: i for i in range(world_size)}
    return group


def send(state: Mapping[str, torch.Tensor], group: dist.ProcessGroup, device: torch.device | str = "cpu") -> None:
    """Broadcast every tensor from rank 0 of `group`, in `state` order (a receiver's manifest
    order). On NCCL each tensor is moved to `device` just before its broadcast: one tensor at a
    time on the GPU, never a second copy of the model."""
    for tensor in state.values():
        dist.broadcast(tensor.to(device).contiguous(), group_src=0, group=group)


def receive(manifest: Manifest, group: dist.ProcessGroup, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """The receiving side of `send`: fresh tensors by name, in manifest order."""
    out = {}
    for name, dtype, shape in zip(manifest.names, manifest.dtypes, manifest.shapes):
        tensor = torch.empty(shape, dtype=getattr(torch, dtype), device=device)
        dist.broadcast(tensor, group_src=0, group=group)
        out[name] = tensor
    return out


def close(group: dist.ProcessGroup) -> None:
    dist.destroy_process_group(group)


def backend_for(use_gpu: bool) -> str:
    return "nccl" if use_gpu else "gloo"


def check_dtypes(dtypes: Sequence[str]) -> None:
    for d in dtypes:
        if not isinstance(getattr(torch, d, None), torch.dtype):
            raise ValueError(f"weight manifest: {d!r} is not a torch dtype")
