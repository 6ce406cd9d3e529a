"""Written images carry A1111 1.10's infotext: what A1111 reads back ("PNG Info", "send to img2img") is
what the image was made with. Each text is read twice: by A1111's own rules, reimplemented below from
its source, and by a third-party reader of A1111 infotext (the `sd-parsers` package)."""

from __future__ import annotations

import hashlib
import io
import json
import re

import PIL.Image
import pytest
import torch
from packaging.version import InvalidVersion, Version
from safetensors.torch import save_file
from sd_parsers import ParserManager

from connectors.image_encode import encode_image
from connectors.manifest import SDXL_COLUMNS
from jobs.infotext import a1111_sampler, checkpoint_identity, image_infotext, lora_shorthash, run_identity
from sd_core.adapters import AdapterInfo
from sd_core.schedulers import SCHEDULER_NAMES, make_scheduler

# ---- A1111 1.10's reading rules ----------------------------------------------------------------------

# modules/infotext_utils.py
RE_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
RE_IMAGESIZE = re.compile(r"^(\d+)x(\d+)$")
# modules/extra_networks.py; extensions-builtin/Lora/lora_script.py
RE_EXTRA_NET = re.compile(r"<(\w+):([^>]+)>")
RE_LORA = re.compile("<lora:([^:]+):")
# modules/sd_samplers_kdiffusion.py, sd_samplers_timesteps.py: name -> what its `Automatic` schedule is
A1111_SAMPLERS = {
    "DPM++ 2M": "karras",
    "DPM++ SDE": "karras",
    "DPM++ 2M SDE": "exponential",
    "Euler a": None,
    "Euler": None,
    "LMS": None,
    "Heun": None,
    "DDIM": None,
    "PLMS": None,
    "UniPC": None,
}
# modules/sd_schedulers.py: label -> name
A1111_SCHEDULES = {
    "Automatic": "automatic",
    "Uniform": "uniform",
    "Karras": "karras",
    "Exponential": "exponential",
    "Polyexponential": "polyexponential",
    "SGM Uniform": "sgm_uniform",
    "KL Optimal": "kl_optimal",
    "Align Your Steps": "align_your_steps",
    "Simple": "simple",
    "Normal": "normal",
    "DDIM": "ddim",
    "Beta": "beta",
}


def unquote(text: str) -> str:
    if len(text) == 0 or text[0] != '"' or text[-1] != '"':
        return text
    try:
        return json.loads(text)
    except Exception:  # noqa: BLE001 - as A1111
        return text


def parse_generation_parameters(text: str) -> dict[str, str]:
    """`infotext_utils.parse_generation_parameters` without the UI's options (styles, skipped fields),
    with its defaults for the keys read here."""
    res: dict[str, str] = {}
    prompt = negative_prompt = ""
    done_with_prompt = False
    *lines, lastline = text.strip().split("\n")
    if len(RE_PARAM.findall(lastline)) < 3:
        lines.append(lastline)
        lastline = ""
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            done_with_prompt = True
            line = line[16:].strip()
        if done_with_prompt:
            negative_prompt += ("" if negative_prompt == "" else "\n") + line
        else:
            prompt += ("" if prompt == "" else "\n") + line
    for key, value in RE_PARAM.findall(lastline):
        if value[:1] == '"' and value[-1:] == '"':
            value = unquote(value)
        size = RE_IMAGESIZE.match(value)
        if size is not None:
            res[f"{key}-1"], res[f"{key}-2"] = size.group(1), size.group(2)
        else:
            res[key] = value
    res["Prompt"], res["Negative prompt"] = prompt, negative_prompt
    res.setdefault("Clip skip", "1")
    res.setdefault("Schedule type", "Automatic")
    return res


def sampler_and_schedule(sampler: str, schedule: str) -> tuple[str, str]:
    """`sd_samplers.get_sampler_and_scheduler` as pasting calls it: an unknown sampler becomes the default
    (the first, DPM++ 2M); a sampler's own schedule reads as Automatic."""
    name = sampler if sampler in A1111_SAMPLERS else "DPM++ 2M"
    label = schedule if schedule in A1111_SCHEDULES else "Automatic"
    if A1111_SAMPLERS[name] == A1111_SCHEDULES[label]:
        label = "Automatic"
    return name, label


def pasted_lora_hashes(params: dict[str, str]) -> dict[str, str]:
    """lora_script.infotext_pasted: `Lora hashes` as alias -> short hash, for each `<lora:alias:` in the
    prompt that A1111 then points at its own file with that hash."""
    hashes = [x.strip().split(":", 1) for x in params["Lora hashes"].split(",")]
    table = {x[0].strip().replace(",", ""): x[1].strip() for x in hashes}
    return {alias: table[alias] for alias in RE_LORA.findall(params["Prompt"])}


