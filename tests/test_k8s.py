"""No Kubernetes cluster or KubeRay operator runs in CI, so the manifests in docker/k8s/ are checked
as files: every YAML document parses and has the fields KubeRay reads (the kinds, the head and worker
groups, the image, GPU limits, the token env on every container, /shared on every pod), the RayJobs
bring up the RayCluster's own spec, and each RayJob's entrypoint names a module, a config and
settings that this checkout has and its command line accepts."""

from __future__ import annotations

import ast
import glob
import os
import re
import shlex
from typing import Any

import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
K8S = os.path.join(ROOT, "docker", "k8s")
IMAGE_ROOT = "/opt/catkd"  # the image's WORKDIR, where docker/Dockerfile copies the project
SECRET, SECRET_KEY = "catkd-ray-token", "auth_token"  # KubeRay's authOptions.secretName wants this key
CLAIM = "catkd-shared"
MANIFESTS = {
    "shared-pvc.yaml",
    "raycluster.yaml",
    "rayjob-cache.yaml",
    "rayjob-distill.yaml",
    "rayjob-distill-elastic.yaml",
}
ELASTIC_JOB = "catkd-distill-elastic"
RAY_KINDS = {"RayCluster", "RayJob"}


def _documents() -> list[tuple[str, dict[str, Any]]]:
    docs = []
    for path in sorted(glob.glob(os.path.join(K8S, "*.yaml"))):
        with open(path) as f:
            docs += [(os.path.basename(path), doc) for doc in yaml.safe_load_all(f) if doc is not None]
    return docs


def _of_kind(kind: str) -> list[dict[str, Any]]:
    return [doc for _, doc in _documents() if doc["kind"] == kind]


def _cluster_specs() -> list[tuple[str, dict[str, Any]]]:
    """(name, RayClusterSpec) of the RayCluster and of each RayJob's own cluster."""
    specs = [(doc["metadata"]["name"], doc["spec"]) for doc in _of_kind("RayCluster")]
    return specs + [(doc["metadata"]["name"], doc["spec"]["rayClusterSpec"]) for doc in _of_kind("RayJob")]


def _pod_templates(spec: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(group, pod spec) of the head group and of every worker group."""
    templates = [("head", spec["headGroupSpec"]["template"]["spec"])]
    return templates + [(group["groupName"], group["template"]["spec"]) for group in spec["workerGroupSpecs"]]


def _containers() -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(where, pod spec, container) of every container of every pod template in the manifests."""
    found = []
    for name, spec in _cluster_specs():
        for group, pod in _pod_templates(spec):
            assert pod["containers"], f"{name}/{group}: a pod template without containers"
            found += [(f"{name}/{group}/{c['name']}", pod, c) for c in pod["containers"]]
    return found


def _env(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {var["name"]: var for var in container.get("env", [])}


def _ray_pin() -> str:
    with open(os.path.join(ROOT, "constraints.txt")) as f:
        return next(line.split("==")[1].strip() for line in f if line.startswith("ray=="))


def _gpus(container: dict[str, Any]) -> int:
    return int(container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))


def _local(path: str) -> str:
    """The checkout's copy of a path inside the image."""
    assert path.startswith(IMAGE_ROOT + "/"), path
    return os.path.join(ROOT, path[len(IMAGE_ROOT) + 1 :])


def _entrypoint(job: dict[str, Any]) -> tuple[str, list[str]]:
    """(module, arguments) of a RayJob entrypoint `python -m MODULE ARGS...`."""
    words = shlex.split(job["spec"]["entrypoint"])
    assert words[:2] == ["python", "-m"], words  # the image's python, the project's environment
    return words[2], words[3:]


def _stage_command(module: str) -> list[str]:
    """The catkd subcommand a jobs/<stage>.py module runs: the list literal it passes to run()."""
    path = os.path.join(ROOT, *module.split(".")) + ".py"
    assert module.startswith("jobs.") and os.path.isfile(path), f"{module}: no {path}"
    with open(path) as f:
        tree = ast.parse(f.read())
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "run"]
    assert len(calls) == 1, f"{path}: expected one run([...]) call"
    return ast.literal_eval(calls[0].args[0])


