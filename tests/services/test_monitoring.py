"""Monitoring: the metric table, the Grafana dashboard, and a real Prometheus scraping a real job.

The fast tests pin the contract between `async_pmd.telemetry.METRICS`, README's metrics table and
the dashboard's PromQL. The slow one runs a short job with metrics on, scrapes it with Debian's
real `prometheus` through ops/prometheus.yml, and checks that every expression of
ops/grafana/async_pmd.json returns at least one series (Grafana itself cannot be installed here).
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from async_pmd import telemetry
from background_job import REPO, BackgroundJob, free_port

DASHBOARD = REPO / "ops" / "grafana" / "async_pmd.json"
_HISTOGRAM_SUFFIX = re.compile(r"_(bucket|count|sum)$")
# Counters that count rare events: no series until the event happens once (Ray cannot inc by 0).
ONLY_WHEN_IT_HAPPENS = {"async_pmd_buffer_put_waits_total", "async_pmd_driver_groups_failed_total",
                        "async_pmd_driver_retries_total",
                        "async_pmd_actor_weight_broadcast_seconds"}  # weight_sync.transport: collective only
# generator.partial_rollout.enable only (tests/services/test_partial_rollouts.py reads them off the port).
ONLY_WITH_PARTIAL_ROLLOUTS = {name for name in telemetry.METRICS if name.startswith("async_pmd_driver_partial_")}


def _render_module():
    spec = importlib.util.spec_from_file_location("render", REPO / "ops" / "grafana" / "render.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _dashboard_metric_names(expr: str) -> set[str]:
    return {_HISTOGRAM_SUFFIX.sub("", m) if not m.endswith("_total") else m
            for m in re.findall(r"async_pmd_[a-z_]+", expr)}


# ---------------------------------------------------------------------------------------- fast


def test_readme_table_lists_exactly_the_metrics():
    """README's Monitoring table has one row per metric of telemetry.METRICS, with its unit."""
    readme = (REPO / "README.md").read_text()
    rows = re.findall(r"^\| `(async_pmd_[a-z_]+)` \| (\w+) \| ([^|]+) \|", readme, re.M)
    assert {name for name, _, _ in rows} == set(telemetry.METRICS)
    for name, kind, unit in rows:
        spec = telemetry.METRICS[name]
        assert (kind, unit.strip()) == (spec.kind, spec.unit), name


def test_metric_names_follow_the_convention():
    """One prefix, async_pmd_<role>_<metric>; counters end in _total, histograms in a unit."""
    roles = {"generator", "scorer", "buffer", "driver", "actor", "weights", "val"}
    for name, spec in telemetry.METRICS.items():
        assert name.startswith(telemetry.PREFIX) and name.split("_")[2] in roles, name
        assert name.endswith("_total") == (spec.kind == "counter"), name
        if spec.kind == "histogram":
            assert name.endswith(("_seconds", "_steps")) and spec.buckets, name


def test_dashboard_queries_only_defined_metrics():
    """Every metric a panel queries is defined; panels cover the issue's topics."""
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = _render_module().expressions(dashboard)
    used = set().union(*map(_dashboard_metric_names, exprs))
    assert used <= set(telemetry.METRICS), used - set(telemetry.METRICS)
    titles = " ".join(p["title"].lower() for p in dashboard["panels"])
    for topic in ("tokens/s", "staleness", "buffer", "reward", "loss", "kl", "weight", "replicas"):
        assert topic in titles, topic


class _FakeMetric:
    def __init__(self):
        self.calls = []

    def inc(self, value, tags):
        self.calls.append(("inc", value, tags))

    def set(self, value, tags):
        self.calls.append(("set", value, tags))

    def observe(self, value, tags):
        self.calls.append(("observe", value, tags))


def test_role_metrics_sync_increments_by_the_change(monkeypatch):
    """`sync` turns cumulative totals into counter increments (nothing for no change), per tag set;
    `tracked` counts a request in flight while it runs and records its latency even if it raises."""
    fakes: dict[str, _FakeMetric] = {}
    monkeypatch.setattr(telemetry, "create", lambda name: fakes.setdefault(name, _FakeMetric()))
    m = telemetry.RoleMetrics("scorer", replica="r1", refresh_s=None)
    m.sync({"failures_total": 3}, reason="timeout")
    m.sync({"failures_total": 3}, reason="timeout")
    m.sync({"failures_total": 5}, reason="timeout")
    m.sync({"failures_total": 1}, reason="type")
    assert fakes["async_pmd_scorer_failures_total"].calls == [
        ("inc", 3.0, {"replica": "r1", "reason": "timeout"}), ("inc", 2.0, {"replica": "r1", "reason": "timeout"}),
        ("inc", 1.0, {"replica": "r1", "reason": "type"})]

    class Service:
        _metrics = m

        @telemetry.tracked
        async def score(self, fail: bool):
            assert fakes["async_pmd_scorer_requests_inflight"].calls[-1] == ("set", 1.0, {"replica": "r1"})
            if fail:
                raise ValueError("boom")
            return "ok"

    assert asyncio.run(Service().score(False)) == "ok"
    with pytest.raises(ValueError):
        asyncio.run(Service().score(True))
    inflight = [c[1] for c in fakes["async_pmd_scorer_requests_inflight"].calls]
    assert inflight == [1.0, 0.0, 1.0, 0.0]
    assert len(fakes["async_pmd_scorer_request_seconds"].calls) == 2


# ---------------------------------------------------------------------------------------- slow