def lora_multipliers(prompt: str) -> dict[str, tuple[float, float]]:
    """extra_networks_lora.activate: name -> (text-encoder, UNet) multiplier of each <lora:...> tag."""
    found = {}
    for kind, args in RE_EXTRA_NET.findall(prompt):
        if kind == "lora":
            name, *weights = args.split(":")
            te = float(weights[0]) if weights else 1.0
            found[name] = (te, float(weights[1]) if len(weights) > 1 else te)
    return found


def sd_parsers_read(data: bytes):
    return ParserManager().parse(PIL.Image.open(io.BytesIO(data)))


# ---- a run's identity and rows -----------------------------------------------------------------------


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def files(tmp_path) -> dict:
    """A checkpoint, a LoRA and an embedding file, with their sha256."""
    checkpoint = tmp_path / "dreamy-v2.safetensors"
    save_file({"w": torch.zeros(3)}, str(checkpoint))
    lora = tmp_path / "paper-cut.safetensors"
    save_file({"lora_unet_x.lora_down.weight": torch.ones(2, 2)}, str(lora), metadata={"ss_network_dim": "2"})
    embedding = tmp_path / "fox.safetensors"
    save_file({"<fox>": torch.ones(1, 4)}, str(embedding))
    paths = {"checkpoint": checkpoint, "lora": lora, "embedding": embedding}
    return {name: (str(path), sha256(path.read_bytes())) for name, path in paths.items()}


def identity(files, scheduler="dpmpp_2m_karras", scale=0.8, text_encoder_scale=None, refiner=None) -> str:
    lora_path, lora_sha = files["lora"]
    adapters = [
        AdapterInfo("lora", "paper-cut", lora_sha, scales={"unet": scale}),
        AdapterInfo("textual_inversion", "<fox>", files["embedding"][1], tokens=("<fox>",)),
    ]
    loras = [(lora_path, scale, text_encoder_scale)]
    return run_identity(make_scheduler(scheduler, {}), files["checkpoint"], refiner, adapters, loras)


def work_row(files, **changes) -> dict:
    row = {
        "prompt": "a <fox> in snow, (detailed)",
        "negative_prompt": "blurry",
        "num_inference_steps": 20,
        "guidance_scale": 7.5,
        "seed": 42,
        "pixel_width": 64,
        "pixel_height": 48,
        "strength": 0.75,
        "scheduler": "dpmpp_2m_karras",
        "guidance_rescale": 0.7,
        "model_sha256": files["checkpoint"][1],
        "adapters": json.dumps([{"kind": "lora", "name": "paper-cut"}]),
        "refiner_sha256": None,
        "refiner_adapters": None,
        "refiner_switch_at": None,
        **{name: None for name in SDXL_COLUMNS},
    }
    row["a1111_identity"] = changes.pop("a1111_identity", None) or identity(files, row["scheduler"])
    return {**row, **changes}


def infotext(row, clip_skip=2, eta=0.0, prompt_syntax="plain") -> tuple[str, dict]:
    parameters, settings = image_infotext(row, clip_skip, eta, prompt_syntax, "9.9.9")
    return parameters, json.loads(settings)


def addnet_hash(path: str) -> str:
    """modules/hashes.py addnet_hash_safetensors: sha256 of what follows the 8-byte length and the header."""
    data = open(path, "rb").read()
    return sha256(data[8 + int.from_bytes(data[:8], "little") :])


# ---- samplers ---------------------------------------------------------------------------------------

SAMPLER_TABLE = {
    "ddim": ("DDIM", "Automatic"),
    "pndm": ("PLMS", "Automatic"),
    "euler": ("Euler", "Automatic"),
    "euler_a": ("Euler a", "Automatic"),
    "dpmpp_2m": ("DPM++ 2M", "Uniform"),  # A1111's Automatic would be Karras
    "dpmpp_2m_karras": ("DPM++ 2M", "Karras"),
    "lms": ("LMS", "Automatic"),
    "unipc": ("UniPC", "Automatic"),
}


def test_every_scheduler_has_its_a1111_sampler_and_schedule_type():
    assert {name: a1111_sampler(name, karras_sigmas=False) for name in SCHEDULER_NAMES} == SAMPLER_TABLE


@pytest.mark.parametrize("scheduler", SCHEDULER_NAMES)
def test_a1111_reads_each_sampler_back_as_the_one_that_ran(scheduler):
    sampler, schedule = a1111_sampler(scheduler, karras_sigmas=False)
    name, label = sampler_and_schedule(sampler, schedule)
    assert name == sampler
    effective = A1111_SAMPLERS[name] if label == "Automatic" else A1111_SCHEDULES[label]
    assert (
        effective
        == {"Karras": "karras", "Uniform": "uniform", "Automatic": A1111_SAMPLERS[sampler]}[schedule]
    )


