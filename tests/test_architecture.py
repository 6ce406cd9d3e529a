"""The layering rules of the codebase, checked on the source itself."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def python_files(*folders: str) -> list[Path]:
    return [p for folder in folders for p in sorted((ROOT / folder).rglob("*.py"))]


@pytest.mark.parametrize("path", python_files("sd_core"), ids=lambda p: str(p.relative_to(ROOT)))
def test_sd_core_knows_nothing_of_ray_or_storage(path):
    forbidden = {"ray", "fsspec", "s3fs", "pyarrow", "connectors", "jobs", "diffusers"}
    assert not imported_modules(path) & forbidden


@pytest.mark.parametrize(
    "path", python_files("sd_core", "connectors", "jobs"), ids=lambda p: str(p.relative_to(ROOT))
)
def test_diffusers_only_in_tests_and_bench(path):
    assert "diffusers" not in imported_modules(path)
