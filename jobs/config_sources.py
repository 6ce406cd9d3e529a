"""Where a configuration's values come from, as text: the YAML file, `--set KEY=VALUE` overrides, and
the named flags (the FLAGS table: which keys each sets and how its text becomes a value, e.g.
`--lora PATH[:SCALE]`, `--actors N|MIN-MAX`); values are put into one nested dict."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import yaml

from jobs.config_checks import ConfigError, described

_SECRET_WORDS = ("secret", "passw", "token", "credential", "access_key", "private_key", "api_key")


def override_origin(key: str, text: str) -> str:
    """How messages name a `--set` override: quoted whole, but a value under a secret-looking key is masked
    (credentials are refused anyway and must not reach logs on the way)."""
    if any(word in key.lower() for word in _SECRET_WORDS):
        return f"--set {key}=***"
    return f"--set {text}"


def read_yaml(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as file:
            data = yaml.safe_load(file)
    except FileNotFoundError:
        raise ConfigError("config file not found; check the --config path", source=path) from None
    except yaml.YAMLError as error:
        raise ConfigError(f"not valid YAML: {error}", source=path) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"expected a mapping of settings at the top, got {described(data)}", source=path)
    return data


def parse_override(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or not all(key.split(".")):
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE with a dotted key, e.g. compute.batch_size=8")
    return key, parse_scalar(raw)


def parse_scalar(text: str) -> Any:
    """A YAML scalar (`8` -> 8, `true` -> True, `null` -> None); text YAML would read as a list or a
    mapping (a prompt holding ': ') stays text."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    return text if isinstance(value, (dict, list)) else value


def put_value(data: dict[str, Any], key: str, value: Any, origin: str, append: bool = False) -> list[str]:
    """Set dotted `key` in nested `data` (or extend the list there); returns the key paths it set."""
    *sections, leaf = key.split(".")
    node = data
    for depth, name in enumerate(sections):
        if node.get(name) is None:
            node[name] = {}
        node = node[name]
        if not isinstance(node, dict):
            where = ".".join(sections[: depth + 1])
            raise ConfigError(f"{origin}: {where} is {described(node)}, not a section; fix the file or key")
    if not append:
        node[leaf] = value
        return [key]
    existing = node.get(leaf) or []
    if not isinstance(existing, list):
        raise ConfigError(f"{origin}: {key} is {described(existing)} in the file, not a list")
    node[leaf] = [*existing, *value]
    return [f"{key}[{i}]" for i in range(len(existing), len(node[leaf]))]


def parse_lora_flag(text: str) -> dict[str, Any]:
    """`PATH[:SCALE]`: the last ':' splits off a scale only when a number follows, so URIs keep theirs."""
    path, scale = _split_suffix(text, "--lora", _is_float)
    return {"path": path} if scale is None else {"path": path, "scale": float(scale)}


def parse_embedding_flag(text: str) -> dict[str, Any]:
    """`PATH[:TOKEN]`: the last ':' splits off a token only when no '/' follows (s3://b/x.pt has one)."""
    path, token = _split_suffix(text, "--embedding", lambda tail: "/" not in tail)
    return {"path": path} if token is None else {"path": path, "token": token}


def _split_suffix(text: str, flag: str, is_suffix: Callable[[str], bool]) -> tuple[str, str | None]:
    head, sep, tail = text.rpartition(":")
    if sep and not tail:
        raise ConfigError(f"{flag} {text!r}: nothing follows the last ':'; remove it or add the value")
    if not sep or not is_suffix(tail):
        head, tail = text, None
    if not head.strip():
        raise ConfigError(f"{flag} {text!r}: the path is empty; expected PATH or PATH:VALUE")
    return head, tail


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


# -- the named flags -----------------------------------------------------------------------------------


def _as_given(value: Any) -> Any:
    return value


def parse_actors_flag(text: str) -> tuple[int, int]:
    """`--actors N` (exactly N actors) or `--actors MIN-MAX` (Ray autoscales the pool between them)."""
    low, dash, high = text.partition("-")
    try:
        sizes = (int(low), int(high) if dash else int(low))
    except ValueError:
        sizes = (0, 0)
    if not 1 <= sizes[0] <= sizes[1]:
        raise ConfigError(
            f"--actors {text!r}: expected N or MIN-MAX, whole numbers with 1 <= MIN <= MAX (e.g. --actors 4, "
            "--actors 1-8); leave it out to use every GPU the cluster has"
        )
    return sizes


# sd_core.schedulers.SCHEDULER_NAMES, copied for --help (importing sd_core loads torch); a test checks it
SCHEDULERS = ("ddim", "pndm", "euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras", "lms", "unipc")


def flag_keys(keys: str | tuple[str, ...]) -> tuple[str, ...]:
    """The key paths of one FLAGS entry."""
    return (keys,) if isinstance(keys, str) else keys


# argparse dest -> (key path, or the key paths a flag sets together, in the config; how its text becomes
# the value, or the tuple of values)
FLAGS: dict[str, tuple[str | tuple[str, ...], Callable[[Any], Any]]] = {
    "model": ("model.path", _as_given),
    "manifest": ("manifest", _as_given),
    "output": ("output", _as_given),
    "scheduler": ("model.scheduler", _as_given),
    "steps": ("defaults.num_inference_steps", parse_scalar),
    "strength": ("defaults.strength", parse_scalar),
    "guidance": ("defaults.guidance_scale", parse_scalar),
    "seed": ("seed", parse_scalar),
    "lora": ("adapters.loras", parse_lora_flag),
    "embedding": ("adapters.embeddings", parse_embedding_flag),
    "batch_size": ("compute.batch_size", parse_scalar),
    "actors": (("compute.actors_min", "compute.actors_max"), parse_actors_flag),
    "storage_endpoint": ("storage.endpoint_url", _as_given),
    "storage_profile": ("storage.profile", _as_given),
    "storage_anonymous": ("storage.anonymous", _as_given),
    "retry_errors": ("retry_errors", _as_given),
    "force": ("force", _as_given),
    "allow_input_root": ("inputs.allowed_roots", _as_given),
}
FLAG_NAMES = {key: "--" + dest.replace("_", "-") for dest, (ks, _) in FLAGS.items() for key in flag_keys(ks)}
APPENDED = ("adapters.loras", "adapters.embeddings", "inputs.allowed_roots")  # flags extend the file's lists