def test_karras_sigmas_from_the_models_scheduler_config_say_karras(files):
    assert a1111_sampler("euler", karras_sigmas=True) == ("Euler", "Karras")
    scheduler = make_scheduler("lms", {"use_karras_sigmas": True})
    text = run_identity(scheduler, files["checkpoint"], None, [], [])
    assert json.loads(text)["schedule_type"] == "Karras"


# ---- hashes ------------------------------------------------------------------------------------------


def test_checkpoint_is_its_file_stem_and_the_first_10_of_its_sha256(files, tmp_path):
    path, digest = files["checkpoint"]
    assert checkpoint_identity(path, digest) == ("dreamy-v2", digest[:10])
    folder = tmp_path / "sd15-diffusers"
    folder.mkdir()
    assert checkpoint_identity(str(folder), "f" * 64) == ("sd15-diffusers", None)


def test_safetensors_lora_hash_is_the_addnet_hash_of_its_tensor_bytes(files):
    path, digest = files["lora"]
    assert lora_shorthash(path, digest) == addnet_hash(path)[:12]
    assert addnet_hash(path) != digest  # the header (with its metadata) is left out


def test_lora_hash_in_the_files_metadata_is_taken_as_is(tmp_path):
    path = tmp_path / "trained.safetensors"
    save_file({"w": torch.ones(2)}, str(path), metadata={"sshs_model_hash": "0123456789abcdef" * 4})
    assert lora_shorthash(str(path), sha256(path.read_bytes())) == "0123456789ab"


def test_pickled_lora_hash_is_its_files_sha256(tmp_path):
    path = tmp_path / "old.pt"
    torch.save({"w": torch.ones(2)}, path)
    digest = sha256(path.read_bytes())
    assert lora_shorthash(str(path), digest) == digest[:12]


# ---- the text ----------------------------------------------------------------------------------------


def test_infotext_is_laid_out_as_a1111_create_infotext(files):
    parameters, _ = infotext(work_row(files))
    model_hash, lora_hash = files["checkpoint"][1][:10], addnet_hash(files["lora"][0])[:12]
    assert parameters == (
        "a <fox> in snow, (detailed) <lora:paper-cut:0.8>\n"
        "Negative prompt: blurry\n"
        "Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.5, Seed: 42, Size: 64x48, "
        f"Model hash: {model_hash}, Model: dreamy-v2, Denoising strength: 0.75, Clip skip: 2, "
        f'Lora hashes: "paper-cut: {lora_hash}", TI hashes: "<fox>: {files["embedding"][1][:12]}", '
        "Emphasis: None, Version: sdbatch 9.9.9"
    )


def test_a1111_reads_back_the_settings_and_hashes(files):
    params = parse_generation_parameters(infotext(work_row(files))[0])
    assert sampler_and_schedule(params["Sampler"], params["Schedule type"]) == ("DPM++ 2M", "Automatic")
    assert params["Schedule type"] == "Karras" and params["Clip skip"] == "2"
    assert (params["Steps"], params["CFG scale"], params["Seed"]) == ("20", "7.5", "42")
    assert (params["Size-1"], params["Size-2"], params["Denoising strength"]) == ("64", "48", "0.75")
    assert (params["Model"], params["Model hash"]) == ("dreamy-v2", files["checkpoint"][1][:10])
    assert params["TI hashes"] == f"<fox>: {files['embedding'][1][:12]}"
    assert params["Negative prompt"] == "blurry"
    assert params["Version"] == "sdbatch 9.9.9"


def test_send_to_img2img_applies_the_pinned_lora_at_its_scales(files):
    row = work_row(files, a1111_identity=identity(files, scale=0.8, text_encoder_scale=0.5))
    params = parse_generation_parameters(infotext(row)[0])
    assert pasted_lora_hashes(params) == {"paper-cut": addnet_hash(files["lora"][0])[:12]}
    assert lora_multipliers(params["Prompt"]) == {"paper-cut": (0.5, 0.8)}
    assert params["Prompt"].startswith(row["prompt"])  # the row's prompt, then the tags


def test_sd_parsers_reads_the_png(files):
    parameters, _ = infotext(work_row(files))
    info = sd_parsers_read(encode_image(PIL.Image.new("RGB", (8, 8)), "png", parameters=parameters))
    (sampler,) = info.samplers
    assert sampler.name == "DPM++ 2M"
    assert sampler.parameters == {"scheduler": "Karras", "cfg_scale": "7.5", "seed": "42", "steps": "20"}
    assert (sampler.model.name, sampler.model.hash) == ("dreamy-v2", files["checkpoint"][1][:10])
    assert [p.value for p in sampler.prompts] == ["a <fox> in snow, (detailed) <lora:paper-cut:0.8>"]
    assert [p.value for p in sampler.negative_prompts] == ["blurry"]
    assert info.metadata["Clip skip"] == "2" and info.metadata["Denoising strength"] == "0.75"


