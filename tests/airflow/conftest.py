"""Fixtures for the Airflow DAG tests, which run only in the Airflow virtualenv (.venv-airflow).

In the main venv (no Airflow) nothing in this folder is collected. In the Airflow venv, Airflow gets a
throwaway AIRFLOW_HOME before anything imports it, and one real `ray start --head` cluster serves the
whole session.
"""

from __future__ import annotations

import atexit
import importlib.metadata
import os
import shutil
import sys
import tempfile
from pathlib import Path

DAG_FOLDER = Path(__file__).resolve().parents[2] / "deploy" / "airflow"


def _airflow_installed() -> bool:
    # By distribution, not by import: in the main suite `tests/` is on sys.path, where this very folder
    # is a namespace package named `airflow`.
    try:
        importlib.metadata.distribution("apache-airflow-task-sdk")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


if not _airflow_installed():
    collect_ignore_glob = ["*"]
else:
    # Before any Airflow import: its config, logs and (unused) database go to a temporary home.
    _home = tempfile.mkdtemp(prefix="sdbatch-airflow-home-")
    atexit.register(shutil.rmtree, _home, ignore_errors=True)
    os.environ["AIRFLOW_HOME"] = _home
    os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
    # The dags folder of the end-to-end test (filled by the `airflow_db` fixture): deploy/airflow's
    # files plus tests/airflow/dags/, as a deployment would lay them out.
    os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(Path(_home) / "dags")
    # The DAG folder on sys.path, as Airflow puts its dags_folder: the tests import its modules.
    if str(DAG_FOLDER) not in sys.path:
        sys.path.insert(0, str(DAG_FOLDER))

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def ray_head():
    from ray_head import RayHead

    with RayHead() as head:
        yield head


@pytest.fixture(scope="session")
def airflow_db() -> Path:
    """Airflow's metadata database (SQLite in the temporary AIRFLOW_HOME) and its dags folder, for
    `dag.test()`; returns the dags folder."""
    from airflow.configuration import conf
    from airflow.utils.db import initdb

    dags = Path(conf.get("core", "dags_folder"))
    dags.mkdir(parents=True, exist_ok=True)
    for source in [
        *DAG_FOLDER.glob("*.py"),
        DAG_FOLDER / ".airflowignore",
        *(Path(__file__).resolve().parent / "dags").glob("*.py"),
    ]:
        shutil.copy(source, dags / source.name)
    initdb()
    return dags


@pytest.fixture(scope="session")
def augment_config(ray_head, tmp_path_factory) -> dict[str, str]:
    """A real augmentation config for `jobs.augment`: a tiny random model and 16 pictures with a manifest,
    made by the main venv's python (the cluster's: it has torch and sdbatch). Returns the config's
    path and its output root."""
    import subprocess

    root = tmp_path_factory.mktemp("augment")
    make = (
        "import sys; from pathlib import Path; from sd_core.tiny import make_tiny_model; "
        "from jobs.demo import write_dataset; root = Path(sys.argv[1]); "
        "make_tiny_model(root / 'model'); write_dataset(root / 'data')"
    )
    python = str(Path(ray_head.env["PATH"].split(os.pathsep)[0]) / "python")
    subprocess.run([python, "-c", make, str(root)], check=True, env=ray_head.env, timeout=300)
    config = root / "aug.yaml"
    config.write_text(
        f"manifest: {root / 'data' / 'manifest.parquet'}\n"
        f"output: {root / 'out'}\n"
        f"model: {{path: {root / 'model'}}}\n"
        "augment: {variants: 2, prompts: ['a photo of a {label}']}\n"
        "compute: {gpus_per_actor: 0}\n"
    )
    return {"config": str(config), "output": str(root / "out")}
