"""Refuse a model or adapters that the actors could not load, on the driver, before any work starts.

The actors load the model and adapters with sd_core (jobs/model_setup.py). Here the same sd_core rules
answer the same questions from what is cheap to read: the model's file names, config.json files and
safetensors header (never its weights), and the adapter files themselves (they are small). The model's
family (SD 1.x, SD 2.x, SDXL base or refiner) comes from its configs or its header as the loader tells
it; LoRA targets and shapes, and embedding widths, are checked against the family's UNet and text towers
built on torch's meta device from the configs the loader would use. An adapter made for another family
is refused naming both: a LoRA whose text-encoder keys are another family's (`lora_te_` for SD 1.x/2.x,
`lora_te1_`/`lora_te2_` for SDXL), an embedding of the other kind (one tensor for SD 1.x/2.x, clip_l +
clip_g for SDXL). An SDXL refiner section (`refiner:`) is checked the same way with its own adapters.
torch is imported only when adapters are configured, so a dry run of a plain model stays light.

LoRA rule: the job fuses LoRAs strictly (PipelineFactory -> `load_loras`, strict=True), so a LoRA with
any key that patches no layer of the model is refused, as the load would refuse it. A LoRA that patches
nothing at all (an empty file) is refused too, although the core would fuse it silently as a no-op.
Not checked here: the model's weights against its configs, and embedding tokens against the model's
tokenizer vocabulary (only against each other).
"""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from connectors.storage import Storage, join_uri
from jobs.config import AdaptersConfig, EmbeddingConfig, LoraConfig, RunConfig
from jobs.plan import PlanError
from sd_core.families import FAMILIES, UNET_PREFIX, VAE_PREFIX, ModelFamily, detect_family, family_of_configs
from sd_core.model_files import (
    SAFETENSORS_LENGTH_BYTES,
    TEXT_FOLDERS,
    PickleRefused,
    check_weight_format,
    component_weight_file,
    parse_safetensors_header,
    present_text_folders,
    safetensors_header_length,
    single_file_configs,
)

CHECKED = "checked   "  # the label of preflight's lines in plan.describe()
_EXAMPLES = 3
_PICKLE_FIX = (
    " In the run configuration that is `model.allow_pickle: true` (or --set model.allow_pickle=true); "
    "it applies to the model and to every adapter."
)


@dataclass(frozen=True)
class ModelLayout:
    """What the driver knows of a model without reading its weights."""

    path: str
    kind: str  # "diffusers folder", "single file" or "pickled single file"
    family: ModelFamily | None  # None for a pickled single file without a config folder
    configs: dict[str, dict[str, Any]] | None  # "unet", "vae" and the towers' config dicts; None when unknown
    parameters: dict[str, int] | None = None  # per component, counted from safetensors headers

    def describe(self) -> str:
        return f"the model {self.path} ({self.family.label if self.family else 'family unknown'})"


@dataclass(frozen=True)
class _ModelSection:
    """A model the actors load, with its adapters: the run's model, or its SDXL refiner."""

    name: str  # "model" or "refiner": its section in the run configuration
    path: str
    config_folder: str | None
    adapters: AdaptersConfig
    adapters_key: str  # "adapters" or "refiner.adapters"


@dataclass(frozen=True)
class ModelChecks:
    """What the preflight found: lines for plan.describe(), and each model's layout by section."""

    lines: list[str]
    layouts: dict[str, ModelLayout]  # "model", and "refiner" when the run has one


def check_model_and_adapters(config: RunConfig, storage: Storage) -> ModelChecks:
    """Check that the model (and refiner) and every adapter would load and fit each other, reading no model
    weights. Raises PlanError saying what, which file and how to fix it."""
    sections = [_ModelSection("model", config.model.path, config.model.config, config.adapters, "adapters")]
    if config.refiner is not None:
        refiner = config.refiner
        sections.append(
            _ModelSection("refiner", refiner.path, refiner.config, refiner.adapters, "refiner.adapters")
        )
    lines, layouts = [], {}
    for section in sections:
        allow_pickle = config.model.allow_pickle
        model = read_model_layout(section.path, allow_pickle, section.config_folder, storage, section.name)
        lines.append(f"{CHECKED}{section.name}: {model.kind}, {_family_text(model)}; no weights read")
        if section.adapters.loras or section.adapters.embeddings:
            lines += _check_adapters(section, allow_pickle, model, storage)
        layouts[section.name] = model
    if "refiner" in layouts:
        _check_refiner_latents(layouts["model"], layouts["refiner"])
    return ModelChecks(lines, layouts)


