"""The docs' YAML examples are real configs: each loads through `load_config`, and the reference block in
docs/jobs.md shows the code's defaults (a value that is not the default says `e.g.` in its comment)."""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml

from jobs.config import RunConfig, load_config

REPO = Path(__file__).resolve().parents[1]
DOCS = sorted((REPO / "docs").glob("*.md")) + [REPO / "README.md"]
BLOCK = re.compile(r"^```yaml\n(.*?)^```", re.MULTILINE | re.DOTALL)
REQUIRED = {"manifest": "s3://b/manifest/", "output": "s3://b/out", "model": {"path": "s3://b/model"}}
RUN_KEYS = {f.name for f in dataclasses.fields(RunConfig)}
# keys the reference block must set whatever their value: there is no default to show
NO_DEFAULT = {"manifest", "output", "model.path", "refiner.path"}


def yaml_blocks() -> list[tuple[str, str]]:
    return [
        (f"{path.relative_to(REPO)}#{number}", text)
        for path in DOCS
        for number, text in enumerate(BLOCK.findall(path.read_text()))
    ]


def job_config_blocks() -> list[tuple[str, str]]:
    """The blocks that are job configs (every top-level key a RunConfig key); others are not ours."""
    blocks = []
    for name, text in yaml_blocks():
        data = yaml.safe_load(text)
        if isinstance(data, dict) and set(data) <= RUN_KEYS:
            blocks.append((name, text))
    return blocks


def test_the_docs_have_job_config_examples():
    names = [name for name, _ in job_config_blocks()]
    assert any(name.startswith("docs/jobs.md") for name in names) and len(names) >= 2, names


@pytest.mark.parametrize(("name", "text"), job_config_blocks(), ids=[n for n, _ in job_config_blocks()])
def test_every_yaml_example_in_the_docs_loads(name, text, tmp_path):
    data = yaml.safe_load(text)
    for key, value in REQUIRED.items():  # a section-only example ("aug.yaml: a job config plus this")
        if key == "model":
            data.setdefault("model", {}).setdefault("path", value["path"])
        else:
            data.setdefault(key, value)
    path = tmp_path / "example.yaml"
    path.write_text(yaml.safe_dump(data))
    load_config(str(path))  # raises ConfigError naming the key if the docs drifted from the code


def test_the_reference_block_shows_the_code_defaults():
    text = BLOCK.findall((REPO / "docs" / "jobs.md").read_text())[0]
    data = yaml.safe_load(text)
    marked = _example_lines(text)
    wrong = []
    for path, value in _leaves(data):
        if path in NO_DEFAULT or path in marked:
            continue
        default = _default(RunConfig, path.split("."))
        if _plain(default) != value:
            wrong.append(f"{path}: docs {value!r}, code {_plain(default)!r}")
    assert not wrong, "docs/jobs.md's reference block differs from the code's defaults:\n" + "\n".join(wrong)


def test_the_reference_block_lists_every_setting():
    data = yaml.safe_load(BLOCK.findall((REPO / "docs" / "jobs.md").read_text())[0])
    documented = {path for path, _ in _leaves(data)}
    skipped = {"augment"}  # its own section in docs/deploy.md (dataset augmentation)
    missing = [path for path in _setting_paths(RunConfig) if path not in documented]
    missing = [path for path in missing if path.split(".")[0] not in skipped]
    assert not missing, missing


def _example_lines(text: str) -> set[str]:
    """Key paths whose line comment starts with `e.g.` (indentation gives the nesting)."""
    stack: list[tuple[int, str]] = []
    marked = set()
    for line in text.splitlines():
        match = re.match(r"^(\s*)([A-Za-z_0-9]+):(.*)$", line)
        if not match:
            continue
        indent, key, rest = len(match[1]), match[2], match[3]
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, key))
        if re.search(r"#\s*e\.g\.", rest):
            marked.add(".".join(name for _, name in stack))
    return marked


def _leaves(data: Any, prefix: str = "") -> list[tuple[str, Any]]:
    leaves = []
    for key, value in data.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value and path != "refiner.adapters":
            leaves.extend(_leaves(value, path + "."))
        else:
            leaves.append((path, value))
    return leaves


def _field(cls: type, name: str) -> dataclasses.Field:
    return next(f for f in dataclasses.fields(cls) if f.name == name)


def _section_class(cls: type, name: str) -> Any:
    """The dataclass of section `name` (a `X | None` section too); other hints as they are."""
    hint = typing.get_type_hints(cls)[name]
    if typing.get_origin(hint) is tuple:
        return hint
    options = [arg for arg in typing.get_args(hint) if dataclasses.is_dataclass(arg)]
    return options[0] if options else hint


def _default(cls: type, path: list[str]) -> Any:
    name, rest = path[0], path[1:]
    if rest:
        return _default(_section_class(cls, name), rest)
    f = _field(cls, name)
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def _setting_paths(cls: type, prefix: str = "") -> list[str]:
    paths = []
    for f in dataclasses.fields(cls):
        section = _section_class(cls, f.name)
        if dataclasses.is_dataclass(section) and f"{prefix}{f.name}" != "refiner.adapters":
            paths.extend(_setting_paths(section, f"{prefix}{f.name}."))
        else:
            paths.append(f"{prefix}{f.name}")
    return paths


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, tuple):
        return [_plain(item) for item in value]
    return value
