"""The deploy files (deploy/, .dockerignore) checked against the project they deploy: versions equal the
pins, the entrypoint and config are the ones the job accepts, the YAML has the fields the tools read.

Offline and fast: nothing is built, pulled or applied. The Ray cluster launcher config is validated with
the schema of the installed Ray (the same check `ray up` makes); KubeRay's CRDs are not available here, so
the RayJob's keys are compared with the field names of KubeRay's Go types (ray-operator/apis/ray/v1).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml

from jobs.config import RunConfig, load_config
from jobs.run_flags import add_run_arguments

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = {"gpu": ROOT / "deploy/docker/Dockerfile", "cpu": ROOT / "deploy/docker/Dockerfile.cpu"}
RAYJOB = ROOT / "deploy/kuberay/rayjob.yaml"
CLUSTER = ROOT / "deploy/ray/cluster.yaml"

# JSON field names of KubeRay's v1 types that these files may use (rayjob_types.go, raycluster_types.go).
RAYJOB_SPEC_FIELDS = {
    "activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submitterPodTemplate", "metadata",
    "clusterSelector", "submitterConfig", "managedBy", "deletionStrategy", "entrypoint", "runtimeEnvYAML",
    "jobId", "submissionMode", "entrypointResources", "entrypointNumCpus", "entrypointNumGpus",
    "ttlSecondsAfterFinished", "shutdownAfterJobFinishes", "suspend",
}  # fmt: skip
RAYCLUSTER_SPEC_FIELDS = {
    "upgradeStrategy", "authOptions", "suspend", "managedBy", "autoscalerOptions", "headServiceAnnotations",
    "enableInTreeAutoscaling", "gcsFaultToleranceOptions", "headGroupSpec", "rayVersion", "workerGroupSpecs",
}  # fmt: skip
HEAD_GROUP_FIELDS = {"serviceType", "headService", "enableIngress", "rayStartParams", "template"}
WORKER_GROUP_FIELDS = {
    "groupName", "replicas", "minReplicas", "maxReplicas", "numOfHosts", "rayStartParams", "template",
    "scaleStrategy",
}  # fmt: skip
AUTOSCALER_OPTIONS_FIELDS = {
    "resources", "image", "imagePullPolicy", "env", "envFrom", "volumeMounts", "securityContext",
    "idleTimeoutSeconds", "upscalingMode",
}  # fmt: skip
AUTH_OPTIONS_FIELDS = {"mode", "secretName", "enableK8sTokenAuth"}


# -- the project's own pins ----------------------------------------------------------------------------


def ray_pin() -> str:
    # pyproject.toml read as text: tomllib is Python 3.11+, the project supports 3.10
    text = (ROOT / "pyproject.toml").read_text()
    (pin,) = re.findall(r'^\s*"ray(?:\[[^\]]*\])?==([^"]+)"', text, re.MULTILINE)
    return pin


def packaged_top_levels() -> set[str]:
    pattern = r"\[tool\.setuptools\.packages\.find\]\s*include\s*=\s*\[([^\]]*)\]"
    match = re.search(pattern, (ROOT / "pyproject.toml").read_text())
    assert match, "no [tool.setuptools.packages.find] include in pyproject.toml"
    return {name.strip().strip('"').rstrip("*") for name in match.group(1).split(",") if name.strip()}


def makefile_torch_version() -> str:
    match = re.search(r"^TORCH_VERSION\s*:?=\s*(\S+)\s*$", (ROOT / "Makefile").read_text(), re.MULTILINE)
    assert match, "Makefile has no TORCH_VERSION"
    return match.group(1)


def test_pins_are_found():
    assert re.fullmatch(r"\d+\.\d+\.\d+", ray_pin())
    assert re.fullmatch(r"\d+\.\d+\.\d+", makefile_torch_version())


# -- Dockerfiles ---------------------------------------------------------------------------------------


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, comments dropped, continuation lines joined."""
    lines = [line for line in path.read_text().splitlines() if not line.lstrip().startswith("#")]
    text = re.sub(r"\\\n", " ", "\n".join(lines))
    result = []
    for line in text.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            result.append((word.upper(), rest.strip()))
    return result


def shell_commands(line: str) -> list[list[str]]:
    """The simple commands of a shell line, split at `&&`, `||`, `;` and `|` outside quotes."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands: list[list[str]] = [[]]
    for token in lexer:
        if token in ("&&", "||", ";", "|"):
            commands.append([])
        else:
            commands[-1].append(token)
    return [command for command in commands if command]


def pip_installs(path: Path) -> list[list[str]]:
    """The argument lists of every `pip install` in the file's RUN instructions."""
    installs = []
    for word, rest in instructions(path):
        if word != "RUN":
            continue
        for tokens in shell_commands(rest):
            if "pip" in tokens and tokens[tokens.index("pip") + 1 : tokens.index("pip") + 2] == ["install"]:
                installs.append(tokens[tokens.index("pip") + 2 :])
    return installs