def test_the_manifests_are_the_expected_kinds():
    docs = _documents()
    assert {file for file, _ in docs} == MANIFESTS
    for file, doc in docs:
        assert doc["kind"] in RAY_KINDS | {"PersistentVolumeClaim"}, (file, doc["kind"])
        assert doc["apiVersion"] == ("ray.io/v1" if doc["kind"] in RAY_KINDS else "v1"), (file, doc["apiVersion"])
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"]), doc["metadata"]
    assert len(_of_kind("RayCluster")) == 1 and len(_of_kind("RayJob")) == 3
    names = [doc["metadata"]["name"] for _, doc in docs]
    assert len(names) == len(set(names))


def test_shared_claim_is_read_write_many_and_mounted_at_shared_on_every_container():
    (claim,) = _of_kind("PersistentVolumeClaim")
    assert claim["metadata"]["name"] == CLAIM and claim["spec"]["accessModes"] == ["ReadWriteMany"]
    assert claim["spec"]["resources"]["requests"]["storage"]
    for where, pod, container in _containers():
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert volumes[mounts["/shared"]]["persistentVolumeClaim"]["claimName"] == CLAIM, where
        # DataLoader workers pass batches through shared memory: /dev/shm is RAM, not the container's disk
        assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory", where


def test_cluster_specs_have_what_kuberay_requires():
    specs = _cluster_specs()
    assert len(specs) == 4
    for name, spec in specs:
        assert spec["rayVersion"] == _ray_pin(), name  # authOptions needs it, and it must be the image's Ray
        assert spec["authOptions"] == {"mode": "token", "secretName": SECRET}, name
        head = spec["headGroupSpec"]
        assert head["rayStartParams"]["num-cpus"] == "0", name  # no work lands on the head
        groups = spec["workerGroupSpecs"]
        assert groups, f"{name}: no worker group"
        for group in groups:
            assert group["groupName"] and isinstance(group["rayStartParams"], dict), (name, group)
            counts = [group[key] for key in ("minReplicas", "replicas", "maxReplicas")]
            assert all(isinstance(n, int) for n in counts) and counts == sorted(counts), (name, counts)
        for params in [head["rayStartParams"], *(group["rayStartParams"] for group in groups)]:
            assert all(isinstance(v, str) for v in params.values()), params  # the CRD's map[string]string
        for group, pod in _pod_templates(spec):
            # KubeRay's bash replaces the image's tini: the pod's pause process reaps instead
            assert pod["shareProcessNamespace"] is True, (name, group)


def test_every_container_runs_the_image_with_resources_and_token_authentication():
    containers = _containers()
    assert len(containers) == 8  # a head and a worker group in each of the four cluster specs
    for where, _, container in containers:
        assert container["image"] == "catkd:gpu", where
        limits = container["resources"]["limits"]
        assert limits["cpu"] and limits["memory"], where
        env = _env(container)
        assert env["RAY_AUTH_MODE"]["value"] == "token", where
        assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": SECRET, "key": SECRET_KEY}, where
        assert "value" not in env["RAY_AUTH_TOKEN"], where  # the token is never in a manifest
        assert env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"]["value"] == "0", where


def test_workers_have_gpus_and_the_head_has_none():
    for name, spec in _cluster_specs():
        head, *workers = _pod_templates(spec)
        assert all(_gpus(c) == 0 for c in head[1]["containers"]), name
        assert workers and all(_gpus(pod["containers"][0]) >= 1 for _, pod in workers), name


def test_rayjobs_run_on_the_rayclusters_spec_and_clean_up():
    (cluster,) = _of_kind("RayCluster")
    with open(os.path.join(ROOT, "jobs", "runtime_env.yaml")) as f:
        runtime_env = yaml.safe_load(f)
    for job in _of_kind("RayJob"):
        spec = job["spec"]
        assert _fixed_form(spec["rayClusterSpec"]) == cluster["spec"], job["metadata"]["name"]
        assert spec["shutdownAfterJobFinishes"] is True
        assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] > 0
        assert spec["submissionMode"] in {"K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"}
        env = yaml.safe_load(spec["runtimeEnvYAML"])
        assert "working_dir" not in env  # the code is the image's: nothing to upload
        assert env["env_vars"] == runtime_env["env_vars"]  # the same job environment as `ray job submit`


