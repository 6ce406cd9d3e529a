"""Adapters on SDXL (base and refiner): LoRA-family files fused into the UNet and both text towers, and
textual inversion in SDXL's format (one `clip_l` + `clip_g` file), against diffusers 0.42's
`StableDiffusionXLImg2ImgPipeline` (`load_lora_weights` + `fuse_lora`; `load_textual_inversion` called
once per tower, as its docs do), or against deltas computed here where diffusers has no loader (LoHa/LoKr).

The files are built as in test_lora.py: random factors under real key names. kohya SDXL files name the
text towers `lora_te1_` / `lora_te2_` and the UNet in sgm block names (`input_blocks_4_1_...`, which
diffusers maps with its own block arithmetic) or in diffusers names; PEFT files `text_encoder_2.text_model.*`.
Findings about diffusers 0.42.1: it silently skips kohya keys for the added embedding in diffusers names
(`lora_unet_add_embedding_linear_1`; its sgm name `label_emb_0_0` loads) and maps the sgm name of an
upsampler in a block without attention (the refiner's `output_blocks_2_1_conv`) to an attention that does
not exist, so it is skipped too; those modules are checked against closed-form deltas instead.
"""

from __future__ import annotations

import diffusers
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from sd_core import Img2ImgPipeline
from sd_core.adapters.lora_targets import Target, targets_of
from sd_core.ldm_keys import UNetLayout, unet_key_map
from tests.conftest import diffusers_images, make_images
from tests.sd_core.test_lora import (
    NEGATIVES,
    PROMPTS,
    SEEDS,
    SETTINGS,
    assert_changed_and_equal,
    kohya_name,
    loha_file,
    lokr_file,
    models_of,
    pick,
    run_ours,
    weight_shapes,
    write_kohya,
    write_peft,
)
from tests.sd_core.test_textual_inversion import vectors, write_safetensors

XL_PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
# kohya LoRA/LoCon: attention, feed-forward, 3x3 LoCon, shortcuts, samplers, time and added embeddings,
# conv_in/out, and every layer of the text towers; without the modules diffusers skips (see above) in the
# files it is compared with
XL_KOHYA_MODULES = ("down_blocks.1.", "mid_block.", "up_blocks.0.", "conv_", "time_", "add_embedding")
XL_KOHYA_DIFFUSERS_NAMED = ("down_blocks.1.", "mid_block.", "up_blocks.0.", "conv_", "time_")
REFINER_KOHYA_MODULES = ("down_blocks.2.", "mid_block.", "up_blocks.1.", "conv_", "time_", "add_embedding")
XL_PEFT_MODULES = ("down_blocks.2.attentions.1.", "up_blocks.1.resnets.2.", "mid_block.attentions.")
XL_PEFT_CONFIGS = {  # a default alpha and a per-module pattern per component, rsLoRA on the first tower
    "unet": {"lora_alpha": 6.0, "alpha_pattern": {"mid_block.attentions.0.proj_in": 1.5}},
    "text_encoder": {"lora_alpha": 2.0, "use_rslora": True},
    "text_encoder_2": {"lora_alpha": 8.0, "alpha_pattern": {"encoder.layers.1.mlp.fc1": 1.0}},
}
XL_LOHA_MODULES = (
    ("unet", "down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_v", False),
    ("unet", "up_blocks.1.resnets.1.conv2", False),
    ("unet", "mid_block.resnets.0.conv1", True),
    ("text_encoder", "encoder.layers.1.mlp.fc1", False),
    ("text_encoder_2", "text_model.encoder.layers.2.self_attn.v_proj", False),
)
XL_LOKR_MODULES = (
    ("unet", "down_blocks.2.attentions.0.transformer_blocks.0.attn1.to_q", "w1_full"),
    ("unet", "up_blocks.0.attentions.1.transformer_blocks.1.ff.net.2", "both_factorised"),
    ("text_encoder_2", "text_model.encoder.layers.0.self_attn.k_proj", "both_full"),
    ("unet", "down_blocks.0.resnets.1.conv1", "conv_full"),
    ("unet", "up_blocks.1.resnets.0.conv2", "conv_tucker"),
)
TI_PROMPTS = ["a <xl-style> photo of a cat", "an oil painting of a harbour"]
TI_NEGATIVES = ["blurry", "<xl-style>, low quality"]


# ---- building adapter files ------------------------------------------------------------------------


def sgm_names(pipe) -> dict[str, str]:
    """Our UNet module name -> its sgm name, through the single-file key map (its own tests check it
    against diffusers' single-file conversion)."""
    names = list(weight_shapes_of(pipe, "unet"))
    ldm = unet_key_map(UNetLayout.from_config(pipe.configs["unet"])).to_ldm(
        {f"{name}.weight": torch.empty(0) for name in names}
    )
    return dict(zip(names, (key.removesuffix(".weight") for key in ldm), strict=True))