def packages(args: list[str]) -> list[str]:
    """Requirement arguments of a `pip install` (options and their values dropped)."""
    with_value = {"--index-url", "-i", "--extra-index-url", "-r", "--requirement", "-c", "--constraint"}
    names, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg in with_value:
            skip = True
        elif not arg.startswith("-"):
            names.append(arg)
    return names


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_dockerfile_base_is_the_official_ray_image_of_the_pin(kind):
    froms = [rest for word, rest in instructions(DOCKERFILES[kind]) if word == "FROM"]
    assert len(froms) == 1, froms
    image, _, tag = froms[0].partition(":")
    assert image == "rayproject/ray"
    match = re.fullmatch(r"(\d+\.\d+\.\d+)-py(\d+)-(cpu|cu\d+)", tag)
    assert match, f"unexpected tag {tag!r}: expected VERSION-pyXY-cpu or VERSION-pyXY-cuXY"
    version, python, platform = match.groups()
    assert version == ray_pin()
    assert python in ("311", "312")
    assert (platform == "cpu") == (kind == "cpu")


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_dockerfile_installs_torch_first_then_the_project_like_the_makefile(kind):
    installs = pip_installs(DOCKERFILES[kind])
    assert len(installs) == 2, installs
    torch_args, project_args = installs
    assert packages(torch_args) == [f"torch=={makefile_torch_version()}"]
    index = torch_args[torch_args.index("--index-url") + 1]
    if kind == "cpu":
        assert index == "https://download.pytorch.org/whl/cpu"
    else:
        cuda = re.fullmatch(r"https://download\.pytorch\.org/whl/(cu\d+)", index)
        assert cuda, index
        from_tag = next(rest for word, rest in instructions(DOCKERFILES[kind]) if word == "FROM")
        assert from_tag.endswith("-" + cuda.group(1)), "torch's CUDA build should match the base image's"
    assert packages(project_args) == ["."], "runtime dependencies only: `pip install .`, no extras"


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_dockerfile_never_installs_test_dependencies(kind):
    for args in pip_installs(DOCKERFILES[kind]):
        assert not {"-r", "--requirement", "-e", "--editable"} & set(args), args
        for name in packages(args):
            assert "[" not in name, f"extras installed: {name}"
            assert not name.lower().startswith(("diffusers", "pytest", "peft", "accelerate", "scipy"))
        assert not any("diffusers" in arg or "[test" in arg for arg in args), args
    run_lines = " ".join(rest for word, rest in instructions(DOCKERFILES[kind]) if word == "RUN")
    assert "[test" not in run_lines
    for command in shell_commands(run_lines):
        if "install" in command:  # pip, uv pip, apt-get, conda: none may bring diffusers in
            assert not any("diffusers" in token for token in command), command


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_dockerfile_runs_as_the_ray_user_and_copies_only_the_package(kind):
    steps = instructions(DOCKERFILES[kind])
    users = [rest for word, rest in steps if word == "USER"]
    assert users and users[-1] in ("ray", "1000"), "must run as the Ray image's non-root user"
    assert any(word == "WORKDIR" for word, _ in steps)
    copied = set()
    for word, rest in steps:
        if word in ("COPY", "ADD"):
            assert word == "COPY"
            *sources, _ = [arg for arg in rest.split() if not arg.startswith("--")]
            copied.update(source.rstrip("/") for source in sources)
    assert copied == {"pyproject.toml", "README.md", "sd_core", "connectors", "jobs"}
    assert packaged_top_levels() <= copied, "a package pyproject.toml builds is not copied"


def test_dockerignore_keeps_local_state_and_secrets_out():
    lines = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    for entry in (".venv", ".git", ".whl", ".gl", ".scratch", "demo-output", "bench/.cache", "bench/results",
                  "*.egg-info", "**/__pycache__", "tests", ".pytest_cache", ".ruff_cache"):  # fmt: skip
        assert entry in lines, entry
    for needed in ("sd_core", "connectors", "jobs", "pyproject.toml", "README.md"):
        assert needed not in lines


# -- KubeRay RayJob ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rayjob_docs() -> dict[str, dict]:
    documents = [d for d in yaml.safe_load_all(RAYJOB.read_text()) if d is not None]
    kinds = [d["kind"] for d in documents]
    assert sorted(kinds) == ["ConfigMap", "RayJob"], kinds
    return {d["kind"]: d for d in documents}


@pytest.fixture(scope="module")
def rayjob(rayjob_docs) -> dict:
    return rayjob_docs["RayJob"]


