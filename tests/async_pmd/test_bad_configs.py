"""A broken config fails before any actor starts, with a message naming the key at fault.

The corpus is `tests/data/bad_configs/*.yaml`; the first line of each file says which dotted key
its error must name (`# expect: algorithm.partition_tau`).
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from async_pmd.config import ConfigError, build_config, load_config
from async_pmd.preflight import check_runnable

REPO = Path(__file__).resolve().parents[2]
CORPUS = sorted((REPO / "tests" / "data" / "bad_configs").glob("*.yaml"))


def expected_key(path: Path) -> str:
    first = path.read_text().splitlines()[0]
    assert first.startswith("# expect:"), f"{path.name}: first line must be '# expect: <key>'"
    return first.split(":", 1)[1].strip()


def test_corpus_covers_the_issue_cases():
    """Unknown key, wrong type, lb >= ub, tau <= 0, missing model path, sglang not installed,
    more learner ranks than CPUs: each has a file."""
    keys = {expected_key(p) for p in CORPUS}
    assert {"algorithm.partition_tua", "data.train_batch_size", "algorithm.partition_reward_lb",
            "algorithm.partition_tau", "actor.policy_loss.pmd_tau", "model.path", "generator.engine",
            "learner.num_ranks"} <= keys


@pytest.mark.parametrize("path", CORPUS, ids=[p.stem for p in CORPUS])
def test_bad_config_names_its_key(path):
    """Refused by the config or by the launcher's preflight (what it does before anything starts)."""
    with pytest.raises(ConfigError) as err:
        check_runnable(load_config(path))
    assert expected_key(path) in str(err.value)


def test_the_launcher_refuses_every_bad_config_before_ray_is_imported():
    """Through the real entry point: exit status 2, the key on stderr, and Ray never imported,
    so no actor (and no Ray process) can have started. One interpreter for the whole corpus."""
    script = (
        "import contextlib, io, json, sys\n"
        "from async_pmd.launch import main\n"
        "out = {}\n"
        "for path in sys.argv[1:]:\n"
        "    err = io.StringIO()\n"
        "    with contextlib.redirect_stderr(err):\n"
        "        rc = main([path])\n"
        "    out[path] = [rc, err.getvalue()]\n"
        "print(json.dumps({'results': out, 'ray_imported': 'ray' in sys.modules}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script, *map(str, CORPUS)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not report["ray_imported"]
    for path in CORPUS:
        rc, stderr = report["results"][str(path)]
        assert rc == 2 and expected_key(path) in stderr, (path.name, rc, stderr)


def test_learner_cpu_check_is_skipped_on_a_cluster():
    """On a cluster the cluster's CPUs decide: the same learner shape is accepted with ray.address."""
    big = ["learner.num_ranks=4096"]
    with pytest.raises(ConfigError, match="learner.num_ranks"):
        check_runnable(build_config({}, big))
    check_runnable(build_config({}, [*big, "ray.address=auto"]))
    # An explicitly larger private Ray is the user's decision, and is accepted.
    check_runnable(build_config({}, [*big, "ray.num_cpus=4096"]))
