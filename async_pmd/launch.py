"""`python -m async_pmd.launch configs/cluster.yaml [key=value ...]`: validate, then run the job.

The config is validated (every error naming its dotted key), then checked against this machine
(`async_pmd.preflight`), before Ray or any actor starts; only then is the job (`job.loop`, which
imports Ray Serve) loaded. Overrides take the
seed's forms too: `+algorithm.partition_tau=0.01`, `actor_rollout_ref.actor.policy_loss.pmd_tau=0.01`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from async_pmd.config import ClusterConfig, ConfigError, load_config
from async_pmd.preflight import check_runnable


def parse_args(argv: list[str] | None = None) -> tuple[ClusterConfig, argparse.Namespace]:
    parser = argparse.ArgumentParser(prog="python -m async_pmd.launch", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="YAML config, e.g. configs/cluster.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides (YAML-typed values)")
    args = parser.parse_args(argv)
    return load_config(args.config, args.overrides), args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg, _ = parse_args(argv)
        check_runnable(cfg)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not cfg.ray.address:
        # Ray reads this once, when it is imported: only then do GCS, raylet and the metrics
        # export port of the private Ray bind 127.0.0.1 (setting it later has no effect).
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    from job.loop import Trainer

    trainer = Trainer(cfg)
    try:
        trainer.setup()
        final = trainer.train()
    finally:
        trainer.cleanup()
    print(f"done: step {final.get('step')}, reward {final.get('reward/mean', float('nan')):.3f}, "
          f"run dir {cfg.trainer.run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
