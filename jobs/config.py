"""A job's configuration: one YAML file mapped onto frozen dataclasses, `--set` overrides and flags on top.

Precedence, lowest first: dataclass defaults, the YAML file, `--set key.sub=value`, named flags. Every
instance is validated when built, so code that holds a `RunConfig` can trust it. Problems are collected
and raised once as a `ConfigError` that names the file, the key path and where the value came from.

Importing this module stays light (no torch, no sd_core): `--dry-run` and the Ray driver use it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar, Union, get_args, get_origin, get_type_hints

from connectors.manifest import SDXL_COLUMNS
from connectors.storage import RetryPolicy, StorageOptions
from connectors.uri_policy import root_problem
from jobs.augment_config import AugmentConfig
from jobs.config_checks import (
    RULES,
    Checked,
    ConfigError,
    Problem,
    bounds,
    choice,
    column_rule,
    described,
    did_you_mean,
    not_empty,
    text_length,
)
from jobs.config_sources import (
    APPENDED,
    FLAG_NAMES,
    override_origin,
    parse_override,
    put_value,
    read_yaml,
)

T = TypeVar("T")

DTYPES = ("auto", "float32", "float16", "bfloat16")
PROMPT_SYNTAXES = ("plain", "a1111")  # sd_core.text_encoder's
# per-row numbers only SDXL reads, checked by their manifest column rules
SDXL_NUMBERS = tuple(name for name in SDXL_COLUMNS if RULES[name].kind in ("int", "float"))
PREDICTION_TYPES = ("epsilon", "v_prediction")
OUTPUT_FORMATS = ("png", "jpeg", "webp")
DEVICES = ("auto", "cpu", "cuda")


# -- the configuration -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelConfig(Checked):
    path: str  # local path or URI of a diffusers folder or a single .safetensors checkpoint
    scheduler: str | None = None  # a name from sd_core.schedulers.SCHEDULER_NAMES; None = the model's own
    dtype: str = "auto"  # one of DTYPES; auto = bfloat16 on GPU, float32 on CPU
    vae_dtype: str | None = None  # one of DTYPES; None = same as dtype
    allow_pickle: bool = False  # load pickled .ckpt/.pt files (runs code from the file: trusted files only)
    prediction_type: str | None = None  # one of PREDICTION_TYPES; None = the scheduler config's
    config: str | None = None  # diffusers folder whose configs a single-file checkpoint should use
    clip_skip: int = 1  # 1 = the text encoder's last layer; 2 = the one before it, ...
    compile: bool = False  # torch.compile the UNet (a speed setting: left out of the fingerprint)

    def _problems(self) -> Iterator[Problem]:
        yield from not_empty("path", self.path)
        if self.scheduler is not None:
            yield from _scheduler_problems(self.scheduler)
        yield from choice("dtype", self.dtype, DTYPES)
        if self.vae_dtype is not None:
            yield from choice("vae_dtype", self.vae_dtype, DTYPES)
        if self.prediction_type is not None:
            yield from choice("prediction_type", self.prediction_type, PREDICTION_TYPES)
        yield from bounds("clip_skip", self.clip_skip, low=1)


def _scheduler_problems(name: str) -> Iterator[Problem]:
    from sd_core.schedulers import SCHEDULER_NAMES  # imported here: it loads torch, which --dry-run avoids

    yield from choice("scheduler", name, SCHEDULER_NAMES)


@dataclass(frozen=True)
class LoraConfig(Checked):
    path: str  # local path or URI of a LoRA file (kohya/A1111 or PEFT/diffusers layout)
    scale: float = 1.0  # strength of the UNet deltas
    text_encoder_scale: float | None = None  # strength of the text-encoder deltas; None = scale

    def _problems(self) -> Iterator[Problem]:
        yield from not_empty("path", self.path)
        yield from bounds("scale", self.scale)
        if self.text_encoder_scale is not None:
            yield from bounds("text_encoder_scale", self.text_encoder_scale)


@dataclass(frozen=True)
class EmbeddingConfig(Checked):
    path: str  # local path or URI of a textual-inversion embedding
    token: str | None = None  # the prompt token; None = the one stored in the file

    def _problems(self) -> Iterator[Problem]:
        yield from not_empty("path", self.path)
        if self.token is not None:
            yield from not_empty("token", self.token)


@dataclass(frozen=True)
class AdaptersConfig:
    loras: tuple[LoraConfig, ...] = ()  # fused into the weights once, in this order
    embeddings: tuple[EmbeddingConfig, ...] = ()


@dataclass(frozen=True)
class RefinerConfig(Checked):
    """SDXL's refiner: it takes over the schedule at `switch_at` (the fraction of the steps the base runs,
    diffusers' denoising_end/denoising_start), in the same actor, on the same sampler and step count."""

    path: str  # local path or URI of the refiner: a diffusers folder or a single .safetensors checkpoint
    switch_at: float = 0.8
    config: str | None = None  # diffusers folder whose configs a single-file refiner should use
    adapters: AdaptersConfig = field(default_factory=AdaptersConfig)  # the refiner's own

    def _problems(self) -> Iterator[Problem]:
        yield from not_empty("path", self.path)
        if not 0.0 < self.switch_at < 1.0:
            share = "the base's share of the schedule"
            yield "switch_at", f"must lie strictly between 0 and 1 ({share}), got {self.switch_at!r}"


