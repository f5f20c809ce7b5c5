"""ops/k8s: the KubeRay manifests are well-formed and hold the job: a RayCluster whose GPU and
CPU reservations fit configs/gpu_cluster.yaml (checked with the job's own placement rule), and
a RayJob that runs the launcher with that config on that cluster."""

from pathlib import Path

import yaml

from async_pmd.config import load_config
from job.cluster import asks, shortfall

REPO = Path(__file__).resolve().parents[2]


def _manifest(name: str) -> dict:
    return yaml.safe_load((REPO / "ops" / "k8s" / name).read_text())


def test_raycluster_holds_the_gpu_config():
    cluster = _manifest("raycluster.yaml")
    assert cluster["apiVersion"] == "ray.io/v1" and cluster["kind"] == "RayCluster"
    assert cluster["spec"]["rayVersion"] == "2.60.0"  # the pinned Ray
    head = cluster["spec"]["headGroupSpec"]["rayStartParams"]
    assert head["dashboard-host"] == "127.0.0.1"
    nodes = [{"CPU": float(head["num-cpus"]), "GPU": 0.0}]
    for group in cluster["spec"]["workerGroupSpecs"]:
        params = group["rayStartParams"]
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert int(limits["nvidia.com/gpu"]) == int(params["num-gpus"])  # the pod really has the GPUs Ray is told of
        nodes += [{"CPU": float(params["num-cpus"]), "GPU": float(params["num-gpus"])}] * group["minReplicas"]
    cfg = load_config(REPO / "configs" / "gpu_cluster.yaml")
    assert shortfall(asks(cfg), nodes) is None


def test_rayjob_runs_the_launcher_on_that_cluster():
    job, cluster = _manifest("rayjob.yaml"), _manifest("raycluster.yaml")
    assert job["kind"] == "RayJob" and job["spec"]["clusterSelector"]["ray.io/cluster"] == cluster["metadata"]["name"]
    entry = job["spec"]["entrypoint"].split()
    assert entry[:4] == ["python", "-m", "async_pmd.launch", "configs/gpu_cluster.yaml"] and "ray.address=auto" in entry
    assert (REPO / entry[3]).is_file()
