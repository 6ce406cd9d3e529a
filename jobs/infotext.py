"""What a written image says about how it was made, as AUTOMATIC1111 1.10 writes its infotext.

Users load our outputs back into A1111 ("PNG Info", "send to img2img"), ComfyUI readers and image
browsers, so the `parameters` text uses A1111's names, keys, order and hash formats, and holds only keys
A1111 itself writes; what A1111 has no key for goes to a second PNG text chunk, `sdbatch` (JSON), and
stays in the run's metadata. Two halves: `run_identity`, in the actor once (A1111's names and short
hashes of the pinned models and adapters, which needs their files), and `image_infotext`, per image.

Written from stable-diffusion-webui 1.10 (AUTOMATIC1111/stable-diffusion-webui):
- `modules/processing.py` `create_infotext`: the key order; `Schedule type` always; `Model hash`,
  `Model`; `Clip skip` only when > 1; `Version`; extra parameters in the order they are set;
- `modules/sd_samplers_kdiffusion.py` `samplers_k_diffusion` and `modules/sd_samplers_timesteps.py`
  `samplers_timesteps`: the display names; `modules/sd_schedulers.py`: the schedule labels, where
  `Automatic` means the sampler's own (Karras for DPM++ 2M);
- `modules/sd_models.py` `CheckpointInfo`: `Model hash` is the file's sha256[0:10], `Model` its stem
  (`name_for_extra`), `Refiner` its `short_title` "stem [hash]" (`sd_samplers_common.apply_refiner`);
- `extensions-builtin/Lora/network.py` `NetworkOnDisk`: a LoRA's short hash is [0:12] of its
  `sshs_model_hash` metadata, else of `modules/hashes.py` `addnet_hash_safetensors` (sha256 of the
  bytes after the safetensors header), else (a pickle) of the file's sha256;
  `extra_networks_lora.py`: `Lora hashes: "alias: hash, ..."`, the alias without ':' and ',';
- `modules/textual_inversion/textual_inversion.py` `Embedding.set_hash`: the file's sha256[0:12];
  `modules/sd_hijack_clip.py`: `TI hashes` of the embeddings a prompt uses, and `Emphasis` when a
  prompt has ( or [ and the emphasis is not Original;
- `modules/sd_samplers_timesteps.py` `CompVisSampler.initialize`: `Eta DDIM` when eta != 0.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from connectors.image_encode import a1111_parameters
from connectors.manifest import SDXL_COLUMNS
from sd_core.model_files import SAFETENSORS_LENGTH_BYTES, parse_safetensors_header, safetensors_header_length

# Our sampler -> A1111's display name. diffusers' PNDM, as SD configs run it (skip_prk_steps), is PLMS.
A1111_SAMPLERS: dict[str, str] = {
    "ddim": "DDIM",
    "pndm": "PLMS",
    "euler": "Euler",
    "euler_a": "Euler a",
    "dpmpp_2m": "DPM++ 2M",
    "dpmpp_2m_karras": "DPM++ 2M",
    "lms": "LMS",
    "unipc": "UniPC",
}
# Samplers whose A1111 `Automatic` schedule is Karras: without Karras sigmas ours say `Uniform` (A1111's
# evenly spaced timesteps, the closest of its schedules to diffusers' spacing).
_KARRAS_BY_DEFAULT = frozenset({"dpmpp_2m"})
_CHUNK_BYTES = 1 << 20


def a1111_sampler(scheduler: str, karras_sigmas: bool) -> tuple[str, str]:
    """(`Sampler`, `Schedule type`) for one of our schedulers; `karras_sigmas`: its config's flag (a model's
    scheduler_config.json may turn Karras sigmas on for Euler, LMS, UniPC...)."""
    if scheduler not in A1111_SAMPLERS:
        raise ValueError(f"scheduler {scheduler!r} has no A1111 name; known: {', '.join(A1111_SAMPLERS)}")
    if karras_sigmas or scheduler == "dpmpp_2m_karras":
        return A1111_SAMPLERS[scheduler], "Karras"
    return A1111_SAMPLERS[scheduler], "Uniform" if scheduler in _KARRAS_BY_DEFAULT else "Automatic"


def checkpoint_identity(local_path: str, sha256: str) -> tuple[str, str | None]:
    """A1111's (`Model`, `Model hash`) of a loaded model: a file's stem and sha256[:10]. A diffusers folder
    (which A1111 cannot load) is named after the folder, with no hash: no checkpoint file would match."""
    path = Path(local_path)
    if path.is_dir():
        return path.name, None
    return path.stem, sha256[:10]


def lora_shorthash(local_path: str, sha256: str) -> str:
    """A1111's 12-hex hash of a LoRA file (`sha256`: of its bytes, for a pickle); reads a .safetensors
    file once more, since its hash covers only the tensor bytes after the header."""
    path = Path(local_path)
    if path.suffix.lower() != ".safetensors":
        return sha256[:12]
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        header_length = safetensors_header_length(handle.read(SAFETENSORS_LENGTH_BYTES))
        _, metadata = parse_safetensors_header(handle.read(header_length))
        if metadata.get("sshs_model_hash"):
            return metadata["sshs_model_hash"][:12]
        for chunk in iter(lambda: handle.read(_CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()[:12]


def run_identity(
    scheduler: Any,
    model: tuple[str, str],
    refiner: tuple[str, str] | None,
    adapters: Sequence[Any],
    loras: Sequence[tuple[str, float, float | None]],
) -> str:
    """The run's fixed infotext parts as JSON, once per actor: `scheduler` is the pipeline's (name,
    config), `model` / `refiner` are (local path, sha256), `adapters` the base's AdapterInfo list and
    `loras` its LoRAs as loaded: (local path, scale, text-encoder scale or None), in load order."""
    sampler, schedule = a1111_sampler(scheduler.name, getattr(scheduler.config, "use_karras_sigmas", False))
    model_name, model_hash = checkpoint_identity(*model)
    refiner_title = None
    if refiner is not None:
        name, shorthash = checkpoint_identity(*refiner)
        refiner_title = name if shorthash is None else f"{name} [{shorthash}]"
    lora_infos = [a for a in adapters if a.kind == "lora"]
    return json.dumps(
        {
            "sampler": sampler,
            "schedule_type": schedule,
            "model": model_name,
            "model_hash": model_hash,
            "refiner": refiner_title,
            "loras": [
                {
                    "name": info.name,
                    "hash": lora_shorthash(path, info.sha256),
                    "unet": scale,
                    "text_encoder": scale if text_scale is None else text_scale,
                }
                for info, (path, scale, text_scale) in zip(lora_infos, loras, strict=True)
            ],
            "embeddings": [
                {"token": a.name, "hash": a.sha256[:12]} for a in adapters if a.kind == "textual_inversion"
            ],
        },
        sort_keys=True,
    )


def image_infotext(
    row: Mapping[str, Any], clip_skip: int, eta: float, prompt_syntax: str, version: str
) -> tuple[str, str]:
    """(`parameters` text, `sdbatch` JSON) of one written image, from its work row (with the actor's
    `a1111_identity`) and the run's clip skip (A1111 counting), DDIM eta and prompt syntax."""
    identity = json.loads(row["a1111_identity"])
    prompt, negative = row["prompt"], row["negative_prompt"] or ""
    # plain prompts take brackets literally: A1111's "None" emphasis (its default is Original)
    literal_brackets = prompt_syntax == "plain" and any("(" in t or "[" in t for t in (prompt, negative))
    parameters = a1111_parameters(
        prompt=" ".join([prompt, *(_lora_tag(lora) for lora in identity["loras"])]),
        negative_prompt=negative,
        steps=row["num_inference_steps"],
        sampler=identity["sampler"],
        schedule_type=identity["schedule_type"],
        cfg_scale=row["guidance_scale"],
        seed=row["seed"],
        width=row["pixel_width"],
        height=row["pixel_height"],
        denoising_strength=row["strength"],
        model_hash=identity["model_hash"],
        model_name=identity["model"],
        extra={
            "Clip skip": clip_skip if clip_skip > 1 else None,
            "Lora hashes": _hash_list((lora["name"], lora["hash"]) for lora in identity["loras"]),
            "TI hashes": _hash_list(_used_embeddings(identity["embeddings"], prompt, negative)),
            "Emphasis": "None" if literal_brackets else None,
            "Eta DDIM": eta if row["scheduler"] == "ddim" and eta != 0 else None,
            "Refiner": identity["refiner"],
            "Refiner switch at": row["refiner_switch_at"] if identity["refiner"] else None,
            "Version": f"sdbatch {version}",
        },
    )
    return parameters, json.dumps(_sdbatch_settings(row, eta, prompt_syntax), sort_keys=True)