@pytest.fixture(scope="module")
def prometheus_bin() -> str:
    """Debian's `prometheus`, installed here if missing (root + apt); skipped with the reason if not."""
    found = shutil.which("prometheus")
    if found:
        return found
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        pytest.skip("prometheus is not installed and cannot be: installing needs root and apt-get")
    attempts = [["apt-get", "install", "-y", "-q", "prometheus"], ["apt-get", "update", "-q"],
                ["apt-get", "install", "-y", "-q", "prometheus"]]
    log = []
    for cmd in attempts:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                              env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
        log.append(proc.stderr[-500:])
        if cmd[1] == "install" and proc.returncode == 0 and shutil.which("prometheus"):
            return shutil.which("prometheus")
    pytest.skip(f"prometheus could not be installed with apt-get: {log[-1]}")


def _prometheus_config(path: Path, metrics_port: int) -> None:
    """ops/prometheus.yml, pointed at this job's export port, scraping every second; the cluster
    job reads a file that does not exist, so other Rays on this machine are not scraped."""
    config = yaml.safe_load((REPO / "ops" / "prometheus.yml").read_text())
    config["global"]["scrape_interval"] = "1s"
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    jobs["async_pmd_local"]["static_configs"] = [{"targets": [f"127.0.0.1:{metrics_port}"]}]
    jobs["ray_cluster"]["file_sd_configs"] = [{"files": [str(path.parent / "no_ray_cluster.json")]}]
    path.write_text(yaml.safe_dump(config))


def _query(url: str, expr: str) -> list[dict]:
    with urllib.request.urlopen(f"{url}/api/v1/query?{urllib.parse.urlencode({'query': expr})}", timeout=10) as r:
        body = json.load(r)
    assert body["status"] == "success", (expr, body)
    return body["data"]["result"]


@pytest.fixture
def prometheus(tmp_path, prometheus_bin):
    """(url, config path) of a Prometheus on loopback; the config is written by the test."""
    port, config = free_port(), tmp_path / "prometheus.yml"
    config.write_text("scrape_configs: []\n")
    state = {}

    def start(metrics_port: int) -> str:
        _prometheus_config(config, metrics_port)
        check = subprocess.run([shutil.which("promtool") or "true", "check", "config", str(config)],
                               capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr
        log = open(tmp_path / "prometheus.log", "w")
        state["proc"] = subprocess.Popen(
            [prometheus_bin, f"--config.file={config}", f"--web.listen-address=127.0.0.1:{port}",
             f"--storage.tsdb.path={tmp_path / 'tsdb'}"], stdout=log, stderr=subprocess.STDOUT)
        return f"http://127.0.0.1:{port}"

    yield start
    if "proc" in state:
        state["proc"].terminate()
        state["proc"].wait(30)


@pytest.mark.slow
def test_dashboard_queries_return_series_from_a_real_job(tmp_path, prometheus):
    """A short job with metrics on (and a validation every 10 steps, whose gauges the trainer's
    own process sets), scraped by the real Prometheus through ops/prometheus.yml:
    every metric appears under its async_pmd_ name (bar counters of events that did not happen and
    the partial-rollout series: this job has none),
    every PromQL expression of the Grafana dashboard returns at least one series, the export port
    and the job's Ray listen on 127.0.0.1 only, and the dashboard renders to a PNG."""
    metrics_port = free_port()
    job = BackgroundJob(
        tmp_path, "monitored", "metrics.enabled=true", f"metrics.export_port={metrics_port}",
        "trainer.total_steps=100000", "trainer.total_minutes=6", "trainer.test_freq=10",
        f"scorer.reward_fn={REPO / 'tests' / 'services' / 'flaky_reward.py'}:reward",
        model_dir=tmp_path / "model")
    try:
        url = prometheus(metrics_port)
        job.wait_for_steps(10)
        assert (job.run_dir / "ray_address").read_text().startswith("127.0.0.1:")
        listening = subprocess.run(["ss", "-Hltn", f"sport = :{metrics_port}"], capture_output=True, text=True)
        if listening.returncode == 0:
            assert all(" 127.0.0.1:" in f" {line.split()[3]}" for line in listening.stdout.splitlines()), listening.stdout
        exprs = _render_module().expressions(json.loads(DASHBOARD.read_text()))
        start = time.time()
        empty = exprs
        while empty and time.time() - start < 180:
            assert job.proc.poll() is None, job.log_tail()
            time.sleep(3)
            empty = [e for e in exprs if not _query(url, e)]
        assert not empty, f"dashboard expressions without a series: {empty}\n{job.log_tail()}"

        assert _query(url, 'up{job="async_pmd_local"} == 1')
        # Gauges set once (at a replica's start) still export now, tens of seconds later.
        for role in ("generator", "scorer"):
            assert [r["value"][1] for r in _query(url, f"count(async_pmd_{role}_up)")] == ["1"], role
        names = [r["metric"]["__name__"] for r in _query(url, 'count by (__name__) ({__name__=~"async_pmd_.+"})')]
        exported = {_HISTOGRAM_SUFFIX.sub("", n) if not n.endswith("_total") else n for n in names}
        expected = set(telemetry.METRICS) - ONLY_WHEN_IT_HAPPENS - ONLY_WITH_PARTIAL_ROLLOUTS
        assert expected <= exported, expected - exported
        assert not _query(url, '{__name__=~"ray_async_pmd_.+"}'), "the relabel rule did not rename"
        assert _query(url, 'async_pmd_scorer_failures_total{reason="exception:ValueError"}')

        png = _render_module().render(url, tmp_path / "dashboard.png", start - 60, time.time())
        assert 10_000 < png.stat().st_size < 400_000
    finally:
        code = job.stop()
    assert code == 0, job.log_tail()
