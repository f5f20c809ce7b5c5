"""`python -m async_pmd.audit RUN_DIR`: check a run's per-prompt fate record and its metrics.

Reads the latest complete checkpoint of RUN_DIR (`checkpoints/step_<k>/trainer_state.json`) and
`metrics.jsonl`, prints the prompts by fate and the first violations, and exits 1 if any prompt
was lost or trained twice, or a step is missing or repeated in the metrics (see
`async_pmd.fates.audit` for the rules); 2 if there is nothing to audit.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from async_pmd import checkpoint, fates


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m async_pmd.audit", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    args = parser.parse_args(argv)
    latest = checkpoint.latest(args.run_dir)
    config = args.run_dir / "config.yaml"
    if latest is None or not config.is_file():
        print(f"error: no complete checkpoint (or no config.yaml) under {args.run_dir}", file=sys.stderr)
        return 2
    import yaml

    batch_groups = yaml.safe_load(config.read_text())["data"]["train_batch_size"]
    metrics = args.run_dir / "metrics.jsonl"
    records = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.is_file() else []
    counts, problems = fates.audit(checkpoint.read_state(latest), records, batch_groups)
    print(f"{latest}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    for line in problems[:20]:
        print(f"  violation: {line}")
    print("audit: FAIL" if problems else "audit: ok (every prompt has one fate; none lost, none trained twice)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
