"""A job's configuration: one YAML file mapped onto frozen dataclasses, `--set` overrides and flags on top.

Precedence, lowest first: dataclass defaults, the YAML file, `--set key.sub=value`, named flags. Every
instance is validated when built, so code that holds a `RunConfig` can trust it. Problems are collected
and raised once as a `ConfigError` that names the file, the key path and where the value came from.

Importing this module stays light (no torch, no sd_core): `--dry-run` and the Ray driver use it.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import hashlib
import json
import math
import string
import types
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from connectors.manifest import COLUMN_RULES, SDXL_COLUMNS, ColumnRule
from connectors.storage import RetryPolicy, StorageOptions
from connectors.uri_policy import root_problem

T = TypeVar("T")
Problem = tuple[str, str]  # (dotted key path, what is wrong and how to fix it)

DTYPES = ("auto", "float32", "float16", "bfloat16")
PROMPT_SYNTAXES = ("plain", "a1111")  # sd_core.text_encoder's
_RULES = {rule.name: rule for rule in COLUMN_RULES}  # per-row limits, shared with manifests
# per-row numbers only SDXL reads, checked by their manifest column rules
SDXL_NUMBERS = tuple(name for name in SDXL_COLUMNS if _RULES[name].kind in ("int", "float"))
PREDICTION_TYPES = ("epsilon", "v_prediction")
OUTPUT_FORMATS = ("png", "jpeg", "webp")
DEVICES = ("auto", "cpu", "cuda")


class ConfigError(ValueError):
    """A configuration that cannot be used; `problems` holds (key path, message) for each thing wrong."""

    def __init__(
        self,
        problems: str | Sequence[Problem],
        source: str | None = None,
        origins: Mapping[str, str] | None = None,
    ):
        listed = (("", problems),) if isinstance(problems, str) else problems
        self.problems: tuple[Problem, ...] = tuple(listed)
        self.source = source
        super().__init__(_format_problems(self.problems, source, origins or {}))


def _format_problems(problems: Sequence[Problem], source: str | None, origins: Mapping[str, str]) -> str:
    lines = [f"invalid configuration{f' in {source}' if source else ''}:"]
    for key, message in problems:
        origin = _origin_of(key, origins)
        label = f"{key} (from {origin})" if key and origin else key
        lines.append(f"  - {label}: {message}" if label else f"  - {message}")
    return "\n".join(lines)


def _origin_of(key: str, origins: Mapping[str, str]) -> str | None:
    """The override or flag that set `key` or the section holding it; None when the value is the file's."""
    while key:
        if key in origins:
            return origins[key]
        key = key[: max(key.rfind("."), key.rfind("["), 0)]
    return None


# -- validation helpers ------------------------------------------------------------------------------


def _bounds(
    name: str,
    value: float,
    low: float | None = None,
    high: float | None = None,
    multiple_of: int | None = None,
    expected: str = "",
) -> Iterator[Problem]:
    """A problem when `value` is not finite, outside [low, high] or not a multiple of `multiple_of`."""
    broken = (
        not math.isfinite(value)
        or (low is not None and value < low)
        or (high is not None and value > high)
        or (multiple_of is not None and value % multiple_of != 0)
    )
    if broken:
        yield name, f"must be {expected or _expected(value, low, high, multiple_of)}, got {value!r}"


def _expected(value: float, low: float | None, high: float | None, multiple_of: int | None) -> str:
    if low is not None and high is not None:
        text = f"in {low}..{high}" if isinstance(value, int) else f"in [{low}, {high}]"
    elif low is not None:
        text = f">= {low}"
    elif high is not None:
        text = f"<= {high}"
    else:
        text = "a finite number"
    return f"a multiple of {multiple_of} {text}" if multiple_of else text


def _choice(name: str, value: str, choices: Sequence[str]) -> Iterator[Problem]:
    if value not in choices:
        suggestion = _did_you_mean(value, choices)
        yield name, f"unknown value {value!r}{suggestion}; choose one of {', '.join(choices)}"


