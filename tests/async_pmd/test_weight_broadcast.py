"""Weights by broadcast (`weight_sync.transport: collective`): the learner side and the torch engine.

A real gloo group between two processes: this test process and a spawned one, each building its
side with `async_pmd.weight_broadcast` over a real TCPStore, the learner side hosting it (as
learner rank 0 does). The SGLang engine's side of the same group is tested against the real
SGLang in tests/engines/test_sglang_real.py.
"""

from __future__ import annotations

import multiprocessing as mp

import pytest
import torch

from async_pmd import models, weight_broadcast
from async_pmd.config import ConfigError, load_config
from async_pmd.engines import SamplingParams
from async_pmd.engines.torch_engine import TorchEngine

TIMEOUT_S = 60.0
GROUP = "async_pmd_weights_test"


def _random_state(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "f32": torch.randn(3, 5, generator=gen),
        "bf16": torch.randn(7, generator=gen).to(torch.bfloat16),
        "f16": torch.randn(2, 2, 2, generator=gen).to(torch.float16),
        "i64": torch.randint(-2**40, 2**40, (4,), generator=gen),
        "scalar": torch.tensor(float(seed)),
        "strided": torch.randn(4, 6, generator=gen).t(),  # not contiguous: send makes it so
    }


def _perturbed(tiny_path, seed: int) -> dict[str, torch.Tensor]:
    """What a learner would publish: every named parameter of the tiny model, moved by noise."""
    model = models.load_model(tiny_path)
    gen = torch.Generator().manual_seed(seed)
    return {name: (p.detach() + 0.5 * torch.randn(p.shape, generator=gen)).contiguous()
            for name, p in model.named_parameters()}


def _receiver(port: int, manifest: weight_broadcast.Manifest, out: mp.Queue) -> None:
    group = weight_broadcast.open_group(store=None, master_address="127.0.0.1", master_port=port, rank=1,
                                        world_size=2, group_name=GROUP, backend="gloo", timeout_s=TIMEOUT_S)
    out.put({name: t.tolist() for name, t in weight_broadcast.receive(manifest, group).items()})


def _sender(kind: str, seed: int, tiny_path: str, ports: mp.Queue) -> None:
    """Learner rank 0's side: host the rendezvous, then broadcast the state of `seed`."""
    state = _random_state(seed) if kind == "random" else _perturbed(tiny_path, seed)
    store = weight_broadcast.host_store("127.0.0.1", 2, TIMEOUT_S)
    ports.put(store.port)
    group = weight_broadcast.open_group(store=store, master_address="127.0.0.1", master_port=store.port, rank=0,
                                        world_size=2, group_name=GROUP, backend="gloo", timeout_s=TIMEOUT_S)
    weight_broadcast.send(state, group)


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return models.build_tiny_model(tmp_path_factory.mktemp("broadcast") / "tiny", seed=0)


def test_every_dtype_and_shape_arrives_bit_exact():
    """Sender in this process (rank 0, hosting the store), receiver spawned (rank 1)."""
    state = _random_state(seed=4)
    manifest = weight_broadcast.Manifest.of(state, version=9)
    assert manifest.dtypes == ("float32", "bfloat16", "float16", "int64", "float32", "float32")
    assert manifest.shapes[-1] == (6, 4) and manifest.shapes[-2] == ()
    ctx = mp.get_context("spawn")
    store = weight_broadcast.host_store("127.0.0.1", 2, TIMEOUT_S)
    out = ctx.Queue()
    receiver = ctx.Process(target=_receiver, args=(store.port, manifest, out))
    receiver.start()
    group = weight_broadcast.open_group(store=store, master_address="127.0.0.1", master_port=store.port, rank=0,
                                        world_size=2, group_name=GROUP, backend="gloo", timeout_s=TIMEOUT_S)
    weight_broadcast.send(state, group)
    received = out.get(timeout=TIMEOUT_S)
    receiver.join(TIMEOUT_S)
    weight_broadcast.close(group)
    assert list(received) == list(state)
    for name, tensor in state.items():
        assert torch.equal(torch.tensor(received[name], dtype=tensor.dtype), tensor), name