def pod_specs(rayjob: dict) -> list[dict]:
    cluster = rayjob["spec"]["rayClusterSpec"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    return [group["template"]["spec"] for group in groups]


def group_gpus(group: dict) -> int:
    """GPUs of one pod of a worker group (its single container's nvidia.com/gpu limit)."""
    (container,) = group["template"]["spec"]["containers"]
    return int(container["resources"]["limits"].get("nvidia.com/gpu", 0))


def entrypoint_config_path(rayjob: dict) -> str:
    argv = shlex.split(rayjob["spec"]["entrypoint"])
    assert argv[:3] == ["python", "-m", "jobs.img2img"], argv
    return argv[argv.index("--config") + 1]


def test_rayjob_kind_and_known_fields(rayjob):
    assert rayjob["apiVersion"] == "ray.io/v1"
    spec = rayjob["spec"]
    assert set(spec) <= RAYJOB_SPEC_FIELDS, set(spec) - RAYJOB_SPEC_FIELDS
    cluster = spec["rayClusterSpec"]
    assert set(cluster) <= RAYCLUSTER_SPEC_FIELDS, set(cluster) - RAYCLUSTER_SPEC_FIELDS
    assert set(cluster["headGroupSpec"]) <= HEAD_GROUP_FIELDS
    for group in cluster["workerGroupSpecs"]:
        assert set(group) <= WORKER_GROUP_FIELDS, set(group) - WORKER_GROUP_FIELDS
    assert set(cluster.get("autoscalerOptions", {})) <= AUTOSCALER_OPTIONS_FIELDS
    assert set(cluster.get("authOptions", {})) <= AUTH_OPTIONS_FIELDS


def test_rayjob_entrypoint_runs_the_job_module_with_its_config_flag(rayjob):
    argv = shlex.split(rayjob["spec"]["entrypoint"])
    module = argv[2]
    assert importlib.util.find_spec(module) is not None
    assert (ROOT / Path(*module.split("."))).with_suffix(".py").is_file()
    # --config is a real flag of the job's CLI, and the rest of the command line parses too
    parser = argparse.ArgumentParser()
    add_run_arguments(parser)
    args = parser.parse_args(argv[3:])
    assert args.config == entrypoint_config_path(rayjob)


def test_rayjob_lifecycle(rayjob):
    spec = rayjob["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] > 0
    assert isinstance(spec["backoffLimit"], int) and spec["backoffLimit"] >= 1
    # a hung attempt must not hold its GPUs forever
    deadline = spec["activeDeadlineSeconds"]
    assert isinstance(deadline, int) and 3600 <= deadline <= 7 * 86400
    lines = RAYJOB.read_text().splitlines()
    at = next(i for i, line in enumerate(lines) if line.strip().startswith("backoffLimit:"))
    comment = " ".join(line for line in lines[max(0, at - 4) : at] if line.strip().startswith("#"))
    assert "resume" in comment.lower(), "say next to backoffLimit why retrying is safe"


def test_rayjob_job_id_is_deterministic_and_names_the_run(rayjob, rayjob_docs):
    job_id = rayjob["spec"]["jobId"]
    assert re.fullmatch(r"sdbatch-[a-z0-9]+(-[a-z0-9]+)*", job_id), job_id
    assert rayjob["metadata"]["name"] == job_id
    run_name = job_id.removeprefix("sdbatch-")
    config = yaml.safe_load(rayjob_docs["ConfigMap"]["data"][Path(entrypoint_config_path(rayjob)).name])
    assert config["output"].rstrip("/").rsplit("/", 1)[1] == run_name, "output URI should end in the run name"


def test_rayjob_ray_version_is_the_pin(rayjob):
    cluster = rayjob["spec"]["rayClusterSpec"]
    assert cluster["rayVersion"] == ray_pin()


def test_rayjob_head_takes_no_work_and_workers_have_a_gpu(rayjob):
    cluster = rayjob["spec"]["rayClusterSpec"]
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    head_resources = cluster["headGroupSpec"]["template"]["spec"]["containers"][0].get("resources", {})
    assert "nvidia.com/gpu" not in head_resources.get("limits", {})
    workers = cluster["workerGroupSpecs"]
    assert workers
    for group in workers:
        assert all(isinstance(value, str) for value in group["rayStartParams"].values())
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        assert group["maxReplicas"] >= 1
        assert group_gpus(group) >= 1, f"worker group {group['groupName']} requests no nvidia.com/gpu"


def test_rayjob_uses_the_image_and_mounts_the_config_everywhere(rayjob, rayjob_docs):
    config_path = Path(entrypoint_config_path(rayjob))
    configmap = rayjob_docs["ConfigMap"]
    assert config_path.name in configmap["data"]
    for pod in pod_specs(rayjob):
        volumes = {volume["name"]: volume for volume in pod["volumes"]}
        (container,) = pod["containers"]
        gpus = int(container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))
        # the head runs no model work: the CPU image, without gigabytes of CUDA libraries to pull
        assert container["image"].rsplit("/", 1)[-1] == f"sdbatch:0.1.0-{'gpu' if gpus else 'cpu'}"
        mounts = [
            mount for mount in container["volumeMounts"]
            if volumes[mount["name"]].get("configMap", {}).get("name") == configmap["metadata"]["name"]
        ]  # fmt: skip
        assert len(mounts) == 1, "the ConfigMap must be mounted once in every Ray container"
        assert Path(mounts[0]["mountPath"]) / config_path.name == config_path


def test_rayjob_credentials_come_from_a_secret(rayjob):
    text = RAYJOB.read_text()
    assert not re.search(r"AKIA[0-9A-Z]{16}", text), "an AWS access key id is written in the file"
    for pod in pod_specs(rayjob):
        (container,) = pod["containers"]
        env = {item["name"]: item for item in container.get("env", [])}
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            assert "value" not in env[name], f"{name} must not be inline"
            assert env[name]["valueFrom"]["secretKeyRef"]["name"]
        assert not any(key.startswith("RAY_AUTH_TOKEN") and "value" in item for key, item in env.items())


def test_rayjob_enables_ray_token_auth(rayjob):
    assert rayjob["spec"]["rayClusterSpec"]["authOptions"]["mode"] == "token"


def test_rayjob_config_loads_with_the_projects_loader(rayjob, rayjob_docs, tmp_path):
    config_path = Path(entrypoint_config_path(rayjob))
    path = tmp_path / config_path.name
    path.write_text(rayjob_docs["ConfigMap"]["data"][config_path.name])
    config = load_config(str(path))
    assert isinstance(config, RunConfig)
    assert config.manifest.startswith("s3://") and config.output.startswith("s3://")
    assert config.model.path.startswith("s3://")
    assert config.compute.gpus_per_actor >= 1
    workers = rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    gpus = sum(group["maxReplicas"] * group_gpus(group) for group in workers)
    assert config.compute.actors_max * config.compute.gpus_per_actor <= gpus, "more actors than GPUs"


# -- Ray cluster launcher ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load(CLUSTER.read_text())


def test_cluster_yaml_is_valid_for_the_installed_ray(cluster):
    (ray_dir,) = importlib.util.find_spec("ray").submodule_search_locations
    schema = json.loads((Path(ray_dir) / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(cluster, schema)  # what `ray up` checks first


def test_cluster_yaml_node_types(cluster):
    assert cluster["provider"]["type"] == "aws"
    assert cluster["provider"]["region"]
    types = cluster["available_node_types"]
    head = types[cluster["head_node_type"]]
    assert head["resources"].get("CPU") == 0 and not head["resources"].get("GPU")
    workers = [t for name, t in types.items() if name != cluster["head_node_type"]]
    gpu_types = [t for t in workers if t["resources"].get("GPU", 0) >= 1]
    assert gpu_types, "no GPU worker node type"
    for node_type in gpu_types:
        assert node_type.get("min_workers", 0) == 0, "GPU workers should scale from zero"
        assert node_type["max_workers"] > 0
        assert node_type["node_config"]["InstanceType"]
    assert cluster["max_workers"] >= max(t["max_workers"] for t in gpu_types)


def test_cluster_yaml_runs_the_sdbatch_images(cluster):
    docker = cluster["docker"]
    images = [docker.get(key) for key in ("image", "head_image", "worker_image") if docker.get(key)]
    assert images
    for image in images:
        assert re.search(r"(^|/)sdbatch:0\.1\.0-(gpu|cpu)$", image), image
    assert docker.get("worker_image", docker.get("image", "")).endswith("-gpu")


def test_cluster_yaml_header_has_the_commands_and_no_secrets(cluster):
    text = CLUSTER.read_text()
    header = "\n".join(line for line in text.splitlines() if line.startswith("#"))
    assert "ray up deploy/ray/cluster.yaml" in header
    assert "ray down deploy/ray/cluster.yaml" in header
    submit = re.search(r"ray job submit --address \S+.*?--working-dir \. -- (python -m jobs\.img2img [^\n]*)",
                       header, re.DOTALL)  # fmt: skip
    assert submit, "no `ray job submit ... --working-dir . -- python -m jobs.img2img ...` in the header"
    assert "--config" in submit.group(1)
    assert not re.search(r"AKIA[0-9A-Z]{16}|aws_secret_access_key|AWS_SECRET_ACCESS_KEY", text)
    assert all("pip install" not in command for command in cluster.get("setup_commands", []))