def weight_shapes_of(pipe, component: str) -> dict[str, torch.Size]:
    return {m: shape for (c, m), shape in weight_shapes(pipe).items() if c == component}


def xl_kohya_namer(pipe, sgm: bool, prefixes=XL_PREFIXES):
    """kohya's key names for SDXL: `lora_te1_` / `lora_te2_` towers, the UNet in sgm or diffusers names."""
    renamed = sgm_names(pipe) if sgm else {}

    def name_of(component: str, module: str) -> str:
        return kohya_name(component, renamed.get(module, module) if component == "unet" else module, prefixes)

    return name_of


def write_xl_kohya(path, pipe, sgm=True, prefixes=XL_PREFIXES, seed=1, modules=XL_KOHYA_MODULES):
    shapes = weight_shapes(pipe)
    targets = pick(shapes, modules)
    rank_of = lambda m: 2 if "resnets" in m else 4  # noqa: E731
    name_of = xl_kohya_namer(pipe, sgm, prefixes)
    return write_kohya(path, shapes, targets, lambda m: 3.0, rank_of, seed, name_of)


def write_xl_peft(path, pipe, seed: int = 2):
    shapes = weight_shapes(pipe)
    write_peft(path, shapes, pick(shapes, XL_PEFT_MODULES), XL_PEFT_CONFIGS, seed)


# ---- running both pipelines ------------------------------------------------------------------------


def diffusers_xl(folder, load=None):
    pipe = diffusers.StableDiffusionXLImg2ImgPipeline.from_pretrained(str(folder))
    pipe.set_progress_bar_config(disable=True)
    if load is not None:
        load(pipe)
    return pipe


def run_diffusers_xl(folder, load) -> np.ndarray:
    pipe = diffusers_xl(folder, load)
    return diffusers_images(pipe, make_images(2), PROMPTS, SEEDS, negative_prompt=NEGATIVES, **SETTINGS)


def fused_ours(folder, specs) -> np.ndarray:
    pipe = Img2ImgPipeline.from_pretrained(folder)
    pipe.load_loras(specs)
    return run_ours(pipe)


@pytest.fixture(scope="module")
def xl_pipes(xl_model_dirs):
    return {family: Img2ImgPipeline.from_pretrained(folder) for family, folder in xl_model_dirs.items()}


@pytest.fixture(scope="module")
def base_images(xl_pipes):
    return {family: run_ours(pipe) for family, pipe in xl_pipes.items()}


@pytest.fixture(scope="module")
def files(xl_pipes, tmp_path_factory):
    """SDXL base: kohya LoRA/LoCon in sgm and in diffusers UNet names (te1 + te2), a PEFT LoRA with
    metadata alphas; refiner: kohya with its one tower as `lora_te2_` (diffusers) and `lora_te_` (ComfyUI)."""
    root = tmp_path_factory.mktemp("xl-loras")
    base, refiner = xl_pipes["xl_base"], xl_pipes["xl_refiner"]
    out = {
        name: root / f"{name}.safetensors"
        for name in ("sgm", "diffusers", "peft", "refiner_te2", "refiner_te")
    }
    write_xl_kohya(out["sgm"], base, sgm=True)
    write_xl_kohya(out["diffusers"], base, sgm=False, modules=XL_KOHYA_DIFFUSERS_NAMED)
    write_xl_peft(out["peft"], base)
    for name, prefix in (("refiner_te2", "lora_te2_"), ("refiner_te", "lora_te_")):
        prefixes = {"unet": "lora_unet_", "text_encoder_2": prefix}
        write_xl_kohya(out[name], refiner, prefixes=prefixes, seed=3, modules=REFINER_KOHYA_MODULES)
    return out


# ---- 1. LoRA parity with diffusers --------------------------------------------------------------------


@pytest.mark.parametrize("unet_names", ["sgm", "diffusers"])
def test_kohya_locon_with_both_text_towers_matches_diffusers(xl_model_dirs, files, base_images, unet_names):
    path = files[unet_names]

    def load(pipe):
        pipe.load_lora_weights(str(path), adapter_name="kohya")
        pipe.fuse_lora(lora_scale=0.8)

    expected = run_diffusers_xl(xl_model_dirs["xl_base"], load)
    got = fused_ours(xl_model_dirs["xl_base"], [(path, 0.8, None)])
    assert_changed_and_equal(got, expected, base_images["xl_base"])


