"""Trainer.validate (`job.validate`) on the real services (local Ray, Serve, torch generator, DeepSpeed learner):
validation reads the current weights and writes nothing back. It never changes the learner's
weights, the data cursor, the ledger or the buffer, nothing it samples is trained on, and the
loop validates every `trainer.test_freq` steps at the weights of that step.

The scenario runs in a subprocess: it starts its own Ray, as a user's run does, and must not meet
a Ray that another test started in this process.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow

SCENARIO = textwrap.dedent(
    """
    import hashlib, json, sys, time
    from pathlib import Path
    import ray
    from async_pmd.config import load_config
    from job.loop import Trainer

    repo, out = Path(sys.argv[1]), Path(sys.argv[2])
    cfg = load_config(repo / "configs" / "cluster.yaml", [
        f"trainer.output_dir={out}", "trainer.experiment_name=val", f"model.path={out / 'tiny'}",
        "metrics.enabled=false", "trainer.total_steps=4", "trainer.test_freq=2", "trainer.save_freq=0",
        "trainer.total_minutes=null", "generator.val_kwargs.n=2"])  # greedy: do_sample is false
    trainer = Trainer(cfg)

    def frozen_state(tag):
        state = ray.get(trainer.services.driver.state_dict.remote(trained_steps=trainer.step))
        trainer.services.learners.export_hf(str(out / f"hf_{tag}"))
        weights = hashlib.sha256((out / f"hf_{tag}" / "model.safetensors").read_bytes()).hexdigest()
        return {"driver": state, "weights": weights, "store_version": ray.get(trainer.services.store.version.remote())}

    try:
        trainer.setup()
        ray.get(trainer.services.driver.pause.remote())  # hold training still, to see what validation moves
        while ray.get(trainer.services.driver.status.remote()).inflight_requests:
            time.sleep(0.05)
        before = frozen_state("before")
        first, second = trainer.validate(), trainer.validate()
        after = frozen_state("after")
        ray.get(trainer.services.driver.resume.remote())
        trainer.train()
    finally:
        trainer.cleanup()
    records = [json.loads(line) for line in (out / "val" / "metrics.jsonl").read_text().splitlines()]
    for m in (first, second):
        m.pop("timing/val_s")
    print(json.dumps({"unchanged": before == after, "before": before, "after": after,
                      "first": first, "second": second, "records": records}))
    """
)


def test_validation_reads_current_weights_and_changes_nothing(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", SCENARIO, str(REPO), str(tmp_path)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])

    # Weights (exported before and after, byte for byte), cursor, ledger and buffer are untouched.
    assert report["unchanged"], (report["before"], report["after"])
    # At fixed weights greedy validation repeats itself, at the weights the store holds.
    assert report["first"] == report["second"]
    assert report["first"]["val/policy_version"] == report["before"]["store_version"] == 0
    assert report["first"]["val/prompts"] == 20 and report["first"]["val/n"] == 2  # add_mod10's val split

    by_step = {r["step"]: r for r in report["records"]}
    assert sorted(by_step) == [1, 2, 3, 4]
    for step in (2, 4):  # every test_freq steps (4 is also the last), after that step's weights
        assert by_step[step]["val/policy_version"] == step
        assert {"val/reward/mean", "val/pass@n", "val/mean@n"} <= by_step[step].keys()
    assert not any(k.startswith("val/") for k in by_step[1]) and not any(k.startswith("val/") for k in by_step[3])
    # Nothing validation sampled was trained on: exactly steps x batch groups were trained.
    assert by_step[4]["groups/trained"] == 4 * 32