def _fixed_form(spec: dict[str, Any]) -> dict[str, Any]:
    """An elastic job's cluster spec as raycluster.yaml has it: without the autoscaler and
    with the GPU group's replica range set back to raycluster.yaml's fixed 4."""
    spec = {key: value for key, value in spec.items() if key not in ("enableInTreeAutoscaling", "autoscalerOptions")}
    fixed = {"replicas": 4, "minReplicas": 4, "maxReplicas": 4}
    return spec | {"workerGroupSpecs": [group | fixed for group in spec["workerGroupSpecs"]]}


def test_the_elastic_job_asks_for_what_its_worker_group_ranges_over():
    """min_workers and num_workers are the GPU group's minReplicas and maxReplicas (one GPU
    a pod), the autoscaler adds the pods between, and lost nodes are retried without limit."""
    from pipeline.cli import build_parser
    from pipeline.train.config import load_config

    (job,) = [doc for doc in _of_kind("RayJob") if doc["metadata"]["name"] == ELASTIC_JOB]
    spec = job["spec"]["rayClusterSpec"]
    assert spec["enableInTreeAutoscaling"] is True
    (group,) = spec["workerGroupSpecs"]
    module, args = _entrypoint(job)
    parsed = build_parser("train").parse_args([*_stage_command(module), *args])
    cfg = load_config(_local(parsed.config), parsed.overrides)
    per_pod = _gpus(group["template"]["spec"]["containers"][0])
    assert cfg.elastic and cfg.use_gpu and cfg.max_failures == -1
    assert (cfg.min_workers, cfg.num_workers) == (group["minReplicas"] * per_pod, group["maxReplicas"] * per_pod)
    assert group["replicas"] == group["minReplicas"]


def test_the_image_holds_the_project_where_the_jobs_look_for_it():
    with open(os.path.join(ROOT, "docker", "Dockerfile")) as f:
        lines = [line.strip() for line in f]
    assert f"WORKDIR {IMAGE_ROOT}" in lines and "COPY jobs ./jobs" in lines


@pytest.mark.parametrize("name", ["catkd-cache", "catkd-distill", ELASTIC_JOB])
def test_rayjob_entrypoint_names_an_existing_stage_config_and_settings(name: str):
    from pipeline.cli import build_parser

    (job,) = [doc for doc in _of_kind("RayJob") if doc["metadata"]["name"] == name]
    module, args = _entrypoint(job)
    command = _stage_command(module)
    values = [arg.split("=", 1)[1] if "=" in arg else arg for arg in args]
    for value in values:
        if value.startswith("/"):  # paths: the project's in the image, everything else on the shared volume
            assert value.startswith(("/shared/", IMAGE_ROOT + "/")), value
            assert not value.startswith(IMAGE_ROOT + "/") or os.path.isfile(_local(value)), value
    parsed = build_parser(command[0]).parse_args([*command, *args])  # SystemExit on an unknown flag
    if command == ["cache", "build"]:
        from pipeline.cache.config import CacheBuildConfig
        from pipeline.settings import flag_values

        cfg = CacheBuildConfig(**flag_values(CacheBuildConfig, parsed))
        needed = cfg.actors * cfg.gpus_per_actor
    else:
        from pipeline.train.config import load_config

        assert command == ["train"] and parsed.config.endswith(".yaml"), parsed
        cfg = load_config(_local(parsed.config), parsed.overrides)
        needed = cfg.num_workers if cfg.use_gpu else 0
    # the GPUs the stage asks for fit the cluster the job brings up
    workers = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    gpus = sum(group["maxReplicas"] * _gpus(group["template"]["spec"]["containers"][0]) for group in workers)
    assert 1 <= needed <= gpus, (needed, gpus)