@dataclass(frozen=True)
class RowDefaults(Checked):
    """Per-row values used where the manifest lacks the column or the row holds null."""

    prompt: str | None = None  # None: a row without a prompt is an error
    negative_prompt: str = ""
    strength: float = 0.75  # how much of the input image is replaced by noise
    guidance_scale: float = 7.5  # classifier-free guidance; <= 1 turns it off
    num_inference_steps: int = 30  # steps of the full schedule; img2img runs about strength times these
    num_images: int = 1  # images per row, each with its own seed
    width: int | None = None  # None: from the input image, keeping its aspect ratio if the other side is set
    height: int | None = None
    resize_mode: str = "just_resize"  # fitting an input to width x height: manifest.RESIZE_MODES
    eta: float = 0.0  # DDIM-family noise; 0 = deterministic
    output_format: str = "png"  # one of OUTPUT_FORMATS
    quality: int = 95  # jpeg/webp encoder quality
    guidance_rescale: float = 0.0  # Lin et al.'s CFG rescale (diffusers' guidance_rescale); 0 = off
    prompt_syntax: str = "plain"  # PROMPT_SYNTAXES: diffusers' plain prompts or A1111's weights and chunks
    # SDXL only (a run of another family refuses them): the second text encoder's prompts (None: the
    # first's), the refiner's aesthetic scores (None: 6.0 / 2.5), the micro-conditioning's original size
    # (None: the output's size) and crop (None: 0, 0), in pixels
    prompt_2: str | None = None
    negative_prompt_2: str | None = None
    aesthetic_score: float | None = None
    negative_aesthetic_score: float | None = None
    original_width: int | None = None
    original_height: int | None = None
    crop_top: int | None = None
    crop_left: int | None = None

    def _problems(self) -> Iterator[Problem]:
        for name in ("prompt", "negative_prompt", "prompt_2", "negative_prompt_2"):
            yield from text_length(name, getattr(self, name))
        for name in ("strength", "guidance_scale", "num_inference_steps", "num_images", "resize_mode"):
            yield from column_rule(name, getattr(self, name))
        yield from column_rule("guidance_rescale", self.guidance_rescale)
        for name in ("width", "height", *SDXL_NUMBERS):
            if getattr(self, name) is not None:
                yield from column_rule(name, getattr(self, name))
        yield from choice("prompt_syntax", self.prompt_syntax, PROMPT_SYNTAXES)
        if (self.original_width is None) != (self.original_height is None):
            yield "original_width", "original_width and original_height go together: set both or neither"
        yield from bounds("eta", self.eta, low=0.0, high=1.0)
        yield from choice("output_format", self.output_format, OUTPUT_FORMATS)
        yield from bounds("quality", self.quality, low=1, high=100)


