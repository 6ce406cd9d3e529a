"""The job as users launch it: `ray job submit --working-dir . -- python -m jobs.img2img ...` against a real
`ray start --head` cluster; a broken configuration fails the submission with the precise message in its logs.

A Ray job runs its entrypoint with the cluster's PATH, so `python` is whatever interpreter the cluster has
first on its PATH; the test cluster puts the virtual environment first, as a cluster image does.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import time
from pathlib import Path

import pytest

from connectors.storage import Storage
from tests.jobs.test_img2img import write_dataset
from tests.ray_services import ray_binary

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


def submit(cluster, *job_args: str, timeout: float = 300) -> tuple[subprocess.CompletedProcess, float]:
    """`ray job submit` of the img2img job with `job_args`; returns the finished process and its seconds."""
    command = [
        ray_binary(),
        "job",
        "submit",
        "--address",
        cluster.dashboard_url,
        "--working-dir",
        str(REPO),
        "--",
        "python",
        "-m",
        "jobs.img2img",
        *job_args,
    ]
    env = {**cluster.client_env(), "RAY_AUTH_MODE": "disabled"}
    started = time.monotonic()
    process = subprocess.run(
        command, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False
    )
    return process, time.monotonic() - started


@pytest.fixture
def job_args(tmp_path, model_dirs) -> list[str]:
    """Flags for a 3-image job on local disk (the cluster runs on this machine, so its workers see it)."""
    manifest = write_dataset(Storage(), str(tmp_path / "data"), [(64, 64)] * 3)
    return [
        "--model",
        str(model_dirs["v1"]),
        "--manifest",
        manifest,
        "--output",
        str(tmp_path / "out"),
        "--steps",
        "4",
        "--batch-size",
        "2",
    ]


def readme_run_flags() -> list[str]:
    """The flags of README.md's `ray job submit ... python -m jobs.img2img ...` example, as written."""
    section = (REPO / "README.md").read_text().split("## Running the job", 1)[1]
    block = section.split("```bash", 1)[1].split("```", 1)[0].replace("\\\n", " ")
    command = shlex.split(block.strip().splitlines()[0])  # the block's first command, continuations joined
    start = command.index("jobs.img2img") if "jobs.img2img" in command else command.index("sdbatch") + 1
    return command[start + 1 :]


def with_local_paths(flags: list[str], values: dict[str, str]) -> list[str]:
    """`flags` with the values of the named flags replaced (the example's s3:// paths by local ones)."""
    out = list(flags)
    for index, flag in enumerate(out[:-1]):
        if flag in values:
            out[index + 1] = values[flag]
    return out


def test_ray_job_submit_runs_the_job(ray_cluster, job_args, tmp_path):
    process, _ = submit(ray_cluster, *job_args)
    logs = process.stdout + process.stderr
    assert process.returncode == 0, logs[-6000:]
    assert "sdbatch run summary" in logs
    assert re.search(r"^\s*exit code\s+0\s*$", logs, re.MULTILINE), logs[-6000:]
    assert re.search(r"^\s*rows\s+3 ", logs, re.MULTILINE), logs[-6000:]
    output = tmp_path / "out"
    assert (output / "_SUCCESS").is_file() and (output / "_run.json").is_file()


def test_readme_example_without_compute_flags_runs_on_a_cpu_only_cluster(ray_cluster, model_dirs, tmp_path):
    flags = readme_run_flags()
    assert not any(flag.startswith("compute.") or flag == "--set" for flag in flags), flags
    manifest = write_dataset(Storage(), str(tmp_path / "data"), [(64, 64)] * 3)
    local = {"--model": str(model_dirs["v1"]), "--manifest": manifest, "--output": str(tmp_path / "out")}
    process, _ = submit(ray_cluster, *with_local_paths(flags, local), timeout=300)
    logs = process.stdout + process.stderr
    assert process.returncode == 0, logs[-6000:]
    assert re.search(r"^actors +1 to 3 \(autoscaling\) CPU actors of 1 CPU each: device auto and the cluster "
                     r"has no GPU", logs, re.MULTILINE), logs[-6000:]  # fmt: skip
    assert re.search(r"^\s*rows\s+3 ", logs, re.MULTILINE), logs[-6000:]
    assert (tmp_path / "out" / "_SUCCESS").is_file()


def test_two_gpus_per_actor_on_a_cluster_without_gpus_is_refused_at_once(ray_cluster, job_args, tmp_path):
    process, seconds = submit(ray_cluster, *job_args, "--set", "compute.gpus_per_actor=2", timeout=180)
    logs = process.stdout + process.stderr
    assert process.returncode != 0, logs[-6000:]
    assert "sdbatch: refused before any work:" in logs, logs[-6000:]
    assert "each actor asks for 2 GPU + 1 CPU, which no node can ever hold: no node has a GPU" in logs
    assert "1 node, 4 CPUs, 0 GPUs now" in logs, logs[-6000:]
    assert "exit code 2" in logs, logs[-6000:]
    assert not (tmp_path / "out").exists()
    assert seconds < 120  # not a wait for resources that never come


def test_ray_job_submit_of_a_broken_config_fails_with_the_message(ray_cluster, job_args, tmp_path):
    process, seconds = submit(ray_cluster, *job_args, "--set", "compute.batch_sise=4", timeout=180)
    logs = process.stdout + process.stderr
    assert process.returncode != 0, logs[-6000:]
    assert "sdbatch: refused before any work:" in logs, logs[-6000:]
    assert (
        "compute.batch_sise (from --set compute.batch_sise=4): unknown key (did you mean 'batch_size'?)"
        in logs
    )
    assert "exit code 2" in logs, logs[-6000:]  # Ray's status message carries the entrypoint's exit code
    assert "sdbatch run summary" not in logs
    assert not (tmp_path / "out").exists()  # refused before the output (or a model or Ray) was touched
    assert seconds < 120
