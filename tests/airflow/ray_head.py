"""The real local Ray cluster of the Airflow tests: tests/ray_services.RayCluster, started from the main
venv's `ray` (.venv/bin), whose `python` is first on the cluster's PATH, so job entrypoints run with the
project installed; the Airflow venv only talks to it over the Jobs API.

tests/ray_services.py is loaded by its path: this folder is its own pytest root (the main suite's
conftest imports torch), so `tests` is not an importable package here.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def _ray_services():
    path = REPO_ROOT / "tests" / "ray_services.py"
    spec = importlib.util.spec_from_file_location("sdbatch_ray_services", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def ray_bin_dir() -> Path:
    """The main venv's bin (the project's Ray), else this interpreter's (the Airflow venv has ray too)."""
    main = REPO_ROOT / ".venv" / "bin"
    return main if (main / "ray").exists() else Path(sys.executable).parent


def RayHead(num_cpus: int = 2):  # noqa: N802 - used like the class it builds
    """A started cluster with no extra environment; a context manager that stops it."""
    return _ray_services().RayCluster({}, num_cpus=num_cpus, bin_dir=ray_bin_dir())
