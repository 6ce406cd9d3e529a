"""Refuse a model or adapters that the actors could not load, on the driver, before any work starts.

The actors load the model and adapters with sd_core (jobs/model_setup.py). Here the same sd_core rules
answer the same questions from what is cheap to read: the model's file names, config.json files and
safetensors header (never its weights), and the adapter files themselves (they are small). LoRA targets
and shapes, and embedding widths, are checked against the model's UNet and text encoder built on torch's
meta device from the configs the loader would use. torch is imported only when adapters are configured,
so a dry run of a plain model stays light.

LoRA rule: the job fuses LoRAs strictly (PipelineFactory -> `load_loras`, strict=True), so a LoRA with
any key that patches no layer of the model is refused, as the load would refuse it. A LoRA that patches
nothing at all (an empty file) is refused too, although the core would fuse it silently as a no-op.
Not checked here: the model's weights against its configs, and embedding tokens against the model's
tokenizer vocabulary (only against each other).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from connectors.storage import Storage, join_uri
from jobs.config import EmbeddingConfig, LoraConfig, RunConfig
from jobs.plan import PlanError
from sd_core.families import FAMILIES, detect_family
from sd_core.model_files import (
    SAFETENSORS_LENGTH_BYTES,
    WEIGHT_STEMS,
    PickleRefused,
    check_weight_format,
    component_weight_file,
    family_of_text_config,
    parse_safetensors_header,
    safetensors_header_length,
    single_file_configs,
)

CHECKED = "checked   "  # the label of preflight's lines in plan.describe()
_EXAMPLES = 3
_PICKLE_FIX = (
    " In the run configuration that is `model.allow_pickle: true` (or --set model.allow_pickle=true); "
    "it applies to the model and to every adapter."
)
_SDXL_TEXT_PREFIXES = ("lora_te1_", "lora_te2_")  # kohya names of SDXL's two text encoders


@dataclass(frozen=True)
class ModelLayout:
    """What the driver knows of the model without reading its weights."""

    path: str
    kind: str  # "diffusers folder", "single file" or "pickled single file"
    family: str | None  # "v1" / "v2"; None for a pickled single file without model.config
    configs: dict[str, dict[str, Any]] | None  # "unet" / "text_encoder" config dicts; None when unknown

    def describe(self) -> str:
        return f"the model {self.path} ({_family_name(self.family)})"


def check_model_and_adapters(config: RunConfig, storage: Storage) -> list[str]:
    """Check that the model and every adapter would load and fit each other, reading no model weights.
    Returns lines for plan.describe(); raises PlanError saying what, which file and how to fix it."""
    model = read_model_layout(config, storage)
    lines = [f"{CHECKED}model: {model.kind}, {_family_text(model)}; no weights read"]
    adapters = config.adapters
    if adapters.loras or adapters.embeddings:
        lines += _check_adapters(config, model, storage)
    return lines


def read_model_layout(config: RunConfig, storage: Storage) -> ModelLayout:
    """The model's kind, family and configs, refusing what the loader would refuse (pickles without
    opt-in, a folder lacking weights, a checkpoint of an unsupported family)."""
    path = config.model.path
    try:
        if storage.is_dir(path):
            return _read_folder(path, config.model.allow_pickle, storage)
        return _read_single_file(path, config.model.allow_pickle, config.model.config, storage)
    except (ValueError, FileNotFoundError) as error:
        raise _refusal(f"model.path {path}", error) from error


# ---- the model -----------------------------------------------------------------------------------------


def _read_folder(folder: str, allow_pickle: bool, storage: Storage) -> ModelLayout:
    """A diffusers folder: the weight file each component would be read from (a pickle needs opt-in)."""
    for name in WEIGHT_STEMS:
        file_names = [PurePosixPath(uri).name for uri in storage.list_files(join_uri(folder, name))]
        chosen = component_weight_file(folder, name, file_names)
        if not chosen.endswith(".index.json"):  # an index names .safetensors shards
            check_weight_format(join_uri(folder, name, chosen), allow_pickle)
    configs = _folder_configs(folder, storage)
    return ModelLayout(folder, "diffusers folder", family_of_text_config(configs["text_encoder"]), configs)


def _read_single_file(
    path: str, allow_pickle: bool, config_folder: str | None, storage: Storage
) -> ModelLayout:
    """A CompVis/A1111 checkpoint: its family from the safetensors header's key names and shapes, its
    configs as the loader picks them (model.config, the configs sdbatch embeds, or the family's)."""
    check_weight_format(path, allow_pickle)
    if PurePosixPath(path).suffix != ".safetensors":  # a trusted pickle: its keys are known once unpickled
        if config_folder is None:
            return ModelLayout(path, "pickled single file", None, None)
        configs = _folder_configs(config_folder, storage)
        return ModelLayout(
            path, "pickled single file", family_of_text_config(configs["text_encoder"]), configs
        )
    shapes, metadata = _read_safetensors_header(path, storage)
    family = detect_family(shapes)
    configs = (
        _folder_configs(config_folder, storage) if config_folder else single_file_configs(family, metadata)
    )
    return ModelLayout(path, "single file", family, configs)


def _folder_configs(folder: str, storage: Storage) -> dict[str, dict[str, Any]]:
    return {
        name: json.loads(storage.read_bytes(join_uri(folder, name, "config.json")))
        for name in ("unet", "text_encoder")
    }


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


def _family_name(family: str | None) -> str:
    """ "SD 1.x" / "SD 2.x" (the start of the family's description)."""
    return FAMILIES[family].description.split(" (")[0] if family else "family unknown"


def _family_text(model: ModelLayout) -> str:
    if model.family is None or model.configs is None:
        return "family unknown until it is loaded (adapters are checked as files only)"
    return f"{_family_name(model.family)}, text width {model.configs['text_encoder'].get('hidden_size')}"


# ---- adapters ------------------------------------------------------------------------------------------


def _check_adapters(config: RunConfig, model: ModelLayout, storage: Storage) -> list[str]:
    from sd_core.adapters.lora import model_modules
    from sd_core.adapters.lora_targets import meta_modules

    modules, text_encoder = None, None
    if model.configs is not None:
        try:
            unet, text_encoder = meta_modules(model.configs)
        except ValueError as error:
            raise _refusal(f"model.path {model.path}", error) from error
        modules = model_modules(unet, text_encoder)
    allow_pickle = config.model.allow_pickle
    lines = []
    with tempfile.TemporaryDirectory(prefix="sdbatch-preflight-") as scratch:
        for index, lora in enumerate(config.adapters.loras):
            local = _local_path(lora.path, storage, Path(scratch))
            lines.append(_check_lora(index, lora, local, allow_pickle, model, modules))
        tokens: dict[str, int] = {}  # token -> index of the embedding that adds it
        for index, embedding in enumerate(config.adapters.embeddings):
            local = _local_path(embedding.path, storage, Path(scratch))
            lines.append(_check_embedding(index, embedding, local, allow_pickle, model, text_encoder, tokens))
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
    index: int,
    lora: LoraConfig,
    local: Path,
    allow_pickle: bool,
    model: ModelLayout,
    modules: Mapping[str, Mapping[str, Any]] | None,
) -> str:
    """The file reads as the load reads it; each module names a layer of the model whose weight fits."""
    from sd_core.adapters.lora import load_lora_file, matching_records

    label = f"adapters.loras[{index}] {lora.path}"
    try:
        loaded = load_lora_file(local, allow_pickle=allow_pickle)
    except (ValueError, FileNotFoundError) as error:
        raise _refusal(label, error) from error
    all_keys = [key for record in loaded.records for key in record.keys] + list(loaded.unmatched_keys)
    total = len(_module_keys(all_keys))
    if modules is None:
        return f"{CHECKED}LoRA {lora.path}: {loaded.format}, {total} modules (not checked against the model)"
    try:
        records, skipped = matching_records(loaded, modules)
    except ValueError as error:
        raise PlanError(
            f"{label} does not fit {model.describe()}: shape mismatch at {error} Use a LoRA trained "
            "for this model's family, or a model of the LoRA's family."
        ) from error
    if skipped or not records:
        raise PlanError(_unmatched_message(label, model, _module_keys(skipped), total))
    applied = len({(record.component, record.module) for record in records})
    return f"{CHECKED}LoRA {lora.path}: {loaded.format}, {applied} of {total} modules patch the model"


