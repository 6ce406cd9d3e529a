"""The driver refuses a model or adapters the actors could not load, before any work and without weights.

Every case goes through `jobs.plan.make_plan` with real files in the real formats (tiny models written by
diffusers, kohya/PEFT LoRAs and A1111/diffusers embeddings written as the core's own tests write them), and
where it matters the real `Img2ImgPipeline` load is asked whether it agrees.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from connectors.storage import Storage, join_uri
from jobs.plan import PlanError, make_plan
from jobs.preflight import CHECKED
from sd_core import Img2ImgPipeline
from sd_core.model_files import SAFETENSORS_LENGTH_BYTES, safetensors_header_length
from tests.conftest import s3_store
from tests.jobs.test_img2img import make_config, write_dataset
from tests.sd_core.test_loading import _pickle_copy
from tests.sd_core.test_lora import (
    KOHYA_UNET_MODULES,
    PEFT_CONFIGS,
    pick,
    weight_shapes,
    write_kohya,
    write_peft,
)
from tests.sd_core.test_sdxl_adapters import REFINER_KOHYA_MODULES, write_xl_kohya, write_xl_peft
from tests.sd_core.test_textual_inversion import WIDTH, vectors, write_a1111_pt, write_safetensors

PICKLE_WORDS = (
    "is a pickle file",
    "arbitrary code",
    "Convert it to .safetensors",
    "model.allow_pickle: true",
)


@pytest.fixture(scope="module")
def loras(model_dirs, tmp_path_factory) -> dict[str, dict[str, Path]]:
    """Per family: a kohya LoRA/LoCon with text-encoder modules and a PEFT LoRA with metadata alphas."""
    root = tmp_path_factory.mktemp("preflight-loras")
    files = {}
    for family, folder in model_dirs.items():
        shapes = weight_shapes(Img2ImgPipeline.from_pretrained(folder))
        kohya, peft = root / f"{family}_kohya.safetensors", root / f"{family}_peft.safetensors"
        targets = pick(shapes, KOHYA_UNET_MODULES)
        write_kohya(kohya, shapes, targets, alpha_of=lambda m: 3.0, rank_of=lambda m: 2, seed=1)
        write_peft(peft, shapes, pick(shapes, ("mid_block.attentions.",)), PEFT_CONFIGS, seed=2)
        files[family] = {"kohya": kohya, "peft": peft}
    return files


@pytest.fixture(scope="module")
def xl_adapters(xl_model_dirs, tmp_path_factory) -> dict[str, Path]:
    """SDXL base: a kohya LoRA (sgm UNet names, lora_te1_ + lora_te2_), a PEFT LoRA (text_encoder_2.*) and
    an SDXL embedding (clip_l + clip_g); refiner: a kohya LoRA whose one tower is lora_te2_."""
    root = tmp_path_factory.mktemp("preflight-xl")
    base = Img2ImgPipeline.from_pretrained(xl_model_dirs["xl_base"])
    refiner = Img2ImgPipeline.from_pretrained(xl_model_dirs["xl_refiner"])
    files = {name: root / f"{name}.safetensors" for name in ("kohya", "peft", "refiner_kohya")}
    write_xl_kohya(files["kohya"], base)
    write_xl_peft(files["peft"], base)
    refiner_prefixes = {"unet": "lora_unet_", "text_encoder_2": "lora_te2_"}
    write_xl_kohya(files["refiner_kohya"], refiner, prefixes=refiner_prefixes, modules=REFINER_KOHYA_MODULES)
    tensors = {"clip_l": vectors(2, 32, 1), "clip_g": vectors(2, 64, 2)}
    files["embedding"] = write_safetensors(root / "<xl-style>.safetensors", tensors)
    return files


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> str:
    return write_dataset(Storage(), str(tmp_path_factory.mktemp("preflight-data")), [(64, 64)])


@pytest.fixture
def plan_for(manifest, tmp_path):
    """make_plan for a model and adapters: `plan_for(model, loras=[path], embeddings=[(path, token)])`."""

    def plan(model, loras=(), embeddings=(), **settings):
        flags = {
            "adapters.loras": [{"path": str(p)} for p in loras] or None,
            "adapters.embeddings": [{"path": str(p), "token": t} for p, t in embeddings] or None,
            **settings,
        }
        return make_plan(make_config(str(model), manifest, str(tmp_path / "out"), **flags))

    return plan


def refusal(plan_for, *args, **kwargs) -> str:
    with pytest.raises(PlanError) as caught:
        plan_for(*args, **kwargs)
    return str(caught.value)


def real_load(folder, loras=(), embeddings=(), allow_pickle=False) -> Img2ImgPipeline:
    """What an actor does (jobs/model_setup.py): load the model, fuse the LoRAs strictly, add embeddings."""
    pipe = Img2ImgPipeline.from_pretrained(folder, allow_pickle=allow_pickle)
    if loras:
        pipe.load_loras([(p, 1.0, None) for p in loras], allow_pickle=allow_pickle)
    for path, token in embeddings:
        pipe.load_textual_inversion(path, token=token, allow_pickle=allow_pickle)
    return pipe


def single_file(model_dirs, family: str, path: Path) -> Path:
    Img2ImgPipeline.from_pretrained(model_dirs[family]).save_single_file(path)
    return path


def cut_after_header(path: Path) -> None:
    """Keep a safetensors file's header and drop its tensor data: only a header reader can still use it."""
    data = path.read_bytes()
    path.write_bytes(data[: SAFETENSORS_LENGTH_BYTES + safetensors_header_length(data)])