@pytest.mark.parametrize("fmt", ["jpeg", "webp"])
def test_jpeg_and_webp_carry_the_same_text_in_exif_user_comment(files, fmt):
    parameters, _ = infotext(work_row(files))
    data = encode_image(PIL.Image.new("RGB", (8, 8)), fmt, parameters=parameters, png_texts={"sdbatch": "{}"})
    comment = PIL.Image.open(io.BytesIO(data)).getexif().get_ifd(0x8769)[0x9286]
    assert comment == b"UNICODE\x00" + parameters.encode("utf-16-be")  # piexif's "unicode" UserComment
    info = sd_parsers_read(data)
    assert info.samplers[0].name == "DPM++ 2M" and info.samplers[0].parameters["scheduler"] == "Karras"


def test_clip_skip_is_written_only_above_one(files):
    assert "Clip skip" not in infotext(work_row(files), clip_skip=1)[0]
    assert parse_generation_parameters(infotext(work_row(files), clip_skip=1)[0])["Clip skip"] == "1"
    assert parse_generation_parameters(infotext(work_row(files), clip_skip=3)[0])["Clip skip"] == "3"


def test_embeddings_are_listed_only_when_a_prompt_uses_them(files):
    unused = parse_generation_parameters(infotext(work_row(files, prompt="a dog"))[0])
    assert "TI hashes" not in unused
    in_negative = parse_generation_parameters(
        infotext(work_row(files, prompt="a dog", negative_prompt="<fox>"))[0]
    )
    assert in_negative["TI hashes"] == f"<fox>: {files['embedding'][1][:12]}"


def test_what_a1111_has_no_key_for_goes_to_the_sdbatch_chunk(files):
    row = work_row(files, guidance_rescale=0.7)
    parameters, settings = infotext(row, eta=0.3, prompt_syntax="a1111")
    params = parse_generation_parameters(parameters)
    assert not {"CFG Rescale", "CFG rescale", "Eta", "Eta DDIM", "Prompt syntax"} & set(params)
    assert "dpmpp_2m_karras" not in parameters and "Emphasis" not in params  # a1111 syntax: Original
    assert settings == {
        "scheduler": "dpmpp_2m_karras",
        "guidance_rescale": 0.7,
        "prompt_syntax": "a1111",
        "eta": 0.3,
        "model_sha256": files["checkpoint"][1],
        "adapters": [{"kind": "lora", "name": "paper-cut"}],
    }
    data = encode_image(
        PIL.Image.new("RGB", (8, 8)), "png", parameters=parameters, png_texts={"sdbatch": "{}"}
    )
    assert PIL.Image.open(io.BytesIO(data)).text == {"parameters": parameters, "sdbatch": "{}"}


def test_ddim_eta_is_written_as_a1111_eta_ddim(files):
    ddim = work_row(files, scheduler="ddim")
    assert parse_generation_parameters(infotext(ddim, eta=0.3)[0])["Eta DDIM"] == "0.3"
    assert "Eta DDIM" not in parse_generation_parameters(infotext(ddim, eta=0.0)[0])
    assert "Eta DDIM" not in parse_generation_parameters(infotext(work_row(files), eta=0.3)[0])


def test_refiner_is_named_with_its_short_hash_and_switch_point(files, tmp_path):
    refiner = tmp_path / "xl-refiner.safetensors"
    save_file({"w": torch.ones(1)}, str(refiner))
    refiner_file = (str(refiner), sha256(refiner.read_bytes()))
    row = work_row(
        files,
        a1111_identity=identity(files, refiner=refiner_file),
        refiner_sha256=refiner_file[1],
        refiner_adapters="[]",
        refiner_switch_at=0.8,
    )
    parameters, settings = infotext(row)
    params = parse_generation_parameters(parameters)
    assert params["Refiner"] == f"xl-refiner [{refiner_file[1][:10]}]"
    assert params["Refiner switch at"] == "0.8"
    assert (settings["refiner_sha256"], settings["refiner_switch_at"]) == (refiner_file[1], 0.8)


def test_version_is_not_read_as_an_old_a1111_version(files):
    """infotext_versions.parse_version: a Version that parses switches on A1111's back-compat options."""
    version = parse_generation_parameters(infotext(work_row(files))[0])["Version"]
    with pytest.raises(InvalidVersion):
        Version(version)
