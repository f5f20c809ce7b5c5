"""A generator replica's torch engine keeps the weight message it fetched as its weights, in the
object store's shared memory (`TorchEngine.adopt_weights`, no copy): that memory must stay the
replica's until its next load, also after the message's owner (learner rank 0) died and while new
objects fill the store, which does hand a released message's memory to new objects (the control).

A real private Ray with a small object store, so that the fillers need the freed memory; an
actor stands in for learner rank 0's publish (`wire.encode_parts`, one `ray.put`, the ref handed
on as the WeightStore holds it), another holds a TorchEngine and loads as `Generator._fetch` does.
"""

from __future__ import annotations

import numpy as np
import pytest
import ray

from async_pmd import wire
from async_pmd.models import build_tiny_model, load_model

FILLERS = 200


@ray.remote(num_cpus=0)
class Publisher:
    def publish(self, state: dict, version: int) -> list:
        msg = wire.NamedTensors(version=version, names=list(state), arrays=list(state.values()))
        return [ray.put(wire.encode_parts(msg, max_bytes=2**30))]


@ray.remote(num_cpus=0)
class Replica:
    def __init__(self, path: str):
        from async_pmd.engines.torch_engine import TorchEngine

        self._engine = TorchEngine(path)

    def load(self, refs: list) -> int:
        """Fetch and adopt; the address of the first tensor's memory, in this process."""
        msg = wire.decode(ray.get(refs[0]), max_bytes=2**30, expect=wire.NamedTensors)
        tensors = msg.to_torch(share_readonly=True)
        self._engine.adopt_weights(tensors, msg.version)
        return next(iter(self._engine.model.state_dict().values())).data_ptr()

    def weights(self) -> dict:
        return {n: t.numpy().copy() for n, t in self._engine.model.state_dict().items()}

    def fillers_reach(self, address: int, size: int) -> bool:
        """Fill the store (objects put from here, mapped here): does one land at `address`?"""
        fillers = [ray.put(np.full(size, 0xFF, np.uint8)) for _ in range(FILLERS)]
        return any(ray.get(f).ctypes.data <= address < ray.get(f).ctypes.data + size for f in fillers)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = build_tiny_model(tmp_path_factory.mktemp("adopt") / "tiny")
    ray.init(address="local", num_cpus=1, include_dashboard=False, object_store_memory=80 * 2**20,
             _temp_dir=str(tmp_path_factory.mktemp("ray")))
    yield path
    ray.shutdown()


def test_adopted_weights_survive_their_owner_and_a_full_store(tiny):
    state = {n: p.detach().numpy() + np.float32(0.5) for n, p in load_model(tiny).named_parameters()}
    size = sum(a.nbytes for a in state.values())
    assert FILLERS * size > 40 * 2**20  # more than the store has free beside the held message
    replica, first = Replica.remote(str(tiny)), Publisher.remote()
    address = ray.get(replica.load.remote(ray.get(first.publish.remote(state, 1))))
    ray.kill(first)  # its object is freed by Ray; the replica's mapping holds it

    assert not ray.get(replica.fillers_reach.remote(address, size))
    held = ray.get(replica.weights.remote())
    for name, array in state.items():
        np.testing.assert_array_equal(held[name], array)

    # The control: once the replica has loaded the next version, the first one's memory is free
    # and the same fillers take it.
    second = Publisher.remote()
    ray.get(replica.load.remote(ray.get(second.publish.remote({n: a + 1 for n, a in state.items()}, 2))))
    assert ray.get(replica.fillers_reach.remote(address, size))