def test_peft_lora_with_text_encoder_2_and_metadata_alphas_matches_diffusers(
    xl_model_dirs, files, base_images
):
    def load(pipe):
        pipe.load_lora_weights(str(files["peft"]), adapter_name="peft")
        pipe.fuse_lora(lora_scale=1.3)

    expected = run_diffusers_xl(xl_model_dirs["xl_base"], load)
    got = fused_ours(xl_model_dirs["xl_base"], [(files["peft"], 1.3, None)])
    assert_changed_and_equal(got, expected, base_images["xl_base"])


@pytest.mark.filterwarnings("ignore:Already found a `peft_config` attribute")  # PEFT, on the 2nd adapter
def test_two_loras_at_different_scales_match_diffusers(xl_model_dirs, files, base_images):
    """`text_encoder_scale` is every text tower's: diffusers' per-component weights for both towers."""

    def load(pipe):
        pipe.load_lora_weights(str(files["sgm"]), adapter_name="kohya")
        pipe.load_lora_weights(str(files["peft"]), adapter_name="peft")
        pipe.set_adapters(["kohya", "peft"], [{"unet": 0.6, "text_encoder": 1.5, "text_encoder_2": 1.5}, 0.9])
        pipe.fuse_lora()

    expected = run_diffusers_xl(xl_model_dirs["xl_base"], load)
    got = fused_ours(xl_model_dirs["xl_base"], [(files["sgm"], 0.6, 1.5), (files["peft"], 0.9, None)])
    assert_changed_and_equal(got, expected, base_images["xl_base"])


def test_refiner_kohya_lora_te2_matches_diffusers(xl_model_dirs, files, base_images):
    def load(pipe):
        pipe.load_lora_weights(str(files["refiner_te2"]), adapter_name="kohya")
        pipe.fuse_lora(lora_scale=0.7)

    expected = run_diffusers_xl(xl_model_dirs["xl_refiner"], load)
    got = fused_ours(xl_model_dirs["xl_refiner"], [(files["refiner_te2"], 0.7, None)])
    assert_changed_and_equal(got, expected, base_images["xl_refiner"])


def test_refiner_reads_comfyui_lora_te_as_its_one_tower(xl_model_dirs, files):
    """ComfyUI names a refiner's bigG `lora_te_`: the same factors fuse into the same weights."""
    fused = {}
    for name in ("refiner_te2", "refiner_te"):
        pipe = Img2ImgPipeline.from_pretrained(xl_model_dirs["xl_refiner"])
        pipe.load_lora(files[name], 0.7)
        fused[name] = pipe.text_encoders["text_encoder_2"].state_dict()
    assert all(torch.equal(fused["refiner_te"][k], v) for k, v in fused["refiner_te2"].items())


def test_adapters_record_the_scale_each_component_was_fused_at(xl_pipes, xl_model_dirs, files):
    pipe = Img2ImgPipeline.from_pretrained(xl_model_dirs["xl_base"])
    report = pipe.load_lora(files["sgm"], scale=0.8, text_encoder_scale=1.2)
    expected = {"unet": 0.8, "text_encoder": 1.2, "text_encoder_2": 1.2}
    assert report.scales == pipe.adapters[0].scales == expected
    assert report.applied_modules == len(pick(weight_shapes(xl_pipes["xl_base"]), XL_KOHYA_MODULES))


def test_both_spellings_of_a_projection_tower_module_resolve(xl_pipes):
    """The projection tower keeps transformers' `text_model.` level (and `text_projection` beside it)."""
    pipe = xl_pipes["xl_base"]
    targets = targets_of(models_of(pipe), pipe.family)
    q_proj = Target("text_encoder_2", "text_model.encoder.layers.0.self_attn.q_proj", "kohya")
    assert targets.resolve("lora_te2_text_model_encoder_layers_0_self_attn_q_proj") == q_proj
    peft = targets.resolve("text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj")
    assert (peft.component, peft.module, peft.naming) == (q_proj.component, q_proj.module, "peft")
    assert targets.resolve("text_encoder_2.text_projection").module == "text_projection"
    assert targets.resolve("lora_te_text_model_encoder_layers_0_self_attn_q_proj") is None  # SD1's name


