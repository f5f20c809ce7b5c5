"""The object-store weights are owned by the process that put them (learner rank 0), not copied
again into the WeightStore: when they are lost with that process before a replica fetched them,
the replica keeps sampling with the weights it has, and loads the next publisher's weights.

A real private Ray, the WeightStore and a Serve generator deployment of the demo config; a plain
Ray actor stands in for learner rank 0's publish (the same calls: `wire.encode_parts`, one
`ray.put`, `WeightStore.publish` of the ref). On one node a dead owner's object stays readable
from the node's shared memory (measured: still there 50 s after the kill), so the lost version
here is a ref that had not resolved when its owner was killed: a replica then gets
`OwnerDiedError`, as one on another node gets for weights whose owner died.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import ray
from ray import serve

from async_pmd import names, wire
from async_pmd.config import load_config
from async_pmd.data import configured_source, generation_request
from async_pmd.models import ensure_tiny_model, load_model, load_tokenizer
from job import cluster, deploy
from services.weights import WeightStore

pytestmark = pytest.mark.slow

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "cluster.yaml"


@ray.remote(num_cpus=0)
def _never() -> None:
    time.sleep(3600)


@ray.remote(num_cpus=0)
class Publisher:
    """Learner rank 0's object-store publish, of `state` (name -> float32 array) plus version·0.01."""

    def __init__(self, state: dict, namespace: str):
        self._state = state
        self._store = ray.get_actor(names.WEIGHT_STORE, namespace=namespace)

    def publish_unresolved(self, version: int) -> None:
        """`WeightStore.publish` of a ref owned here that never resolves: lost when this dies."""
        ray.get(self._store.publish.remote(version, [_never.remote()]))

    def publish(self, version: int) -> None:
        msg = wire.NamedTensors(version=version, names=list(self._state),
                                arrays=[a + np.float32(0.01 * version) for a in self._state.values()])
        ray.get(self._store.publish.remote(version, [ray.put(wire.encode_parts(msg, max_bytes=2**30))]))


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    out = tmp_path_factory.mktemp("owner")
    cfg = load_config(CONFIG, [f"model.path={out / 'tiny'}", f"trainer.output_dir={out}", "metrics.enabled=false",
                               f"ray.temp_dir={out / 'ray'}"])
    ensure_tiny_model(cfg.model.path, **cfg.model.tiny.model_dump())
    cluster.init_ray(cfg)
    store = WeightStore.options(name=names.WEIGHT_STORE, namespace=cfg.ray.namespace).remote()
    deploy.start_serve()
    deploy.deploy_serve(cfg)
    yield cfg
    del store
    serve.shutdown()
    ray.shutdown()


def _generate(cfg, request_id: int) -> wire.ScoredBatch:
    tokenizer = load_tokenizer(cfg.model.path)
    prompts = configured_source(cfg.data, tokenizer, split="train").next_batch(2)
    request = generation_request(request_id, 1, [f"u{request_id}-{i}" for i in range(2)], prompts, {"seed": request_id})
    out = deploy.generator_handle().generate.remote(wire.encode_array(request)).result()
    return wire.decode(out, expect=wire.ScoredBatch)


def test_a_replica_keeps_its_weights_when_their_publisher_dies_and_follows_the_next(cfg):
    ns = cfg.ray.namespace
    state = {n: p.detach().numpy() for n, p in load_model(cfg.model.path).named_parameters()}
    first = Publisher.remote(state, ns)
    ray.get(first.publish.remote(1))
    assert {g.policy_version for g in _generate(cfg, 1).groups} == {1}

    ray.get(first.publish_unresolved.remote(2))  # the store points at version 2, owned by `first` ...
    ray.kill(first)  # ... which dies with it
    store = ray.get_actor(names.WEIGHT_STORE, namespace=ns)
    version, refs, _ = ray.get(store.latest.remote())
    assert version == 2
    with pytest.raises(ray.exceptions.OwnerDiedError):
        ray.get(refs[0], timeout=60)
    batch = _generate(cfg, 2)  # the replica samples on with the weights it has
    assert {g.policy_version for g in batch.groups} == {1} and len(batch.groups) == 2
    assert deploy.generator_handle().status.remote().result()["weight_pulls"] == 1

    second = Publisher.remote(state, ns)  # the rebuilt learner publishes again
    ray.get(second.publish.remote(3))
    assert {g.policy_version for g in _generate(cfg, 3).groups} == {3}
    assert deploy.generator_handle().status.remote().result()["weight_pulls"] == 2


def test_the_store_refuses_a_publish_that_is_not_one_ref_in_a_list(cfg):
    """A publish must hand over [ref] (unresolved): bytes, an empty list, values, two refs, or a bare
    ref (which Ray resolves to its value before the call) are refused with a TypeError naming what
    came, and the version the replicas follow does not move."""
    store = ray.get_actor(names.WEIGHT_STORE, namespace=cfg.ray.namespace)
    version = ray.get(store.version.remote())
    for bad, got in ((b"weights", "bytes"), ([], "list"), ([b"x"], "list"), ([ray.put(1), ray.put(2)], "list"),
                     (ray.put([np.zeros(3, np.float32)]), "list")):
        with pytest.raises(TypeError, match=rf"publish takes \[object ref\], got {got}"):
            ray.get(store.publish.remote(version + 10, bad))
    assert ray.get(store.version.remote()) == version