def _did_you_mean(word: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(str(word), list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _rule(name: str, value: Any) -> Iterator[Problem]:
    """Check a per-row default against the manifest column rule of the same name."""
    rule: ColumnRule = _RULES[name]
    if rule.choices:
        yield from _choice(name, value, rule.choices)
    else:
        yield from _bounds(name, value, rule.low, rule.high, rule.multiple_of, rule.expected)


def _length(name: str, value: str | None) -> Iterator[Problem]:
    """Check a per-row default text against the manifest column's max_length."""
    rule: ColumnRule = _RULES[name]
    if value is not None and rule.max_length is not None and len(value) > rule.max_length:
        yield name, rule.length_problem(len(value))


def _not_empty(name: str, value: str) -> Iterator[Problem]:
    if not value.strip():
        yield name, "must not be empty"


class _Checked:
    """Validates on construction: an instance that exists is a valid one."""

    def __post_init__(self) -> None:
        problems = list(self._problems())
        if problems:
            raise ConfigError(problems)

    def _problems(self) -> Iterator[Problem]:
        return iter(())


# -- the configuration -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelConfig(_Checked):
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
        yield from _not_empty("path", self.path)
        if self.scheduler is not None:
            yield from _scheduler_problems(self.scheduler)
        yield from _choice("dtype", self.dtype, DTYPES)
        if self.vae_dtype is not None:
            yield from _choice("vae_dtype", self.vae_dtype, DTYPES)
        if self.prediction_type is not None:
            yield from _choice("prediction_type", self.prediction_type, PREDICTION_TYPES)
        yield from _bounds("clip_skip", self.clip_skip, low=1)


def _scheduler_problems(name: str) -> Iterator[Problem]:
    from sd_core.schedulers import SCHEDULER_NAMES  # imported here: it loads torch, which --dry-run avoids

    yield from _choice("scheduler", name, SCHEDULER_NAMES)


@dataclass(frozen=True)
class LoraConfig(_Checked):
    path: str  # local path or URI of a LoRA file (kohya/A1111 or PEFT/diffusers layout)
    scale: float = 1.0  # strength of the UNet deltas
    text_encoder_scale: float | None = None  # strength of the text-encoder deltas; None = scale

    def _problems(self) -> Iterator[Problem]:
        yield from _not_empty("path", self.path)
        yield from _bounds("scale", self.scale)
        if self.text_encoder_scale is not None:
            yield from _bounds("text_encoder_scale", self.text_encoder_scale)


@dataclass(frozen=True)
class EmbeddingConfig(_Checked):
    path: str  # local path or URI of a textual-inversion embedding
    token: str | None = None  # the prompt token; None = the one stored in the file

    def _problems(self) -> Iterator[Problem]:
        yield from _not_empty("path", self.path)
        if self.token is not None:
            yield from _not_empty("token", self.token)


@dataclass(frozen=True)
class AdaptersConfig:
    loras: tuple[LoraConfig, ...] = ()  # fused into the weights once, in this order
    embeddings: tuple[EmbeddingConfig, ...] = ()


@dataclass(frozen=True)
class RefinerConfig(_Checked):
    """SDXL's refiner: it takes over the schedule at `switch_at` (the fraction of the steps the base runs,
    diffusers' denoising_end/denoising_start), in the same actor, on the same sampler and step count."""

    path: str  # local path or URI of the refiner: a diffusers folder or a single .safetensors checkpoint
    switch_at: float = 0.8
    config: str | None = None  # diffusers folder whose configs a single-file refiner should use
    adapters: AdaptersConfig = field(default_factory=AdaptersConfig)  # the refiner's own

    def _problems(self) -> Iterator[Problem]:
        yield from _not_empty("path", self.path)
        if not 0.0 < self.switch_at < 1.0:
            share = "the base's share of the schedule"
            yield "switch_at", f"must lie strictly between 0 and 1 ({share}), got {self.switch_at!r}"


@dataclass(frozen=True)
class RowDefaults(_Checked):
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
            yield from _length(name, getattr(self, name))
        for name in ("strength", "guidance_scale", "num_inference_steps", "num_images", "resize_mode"):
            yield from _rule(name, getattr(self, name))
        yield from _rule("guidance_rescale", self.guidance_rescale)
        for name in ("width", "height", *SDXL_NUMBERS):
            if getattr(self, name) is not None:
                yield from _rule(name, getattr(self, name))
        yield from _choice("prompt_syntax", self.prompt_syntax, PROMPT_SYNTAXES)
        if (self.original_width is None) != (self.original_height is None):
            yield "original_width", "original_width and original_height go together: set both or neither"
        yield from _bounds("eta", self.eta, low=0.0, high=1.0)
        yield from _choice("output_format", self.output_format, OUTPUT_FORMATS)
        yield from _bounds("quality", self.quality, low=1, high=100)


@dataclass(frozen=True)
class ComputeConfig(_Checked):
    batch_size: int = 4  # images per UNet batch
    rows_per_call: int | None = None  # rows sent to one actor call, grouped by shape there; None = 4x batch
    actors_min: int = 1  # size of the actor pool (Ray autoscales between min and max)
    actors_max: int = 1
    gpus_per_actor: float = 1.0  # 0 = CPU actors
    cpus_per_actor: float = 1.0
    device: str = "auto"  # one of DEVICES; auto = cuda when the actor has a GPU
    rows_per_part: int = 256  # rows per metadata part: fewer, larger parts vs. less redone after a crash

    @property
    def call_rows(self) -> int:
        """Rows per actor call, with the default resolved."""
        return self.rows_per_call if self.rows_per_call is not None else 4 * self.batch_size

    def _problems(self) -> Iterator[Problem]:
        yield from _bounds("batch_size", self.batch_size, low=1)
        if self.rows_per_call is not None:
            yield from _bounds("rows_per_call", self.rows_per_call, low=1)
        yield from _bounds("rows_per_part", self.rows_per_part, low=1)
        yield from _bounds("actors_min", self.actors_min, low=1)
        at_least_min = f">= actors_min ({self.actors_min})"
        yield from _bounds("actors_max", self.actors_max, low=self.actors_min, expected=at_least_min)
        yield from _bounds("gpus_per_actor", self.gpus_per_actor, low=0)
        yield from _bounds("cpus_per_actor", self.cpus_per_actor, low=0)
        yield from _choice("device", self.device, DEVICES)
        if self.device == "cuda" and self.gpus_per_actor == 0:
            yield "device", "cuda needs gpus_per_actor > 0; set gpus_per_actor or use device: cpu"


@dataclass(frozen=True)
class RetryConfig(_Checked):
    retry_rounds: int = 2  # extra passes for rows that failed retryably or never committed (last at batch 1)
    max_task_retries: int = 1  # Ray retries of a task whose actor died
    storage_attempts: int = 6  # tries of one storage operation on transient errors
    storage_budget_s: float = 120.0  # seconds one storage operation may spend retrying

    def _problems(self) -> Iterator[Problem]:
        yield from _bounds("retry_rounds", self.retry_rounds, low=0)
        yield from _bounds("max_task_retries", self.max_task_retries, low=0)
        yield from _bounds("storage_attempts", self.storage_attempts, low=1)
        yield from _bounds("storage_budget_s", self.storage_budget_s, low=0)


@dataclass(frozen=True)
class StorageConfig(_Checked):
    """How storage is reached; credentials never go here (see connectors.storage)."""

    endpoint_url: str | None = None  # S3-compatible stores: SeaweedFS, MinIO, R2, ...
    anonymous: bool = False  # public buckets, no credentials at all
    profile: str | None = None  # a named AWS profile instead of the default chain
    max_pool_connections: int = 64

    def _problems(self) -> Iterator[Problem]:
        yield from _bounds("max_pool_connections", self.max_pool_connections, low=1)
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
class InputsConfig(_Checked):
    """Where manifest rows may read their images: a manifest is user data, these limits are the operator's
    (rules in connectors.uri_policy). Inline image bytes are always allowed."""

    allowed_roots: tuple[str, ...] = ()  # URI prefixes (s3://b/data/, /mnt/data/), schemes (s3://); () = any

    def _problems(self) -> Iterator[Problem]:
        for index, root in enumerate(self.allowed_roots):
            problem = root_problem(root)
            if problem is not None:
                yield f"allowed_roots[{index}]", problem


@dataclass(frozen=True)
class SampledValue(_Checked):
    """A value drawn per variant: one of `values` (a single value = fixed), or uniform in [low, high]."""

    values: tuple[float, ...] = ()
    low: float | None = None
    high: float | None = None

    @property
    def given(self) -> bool:
        return bool(self.values) or self.low is not None

    def _problems(self) -> Iterator[Problem]:
        ranged = (self.low is not None, self.high is not None)
        if self.values and any(ranged):
            yield "", "give either values (to choose from) or low and high (a uniform range), not both"
        elif ranged[0] != ranged[1]:
            yield "", "a uniform range needs both low and high"
        elif self.low is not None and self.high is not None and self.low > self.high:
            yield "", f"low ({self.low}) must be <= high ({self.high})"

    def limits(self) -> tuple[float, ...]:
        """The values any draw lies between or among (for checking them against the column rule)."""
        return self.values if self.values else tuple(v for v in (self.low, self.high) if v is not None)


@dataclass(frozen=True)
class Substitution:
    """Where manifest column `column` holds `value`, its placeholder becomes `text` (e.g. a TI token)."""

    column: str
    value: str
    text: str


@dataclass(frozen=True)
class AugmentConfig(_Checked):
    """Dataset augmentation (`sdbatch augment`): each manifest row becomes `variants` images whose prompt,
    negative prompt, strength and guidance are drawn per variant, stably from (run seed, id, variant)."""

    variants: int = 0  # images per manifest row; 0 = augmentation off
    prompts: tuple[str, ...] = ()  # templates, `{column}` filled from the row; one drawn per variant
    negative_prompts: tuple[str, ...] = ()  # templates too; () = the row's or defaults' negative prompt
    strength: SampledValue = field(default_factory=SampledValue)  # not given: the row's or defaults'
    guidance_scale: SampledValue = field(default_factory=SampledValue)
    substitutions: tuple[Substitution, ...] = ()  # column values replaced before filling templates

    @property
    def enabled(self) -> bool:
        return self.variants > 0

    def template_columns(self) -> list[str]:
        """Manifest columns the templates read, in order of first use."""
        names = [name for text in self.prompts + self.negative_prompts for name in template_fields(text)]
        return list(dict.fromkeys(names))

    def _problems(self) -> Iterator[Problem]:
        yield from _bounds("variants", self.variants, low=0, high=64)
        for key, templates in (("prompts", self.prompts), ("negative_prompts", self.negative_prompts)):
            for index, text in enumerate(templates):
                yield from ((f"{key}[{index}]", problem) for problem in _template_problems(text))
        for name in ("strength", "guidance_scale"):
            for value in getattr(self, name).limits():
                yield from ((f"{name}", message) for _, message in _rule(name, value))
        if self.variants and not self.prompts and self.substitutions:
            yield "substitutions", "substitutions fill prompt templates: add prompts, or remove them"


def template_fields(template: str) -> list[str]:
    """The `{column}` names a prompt template uses, in order (with repeats)."""
    return [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]


def _template_problems(template: str) -> Iterator[str]:
    """A template may hold `{column}` placeholders (plain names) and `{{`/`}}` for literal braces."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as error:
        yield f"{error} in {template!r}; write {{{{ and }}}} for literal braces"
        return
    for _, name, spec, conversion in parsed:
        if name is not None and (not name.isidentifier() or spec or conversion):
            shown = "{" + name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
            yield f"placeholder {shown} in {template!r}: use a plain manifest column name, e.g. {{label}}"
    yield from _length("prompt", template)


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
class RunConfig(_Checked):
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

    def _problems(self) -> Iterator[Problem]:
        yield from _not_empty("manifest", self.manifest)
        yield from _not_empty("output", self.output)
        yield from _bounds("seed", self.seed, _RULES["seed"].low, _RULES["seed"].high)
        yield from _bounds("max_error_rate", self.max_error_rate, low=0.0, high=1.0)
        if self.log_every_s <= 0:
            yield "log_every_s", f"must be > 0, got {self.log_every_s!r}"
        yield from _bounds("contact_sheet_rows", self.contact_sheet_rows, low=0)

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
    problems.append((where, f"expected {_TYPE_NAMES[hint]}, got {_describe(value)}{fix}"))
    return _INVALID


def _build_tuple(item_hint: Any, value: Any, where: str, problems: list[Problem]) -> Any:
    if not isinstance(value, (list, tuple)):
        problems.append((where, f"expected a list, got {_describe(value)}"))
        return _INVALID
    items = tuple(_build(item_hint, item, f"{where}[{i}]", problems) for i, item in enumerate(value))
    return _INVALID if any(item is _INVALID for item in items) else items


def _build_dataclass(cls: type, value: Any, where: str, problems: list[Problem]) -> Any:
    names = [f.name for f in dataclasses.fields(cls)]
    if value is None:  # an empty YAML section (`model:`) means "all defaults"
        value = {}
    if not isinstance(value, Mapping):
        problems.append((where, f"expected a section with keys {', '.join(names)}, got {_describe(value)}"))
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
    how = f" or pass {_FLAG_NAMES[key]}" if key in _FLAG_NAMES else f" or pass --set {key}=..."
    problems.append((key, f"missing required key; set it in the config file{how}"))
    return _INVALID


def _unknown_keys(value: Mapping, names: Sequence[str], where: str) -> Iterator[Problem]:
    for key in value:
        if key not in names:
            yield (
                _join(where, str(key)),
                f"unknown key{_did_you_mean(key, names)}; valid keys here: {', '.join(names)}",
            )


def _has_default(f: dataclasses.Field) -> bool:
    return f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING


def _join(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def _describe(value: Any) -> str:
    if isinstance(value, Mapping):
        return "a section (mapping)"
    if isinstance(value, (list, tuple)):
        return "a list"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# -- file, overrides, flags --------------------------------------------------------------------------


def load_config(
    path: str | None,
    overrides: Sequence[str] = (),
    flags: Mapping[str, Any] | None = None,
) -> RunConfig:
    """Read the YAML file at `path` (None: flags give everything), apply `--set KEY=VALUE` overrides, then
    `flags` ({dotted key path: value}; None values are skipped, lists for the _APPENDED keys are
    appended to the file's), and build a validated RunConfig."""
    data = _read_yaml(path) if path is not None else {}
    origins: dict[str, str] = {}
    for text in overrides:
        key, value = _parse_override(text)
        origin = _override_origin(key, text)
        origins.update(dict.fromkeys(_put(data, key, value, origin), origin))
    for key, value in (flags or {}).items():
        if value is not None:
            origin = _FLAG_NAMES.get(key, f"flag {key}")
            origins.update(dict.fromkeys(_put(data, key, value, origin, append=key in _APPENDED), origin))
    try:
        return from_dict(RunConfig, data)
    except ConfigError as error:
        raise ConfigError(error.problems, source=path, origins=origins) from None


_SECRET_WORDS = ("secret", "passw", "token", "credential", "access_key", "private_key", "api_key")


def _override_origin(key: str, text: str) -> str:
    """How messages name a `--set` override: quoted whole, but a value under a secret-looking key is masked
    (credentials are refused anyway and must not reach logs on the way)."""
    if any(word in key.lower() for word in _SECRET_WORDS):
        return f"--set {key}=***"
    return f"--set {text}"


def _read_yaml(path: str) -> dict[str, Any]:
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
        raise ConfigError(f"expected a mapping of settings at the top, got {_describe(data)}", source=path)
    return data


def _parse_override(text: str) -> tuple[str, Any]:
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


def _put(data: dict[str, Any], key: str, value: Any, origin: str, append: bool = False) -> list[str]:
    """Set dotted `key` in nested `data` (or extend the list there); returns the key paths it set."""
    *sections, leaf = key.split(".")
    node = data
    for depth, name in enumerate(sections):
        if node.get(name) is None:
            node[name] = {}
        node = node[name]
        if not isinstance(node, dict):
            where = ".".join(sections[: depth + 1])
            raise ConfigError(f"{origin}: {where} is {_describe(node)}, not a section; fix the file or key")
    if not append:
        node[leaf] = value
        return [key]
    existing = node.get(leaf) or []
    if not isinstance(existing, list):
        raise ConfigError(f"{origin}: {key} is {_describe(existing)} in the file, not a list")
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


def _as_given(value: Any) -> Any:
    return value


# argparse dest -> (key path in the config, how the flag's text becomes a value)
_FLAGS: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "model": ("model.path", _as_given),
    "manifest": ("manifest", _as_given),
    "output": ("output", _as_given),
    "scheduler": ("model.scheduler", _as_given),
    "steps": ("defaults.num_inference_steps", parse_scalar),
    "strength": ("defaults.strength", parse_scalar),
    "guidance": ("defaults.guidance_scale", parse_scalar),
    "batch_size": ("compute.batch_size", parse_scalar),
    "lora": ("adapters.loras", parse_lora_flag),
    "embedding": ("adapters.embeddings", parse_embedding_flag),
    "storage_endpoint": ("storage.endpoint_url", _as_given),
    "retry_errors": ("retry_errors", _as_given),
    "force": ("force", _as_given),
    "seed": ("seed", parse_scalar),
    "allow_input_root": ("inputs.allowed_roots", _as_given),
}
_FLAG_NAMES = {key: "--" + dest.replace("_", "-") for dest, (key, _) in _FLAGS.items()}  # for messages
_APPENDED = ("adapters.loras", "adapters.embeddings", "inputs.allowed_roots")  # flags extend the file's lists


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the run's flags. Values stay text here; config_from_args parses them so that bad values raise
    ConfigError naming the key rather than argparse's bare usage error."""
    add = parser.add_argument
    add("--config", metavar="PATH", help="YAML configuration file")
    add("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override one setting, e.g. --set compute.batch_size=8 (repeatable)")
    add("--dry-run", action="store_true", help="validate the configuration and the manifest, then stop")
    add("--model", metavar="PATH", help="model.path: diffusers folder or .safetensors checkpoint")
    add("--manifest", metavar="URI", help="Parquet manifest: file, directory, glob or hive prefix")
    add("--output", metavar="URI", help="output root")
    add("--scheduler", metavar="NAME", help="model.scheduler")
    add("--steps", metavar="N", help="defaults.num_inference_steps")
    add("--strength", metavar="X", help="defaults.strength")
    add("--guidance", metavar="X", help="defaults.guidance_scale")
    add("--batch-size", metavar="N", help="compute.batch_size")
    add("--lora", action="append", metavar="PATH[:SCALE]", help="add a LoRA (repeatable)")
    add("--embedding", action="append", metavar="PATH[:TOKEN]", help="add a textual inversion (repeatable)")
    add("--storage-endpoint", metavar="URL", help="storage.endpoint_url for S3-compatible stores")
    add("--retry-errors", action="store_true", default=None, help="rerun rows a previous run failed")
    add("--force", action="store_true", default=None, help="write over an output made with another config")
    add("--seed", metavar="N", help="run seed")
    add("--allow-input-root", action="append", metavar="URI",
        help="inputs.allowed_roots: rows may read images only under these prefixes or schemes (repeatable)")


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """The RunConfig for parsed `add_run_arguments` flags: the file, then --set, then the named flags."""
    flags = {}
    for dest, (key, parse) in _FLAGS.items():
        value = getattr(args, dest, None)
        if value is not None:
            flags[key] = [parse(item) for item in value] if isinstance(value, list) else parse(value)
    return load_config(args.config, args.overrides, flags)