def _check_refiner_latents(base: ModelLayout, refiner: ModelLayout) -> None:
    """The refiner continues the base's latents: their VAEs must share the latent space (as
    sd_core.ensemble checks when it loads them)."""
    if base.configs is None or refiner.configs is None:
        return

    def latent_space(layout: ModelLayout) -> tuple[int, float]:
        vae = layout.configs.get("vae", {})
        return vae.get("latent_channels", 4), vae.get("scaling_factor", 0.18215)

    if latent_space(base) != latent_space(refiner):
        raise PlanError(
            f"refiner.path {refiner.path} ({refiner.family.label}) cannot continue the latents of "
            f"{base.describe()}: their VAEs differ (latent channels, scaling factor "
            f"{latent_space(refiner)} vs {latent_space(base)}); use a refiner of the model's family"
        )


def read_model_layout(
    path: str, allow_pickle: bool, config_folder: str | None, storage: Storage, section: str = "model"
) -> ModelLayout:
    """The model's kind, family and configs, refusing what the loader would refuse (pickles without
    opt-in, a folder lacking weights, a checkpoint or folder of an unsupported family)."""
    try:
        if storage.is_dir(path):
            return _read_folder(path, allow_pickle, storage)
        return _read_single_file(path, allow_pickle, config_folder, storage)
    except (ValueError, FileNotFoundError) as error:
        raise _refusal(f"{section}.path {path}", error) from error


# ---- the model -----------------------------------------------------------------------------------------


def _read_folder(folder: str, allow_pickle: bool, storage: Storage) -> ModelLayout:
    """A diffusers folder: the weight file each component would be read from (a pickle needs opt-in)."""
    family, configs, text_folders = _folder_configs(folder, storage)
    parameters: dict[str, int] | None = {}
    for name in ("unet", "vae", *text_folders):
        file_names = [PurePosixPath(uri).name for uri in storage.list_files(join_uri(folder, name))]
        chosen = component_weight_file(folder, name, file_names)
        if not chosen.endswith(".index.json"):  # an index names .safetensors shards
            check_weight_format(join_uri(folder, name, chosen), allow_pickle)
        counted = _component_parameters(join_uri(folder, name), chosen, storage)
        parameters = None if parameters is None or counted is None else {**parameters, name: counted}
    return ModelLayout(folder, "diffusers folder", family, configs, parameters)


def _component_parameters(folder: str, chosen: str, storage: Storage) -> int | None:
    """Weights of one diffusers component, from its safetensors headers (shards too); None: a pickle."""
    if chosen.endswith(".index.json"):
        index = json.loads(storage.read_bytes(join_uri(folder, chosen)))
        shards = sorted(set(index.get("weight_map", {}).values()))
    elif chosen.endswith(".safetensors"):
        shards = [chosen]
    else:
        return None
    headers = [_read_safetensors_header(join_uri(folder, shard), storage)[0] for shard in shards]
    return sum(math.prod(shape) for shapes in headers for shape in shapes.values())


def _read_single_file(
    path: str, allow_pickle: bool, config_folder: str | None, storage: Storage
) -> ModelLayout:
    """A CompVis/SGM checkpoint: its family from the safetensors header's key names and shapes, its
    configs as the loader picks them (model.config, the configs sdbatch embeds, or the family's)."""
    check_weight_format(path, allow_pickle)
    if PurePosixPath(path).suffix != ".safetensors":  # a trusted pickle: its keys are known once unpickled
        if config_folder is None:
            return ModelLayout(path, "pickled single file", None, None)
        family, configs, _ = _folder_configs(config_folder, storage)
        return ModelLayout(path, "pickled single file", family, configs)
    shapes, metadata = _read_safetensors_header(path, storage)
    family = FAMILIES[detect_family(shapes)]
    parameters = _single_file_parameters(shapes, family)
    if config_folder is None:
        configs = single_file_configs(family.name, metadata)
        return ModelLayout(path, "single file", family, configs, parameters)
    folder_family, configs, _ = _folder_configs(config_folder, storage)
    if folder_family != family:
        raise ValueError(
            f"config folder {config_folder} is a {folder_family.label} model but {path} is {family.label}; "
            "give the config folder of this checkpoint's family"
        )
    return ModelLayout(path, "single file", family, configs, parameters)


def _single_file_parameters(shapes: dict[str, tuple[int, ...]], family: ModelFamily) -> dict[str, int]:
    """Weights per component of a single file (EMA copies and other keys outside them are not loaded)."""
    prefixes = {"unet": UNET_PREFIX, "vae": VAE_PREFIX}
    prefixes.update({tower.component: tower.checkpoint_prefix for tower in family.towers})
    return {
        name: sum(math.prod(shape) for key, shape in shapes.items() if key.startswith(prefix))
        for name, prefix in prefixes.items()
    }