@pytest.mark.parametrize(
    ("family", "module", "sgm"),
    [
        ("xl_base", "add_embedding.linear_1", False),
        ("xl_base", "add_embedding.linear_2", False),
        ("xl_refiner", "up_blocks.0.upsamplers.0.conv", True),  # sgm output_blocks_2_1_conv
    ],
)
def test_modules_diffusers_skips_get_their_closed_form_delta(
    xl_model_dirs, xl_pipes, tmp_path, family, module, sgm
):
    """W + alpha/rank · up @ down on exactly that module, where diffusers 0.42 leaves W as it is."""
    pipe, path = xl_pipes[family], tmp_path / "one.safetensors"
    name_of = xl_kohya_namer(pipe, sgm, {"unet": "lora_unet_"})
    deltas = write_kohya(
        path, weight_shapes(pipe), [("unet", module)], lambda m: 2.0, lambda m: 4, 5, name_of
    )
    fused = Img2ImgPipeline.from_pretrained(xl_model_dirs[family])
    fused.load_lora(path)
    before, after = pipe.unet.state_dict(), fused.unet.state_dict()
    changed = {key for key in before if not torch.equal(before[key], after[key])}
    assert changed == {f"{module}.weight"}
    got = after[f"{module}.weight"] - before[f"{module}.weight"]
    torch.testing.assert_close(got, deltas["unet", module], rtol=1e-4, atol=1e-6)


def test_sd1_lora_on_sdxl_is_an_error_naming_its_keys(xl_model_dirs, tmp_path):
    name = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    save_file(
        {f"{name}.lora_down.weight": torch.zeros(2, 32), f"{name}.lora_up.weight": torch.zeros(32, 2)},
        str(tmp_path / "sd1.safetensors"),
    )
    pipe = Img2ImgPipeline.from_pretrained(xl_model_dirs["xl_base"])
    with pytest.raises(ValueError, match=rf"2 keys match no module.*{name}"):
        pipe.load_lora(tmp_path / "sd1.safetensors")


# ---- 2. LoHa and LoKr against independently patched weights --------------------------------------------


@pytest.mark.parametrize(
    ("make_file", "modules"),
    [(loha_file, XL_LOHA_MODULES), (lokr_file, XL_LOKR_MODULES)],
    ids=["loha", "lokr"],
)
def test_lycoris_adapter_equals_independently_patched_model(
    xl_model_dirs, xl_pipes, base_images, tmp_path, make_file, modules
):
    path, pipe = tmp_path / "lycoris.safetensors", xl_pipes["xl_base"]
    deltas = make_file(
        path, weight_shapes(pipe), torch.Generator().manual_seed(6), modules, xl_kohya_namer(pipe, True)
    )
    patched = Img2ImgPipeline.from_pretrained(xl_model_dirs["xl_base"])
    with torch.no_grad():
        for (component, module), delta in deltas.items():
            models_of(patched)[component].get_submodule(module).weight += 0.7 * delta
    expected = run_ours(patched)
    got = fused_ours(xl_model_dirs["xl_base"], [(path, 0.7, None)])
    assert_changed_and_equal(got, expected, base_images["xl_base"])


# ---- 3. export -------------------------------------------------------------------------------------


def test_save_lora_writes_text_encoder_2_keys_diffusers_loads(
    xl_model_dirs, xl_pipes, files, base_images, tmp_path
):
    """kohya sgm LoCon at (0.6, towers 1.4) + LoHa at 0.8, saved as one PEFT file; diffusers loads it and
    gives our fused pipeline's images."""
    loha, exported = tmp_path / "loha.safetensors", tmp_path / "sum.safetensors"
    shapes = weight_shapes(xl_pipes["xl_base"])
    loha_file(
        loha,
        shapes,
        torch.Generator().manual_seed(9),
        XL_LOHA_MODULES,
        xl_kohya_namer(xl_pipes["xl_base"], True),
    )
    pipe = Img2ImgPipeline.from_pretrained(xl_model_dirs["xl_base"])
    pipe.load_loras([(files["sgm"], 0.6, 1.4), (loha, 0.8, None)])
    pipe.save_lora(exported)
    keys = load_file(str(exported))
    assert "text_encoder_2.text_model.encoder.layers.2.self_attn.v_proj.lora_A.weight" in keys
    assert "text_encoder.text_model.encoder.layers.1.mlp.fc1.lora_B.weight" in keys

    def load(oracle):
        oracle.load_lora_weights(str(exported), adapter_name="sum")
        oracle.fuse_lora()

    expected = run_diffusers_xl(xl_model_dirs["xl_base"], load)
    assert_changed_and_equal(run_ours(pipe), expected, base_images["xl_base"])


# ---- 4. textual inversion ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def xl_embedding(tmp_path_factory):
    """An SDXL embedding file for "<xl-style>": 2 vectors per tower (clip_l 32 wide, clip_g 64)."""
    folder = tmp_path_factory.mktemp("xl-embeddings")
    tensors = {"clip_l": vectors(2, 32, 1), "clip_g": vectors(2, 64, 2)}
    return write_safetensors(folder / "<xl-style>.safetensors", tensors)


