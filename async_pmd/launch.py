"""`python -m async_pmd.launch configs/cluster.yaml [key=value ...]`: validate, then run the job.

The config is validated (every error naming its dotted key), then checked against this machine
(`async_pmd.preflight`), before Ray or any actor starts; only then is the job (`job.loop`, which
imports Ray Serve) loaded. Overrides take the seed's forms too, verbatim from its launch
scripts (`+algorithm.partition_tau=0.01`, `actor_rollout_ref.actor.optim.lr=1e-6`, ...; see
`async_pmd.seed_keys`); the seed's keys that have no effect here are listed once at start-up.
`--print-config` resolves, validates and prints the config and those warnings, and starts
nothing: it needs neither the engine nor the GPUs (those are checked when the job starts).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import yaml

from async_pmd.config import ClusterConfig, ConfigError, load_config
from async_pmd.preflight import check_runnable
from async_pmd.seed_keys import Report

logger = logging.getLogger("async_pmd.launch")


def parse_args(argv: list[str] | None = None) -> tuple[ClusterConfig, argparse.Namespace, Report]:
    parser = argparse.ArgumentParser(prog="python -m async_pmd.launch", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="YAML config, e.g. configs/cluster.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides (YAML-typed values)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config and the no-op warnings, then exit; starts nothing")
    # The seed starts its trainer with Hydra's --config-path/--config-name: accepted, and unused
    # (our config is the positional YAML file).
    parser.add_argument("--config-path", help=argparse.SUPPRESS)
    parser.add_argument("--config-name", help=argparse.SUPPRESS)
    args = parser.parse_intermixed_args(argv)
    report = Report.empty()
    return load_config(args.config, args.overrides, report), args, report


def main(argv: list[str] | None = None) -> int:
    launched = time.monotonic()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg, args, report = parse_args(argv)
        if args.print_config:
            print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), end="")
            for line in report.noops:
                print(f"warning: {line}", file=sys.stderr)
            for line in report.notes:
                print(f"note: {line}", file=sys.stderr)
            return 0
        check_runnable(cfg)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if report.noops:
        logger.warning("the seed's keys with no effect here:\n  %s", "\n  ".join(report.noops))
    for line in report.notes:
        logger.info("seed key: %s", line)
    if not cfg.ray.address:
        # Ray reads this once, when it is imported: only then do GCS, raylet and the metrics
        # export port of the private Ray bind 127.0.0.1 (setting it later has no effect).
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    from job import cluster

    # Ray's own processes start (seconds, mostly their imports) while this one imports the job
    # (Serve, pydantic, the actors' modules: a second or two): sooner to the first learner step.
    with ThreadPoolExecutor(1) as pool:
        importing = pool.submit(importlib.import_module, "job.loop")
        try:
            cluster.init_ray(cfg)
        finally:
            loop = importing.result()
    logger.info("Ray up and the job imported %.1f s after launch", time.monotonic() - launched)
    trainer = loop.Trainer(cfg, launched_at=launched)
    try:
        trainer.setup(ray_started=True)
        final = trainer.train()
    except cluster.ResourceShortfall as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        trainer.cleanup()
    print(f"done: step {final.get('step')}, reward {final.get('reward/mean', float('nan')):.3f}, "
          f"run dir {cfg.trainer.run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