def _module_keys(keys: Iterable[str]) -> list[str]:
    """The distinct module names of adapter keys (their factor suffixes removed), sorted."""
    from sd_core.adapters.lora_formats import split_key

    return sorted({split_key(key)[0] for key in keys})


def _unmatched_message(label: str, model: ModelLayout, unmatched: list[str], total: int) -> str:
    if total == 0:
        return f"{label} holds no LoRA weights at all, so it would change nothing: check the file"
    examples = ", ".join(unmatched[:_EXAMPLES])
    if any(name.startswith(_SDXL_TEXT_PREFIXES) for name in unmatched):
        hint = "lora_te1_/lora_te2_ name SDXL's two text encoders: this is an SDXL LoRA"
    else:
        hint = "is it a LoRA for another model family (SDXL, SD 2.x vs 1.x) or of an unsupported format?"
    return (
        f"{label}: {len(unmatched)} of {total} modules name no layer of {model.describe()} or are in no "
        f"supported format, e.g. {examples}; {hint}. The run loads LoRAs strictly: every module must "
        "patch a layer of the model. Use a LoRA made for this model."
    )


def _check_embedding(
    index: int,
    embedding: EmbeddingConfig,
    local: Path,
    allow_pickle: bool,
    model: ModelLayout,
    text_encoder,
    tokens: dict[str, int],
) -> str:
    """The file reads as the load reads it, its vectors are as wide as the model's text encoder's, and
    its tokens are not added by an earlier embedding (the load would refuse them)."""
    from sd_core.adapters.textual_inversion import check_embedding_width, load_embedding_file

    label = f"adapters.embeddings[{index}] {embedding.path}"
    try:
        loaded = load_embedding_file(local, token=embedding.token, allow_pickle=allow_pickle)
    except (ValueError, FileNotFoundError) as error:
        raise _refusal(label, error) from error
    if text_encoder is not None:
        try:
            check_embedding_width(text_encoder, loaded)
        except ValueError as error:
            raise PlanError(f"{label} does not fit {model.describe()}: {error}") from error
    clashes = sorted(token for token in loaded.tokens if token in tokens)
    if clashes:
        earlier = tokens[clashes[0]]
        raise PlanError(
            f"{label} adds token(s) {clashes} that adapters.embeddings[{earlier}] adds too: give one of "
            "them another token (adapters.embeddings[i].token, or --embedding PATH:TOKEN)"
        )
    tokens.update(dict.fromkeys(loaded.tokens, index))
    return (
        f"{CHECKED}embedding {embedding.path}: token {loaded.token!r}, {loaded.num_vectors} vectors "
        f"{loaded.width} wide"
    )


def _refusal(label: str, error: Exception) -> PlanError:
    """PlanError for `label`'s file; a refused pickle also says how the run configuration opts in."""
    fix = _PICKLE_FIX if isinstance(error, PickleRefused) else ""
    return PlanError(f"{label}: {error}{fix}")
