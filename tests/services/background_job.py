"""A training job running in the background through the real CLI, for tests that act on it while
it trains (scrape it, scale it) and then stop it the way a user does, with Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from async_pmd.ports import find_free_port as free_port  # noqa: F401  (re-exported for the tests)

REPO = Path(__file__).resolve().parents[2]


# A shell that starts pytest in the background ignores SIGINT in its children; the job must not.
# Reset in the job's own interpreter, before the launcher runs: a `preexec_fn` would run Python
# between fork and exec in this multithreaded process (Ray's threads), which can corrupt the
# child's heap (seen once: the job aborted with "malloc_consolidate(): unaligned fastbin chunk").
_LAUNCH = ("import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
           "sys.argv[0] = 'async_pmd.launch'; runpy.run_module('async_pmd.launch', run_name='__main__', alter_sys=True)")


class BackgroundJob:
    """`python -m async_pmd.launch configs/cluster.yaml ...` with its output in `<tmp>/<name>.log`."""

    def __init__(self, tmp_path: Path, name: str, *overrides: str, model_dir: Path, new_session: bool = False,
                 env: dict | None = None, config: str = "cluster.yaml"):
        self.tmp_path, self.run_dir = tmp_path, tmp_path / name
        self.log_path = tmp_path / f"{name}.log"
        self.env = env or {**os.environ, "HF_HUB_OFFLINE": "1"}
        cmd = [sys.executable, "-c", _LAUNCH, str(REPO / "configs" / config),
               f"trainer.output_dir={tmp_path}", f"trainer.experiment_name={name}", f"model.path={model_dir}",
               "trainer.save_freq=0", "checkpoint.export_hf=false", *overrides]
        with open(self.log_path, "w") as log:
            # new_session: its own process group, which a test can SIGKILL whole (os.killpg)
            self.proc = subprocess.Popen(cmd, cwd=tmp_path, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=new_session)

    def records(self) -> list[dict]:
        path = self.run_dir / "metrics.jsonl"
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]

    def wait_for_steps(self, steps: int, timeout_s: float = 300) -> list[dict]:
        """The records once the job has logged `steps` learner steps; fails if it exits first."""
        deadline = time.monotonic() + timeout_s
        while True:
            records = self.records()
            if records and records[-1]["step"] >= steps:
                return records
            assert self.proc.poll() is None, f"the job exited ({self.proc.returncode}):\n{self.log_tail()}"
            assert time.monotonic() < deadline, f"no step {steps} after {timeout_s} s:\n{self.log_tail()}"
            time.sleep(1)

    def scale(self, *args: str) -> dict:
        """`python -m async_pmd.scale --run-dir <run_dir> --json ARGS`, its JSON output."""
        cmd = [sys.executable, "-m", "async_pmd.scale", "--run-dir", str(self.run_dir), "--json", *args]
        proc = subprocess.run(cmd, cwd=REPO, env=self.env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, f"{' '.join(args)}: {proc.stderr[-3000:]}"
        return json.loads(proc.stdout)

    def stop(self, timeout_s: float = 180) -> int:
        """Ctrl-C: the trainer drains, checkpoints, writes accounting.json and shuts Ray down."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)
        return self.proc.returncode

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]
