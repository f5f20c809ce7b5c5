"""The checks a valid config must still pass on this machine before the job starts.

`async_pmd.config` validates a config on its own terms (types, bounds, cross-section rules) and
touches nothing outside it, so a resolved config can be printed or shipped anywhere. What
depends on this machine or on code registered at import time is checked here, once, by the
launcher, before Ray or any actor starts: the registered estimator and loss names, the engine
being installed, the model directory existing, the learner fitting a private Ray.
"""

from __future__ import annotations

import os
from pathlib import Path

from async_pmd.config import (
    BUILT_IN_ADV_ESTIMATORS,
    BUILT_IN_POLICY_LOSSES,
    OPMD_AGG_MODES,
    VLLM_CPU_HEAD_DIMS,
    ClusterConfig,
    ConfigError,
)
from async_pmd.engines import SGLANG_INSTALL_HINT, VLLM_INSTALL_HINT, engine_available


def check_runnable(cfg: ClusterConfig) -> None:
    """Raise ConfigError naming every key that cannot run here."""
    errors = [e for check in (_registered_names, _engine_installed, _engine_runs_model, _model_present,
                              _learner_fits_machine)
              for e in check(cfg)]
    if errors:
        raise ConfigError("invalid config:\n" + "\n".join(f"  {key}: {msg}" for key, msg in errors))


def _registered_names(cfg: ClusterConfig):
    estimator, loss = cfg.algorithm.adv_estimator, cfg.actor.policy_loss.loss_mode
    if estimator not in BUILT_IN_ADV_ESTIMATORS or loss not in BUILT_IN_POLICY_LOSSES:
        # Not a built-in: only the registry knows (importing algos, and torch, takes seconds:
        # the built-ins are checked without it, before Ray starts).
        from async_pmd import algos

        if estimator not in algos.list_adv_estimators():
            yield "algorithm.adv_estimator", (f"unknown {estimator!r}; "
                                              f"registered: {algos.list_adv_estimators()}")
        if loss not in algos.list_policy_losses():
            yield "actor.policy_loss.loss_mode", f"unknown {loss!r}; registered: {algos.list_policy_losses()}"
    if loss == "opmd" and cfg.actor.loss_agg_mode not in OPMD_AGG_MODES:
        yield "actor.loss_agg_mode", f"opmd takes {' or '.join(OPMD_AGG_MODES)}, got {cfg.actor.loss_agg_mode!r}"


def _engine_installed(cfg: ClusterConfig):
    engine = cfg.generator.engine
    if not engine_available(engine):
        hint = SGLANG_INSTALL_HINT if engine == "sglang" else VLLM_INSTALL_HINT
        yield "generator.engine", f"engine {engine!r} is not installed here: {hint}; or set generator.engine=torch"


def _engine_runs_model(cfg: ClusterConfig):
    # vLLM's CPU attention has kernels for some head dims only; the default tiny model's 16 is not
    # one of them (it would fail minutes later, inside the replica).
    g, m = cfg.generator, cfg.model
    if g.engine != "vllm" or g.num_gpus > 0:
        return
    from async_pmd.models import head_dim, model_head_dim

    if (Path(m.path) / "config.json").is_file():
        dim, what = model_head_dim(m.path), f"model.path {m.path!r}"
    elif m.build_tiny:
        dim, what = head_dim(m.tiny.hidden_size, m.tiny.num_heads), "model.tiny (hidden_size / num_heads)"
    else:
        return
    if dim not in VLLM_CPU_HEAD_DIMS:
        yield "generator.engine", (
            f"'vllm' on CPU cannot run {what}: head dim {dim} has no kernel in vLLM's CPU attention (supported: "
            f"{list(VLLM_CPU_HEAD_DIMS)}); use a head-dim-64 tiny model (model.tiny hidden_size 128, num_heads 2, "
            "as configs/cluster_vllm.yaml) or generator.engine=torch")


def _model_present(cfg: ClusterConfig):
    if not cfg.model.build_tiny and not (Path(cfg.model.path) / "config.json").is_file():
        yield "model.path", (f"{cfg.model.path!r} is not a local Hugging Face model directory (no config.json); "
                             "nothing is downloaded: point model.path at a local copy, or set model.build_tiny=true")


def _learner_fits_machine(cfg: ClusterConfig):
    # A private Ray cannot place more learner CPUs than it has: the ranks would wait forever.
    # On a cluster (ray.address set) the cluster's resources decide, not this machine's.
    lc = cfg.learner
    cpus = cfg.ray.num_cpus or os.cpu_count() or 1
    if cfg.ray.address is None and lc.num_ranks * lc.num_cpus_per_rank > cpus:
        yield "learner.num_ranks", (
            f"{lc.num_ranks} ranks x learner.num_cpus_per_rank ({lc.num_cpus_per_rank:g}) need more CPUs than "
            f"the {cpus} here: lower learner.num_ranks, or join a cluster with ray.address")
