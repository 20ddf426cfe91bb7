"""The cloud configs parse and use only fields their schemas know.

The Ray cluster launcher YAML is validated against the JSON schema shipped inside the
installed `ray` package; the KubeRay manifests against the KubeRay v1 CRD field names.
"""

import json
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

INFRA = Path(__file__).resolve().parents[1] / "infra"

# Field names of the KubeRay v1 CRDs (ray.io_rayclusters.yaml / ray.io_rayjobs.yaml,
# ray-project/kuberay ray-operator/config/crd/bases), for the levels our manifests use.
RAYJOB_SPEC = {
    "activeDeadlineSeconds",
    "backoffLimit",
    "clusterSelector",
    "deletionStrategy",
    "entrypoint",
    "entrypointNumCpus",
    "entrypointNumGpus",
    "entrypointResources",
    "jobId",
    "managedBy",
    "metadata",
    "rayClusterSpec",
    "runtimeEnvYAML",
    "shutdownAfterJobFinishes",
    "submissionMode",
    "submitterConfig",
    "submitterPodTemplate",
    "suspend",
    "ttlSecondsAfterFinished",
}
RAYCLUSTER_SPEC = {
    "autoscalerOptions",
    "enableInTreeAutoscaling",
    "gcsFaultToleranceOptions",
    "headGroupSpec",
    "headServiceAnnotations",
    "managedBy",
    "rayVersion",
    "suspend",
    "workerGroupSpecs",
}
HEAD_GROUP = {"enableIngress", "headService", "rayStartParams", "serviceType", "template"}
WORKER_GROUP = {
    "groupName",
    "idleTimeoutSeconds",
    "maxReplicas",
    "minReplicas",
    "numOfHosts",
    "rayStartParams",
    "replicas",
    "scaleStrategy",
    "suspend",
    "template",
}
SUBMISSION_MODES = {"K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"}


def _ray_schema() -> dict:
    path = Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"
    return json.loads(path.read_text())


def test_cluster_launcher_yaml_matches_ray_schema():
    config = yaml.safe_load((INFRA / "ray-cluster-aws.yaml").read_text())
    jsonschema.validate(config, _ray_schema())
    assert config["head_node_type"] in config["available_node_types"]
    gpu_nodes = [t for t in config["available_node_types"].values() if t["resources"].get("GPU")]
    assert gpu_nodes, "the cluster must have a GPU worker type"


def test_cluster_launcher_schema_rejects_unknown_fields():
    # The check above must be able to fail: a misspelt top-level key is refused.
    config = yaml.safe_load((INFRA / "ray-cluster-aws.yaml").read_text())
    config["max_wrokers"] = 3
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(config, _ray_schema())


def _check_cluster_spec(spec: dict, where: str) -> None:
    assert set(spec) <= RAYCLUSTER_SPEC, f"{where}: unknown RayCluster fields {set(spec) - RAYCLUSTER_SPEC}"
    assert set(spec["headGroupSpec"]) <= HEAD_GROUP, f"{where}: unknown headGroupSpec fields"
    for group in spec["workerGroupSpecs"]:
        assert set(group) <= WORKER_GROUP, f"{where}: unknown worker group fields {set(group) - WORKER_GROUP}"
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        containers = group["template"]["spec"]["containers"]
        gpus = [c["resources"]["limits"].get("nvidia.com/gpu") for c in containers]
        assert any(gpus), f"{where}: worker group {group['groupName']} requests no GPU"
    for c in spec["headGroupSpec"]["template"]["spec"]["containers"]:
        assert c["image"] and c["name"]


def test_raycluster_manifest_fields():
    doc = yaml.safe_load((INFRA / "kuberay" / "raycluster.yaml").read_text())
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayCluster"
    _check_cluster_spec(doc["spec"], "raycluster.yaml")


@pytest.mark.parametrize("stage", ["cache-teacher", "distill", "sweep"])
def test_rayjob_manifest_fields(stage):
    path = INFRA / "kuberay" / f"rayjob-{stage}.yaml"
    doc = yaml.safe_load(path.read_text())
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayJob"
    spec = doc["spec"]
    assert set(spec) <= RAYJOB_SPEC, f"unknown RayJob fields {set(spec) - RAYJOB_SPEC}"
    assert spec["submissionMode"] in SUBMISSION_MODES
    job_script = {"cache-teacher": "jobs/cache_teacher.py", "distill": "jobs/distill.py", "sweep": "jobs/sweep.py"}
    assert job_script[stage] in spec["entrypoint"]
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert "env_vars" in runtime_env
    _check_cluster_spec(spec["rayClusterSpec"], path.name)


def _entrypoint_args(stage: str) -> list[str]:
    doc = yaml.safe_load((INFRA / "kuberay" / f"rayjob-{stage}.yaml").read_text())
    words = doc["spec"]["entrypoint"].split()
    assert words[0] == "python" and words[1].startswith("jobs/")
    return words[2:]


def test_rayjob_entrypoints_parse_with_the_jobs_own_arguments(monkeypatch):
    import argparse

    monkeypatch.syspath_prepend(str(INFRA.parent / "jobs"))
    import cache_teacher
    import distill

    args = cache_teacher.parse_args(_entrypoint_args("cache-teacher"))
    assert args.gpus_per_worker == 1 and args.out.startswith("s3://")
    parser = argparse.ArgumentParser()
    distill.add_distill_args(parser)
    args = parser.parse_args(_entrypoint_args("distill"))
    assert args.gpu and args.workers == 8 and args.storage.startswith("s3://")
    sweep = _entrypoint_args("sweep")
    assert {"--cache", "--space", "--storage", "--name"} <= set(sweep)
    assert (INFRA.parent / sweep[sweep.index("--space") + 1]).exists()
