"""No Docker engine runs here, so the Docker files are checked as files: they parse, and
every path and command they name exists in the repository or the installed project."""

from __future__ import annotations

import os
import re
import shutil
import sys

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _dockerfile() -> list[str]:
    with open(os.path.join(ROOT, "docker", "Dockerfile")) as f:
        return [line.strip() for line in f if line.strip() and not line.startswith("#")]


def test_dockerfile_copies_existing_paths_and_installs_like_ci():
    lines = _dockerfile()
    assert lines[0].startswith("FROM python:3.11")
    for line in lines:
        if line.startswith("COPY"):
            for source in line.split()[1:-1]:
                assert os.path.exists(os.path.join(ROOT, source)), source
    assert "RUN make install VENV=/opt/venv" in lines
    makefile = open(os.path.join(ROOT, "Makefile")).read()
    assert re.search(r"^install:", makefile, re.M) and "-c constraints.txt" in makefile
    assert "make test" in open(os.path.join(ROOT, ".ci", "run")).read()  # CI installs through the same target


def test_compose_cluster_is_consistent():
    with open(os.path.join(ROOT, "docker", "compose.yaml")) as f:
        compose = yaml.safe_load(f)
    head, worker = compose["services"]["head"], compose["services"]["worker"]
    assert head["build"]["dockerfile"] == "docker/Dockerfile" and os.path.exists(
        os.path.join(ROOT, "docker", head["build"]["context"], head["build"]["dockerfile"])
    )
    assert head["ports"] == ["127.0.0.1:8265:8265"]  # dashboard on localhost only
    assert "ray start --head" in head["command"] and "--address=head:6379" in worker["command"]
    for service in (head, worker):
        assert "shared:/shared" in service["volumes"] and service["shm_size"]
    assert shutil.which("ray", path=os.path.dirname(sys.executable))  # the image runs `ray start` from the project env


def test_runtime_env_and_entrypoints_exist():
    with open(os.path.join(ROOT, "jobs", "runtime_env.yaml")) as f:
        runtime_env = yaml.safe_load(f)
    assert runtime_env["working_dir"] == "."
    for stage in ("shard", "train_teacher", "build_cache", "distill", "evaluate", "sweep"):
        assert os.path.exists(os.path.join(ROOT, "jobs", f"{stage}.py")), stage