# ---- models ------------------------------------------------------------------------------------------


def test_plain_model_is_described(plan_for, model_dirs):
    plan = plan_for(model_dirs["v2"])
    assert f"{CHECKED}model: diffusers folder, SD 2.x, text width 64; no weights read" in plan.describe()


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".pth", ".bin"])
def test_pickled_single_file_is_refused_without_opt_in(plan_for, model_dirs, tmp_path, suffix):
    safe = single_file(model_dirs, "v1", tmp_path / "model.safetensors")
    pickled = tmp_path / f"model{suffix}"
    torch.save({"state_dict": load_file(str(safe))}, pickled)
    message = refusal(plan_for, pickled)
    assert f"model.path {pickled}: {pickled} is a pickle file" in message
    assert all(words in message for words in PICKLE_WORDS), message
    plan = plan_for(pickled, **{"model.allow_pickle": True})
    assert any(f"{CHECKED}model: pickled single file, family unknown" in line for line in plan.describe())
    assert "memory    weights not counted: the model is a pickle" in plan.describe()[-1]


def test_folder_with_pickled_weights_is_refused_whatever_model_config_says(plan_for, model_dirs, tmp_path):
    folder = _pickle_copy(model_dirs["v1"], tmp_path / "pickled")
    message = refusal(plan_for, folder, **{"model.config": str(model_dirs["v1"])})
    assert f"{folder}/unet/diffusion_pytorch_model.bin is a pickle file" in message
    assert all(words in message for words in PICKLE_WORDS), message
    with pytest.raises(ValueError, match="pickle file"):
        real_load(folder)
    assert plan_for(folder, **{"model.allow_pickle": True}).checks


def test_folder_without_weights_is_refused_as_the_loader_would(plan_for, model_dirs, tmp_path):
    folder = Path(shutil.copytree(model_dirs["v1"], tmp_path / "model"))
    (folder / "text_encoder" / "model.safetensors").unlink()
    message = refusal(plan_for, folder)
    assert f"model folder {folder} has no weights for 'text_encoder'" in message


@pytest.mark.parametrize(
    ("family", "described"),
    [("xl_base", "SDXL base, text widths 32 + 64"), ("xl_refiner", "SDXL refiner, text width 64")],
)
def test_sdxl_folder_is_described(plan_for, xl_model_dirs, family, described):
    plan = plan_for(xl_model_dirs[family])
    assert f"{CHECKED}model: diffusers folder, {described}; no weights read" in plan.describe()