def _folder_configs(
    folder: str, storage: Storage
) -> tuple[ModelFamily, dict[str, dict[str, Any]], list[str]]:
    """(family, {"unet" and text folder: config}, text folders) of a diffusers folder, as the loader reads
    them (`sd_core.loading.read_folder_configs`): the text folders present and not declared empty."""
    index_uri = join_uri(folder, "model_index.json")
    model_index = json.loads(storage.read_bytes(index_uri)) if storage.exists(index_uri) else {}
    present = [name for name in TEXT_FOLDERS if storage.is_dir(join_uri(folder, name))]
    text_folders = present_text_folders(present, model_index)
    if not text_folders:
        raise FileNotFoundError(
            f"model folder {folder} lacks text_encoder/ (SDXL: text_encoder_2/): a diffusers Stable "
            "Diffusion folder holds its text encoders next to unet/, vae/ and scheduler/"
        )
    configs = {
        name: json.loads(storage.read_bytes(join_uri(folder, name, "config.json")))
        for name in ("unet", "vae", *text_folders)
    }
    family = family_of_configs(configs["unet"], {name: configs[name] for name in text_folders})
    return family, configs, text_folders


def _read_safetensors_header(uri: str, storage: Storage) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """(key -> shape, metadata) from the header alone: two ranged reads, however large the file."""
    fs, path = storage.filesystem(uri)

    def read(start: int, end: int) -> bytes:
        return storage.retrying(f"reading {uri}", lambda: fs.cat_file(path, start=start, end=end))

    try:
        length = safetensors_header_length(read(0, SAFETENSORS_LENGTH_BYTES))
        header = read(SAFETENSORS_LENGTH_BYTES, SAFETENSORS_LENGTH_BYTES + length)
        return parse_safetensors_header(header)
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"not a readable safetensors file (its header: {error})") from error


def _family_text(model: ModelLayout) -> str:
    if model.family is None or model.configs is None:
        return "family unknown until it is loaded (adapters are checked as files only)"
    widths = [str(model.configs[tower.component].get("hidden_size")) for tower in model.family.towers]
    return f"{model.family.label}, text width{'s' if len(widths) > 1 else ''} {' + '.join(widths)}"


# ---- adapters ------------------------------------------------------------------------------------------


def _check_adapters(
    section: _ModelSection, allow_pickle: bool, model: ModelLayout, storage: Storage
) -> list[str]:
    from sd_core.adapters.lora_targets import meta_models

    models = None
    if model.family is not None and model.configs is not None:
        try:
            models = meta_models(model.configs, model.family)
        except ValueError as error:
            raise _refusal(f"{section.name}.path {model.path}", error) from error
    lines = []
    with tempfile.TemporaryDirectory(prefix="sdbatch-preflight-") as scratch:
        for index, lora in enumerate(section.adapters.loras):
            local = _local_path(lora.path, storage, Path(scratch))
            where = f"{section.adapters_key}.loras[{index}]"
            lines.append(_check_lora(where, lora, local, allow_pickle, model, models))
        tokens: dict[str, str] = {}  # token -> where in the configuration the embedding that adds it is
        for index, embedding in enumerate(section.adapters.embeddings):
            local = _local_path(embedding.path, storage, Path(scratch))
            where = f"{section.adapters_key}.embeddings[{index}]"
            lines.append(_check_embedding(where, embedding, local, allow_pickle, model, models, tokens))
    return lines


def _local_path(uri: str, storage: Storage, scratch: Path) -> Path:
    """`uri` itself when it is local, else a copy under `scratch` (adapter files are small)."""
    fs, path = storage.filesystem(uri)
    if storage.is_local(uri):
        return Path(path)
    target = scratch / str(len(list(scratch.iterdir()))) / PurePosixPath(path).name
    target.parent.mkdir()
    storage.retrying(f"reading {uri}", lambda: fs.get(path, str(target), recursive=True))
    return target