@dataclass(frozen=True)
class ComputeConfig(Checked):
    """The denoise actor pool. Unset sizes are resolved from the cluster when the run starts
    (jobs/resources.py): GPU actors when the cluster has GPUs, CPU actors otherwise, up to all of them."""

    batch_size: int = 4  # images per UNet batch
    rows_per_call: int | None = None  # rows sent to one actor call, grouped by shape there; None = 4x batch
    actors_min: int = 1  # size of the actor pool: Ray autoscales it between min and max
    actors_max: int | None = None  # None = every GPU the cluster offers (CPU-only cluster: its CPUs)
    gpus_per_actor: float | None = None  # None = 1 if the cluster has GPUs, else 0 (device auto); 0 = CPU
    cpus_per_actor: float = 1.0
    device: str = "auto"  # one of DEVICES; auto = cuda when the actor has a GPU
    rows_per_part: int = 256  # rows per metadata part: fewer, larger parts vs. less redone after a crash

    @property
    def call_rows(self) -> int:
        """Rows per actor call, with the default resolved."""
        return self.rows_per_call if self.rows_per_call is not None else 4 * self.batch_size

    def _problems(self) -> Iterator[Problem]:
        yield from bounds("batch_size", self.batch_size, low=1)
        if self.rows_per_call is not None:
            yield from bounds("rows_per_call", self.rows_per_call, low=1)
        yield from bounds("rows_per_part", self.rows_per_part, low=1)
        yield from bounds("actors_min", self.actors_min, low=1)
        if self.actors_max is not None:
            at_least_min = f">= actors_min ({self.actors_min})"
            yield from bounds("actors_max", self.actors_max, low=self.actors_min, expected=at_least_min)
        if self.gpus_per_actor is not None:
            yield from bounds("gpus_per_actor", self.gpus_per_actor, low=0)
        yield from bounds("cpus_per_actor", self.cpus_per_actor, low=0)
        yield from choice("device", self.device, DEVICES)
        if self.device == "cuda" and self.gpus_per_actor == 0:
            yield "device", "cuda needs gpus_per_actor > 0; set gpus_per_actor or use device: cpu"
        if self.device == "cpu" and self.gpus_per_actor:
            fix = "set gpus_per_actor: 0 (or leave it unset) or use device: auto"
            yield "device", f"cpu actors take no GPU; {fix}"


@dataclass(frozen=True)
class RetryConfig(Checked):
    retry_rounds: int = 2  # extra passes for rows that failed retryably or never committed (last at batch 1)
    max_task_retries: int = 1  # Ray retries of a task whose actor died
    storage_attempts: int = 6  # tries of one storage operation on transient errors
    storage_budget_s: float = 120.0  # seconds one storage operation may spend retrying

    def _problems(self) -> Iterator[Problem]:
        yield from bounds("retry_rounds", self.retry_rounds, low=0)
        yield from bounds("max_task_retries", self.max_task_retries, low=0)
        yield from bounds("storage_attempts", self.storage_attempts, low=1)
        yield from bounds("storage_budget_s", self.storage_budget_s, low=0)


@dataclass(frozen=True)
class StorageConfig(Checked):
    """How storage is reached; credentials never go here (see connectors.storage)."""

    endpoint_url: str | None = None  # S3-compatible stores: SeaweedFS, MinIO, R2, ...
    anonymous: bool = False  # public buckets, no credentials at all
    profile: str | None = None  # a named AWS profile instead of the default chain
    max_pool_connections: int = 64

    def _problems(self) -> Iterator[Problem]:
        yield from bounds("max_pool_connections", self.max_pool_connections, low=1)
        if self.anonymous and self.profile is not None:
            yield "anonymous", "anonymous access uses no profile; set anonymous: false or remove profile"

    def to_options(self, retry: RetryConfig) -> StorageOptions:
        policy = RetryPolicy(attempts=retry.storage_attempts, budget_s=retry.storage_budget_s)
        return StorageOptions(
            endpoint_url=self.endpoint_url,
            anonymous=self.anonymous,
            profile=self.profile,
            max_pool_connections=self.max_pool_connections,
            retry=policy,
        )


@dataclass(frozen=True)
class InputsConfig(Checked):
    """Where manifest rows may read their images: a manifest is user data, these limits are the operator's
    (rules in connectors.uri_policy). Inline image bytes are always allowed."""

    allowed_roots: tuple[str, ...] = ()  # URI prefixes (s3://b/data/, /mnt/data/), schemes (s3://); () = any

    def _problems(self) -> Iterator[Problem]:
        for index, root in enumerate(self.allowed_roots):
            problem = root_problem(root)
            if problem is not None:
                yield f"allowed_roots[{index}]", problem