def test_sdxl_single_file_family_comes_from_its_header(plan_for, xl_model_dirs, xl_adapters, tmp_path):
    path = single_file(xl_model_dirs, "xl_base", tmp_path / "xl.safetensors")
    cut_after_header(path)
    plan = plan_for(path, loras=[xl_adapters["kohya"]])
    assert f"{CHECKED}model: single file, SDXL base, text widths 32 + 64; no weights read" in plan.describe()


def test_single_file_family_comes_from_its_header(plan_for, model_dirs, loras, tmp_path):
    path = single_file(model_dirs, "v2", tmp_path / "model.safetensors")
    cut_after_header(path)  # the tensor data is gone: preflight must not need it
    plan = plan_for(path, loras=[loras["v2"]["kohya"]])
    assert f"{CHECKED}model: single file, SD 2.x, text width 64; no weights read" in plan.describe()
    message = refusal(plan_for, path, loras=[loras["v1"]["kohya"]])
    assert f"does not fit the model {path} (SD 2.x): shape mismatch at" in message


def test_preflight_reads_no_model_weights(plan_for, model_dirs, loras, tmp_path, monkeypatch):
    folder = Path(shutil.copytree(model_dirs["v1"], tmp_path / "model"))
    for weights in folder.glob("*/*.safetensors"):
        cut_after_header(weights)
    import safetensors.torch

    def forbidden(*args, **kwargs):
        raise AssertionError("preflight must not read model weights")

    monkeypatch.setattr(safetensors.torch, "load_file", forbidden)
    monkeypatch.setattr("sd_core.loading.load_file", forbidden)
    embedding = write_safetensors(tmp_path / "e.safetensors", {"<e>": vectors(1, WIDTH["v1"], 0)})
    plan = plan_for(folder, loras=[loras["v1"]["kohya"]], embeddings=[(embedding, None)])
    assert len(plan.checks) == 3  # model, LoRA, embedding
    memory = [line for line in plan.describe() if line.startswith("memory")]  # from the headers
    assert len(memory) == 1 and "model 0.02 GiB (4.8 M parameters)" in memory[0]