def _lora_tag(lora: Mapping[str, Any]) -> str:
    """`<lora:name:weight>` (A1111's text-encoder then UNet multiplier when they differ), so "send to
    img2img" applies the LoRA our run pinned; A1111 maps the name to its own file by `Lora hashes`."""
    unet, text = lora["unet"], lora["text_encoder"]
    weights = f"{text}" if text == unet else f"{text}:{unet}"
    return f"<lora:{lora['name']}:{weights}>"


def _used_embeddings(
    embeddings: Sequence[Mapping[str, str]], prompt: str, negative: str
) -> list[tuple[str, str]]:
    """(token, hash) of the embeddings the prompt uses, in the order it uses them, then the negative's."""
    used: list[tuple[str, str]] = []
    for text in (prompt, negative):
        found = sorted(
            (text.find(e["token"]), e["token"], e["hash"]) for e in embeddings if e["token"] in text
        )
        used += [(token, shorthash) for _, token, shorthash in found if (token, shorthash) not in used]
    return used


def _hash_list(pairs: Iterable[tuple[str, str]]) -> str | None:
    """A1111's "name: hash, ..." with ':' and ',' taken out of names; None when empty."""
    text = ", ".join(f"{name.replace(':', '').replace(',', '')}: {shorthash}" for name, shorthash in pairs)
    return text or None


def _sdbatch_settings(row: Mapping[str, Any], eta: float, prompt_syntax: str) -> dict[str, Any]:
    """What shaped the image that A1111 has no key for, with the full hashes."""
    settings: dict[str, Any] = {
        "scheduler": row["scheduler"],
        "guidance_rescale": row["guidance_rescale"],
        "prompt_syntax": prompt_syntax,
        "eta": eta,
        "model_sha256": row["model_sha256"],
        "adapters": json.loads(row["adapters"]),
    }
    if row.get("refiner_sha256") is not None:
        settings.update(
            refiner_sha256=row["refiner_sha256"],
            refiner_adapters=json.loads(row["refiner_adapters"]),
            refiner_switch_at=row["refiner_switch_at"],
        )
    settings.update({name: row[name] for name in SDXL_COLUMNS if row.get(name) is not None})
    return settings