def _check_lora(
    where: str,
    lora: LoraConfig,
    local: Path,
    allow_pickle: bool,
    model: ModelLayout,
    models: Mapping[str, Any] | None,
) -> str:
    """The file reads as the load reads it (in the model's names), its text-encoder keys are its family's,
    and each module names a layer of the model whose weight fits."""
    from sd_core.adapters.lora import load_lora_file, matching_records, model_modules
    from sd_core.adapters.lora_targets import standard_targets, targets_of

    label = f"{where} {lora.path}"
    targets = standard_targets() if models is None else targets_of(models, model.family)
    try:
        loaded = load_lora_file(local, allow_pickle=allow_pickle, targets=targets)
    except (ValueError, FileNotFoundError) as error:
        raise _refusal(label, error) from error
    all_keys = [key for record in loaded.records for key in record.keys] + list(loaded.unmatched_keys)
    module_keys = _module_keys(all_keys)
    if models is None:
        total = len(module_keys)
        return f"{CHECKED}LoRA {lora.path}: {loaded.format}, {total} modules (not checked against the model)"
    _check_lora_family(label, module_keys, model)
    try:
        records, skipped = matching_records(loaded, model_modules(models))
    except ValueError as error:
        raise PlanError(
            f"{label} does not fit {model.describe()}: shape mismatch at {error} Use a LoRA trained "
            "for this model's family, or a model of the LoRA's family."
        ) from error
    if skipped or not records:
        raise PlanError(_unmatched_message(label, model, _module_keys(skipped), len(module_keys)))
    applied = len({(record.component, record.module) for record in records})
    return (
        f"{CHECKED}LoRA {lora.path}: {loaded.format}, {applied} of {len(module_keys)} modules patch the model"
    )


def _check_lora_family(label: str, module_keys: list[str], model: ModelLayout) -> None:
    """Refuse, naming both families, a LoRA whose text-encoder keys name another family's text towers."""
    from sd_core.adapters.lora_targets import families_using, text_key_prefixes, text_prefixes_used

    used = text_prefixes_used(module_keys)
    own = text_key_prefixes(model.family)
    if used <= set(own):
        return
    made_for = " / ".join(family.label for family in families_using(used))
    fix = f"Use a LoRA made for {model.family.label}" + (f", or a {made_for} model." if made_for else ".")
    raise PlanError(
        f"{label} is a LoRA for {made_for or 'another model family'}, not for {model.describe()}: its "
        f"text-encoder keys start {', '.join(f'{p}*' for p in sorted(used))}, while {model.family.label} "
        f"names its text encoders {', '.join(f'{p}*' for p in own)}. {fix}"
    )


def _module_keys(keys: Iterable[str]) -> list[str]:
    """The distinct module names of adapter keys (their factor suffixes removed), sorted."""
    from sd_core.adapters.lora_formats import split_key

    return sorted({split_key(key)[0] for key in keys})


def _unmatched_message(label: str, model: ModelLayout, unmatched: list[str], total: int) -> str:
    if total == 0:
        return f"{label} holds no LoRA weights at all, so it would change nothing: check the file"
    examples = ", ".join(unmatched[:_EXAMPLES])
    return (
        f"{label}: {len(unmatched)} of {total} modules name no layer of {model.describe()} or are in no "
        f"supported format, e.g. {examples}; is it a LoRA for another model family (SD 1.x, SD 2.x, SDXL) "
        "or of an unsupported format? The run loads LoRAs strictly: every module must patch a layer of the "
        "model. Use a LoRA made for this model."
    )


def _check_embedding(
    where: str,
    embedding: EmbeddingConfig,
    local: Path,
    allow_pickle: bool,
    model: ModelLayout,
    models: Mapping[str, Any] | None,
    tokens: dict[str, str],
) -> str:
    """The file reads as the load reads it, holds a tensor for each of the model's text towers as wide as
    the tower's, and its tokens are not added by an earlier embedding (the load would refuse them)."""
    from sd_core.adapters.textual_inversion import check_embedding_width, embedding_keys, load_embedding_file

    label = f"{where} {embedding.path}"
    try:
        loaded = load_embedding_file(local, token=embedding.token, allow_pickle=allow_pickle)
    except (ValueError, FileNotFoundError) as error:
        raise _refusal(label, error) from error
    if models is not None:
        try:
            for component, key in embedding_keys(loaded, model.family).items():
                check_embedding_width(models[component], loaded, key)
        except ValueError as error:
            raise PlanError(f"{label} does not fit {model.describe()}: {error}") from error
    clashes = sorted(token for token in loaded.tokens if token in tokens)
    if clashes:
        raise PlanError(
            f"{label} adds token(s) {clashes} that {tokens[clashes[0]]} adds too: give one of them another "
            "token (adapters.embeddings[i].token, or --embedding PATH:TOKEN)"
        )
    tokens.update(dict.fromkeys(loaded.tokens, where))
    widths = loaded.widths
    wide = f"{widths[None]} wide" if None in widths else ", ".join(f"{k} {w} wide" for k, w in widths.items())
    return f"{CHECKED}embedding {embedding.path}: token {loaded.token!r}, {loaded.num_vectors} vectors {wide}"


def _refusal(label: str, error: Exception) -> PlanError:
    """PlanError for `label`'s file; a refused pickle also says how the run configuration opts in."""
    fix = _PICKLE_FIX if isinstance(error, PickleRefused) else ""
    return PlanError(f"{label}: {error}{fix}")