def test_the_torch_engine_samples_and_scores_with_broadcast_weights(tiny_path):
    """The engine joins a learner's group as rank 1 and loads the broadcast as `version`: it then
    samples exactly what an engine built on those weights samples, with the same log-probs."""
    ctx = mp.get_context("spawn")
    ports = ctx.Queue()
    sender = ctx.Process(target=_sender, args=("model", 7, str(tiny_path), ports))
    sender.start()
    engine = TorchEngine(tiny_path)
    port = ports.get(timeout=TIMEOUT_S)
    engine.init_weight_sync_group(master_address="127.0.0.1", master_port=port, rank_offset=1, world_size=2,
                                  group_name=GROUP, backend="gloo", timeout_s=TIMEOUT_S)
    state = _perturbed(tiny_path, 7)
    manifest = weight_broadcast.Manifest.of(state, version=5)
    engine.update_weights_from_distributed(manifest.names, manifest.dtypes, manifest.shapes, 5, group_name=GROUP)
    sender.join(TIMEOUT_S)
    engine.destroy_weight_sync_group(GROUP)
    assert engine.version == 5
    reference = models.load_model(tiny_path)
    reference.load_state_dict(state, strict=False)
    expected_engine = TorchEngine(reference)
    tok = models.load_tokenizer(tiny_path)
    prompts = [tok.encode(s) for s in ["3+4=", "12+30="]]
    params = SamplingParams(max_new_tokens=6, temperature=1.0, n=3, seed=11, ignore_eos=True)
    for got, want in zip(engine.generate(prompts, params), expected_engine.generate(prompts, params)):
        for g, w in zip(got, want):
            assert g.token_ids.tolist() == w.token_ids.tolist()
            torch.testing.assert_close(torch.as_tensor(g.logprobs), torch.as_tensor(w.logprobs), rtol=0, atol=1e-6)
            assert g.policy_version == 5


def test_a_manifest_that_does_not_fit_the_model_is_refused_before_any_broadcast(tiny_path):
    """Checked before the group is touched (there is none here): a wrong shape or an unknown name
    raises, naming the tensor, and the weights and version stay as they were."""
    engine = TorchEngine(tiny_path)
    before = {n: t.clone() for n, t in engine.model.state_dict().items()}
    name, param = next(iter(engine.model.named_parameters()))
    with pytest.raises(ValueError, match=f"tensor {name!r} has shape"):
        engine.update_weights_from_distributed([name], ["float32"], [(param.shape[0] + 1, *param.shape[1:])], 3,
                                               group_name="missing")
    with pytest.raises(ValueError, match="unknown tensor 'not.a.weight'"):
        engine.update_weights_from_distributed(["not.a.weight"], ["float32"], [(2,)], 3, group_name="missing")
    assert engine.version == 0
    assert all(torch.equal(before[n], t) for n, t in engine.model.state_dict().items())


def test_a_manifest_dtype_must_name_a_torch_dtype():
    weight_broadcast.check_dtypes(["float32", "bfloat16", "int64"])
    for bad in ("load", "os.system", "Tensor"):
        with pytest.raises(ValueError, match="not a torch dtype"):
            weight_broadcast.check_dtypes(["float32", bad])


@pytest.mark.parametrize("overrides, message", [
    (["generator.engine=vllm", "model.path=models/tiny64"], "generator.engine=vllm use weight_sync.transport=object_store"),
    (["learner.num_gpus_per_rank=1"], "same kind of device"),
])
def test_config_refuses_a_collective_that_cannot_form(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config("configs/cluster.yaml", ["weight_sync.transport=collective", *overrides])


def test_config_accepts_the_collective_on_torch_and_sglang():
    for engine in ("torch", "sglang"):
        cfg = load_config("configs/cluster.yaml", ["weight_sync.transport=collective", f"generator.engine={engine}"])
        assert cfg.weight_sync.transport == "collective"