def test_dry_run_without_adapters_does_not_import_torch(model_dirs, manifest, tmp_path):
    script = (
        "import sys\n"
        "from jobs.plan import make_plan\n"
        "from tests.jobs.test_img2img import make_config\n"
        f"plan = make_plan(make_config({str(model_dirs['v1'])!r}, {manifest!r}, {str(tmp_path / 'o')!r}))\n"
        "assert plan.checks, plan.checks\n"
        "print(sorted(m for m in ('torch', 'transformers', 'diffusers') if m in sys.modules))\n"
    )
    # make_config comes from a test module that imports torch: stub it to see what the plan itself imports
    stub = "import sys, types\nsys.modules['tests.jobs.test_img2img'] = types.ModuleType('stub')\n"
    stub += "from jobs.config import load_config\n"
    stub += "sys.modules['tests.jobs.test_img2img'].make_config = lambda m, i, o: load_config(None, flags="
    stub += "{'model.path': m, 'manifest': i, 'output': o})\n"
    result = subprocess.run(
        [sys.executable, "-c", stub + script], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_model_and_adapters_on_s3_are_read_without_weights(
    s3_server, monkeypatch, plan_for, model_dirs, loras, tmp_path
):
    """On S3 the driver reads the folder's listing and configs, a single file's header (ranged reads) and
    the adapter files; the model weights are stored cut after their headers, so reading them would fail."""
    store = s3_store(s3_server, monkeypatch)
    folder = Path(shutil.copytree(model_dirs["v1"], tmp_path / "model"))
    single_file(model_dirs, "v1", folder.parent / "model.safetensors")
    for weights in [*folder.glob("*/*.safetensors"), folder.parent / "model.safetensors"]:
        cut_after_header(weights)
    uploads = {str(f.relative_to(tmp_path)): f for f in tmp_path.rglob("*") if f.is_file()}
    uploads[loras["v1"]["kohya"].name] = loras["v1"]["kohya"]
    for relative, file in uploads.items():
        store.storage.write_bytes(join_uri(store.root, relative), file.read_bytes())
    lora = join_uri(store.root, loras["v1"]["kohya"].name)
    endpoint = {"storage.endpoint_url": s3_server.endpoint_url}
    for model, kind in [
        (join_uri(store.root, "model"), "diffusers folder"),
        (f"{store.root}/model.safetensors", "single file"),
    ]:
        checks = plan_for(model, loras=[lora], **endpoint).checks
        assert checks[0] == f"{CHECKED}model: {kind}, SD 1.x, text width 32; no weights read"
        assert checks[1].startswith(f"{CHECKED}LoRA {lora}: kohya, ")


# ---- LoRAs -------------------------------------------------------------------------------------------


def test_matching_lora_and_embedding_pass_and_load(plan_for, model_dirs, loras, tmp_path):
    embedding = write_safetensors(tmp_path / "multi-vec.safetensors", {"<multi-vec>": vectors(3, 32, 3)})
    lora_files = [loras["v1"]["kohya"], loras["v1"]["peft"]]
    plan = plan_for(model_dirs["v1"], loras=lora_files, embeddings=[(embedding, None)])
    lines = plan.describe()
    assert any(line.startswith(f"{CHECKED}LoRA {lora_files[0]}: kohya, ") for line in lines), lines
    assert any(line.startswith(f"{CHECKED}LoRA {lora_files[1]}: peft, ") for line in lines), lines
    assert f"{CHECKED}embedding {embedding}: token '<multi-vec>', 3 vectors 32 wide" in lines
    pipe = real_load(model_dirs["v1"], lora_files, [(embedding, None)])
    assert [a.kind for a in pipe.adapters] == ["lora", "lora", "textual_inversion"]


def test_sd2_lora_on_an_sd1_model_is_a_shape_mismatch(plan_for, model_dirs, loras):
    lora = loras["v2"]["kohya"]
    message = refusal(plan_for, model_dirs["v1"], loras=[lora])
    assert f"adapters.loras[0] {lora} does not fit the model {model_dirs['v1']} (SD 1.x)" in message
    assert "shape mismatch at v2_kohya: " in message
    assert "the adapter's delta has shape" in message and "but the model's weight has shape" in message
    assert "different model family" in message
    with pytest.raises(ValueError, match="different model family"):
        real_load(model_dirs["v1"], [lora])


def with_extra_modules(source: Path, target: Path, names: list[str]) -> Path:
    """`source`'s tensors plus rank-1 kohya factors under `names`."""
    tensors = load_file(str(source))
    for name in names:
        tensors |= {
            f"{name}.lora_down.weight": torch.zeros(1, 8),
            f"{name}.lora_up.weight": torch.zeros(8, 1),
        }
        tensors[f"{name}.alpha"] = torch.tensor(1.0)
    save_file(tensors, str(target))
    return target


UNKNOWN_NAMES = [f"lora_unet_no_such_block_{i}" for i in range(4)]


def test_lora_whose_modules_name_no_layer_is_refused(plan_for, model_dirs, loras, tmp_path):
    lora = with_extra_modules(loras["v1"]["kohya"], tmp_path / "odd.safetensors", UNKNOWN_NAMES)
    total = len({key.rsplit(".", 2)[0] for key in load_file(str(lora))})
    message = refusal(plan_for, model_dirs["v1"], loras=[lora])
    assert f"adapters.loras[0] {lora}: 4 of {total} modules name no layer of the model" in message
    assert f"e.g. {UNKNOWN_NAMES[0]}" in message and "is it a LoRA for another model family" in message
    with pytest.raises(ValueError, match="12 keys match no module"):
        real_load(model_dirs["v1"], [lora])


def test_sdxl_loras_and_embedding_pass_on_sdxl_base_and_load(plan_for, xl_model_dirs, xl_adapters):
    loras, embedding = [xl_adapters["kohya"], xl_adapters["peft"]], xl_adapters["embedding"]
    lines = plan_for(xl_model_dirs["xl_base"], loras=loras, embeddings=[(embedding, None)]).checks
    assert lines[1].startswith(f"{CHECKED}LoRA {loras[0]}: kohya, ") and "modules patch the model" in lines[1]
    assert lines[2].startswith(f"{CHECKED}LoRA {loras[1]}: peft, ")
    assert (
        lines[3]
        == f"{CHECKED}embedding {embedding}: token '<xl-style>', 2 vectors clip_l 32 wide, clip_g 64 wide"
    )
    pipe = real_load(xl_model_dirs["xl_base"], loras, [(embedding, None)])
    assert [a.kind for a in pipe.adapters] == ["lora", "lora", "textual_inversion"]


def test_sd1_lora_on_sdxl_base_is_refused_naming_both_families(plan_for, xl_model_dirs, loras):
    lora = loras["v1"]["kohya"]
    message = refusal(plan_for, xl_model_dirs["xl_base"], loras=[lora])
    assert f"adapters.loras[0] {lora} is a LoRA for SD 1.x / SD 2.x, not for the model " in message
    assert f"{xl_model_dirs['xl_base']} (SDXL base): its text-encoder keys start lora_te_*" in message
    assert (
        "SDXL base names its text encoders lora_te1_*, text_encoder.*, lora_te2_*, text_encoder_2.*"
        in message
    )
    with pytest.raises(ValueError, match="a LoRA for a different model family"):  # the load's shape check
        real_load(xl_model_dirs["xl_base"], [lora])


def test_sdxl_lora_on_sd1_is_refused_naming_both_families(plan_for, model_dirs, xl_adapters):
    lora = xl_adapters["kohya"]
    message = refusal(plan_for, model_dirs["v1"], loras=[lora])
    assert (
        f"adapters.loras[0] {lora} is a LoRA for SDXL base, not for the model {model_dirs['v1']} (SD 1.x)"
        in message
    )
    assert "its text-encoder keys start lora_te1_*, lora_te2_*" in message
    assert "Use a LoRA made for SD 1.x, or a SDXL base model." in message
    with pytest.raises(ValueError, match="a LoRA for a different model family"):
        real_load(model_dirs["v1"], [lora])


def test_refiner_section_and_its_adapters_are_checked(plan_for, xl_model_dirs, xl_adapters):
    """The refiner's own LoRA is checked against the refiner (its one tower: lora_te2_), and the base's
    LoRA would not fit it."""
    refiner = {"refiner.path": str(xl_model_dirs["xl_refiner"])}
    lora = xl_adapters["refiner_kohya"]
    checks = plan_for(
        xl_model_dirs["xl_base"], **refiner, **{"refiner.adapters.loras": [{"path": str(lora)}]}
    ).checks
    assert checks[1] == f"{CHECKED}refiner: diffusers folder, SDXL refiner, text width 64; no weights read"
    assert checks[2].startswith(f"{CHECKED}LoRA {lora}: kohya, ")
    base_lora = {"refiner.adapters.loras": [{"path": str(xl_adapters["kohya"])}]}
    message = refusal(plan_for, xl_model_dirs["xl_base"], **refiner, **base_lora)
    assert (
        f"refiner.adapters.loras[0] {xl_adapters['kohya']} is a LoRA for SDXL base, not for the model"
        in message
    )


def test_empty_lora_is_refused(plan_for, model_dirs, tmp_path):
    save_file({}, str(tmp_path / "empty.safetensors"))
    message = refusal(plan_for, model_dirs["v1"], loras=[tmp_path / "empty.safetensors"])
    assert "holds no LoRA weights at all" in message


def test_pickled_lora_needs_opt_in(plan_for, model_dirs, loras, tmp_path):
    pickled = tmp_path / "lora.pt"
    torch.save(load_file(str(loras["v1"]["kohya"])), pickled)
    message = refusal(plan_for, model_dirs["v1"], loras=[pickled])
    assert f"adapters.loras[0] {pickled}: {pickled} is a pickle file" in message
    assert all(words in message for words in PICKLE_WORDS), message
    plan = plan_for(model_dirs["v1"], loras=[pickled], **{"model.allow_pickle": True})
    assert any(line.startswith(f"{CHECKED}LoRA {pickled}: kohya") for line in plan.checks)


# ---- embeddings ----------------------------------------------------------------------------------------


def test_embedding_of_another_width_is_refused(plan_for, model_dirs, tmp_path):
    embedding = write_safetensors(tmp_path / "wide.safetensors", {"<wide>": vectors(2, WIDTH["v2"], 0)})
    message = refusal(plan_for, model_dirs["v1"], embeddings=[(embedding, None)])
    assert f"adapters.embeddings[0] {embedding} does not fit the model {model_dirs['v1']} (SD 1.x)" in message
    assert "has 64-wide vectors but this text encoder's token embeddings are 32-wide" in message
    assert "another model family" in message
    with pytest.raises(ValueError, match="64-wide vectors"):
        real_load(model_dirs["v1"], embeddings=[(embedding, None)])


def test_sdxl_embedding_on_sd1_is_refused_naming_both_families(plan_for, model_dirs, xl_adapters):
    embedding = xl_adapters["embedding"]
    message = refusal(plan_for, model_dirs["v1"], embeddings=[(embedding, None)])
    assert f"adapters.embeddings[0] {embedding} does not fit the model {model_dirs['v1']} (SD 1.x)" in message
    assert "is an SDXL embedding (clip_l, clip_g tensors) but this model is SD 1.x" in message
    with pytest.raises(ValueError, match="is an SDXL embedding"):
        real_load(model_dirs["v1"], embeddings=[(embedding, None)])


def test_sd1_embedding_on_sdxl_is_refused_naming_both_families(plan_for, xl_model_dirs, tmp_path):
    embedding = write_safetensors(tmp_path / "sd1.safetensors", {"<sd1>": vectors(1, WIDTH["v1"], 0)})
    message = refusal(plan_for, xl_model_dirs["xl_base"], embeddings=[(embedding, None)])
    assert (
        "is a one-tensor embedding, the kind SD 1.x / SD 2.x models read, but this model is SDXL base"
        in message
    )


def test_pickled_embedding_needs_opt_in(plan_for, model_dirs, tmp_path):
    pickled = write_a1111_pt(tmp_path / "CharTurner.pt", "charturnerv2", vectors(2, WIDTH["v1"], 1))
    message = refusal(plan_for, model_dirs["v1"], embeddings=[(pickled, None)])
    assert f"adapters.embeddings[0] {pickled}: {pickled} is a pickle file" in message
    assert all(words in message for words in PICKLE_WORDS), message
    plan = plan_for(model_dirs["v1"], embeddings=[(pickled, None)], **{"model.allow_pickle": True})
    assert f"{CHECKED}embedding {pickled}: token 'charturnerv2', 2 vectors 32 wide" in plan.checks


def test_two_embeddings_adding_one_token_are_refused(plan_for, model_dirs, tmp_path):
    first = write_safetensors(tmp_path / "a.safetensors", {"<a>": vectors(2, WIDTH["v1"], 0)})
    second = write_safetensors(tmp_path / "b.safetensors", {"<b>": vectors(1, WIDTH["v1"], 1)})
    message = refusal(plan_for, model_dirs["v1"], embeddings=[(first, None), (second, "<a>")])
    assert "adapters.embeddings[1]" in message and "['<a>'] that adapters.embeddings[0] adds too" in message
    with pytest.raises(ValueError, match="already in the tokenizer's vocabulary"):
        real_load(model_dirs["v1"], embeddings=[(first, None), (second, "<a>")])