def run_ti(pipe) -> np.ndarray:
    return pipe(
        make_images(2), TI_PROMPTS, negative_prompts=TI_NEGATIVES, seeds=SEEDS, output_type="np", **SETTINGS
    )


def test_sdxl_embedding_in_prompt_and_negative_matches_diffusers(xl_model_dirs, xl_embedding):
    ours = Img2ImgPipeline.from_pretrained(xl_model_dirs["xl_base"])
    base = run_ti(ours)
    info = ours.load_textual_inversion(xl_embedding)
    oracle = diffusers_xl(xl_model_dirs["xl_base"])
    tensors = load_file(str(xl_embedding))
    oracle.load_textual_inversion(
        tensors["clip_l"], token="<xl-style>", text_encoder=oracle.text_encoder, tokenizer=oracle.tokenizer
    )
    oracle.load_textual_inversion(
        tensors["clip_g"],
        token="<xl-style>",
        text_encoder=oracle.text_encoder_2,
        tokenizer=oracle.tokenizer_2,
    )
    expected = diffusers_images(
        oracle, make_images(2), TI_PROMPTS, SEEDS, negative_prompt=TI_NEGATIVES, **SETTINGS
    )
    assert info.tokens == ("<xl-style>", "<xl-style>_1")
    for name in ("tokenizer", "tokenizer_2"):
        assert ours.tokenizers[name].added_tokens_encoder == getattr(oracle, name).added_tokens_encoder
    assert np.abs(expected - base).reshape(2, -1).max(axis=1).min() > 1e-3  # both rows change
    assert np.abs(run_ti(ours) - expected).max() <= 1e-4


def test_refiner_takes_the_clip_g_tensor_of_an_sdxl_embedding(xl_model_dirs, xl_embedding):
    pipe = Img2ImgPipeline.from_pretrained(xl_model_dirs["xl_refiner"])
    pipe.load_textual_inversion(xl_embedding)
    ids = pipe.tokenizers["tokenizer_2"].convert_tokens_to_ids(["<xl-style>", "<xl-style>_1"])
    rows = pipe.text_encoders["text_encoder_2"].get_input_embeddings().weight[ids]
    assert torch.equal(rows, load_file(str(xl_embedding))["clip_g"])


def test_one_tensor_embedding_on_sdxl_is_refused_naming_both_families(xl_model_dirs, tmp_path):
    path = write_safetensors(tmp_path / "sd1.safetensors", {"<sd1>": vectors(1, 32, 0)})
    pipe = Img2ImgPipeline.from_pretrained(xl_model_dirs["xl_base"])
    with pytest.raises(
        ValueError,
        match=r"one-tensor embedding, the kind SD 1.x / SD 2.x models read, but "
        r"this model is SDXL base.*clip_l, clip_g",
    ):
        pipe.load_textual_inversion(path)


def test_sdxl_embedding_on_sd1_is_refused_naming_both_families(model_dirs, xl_embedding):
    pipe = Img2ImgPipeline.from_pretrained(model_dirs["v1"])
    with pytest.raises(
        ValueError,
        match=r"is an SDXL embedding \(clip_l, clip_g tensors\) but this model is "
        r"SD 1.x, which reads one-tensor embeddings",
    ):
        pipe.load_textual_inversion(xl_embedding)


def test_embedding_lacking_a_towers_tensor_names_it(xl_model_dirs, tmp_path):
    path = write_safetensors(tmp_path / "g-only.safetensors", {"clip_g": vectors(1, 64, 0)})
    pipe = Img2ImgPipeline.from_pretrained(xl_model_dirs["xl_base"])
    with pytest.raises(
        ValueError,
        match=r"has no 'clip_l' tensor, which SDXL base's text_encoder needs "
        r"\(the file holds clip_g\)",
    ):
        pipe.load_textual_inversion(path)


def test_every_tower_is_checked_before_any_changes(xl_model_dirs, tmp_path):
    """clip_l fits, clip_g is too wide: the first tower must not have been given the token."""
    path = write_safetensors(
        tmp_path / "wide-g.safetensors", {"clip_l": vectors(1, 32, 0), "clip_g": vectors(1, 96, 0)}
    )
    pipe = Img2ImgPipeline.from_pretrained(xl_model_dirs["xl_base"])
    with pytest.raises(
        ValueError, match=r"96-wide 'clip_g' vectors but this text encoder's token embeddings are 64-wide"
    ):
        pipe.load_textual_inversion(path)
    assert all("wide-g" not in tokenizer.get_vocab() for tokenizer in pipe.tokenizers.values())