_OUTPUT_SHAPING = ("model", "refiner", "adapters", "defaults", "seed", "augment")  # what fingerprint() covers
# Settings added after outputs were written without them: left out of the fingerprint while they hold
# these values, so those outputs keep theirs (and resume).
_LATER_DEFAULTS = {
    "defaults": {
        "guidance_rescale": 0.0,
        "prompt_syntax": "plain",
        **dict.fromkeys(("prompt_2", "negative_prompt_2", *SDXL_NUMBERS)),
    },
}


@dataclass(frozen=True)
class RunConfig(Checked):
    manifest: str  # Parquet file, directory, glob or hive prefix
    output: str  # output root URI
    model: ModelConfig
    adapters: AdaptersConfig = field(default_factory=AdaptersConfig)
    defaults: RowDefaults = field(default_factory=RowDefaults)
    compute: ComputeConfig = field(default_factory=ComputeConfig)
    retry: RetryConfig = field(default_factory=RetryConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    inputs: InputsConfig = field(default_factory=InputsConfig)  # which rows may run: not fingerprinted
    augment: AugmentConfig = field(default_factory=AugmentConfig)  # `sdbatch augment` runs only
    refiner: RefinerConfig | None = None  # SDXL: a refiner taking over the last part of the schedule
    seed: int = 0  # run seed; a row without a seed column value derives its own from this and its id
    max_error_rate: float = 0.01  # exit code 0 only when failed rows / rows <= this
    retry_errors: bool = False  # rerun rows that a previous run recorded as failed
    force: bool = False  # write into an output made with a different fingerprint
    log_every_s: float = 10.0  # progress log interval
    contact_sheet_rows: int = 16  # rows on the contact sheet; 0 = none
    contact_sheet_title: str | None = None  # the contact sheet's heading; None = "sdbatch · {output}"

    def _problems(self) -> Iterator[Problem]:
        yield from not_empty("manifest", self.manifest)
        yield from not_empty("output", self.output)
        yield from bounds("seed", self.seed, RULES["seed"].low, RULES["seed"].high)
        yield from bounds("max_error_rate", self.max_error_rate, low=0.0, high=1.0)
        if self.log_every_s <= 0:
            yield "log_every_s", f"must be > 0, got {self.log_every_s!r}"
        yield from bounds("contact_sheet_rows", self.contact_sheet_rows, low=0)

    def to_dict(self) -> dict[str, Any]:
        """A plain JSON-ready copy for `_run.json` and logs (the config holds no secrets by design)."""
        return _plain(self)

    def fingerprint(self) -> str:
        """sha256 of the settings that shape the images (model, adapters, defaults, seed), not of where
        they go or how fast; a run refuses to write into an output made with a different fingerprint."""
        shaping = {name: value for name, value in self.to_dict().items() if name in _OUTPUT_SHAPING}
        del shaping["model"]["compile"]
        if not self.augment.enabled:  # so outputs written before augmentation existed keep their print
            del shaping["augment"]
        if self.refiner is None:
            del shaping["refiner"]
        for section, later in _LATER_DEFAULTS.items():
            for name, value in later.items():
                if shaping[section][name] == value:
                    del shaping[section][name]
        text = json.dumps(shaping, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (tuple, list)):
        return [_plain(item) for item in value]
    return value


# -- plain data -> dataclasses -----------------------------------------------------------------------

_INVALID: Any = object()  # a value that could not be built; its problem is already recorded
_TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def from_dict(cls: type[T], data: Any, where: str = "") -> T:
    """Build dataclass `cls` from plain (YAML) data by its type hints; one ConfigError lists every problem.

    Handles nested dataclasses, `X | None`, `tuple[X, ...]` and bool/int/float/str; ints are accepted
    for floats, bools are not accepted as numbers, unknown keys are errors.
    """
    problems: list[Problem] = []
    built = _build(cls, data, where, problems)
    if problems:
        raise ConfigError(problems)
    return built


def _build(hint: Any, value: Any, where: str, problems: list[Problem]) -> Any:
    if dataclasses.is_dataclass(hint):
        return _build_dataclass(hint, value, where, problems)
    origin = get_origin(hint)
    if origin in (Union, types.UnionType):
        options = [arg for arg in get_args(hint) if arg is not type(None)]
        if value is None and len(options) < len(get_args(hint)):
            return None
        (inner,) = options
        return _build(inner, value, where, problems)
    if origin is tuple:
        return _build_tuple(get_args(hint)[0], value, where, problems)
    return _build_scalar(hint, value, where, problems)


def _build_scalar(hint: type, value: Any, where: str, problems: list[Problem]) -> Any:
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is float and numeric:
        return float(value)
    if isinstance(value, hint) and not (hint is int and isinstance(value, bool)):
        return value
    quote = hint is str and (numeric or isinstance(value, bool))
    fix = " (quote it in YAML to keep it text)" if quote else ""
    problems.append((where, f"expected {_TYPE_NAMES[hint]}, got {described(value)}{fix}"))
    return _INVALID


def _build_tuple(item_hint: Any, value: Any, where: str, problems: list[Problem]) -> Any:
    if not isinstance(value, (list, tuple)):
        problems.append((where, f"expected a list, got {described(value)}"))
        return _INVALID
    items = tuple(_build(item_hint, item, f"{where}[{i}]", problems) for i, item in enumerate(value))
    return _INVALID if any(item is _INVALID for item in items) else items


def _build_dataclass(cls: type, value: Any, where: str, problems: list[Problem]) -> Any:
    names = [f.name for f in dataclasses.fields(cls)]
    if value is None:  # an empty YAML section (`model:`) means "all defaults"
        value = {}
    if not isinstance(value, Mapping):
        problems.append((where, f"expected a section with keys {', '.join(names)}, got {described(value)}"))
        return _INVALID
    found = len(problems)
    problems.extend(_unknown_keys(value, names, where))
    hints = get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        key = _join(where, f.name)
        if f.name in value:
            kwargs[f.name] = _build(hints[f.name], value[f.name], key, problems)
        elif not _has_default(f):
            kwargs[f.name] = _build_missing(hints[f.name], key, problems)
    if len(problems) > found:
        return _INVALID
    try:
        return cls(**kwargs)
    except ConfigError as error:
        problems.extend((_join(where, key), message) for key, message in error.problems)
        return _INVALID


def _build_missing(hint: Any, key: str, problems: list[Problem]) -> Any:
    """A required section is built from nothing, so the problem names the keys it lacks (model.path)."""
    if dataclasses.is_dataclass(hint):
        return _build_dataclass(hint, {}, key, problems)
    how = f" or pass {FLAG_NAMES[key]}" if key in FLAG_NAMES else f" or pass --set {key}=..."
    problems.append((key, f"missing required key; set it in the config file{how}"))
    return _INVALID


def _unknown_keys(value: Mapping, names: Sequence[str], where: str) -> Iterator[Problem]:
    for key in value:
        if key not in names:
            yield (
                _join(where, str(key)),
                f"unknown key{did_you_mean(key, names)}; valid keys here: {', '.join(names)}",
            )


def _has_default(f: dataclasses.Field) -> bool:
    return f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING


def _join(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


# -- file, overrides, flags --------------------------------------------------------------------------


def load_config(
    path: str | None,
    overrides: Sequence[str] = (),
    flags: Mapping[str, Any] | None = None,
) -> RunConfig:
    """Read the YAML file at `path` (None: flags give everything), layer the overrides and flags on it
    (`layer_settings`), and build a validated RunConfig."""
    data = read_yaml(path) if path is not None else {}
    origins = layer_settings(data, overrides, flags)
    try:
        return from_dict(RunConfig, data)
    except ConfigError as error:
        raise ConfigError(error.problems, source=path, origins=origins) from None


def layer_settings(
    data: dict[str, Any], overrides: Sequence[str] = (), flags: Mapping[str, Any] | None = None
) -> dict[str, str]:
    """Apply `--set KEY=VALUE` overrides, then `flags` ({dotted key path: value}; None values are skipped,
    lists for the APPENDED keys are appended to the data's), to nested settings `data` in place; returns
    {key path: the override or flag that set it}, for messages."""
    origins: dict[str, str] = {}
    for text in overrides:
        key, value = parse_override(text)
        origin = override_origin(key, text)
        origins.update(dict.fromkeys(put_value(data, key, value, origin), origin))
    for key, value in (flags or {}).items():
        if value is not None:
            origin = FLAG_NAMES.get(key, f"flag {key}")
            keys = put_value(data, key, value, origin, append=key in APPENDED)
            origins.update(dict.fromkeys(keys, origin))
    return origins
