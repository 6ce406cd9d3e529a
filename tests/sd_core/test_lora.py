"""LoRA-family adapters fused at load: parity with diffusers 0.42's `load_lora_weights` + `fuse_lora`,
closed-form LoHa/LoKr/LoCon deltas, PEFT export, errors and half precision.

The test files are built here from random tensors under real key names (tiny ranks, magnitudes that
visibly change the images). Findings about diffusers 0.42.1 + transformers 5 (see the tests below):
it loads kohya UNet keys of every module kind (attention, 3x3 LoCon, conv_in/out, time embedding) and
text-encoder keys (kohya `lora_te_text_model_*`, PEFT `text_encoder.text_model.*`), but mis-scales kohya
files whose alphas differ between modules, and reads SD1 kohya keys in CompVis block names wrongly; those
two cases are checked against closed-form deltas instead.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable

import diffusers
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from sd_core import Img2ImgPipeline
from sd_core.adapters.lora import delta_of, fit_delta, fuse_lora, fuse_loras, load_lora_file
from sd_core.adapters.lora_export import save_lora_peft
from sd_core.adapters.lora_targets import targets_of
from tests.conftest import diffusers_images, make_images

PROMPTS = ["a photo of a cat", "an oil painting of a harbour at night"]
NEGATIVES = ["blurry", "low quality"]
SEEDS = [3, 4]
TOLERANCE = 1e-4
RANK = 4
SETTINGS = dict(strength=0.8, guidance_scale=7.5, num_inference_steps=5)
# kohya LoRA: cross-attention, self-attention, feed-forward, 3x3 LoCon, shortcuts, samplers, time embedding,
# conv_in/out, and every text-encoder layer
KOHYA_UNET_MODULES = ("down_blocks.1.", "mid_block.", "up_blocks.2.", "conv_", "time_embedding")
PEFT_UNET_MODULES = ("down_blocks.0.attentions.0.", "up_blocks.1.resnets.2.", "mid_block.attentions.")
# PEFT LoRA alphas: a default, a per-module alpha_pattern, and rsLoRA's alpha / sqrt(rank)
PEFT_CONFIGS = {
    "unet": {"lora_alpha": 6.0, "alpha_pattern": {"mid_block.attentions.0.proj_in": 1.5}},
    "text_encoder": {"lora_alpha": 2.0, "use_rslora": True},
}
SD_KOHYA_PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te_"}
# A hand-made table of CompVis names for the tiny layout ([CA, CA, Down] / [Up, CA, CA], 2 layers per level)
LDM_NAMES = {
    "input_blocks_0_0": "conv_in",
    "time_embed_0": "time_embedding.linear_1",
    "input_blocks_1_0_in_layers_2": "down_blocks.0.resnets.0.conv1",
    "input_blocks_3_0_op": "down_blocks.0.downsamplers.0.conv",
    "input_blocks_4_1_proj_out": "down_blocks.1.attentions.0.proj_out",
    "input_blocks_7_0_emb_layers_1": "down_blocks.2.resnets.0.time_emb_proj",
    "middle_block_1_transformer_blocks_0_ff_net_2": "mid_block.attentions.0.transformer_blocks.0.ff.net.2",
    "middle_block_2_out_layers_3": "mid_block.resnets.1.conv2",
    "output_blocks_3_0_skip_connection": "up_blocks.1.resnets.0.conv_shortcut",
    "output_blocks_5_2_conv": "up_blocks.1.upsamplers.0.conv",
    "output_blocks_8_1_proj_in": "up_blocks.2.attentions.2.proj_in",
    "out_2": "conv_out",
}


# ---- building adapter files ------------------------------------------------------------------------


def models_of(pipe) -> dict[str, torch.nn.Module]:
    """{component: model} of what adapters patch: the UNet and every text tower."""
    return {"unet": pipe.unet, **pipe.text_encoders}


def weight_shapes(pipe) -> dict[tuple[str, str], torch.Size]:
    """(component, module) -> weight shape of every Linear/Conv2d of the pipeline."""
    return {
        (component, name): module.weight.shape
        for component, model in models_of(pipe).items()
        for name, module in model.named_modules()
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d))
    }


def pick(shapes, unet_prefixes, text_encoder: bool = True) -> list[tuple[str, str]]:
    """UNet modules under `unet_prefixes`, and every text tower's transformer layers if `text_encoder`."""
    return [
        (c, m)
        for c, m in shapes
        if (c == "unet" and m.startswith(unet_prefixes)) or (c != "unet" and text_encoder and "layers." in m)
    ]


def randn(g, *shape, magnitude=0.2) -> torch.Tensor:
    return torch.randn(*shape, generator=g) * magnitude


def lora_factors(g, shape, rank) -> tuple[torch.Tensor, torch.Tensor]:
    """(down, up): a 3x3 conv gets a 3x3 down and a 1x1 up (LoCon); 1x1 convs keep 4-D factors."""
    if len(shape) == 4:
        return randn(g, rank, shape[1], *shape[2:]), randn(g, shape[0], rank, 1, 1)
    return randn(g, rank, shape[1]), randn(g, shape[0], rank)


def kohya_name(component: str, module: str, prefixes: dict[str, str] = SD_KOHYA_PREFIXES) -> str:
    """kohya's key: the component's prefix and the module path with "." -> "_" (text towers under
    transformers 4's `text_model.` level)."""
    return prefixes[component] + text_model_path(component, module).replace(".", "_")


def text_model_path(component: str, module: str) -> str:
    """A module's path as files name it: text modules under `text_model.` (flat in transformers 5's
    CLIPTextModel, nested in CLIPTextModelWithProjection)."""
    return module if component == "unet" else "text_model." + module.removeprefix("text_model.")


def closed_form(down, up, alpha, rank) -> torch.Tensor:
    return (up.flatten(1) @ down.flatten(1)).reshape(up.shape[0], *down.shape[1:]) * (alpha / rank)


def write_kohya(
    path, shapes, targets, alpha_of, rank_of, seed=0, name_of: Callable[[str, str], str] = kohya_name
) -> dict[tuple[str, str], torch.Tensor]:
    """A kohya file over `targets` (keys named by `name_of(component, module)`); returns each module's
    closed-form delta at scale 1."""
    g = torch.Generator().manual_seed(seed)
    tensors, deltas = {}, {}
    for component, module in targets:
        shape, rank, alpha = shapes[component, module], rank_of(module), alpha_of(module)
        down, up = lora_factors(g, shape, rank)
        name = name_of(component, module)
        tensors |= {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up}
        tensors[f"{name}.alpha"] = torch.tensor(alpha)
        deltas[component, module] = closed_form(down, up, alpha, rank).reshape(shape)
    save_file(tensors, str(path))
    return deltas


def write_peft(path, shapes, targets, configs: dict[str, dict], seed) -> None:
    """A diffusers-format file: `unet.<module>.lora_A/B`, `text_encoder.text_model.<module>...` (SDXL:
    also `text_encoder_2.`), and the `lora_adapter_metadata` JSON of PEFT LoraConfig fields per component
    (`configs`)."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for component, module in targets:
        down, up = lora_factors(g, shapes[component, module], RANK)
        key = f"{component}.{text_model_path(component, module)}"
        tensors |= {f"{key}.lora_A.weight": down, f"{key}.lora_B.weight": up}
    metadata = {}
    for component, config in configs.items():
        config = config | {"r": RANK, "target_modules": [m for c, m in targets if c == component]}
        metadata |= {f"{component}.{field}": value for field, value in config.items()}
    save_file(tensors, str(path), metadata={"lora_adapter_metadata": json.dumps(metadata)})


# ---- running both pipelines ------------------------------------------------------------------------


def run_ours(pipe) -> np.ndarray:
    return pipe(
        make_images(2), PROMPTS, negative_prompts=NEGATIVES, seeds=SEEDS, output_type="np", **SETTINGS
    )


def run_diffusers(folder, load) -> np.ndarray:
    """diffusers' pipeline after `load(pipe)` (no clip_skip, so no `text_model` alias hack: the alias would
    make diffusers keep the `text_model.` prefix and miss the flat text encoder's modules)."""
    pipe = diffusers.StableDiffusionImg2ImgPipeline.from_pretrained(str(folder), safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    load(pipe)
    return diffusers_images(pipe, make_images(2), PROMPTS, SEEDS, negative_prompt=NEGATIVES, **SETTINGS)


def fused_ours(folder, specs) -> np.ndarray:
    """Our pipeline with LoRAs given as (path, scale, text_encoder_scale) loaded through its public API."""
    pipe = Img2ImgPipeline.from_pretrained(folder)
    pipe.load_loras(specs)
    return run_ours(pipe)


@pytest.fixture(scope="module")
def shapes(model_dirs):
    return {family: weight_shapes(Img2ImgPipeline.from_pretrained(d)) for family, d in model_dirs.items()}


@pytest.fixture(scope="module")
def base_images(model_dirs):
    return {family: run_ours(Img2ImgPipeline.from_pretrained(d)) for family, d in model_dirs.items()}


@pytest.fixture(scope="module")
def files(shapes, tmp_path_factory):
    """Per family: a kohya LoRA (alpha 3, ranks 4 and 2 for resnets) and a PEFT LoRA (PEFT_CONFIGS)."""
    root = tmp_path_factory.mktemp("loras")
    out = {}
    for family, family_shapes in shapes.items():
        kohya, peft = root / f"{family}_kohya.safetensors", root / f"{family}_peft.safetensors"
        write_kohya(
            kohya,
            family_shapes,
            pick(family_shapes, KOHYA_UNET_MODULES),
            alpha_of=lambda m: 3.0,
            rank_of=lambda m: 2 if "resnets" in m else RANK,
            seed=1,
        )
        targets = pick(family_shapes, PEFT_UNET_MODULES)
        write_peft(peft, family_shapes, targets, PEFT_CONFIGS, seed=2)
        out[family] = {"kohya": kohya, "peft": peft}
    return out


@pytest.fixture
def v1_pipe(model_dirs):
    return Img2ImgPipeline.from_pretrained(model_dirs["v1"])


def assert_changed_and_equal(got, expected, base):
    assert np.abs(expected - base).max() > 1e-3  # the adapter visibly changes the images
    assert np.abs(got - expected).max() <= TOLERANCE


# ---- 1. parity with diffusers ------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["v1", "v2"])
def test_kohya_locon_with_text_encoder_matches_diffusers(model_dirs, files, base_images, family):
    path = files[family]["kohya"]

    def load(pipe):
        pipe.load_lora_weights(str(path), adapter_name="kohya")
        pipe.fuse_lora(lora_scale=0.8)

    expected = run_diffusers(model_dirs[family], load)
    got = fused_ours(model_dirs[family], [(path, 0.8, None)])
    assert_changed_and_equal(got, expected, base_images[family])


@pytest.mark.parametrize("family", ["v1", "v2"])
def test_peft_lora_with_metadata_alphas_and_rslora_matches_diffusers(model_dirs, files, base_images, family):
    path = files[family]["peft"]

    def load(pipe):
        pipe.load_lora_weights(str(path), adapter_name="peft")
        pipe.fuse_lora(lora_scale=1.3)

    expected = run_diffusers(model_dirs[family], load)
    got = fused_ours(model_dirs[family], [(path, 1.3, None)])
    assert_changed_and_equal(got, expected, base_images[family])


@pytest.mark.filterwarnings("ignore:Already found a `peft_config` attribute")  # PEFT, on the 2nd adapter
@pytest.mark.parametrize("family", ["v1", "v2"])
def test_two_loras_at_different_scales_match_diffusers(model_dirs, files, base_images, family):
    kohya, peft = files[family]["kohya"], files[family]["peft"]

    def load(pipe):
        pipe.load_lora_weights(str(kohya), adapter_name="kohya")
        pipe.load_lora_weights(str(peft), adapter_name="peft")
        pipe.set_adapters(["kohya", "peft"], [{"unet": 0.6, "text_encoder": 1.5}, 0.9])
        pipe.fuse_lora()

    expected = run_diffusers(model_dirs[family], load)
    got = fused_ours(model_dirs[family], [(kohya, 0.6, 1.5), (peft, 0.9, None)])
    assert_changed_and_equal(got, expected, base_images[family])


# ---- closed forms where diffusers gets it wrong --------------------------------------------------------


def fused_minus_base(folder, adapters) -> dict[tuple[str, str], torch.Tensor]:
    base = Img2ImgPipeline.from_pretrained(folder)
    pipe = Img2ImgPipeline.from_pretrained(folder)
    fuse_loras(models_of(pipe), adapters)
    before, after = weight_state(base), weight_state(pipe)
    return {key: after[key] - before[key] for key in before if not torch.equal(after[key], before[key])}


def weight_state(pipe) -> dict[tuple[str, str], torch.Tensor]:
    return {
        (component, name.removesuffix(".weight")): value
        for component, model in models_of(pipe).items()
        for name, value in model.state_dict().items()
        if name.endswith(".weight")
    }


def test_per_module_alphas_scale_each_module(model_dirs, shapes, tmp_path):
    """kohya alphas that differ between modules: diffusers 0.42 scales attention and text-encoder modules
    by the most common alpha instead (its alpha_pattern keys keep `processor.to_q_lora.down.weight`), so
    the oracle is W + alpha/rank · up @ down computed here."""
    path = tmp_path / "alphas.safetensors"
    targets = pick(shapes["v1"], ("down_blocks.1.", "conv_in"))
    alphas = {m: 1.0 + i % 5 for i, (_, m) in enumerate(targets)}
    deltas = write_kohya(path, shapes["v1"], targets, alphas.get, lambda m: RANK, seed=3)
    got = fused_minus_base(model_dirs["v1"], [(load_lora_file(path), 1.0, None)])
    assert got.keys() == deltas.keys()
    for key, delta in deltas.items():
        torch.testing.assert_close(got[key], delta, rtol=1e-4, atol=1e-6)


def test_compvis_block_names_patch_the_matching_modules(model_dirs, shapes, tmp_path):
    """kohya keys in CompVis block names (`lora_unet_input_blocks_4_1_...`); diffusers maps SD1 ones by
    text substitution (input_blocks -> down_blocks), so the oracle is the hand-made LDM_NAMES table."""
    g = torch.Generator().manual_seed(4)
    tensors, deltas = {}, {}
    for ldm, module in LDM_NAMES.items():
        down, up = lora_factors(g, shapes["v1"]["unet", module], RANK)
        tensors |= {f"lora_unet_{ldm}.lora_down.weight": down, f"lora_unet_{ldm}.lora_up.weight": up}
        tensors[f"lora_unet_{ldm}.alpha"] = torch.tensor(2.0)
        deltas["unet", module] = closed_form(down, up, 2.0, RANK).reshape(shapes["v1"]["unet", module])
    save_file(tensors, str(tmp_path / "ldm.safetensors"))
    got = fused_minus_base(model_dirs["v1"], [(load_lora_file(tmp_path / "ldm.safetensors"), 1.0, None)])
    assert got.keys() == deltas.keys()
    for key, delta in deltas.items():
        torch.testing.assert_close(got[key], delta, rtol=1e-4, atol=1e-6)


def test_names_resolve_against_a_given_models_modules(v1_pipe, tmp_path):
    """`targets=targets_of(models, family)` (for UNet layouts other than SD's) reads CompVis names
    through the model's own layout; on the tiny layout that agrees with the LDM_NAMES table."""
    zeros = {
        f"lora_unet_{ldm}.lora_{part}.weight": torch.zeros(1, 1)
        for ldm in LDM_NAMES
        for part in ("down", "up")
    }
    save_file(zeros, str(tmp_path / "ldm.safetensors"))
    targets = targets_of(models_of(v1_pipe), v1_pipe.family)
    lora = load_lora_file(tmp_path / "ldm.safetensors", targets=targets)
    assert sorted(record.module for record in lora.records) == sorted(LDM_NAMES.values())


def test_tucker_locon_equals_closed_form(model_dirs, shapes, tmp_path):
    """LoCon with `lora_mid` (LyCORIS 'use_tucker'): 1x1 down, r x r x 3 x 3 mid, 1x1 up; the layer is
    up(mid(down(x))), so delta[o,i] = sum up[o,a] mid[a,b] down[b,i] (computed here with tensordot)."""
    g = torch.Generator().manual_seed(5)
    module = "down_blocks.1.resnets.0.conv1"
    out_ch, in_ch, kh, kw = shapes["v1"]["unet", module]
    down, mid, up = randn(g, RANK, in_ch, 1, 1), randn(g, RANK, RANK, kh, kw), randn(g, out_ch, RANK, 1, 1)
    name = kohya_name("unet", module)
    tensors = {f"{name}.lora_down.weight": down, f"{name}.lora_mid.weight": mid, f"{name}.lora_up.weight": up}
    save_file(tensors | {f"{name}.alpha": torch.tensor(3.0)}, str(tmp_path / "tucker.safetensors"))
    inner = torch.tensordot(mid, down.flatten(1), dims=([1], [0])).permute(0, 3, 1, 2)  # [a, i, h, w]
    expected = torch.tensordot(up.flatten(1), inner, dims=([1], [0])) * (3.0 / RANK)
    got = fused_minus_base(model_dirs["v1"], [(load_lora_file(tmp_path / "tucker.safetensors"), 1.0, None)])
    torch.testing.assert_close(got["unet", module], expected, rtol=1e-4, atol=1e-6)


# ---- 2. LoHa and LoKr against independently patched weights --------------------------------------------


def tucker_rebuild(core, a, b) -> torch.Tensor:
    """LyCORIS' Tucker rebuild, assumed: a [r, out], b [r, in], core [r, r, kh, kw] ->
    W[p, q, h, w] = sum_ij core[i, j, h, w] a[i, p] b[j, q]."""
    half = torch.tensordot(core, b, dims=([1], [0]))  # [i, h, w, q]
    return torch.tensordot(a, half, dims=([0], [0])).permute(0, 3, 1, 2)  # [p, q, h, w]


def kron_blocks(w1, w2) -> torch.Tensor:
    """kron(w1, w2) written out block by block (w1 2-D; w2 2-D or 4-D)."""
    rows, cols = w2.shape[:2]
    out = torch.zeros(w1.shape[0] * rows, w1.shape[1] * cols, *w2.shape[2:])
    for i in range(w1.shape[0]):
        for j in range(w1.shape[1]):
            out[i * rows : (i + 1) * rows, j * cols : (j + 1) * cols] = w1[i, j] * w2
    return out


LOHA_MODULES = (  # (component, module, Tucker)
    ("unet", "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v", False),
    ("unet", "up_blocks.1.resnets.1.conv2", False),
    ("unet", "mid_block.resnets.0.conv1", True),
    ("text_encoder", "encoder.layers.1.mlp.fc1", False),
)
LOKR_MODULES = (  # (component, module, case)
    ("unet", "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", "w1_full"),
    ("unet", "up_blocks.2.attentions.0.transformer_blocks.0.ff.net.2", "both_factorised"),
    ("text_encoder", "encoder.layers.0.self_attn.k_proj", "both_full"),
    ("unet", "down_blocks.0.resnets.1.conv1", "conv_full"),
    ("unet", "up_blocks.1.resnets.0.conv2", "conv_tucker"),
)


def loha_file(
    path, shapes, g, modules=LOHA_MODULES, name_of=kohya_name
) -> dict[tuple[str, str], torch.Tensor]:
    """LoHa on a Linear, on a 3x3 conv with flattened kernel, and a Tucker 3x3 conv (hada_t1/t2), plus a
    text-encoder Linear. Assumed (LyCORIS loha.py): delta = (w1_a @ w1_b) * (w2_a @ w2_b) * alpha / rank,
    rank = w1_b.shape[0]; non-Tucker convs store w*_b as [r, in*kh*kw]."""
    tensors, deltas = {}, {}
    for component, module, tucker in modules:
        shape, name, rank, alpha = shapes[component, module], name_of(component, module), 3, 2.0
        if tucker:
            parts = {
                f"{s}_{n}": randn(g, rank, shape[i], magnitude=0.5)
                for n, i in (("a", 0), ("b", 1))
                for s in ("w1", "w2")
            }
            parts |= {t: randn(g, rank, rank, *shape[2:], magnitude=0.5) for t in ("t1", "t2")}
            w1 = tucker_rebuild(parts["t1"], parts["w1_a"], parts["w1_b"])
            w2 = tucker_rebuild(parts["t2"], parts["w2_a"], parts["w2_b"])
        else:
            n_in = shape[1:].numel()
            parts = {f"{s}_a": randn(g, shape[0], rank, magnitude=0.5) for s in ("w1", "w2")}
            parts |= {f"{s}_b": randn(g, rank, n_in, magnitude=0.5) for s in ("w1", "w2")}
            w1, w2 = parts["w1_a"] @ parts["w1_b"], parts["w2_a"] @ parts["w2_b"]
        tensors |= {f"{name}.hada_{k}": v for k, v in parts.items()} | {f"{name}.alpha": torch.tensor(alpha)}
        deltas[component, module] = (w1 * w2 * alpha / rank).reshape(shape)
    save_file(tensors, str(path))
    return deltas


def lokr_file(path, shapes, g, cases=LOKR_MODULES, name_of=kohya_name) -> dict[tuple[str, str], torch.Tensor]:
    """LoKr: delta = kron(w1, w2) * scale, scale = alpha / rank of the factorised side, 1 with both full
    (assumed from LyCORIS lokr.py and A1111's network_lokr.py). Cases: w1 full + w2 factorised; both
    factorised; both full with an alpha that must be ignored; a 3x3 conv with a full 4-D w2; a 3x3 conv with
    a Tucker w2 (lokr_t2)."""
    tensors, deltas = {}, {}
    for component, module, case in cases:
        shape, name, rank, alpha = shapes[component, module], name_of(component, module), 2, 5.0
        a, c = 4, 8  # w1 is [4, 8]; w2 is [out/4, in/8 (, kh, kw)]
        b, d = shape[0] // a, shape[1] // c
        parts = {}
        if case == "both_factorised":
            parts |= {"w1_a": randn(g, a, rank, magnitude=0.5), "w1_b": randn(g, rank, c, magnitude=0.5)}
            w1 = parts["w1_a"] @ parts["w1_b"]
        else:
            w1 = parts["w1"] = randn(g, a, c, magnitude=0.5)
        if case in ("both_full", "conv_full"):
            w2 = parts["w2"] = randn(g, b, d, *shape[2:], magnitude=0.5)
        elif case == "conv_tucker":
            parts |= {"w2_a": randn(g, rank, b, magnitude=0.5), "w2_b": randn(g, rank, d, magnitude=0.5)}
            parts["t2"] = randn(g, rank, rank, *shape[2:], magnitude=0.5)
            w2 = tucker_rebuild(parts["t2"], parts["w2_a"], parts["w2_b"])
        else:
            parts |= {"w2_a": randn(g, b, rank, magnitude=0.5), "w2_b": randn(g, rank, d, magnitude=0.5)}
            w2 = parts["w2_a"] @ parts["w2_b"]
        scale = 1.0 if case in ("both_full", "conv_full") else alpha / rank
        tensors |= {f"{name}.lokr_{k}": v for k, v in parts.items()} | {f"{name}.alpha": torch.tensor(alpha)}
        deltas[component, module] = kron_blocks(w1, w2).reshape(shape) * scale
    save_file(tensors, str(path))
    return deltas


def patched_images(folder, deltas, scale: float) -> np.ndarray:
    pipe = Img2ImgPipeline.from_pretrained(folder)
    models = models_of(pipe)
    with torch.no_grad():
        for (component, module), delta in deltas.items():
            models[component].get_submodule(module).weight += scale * delta
    return run_ours(pipe)


@pytest.mark.parametrize("make_file", [loha_file, lokr_file], ids=["loha", "lokr"])
def test_lycoris_adapter_equals_independently_patched_model(
    model_dirs, shapes, base_images, tmp_path, make_file
):
    path = tmp_path / "lycoris.safetensors"
    deltas = make_file(path, shapes["v1"], torch.Generator().manual_seed(6))
    expected = patched_images(model_dirs["v1"], deltas, scale=0.7)
    got = fused_ours(model_dirs["v1"], [(path, 0.7, None)])
    assert_changed_and_equal(got, expected, base_images["v1"])


def test_loaded_lora_describes_the_file(shapes, tmp_path):
    path = tmp_path / "style.safetensors"
    write_kohya(path, shapes["v1"], pick(shapes["v1"], ("conv_in",), False), lambda m: 1.0, lambda m: 2, 0)
    lora = load_lora_file(path)
    assert (lora.name, lora.format, len(lora.records)) == ("style", "kohya", 1)
    assert lora.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    record = lora.records[0]
    assert (record.component, record.module) == ("unet", "conv_in")


def test_mixed_formats_are_named_together(shapes, tmp_path):
    path = tmp_path / "loha.safetensors"
    loha_file(path, shapes["v1"], torch.Generator().manual_seed(7))
    lokr_file(tmp_path / "lokr.safetensors", shapes["v1"], torch.Generator().manual_seed(8))
    save_file(load_file(str(path)) | load_file(str(tmp_path / "lokr.safetensors")), str(path))
    assert load_lora_file(path).format == "loha+lokr"


# ---- 3. export -------------------------------------------------------------------------------------


def test_save_lora_of_kohya_plus_loha_loads_in_diffusers(model_dirs, files, shapes, base_images, tmp_path):
    """`save_lora` writes one PEFT file = kohya LoCon at (0.6, te 1.4) + LoHa (incl. a flattened conv
    LoHa) at 0.8; diffusers loads it and gives our fused pipeline's images."""
    loha_path, exported = tmp_path / "loha.safetensors", tmp_path / "sum.safetensors"
    loha_file(loha_path, shapes["v1"], torch.Generator().manual_seed(9))
    pipe = Img2ImgPipeline.from_pretrained(model_dirs["v1"])
    pipe.load_loras([(files["v1"]["kohya"], 0.6, 1.4), (loha_path, 0.8, None)])
    pipe.save_lora(exported)

    def load(oracle):
        oracle.load_lora_weights(str(exported), adapter_name="sum")
        oracle.fuse_lora()

    expected = run_diffusers(model_dirs["v1"], load)
    assert_changed_and_equal(run_ours(pipe), expected, base_images["v1"])


def test_export_concatenates_lora_ranks_and_svds_loha_to_its_rank(files, shapes, tmp_path):
    """On one module: the kohya LoRA twice (rank 4 each) and a rank-3 LoHa, whose delta has rank 3·3 = 9."""
    loha_path, exported = tmp_path / "loha.safetensors", tmp_path / "sum.safetensors"
    loha_file(loha_path, shapes["v1"], torch.Generator().manual_seed(10))
    kohya = load_lora_file(files["v1"]["kohya"])
    save_lora_peft([(kohya, 1.0, None), (kohya, 0.5, None), (load_lora_file(loha_path), 1.0, None)], exported)
    module = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v"
    assert load_file(str(exported))[f"{module}.lora_A.weight"].shape[0] == RANK + RANK + 9


# ---- 4. errors -------------------------------------------------------------------------------------


@pytest.fixture
def with_unknown_keys(files, tmp_path):
    tensors = load_file(str(files["v1"]["kohya"]))
    tensors |= {f"lora_unet_no_such_block_{i}.lora_down.weight": torch.zeros(2, 4) for i in range(3)}
    tensors["lora_unet_conv_in.dora_scale"] = torch.ones(1)
    save_file(tensors, str(tmp_path / "unknown.safetensors"))
    return load_lora_file(tmp_path / "unknown.safetensors")


def test_unknown_keys_are_an_error_that_names_them(v1_pipe, with_unknown_keys):
    weight = v1_pipe.unet.conv_in.weight.clone()
    with pytest.raises(ValueError, match=r"4 keys match no module.*no_such_block.*strict=False"):
        fuse_lora(models_of(v1_pipe), with_unknown_keys)
    assert torch.equal(v1_pipe.unet.conv_in.weight, weight)  # nothing was fused


def test_unknown_keys_without_strict_warn_and_are_counted(v1_pipe, with_unknown_keys, files, caplog):
    with caplog.at_level(logging.WARNING, logger="sd_core.adapters.lora"):
        report = fuse_lora(models_of(v1_pipe), with_unknown_keys, scale=0.5, strict=False)
    complete = load_lora_file(files["v1"]["kohya"])
    assert report.applied_modules == len(complete.records)
    assert report.skipped_keys == 4 and "lora_unet_conv_in.dora_scale" in report.skipped_examples
    assert report.scales == {"unet": 0.5, "text_encoder": 0.5}
    assert "4 keys match no module" in caplog.text and "applied" in caplog.text


def test_sd2_lora_on_sd1_model_is_a_shape_error(v1_pipe, files):
    lora = load_lora_file(files["v2"]["kohya"])
    with pytest.raises(
        ValueError, match=r"module .* shape \(.*\) but the model's weight has shape .*different model family"
    ):
        fuse_lora(models_of(v1_pipe), lora)


def test_pickle_is_refused_without_opt_in(files, tmp_path):
    torch.save(load_file(str(files["v1"]["kohya"])), tmp_path / "lora.pt")
    with pytest.raises(ValueError, match=r"pickle.*allow_pickle=True"):
        load_lora_file(tmp_path / "lora.pt")


def test_pickle_with_opt_in_loads_like_safetensors(files, tmp_path):
    torch.save(load_file(str(files["v1"]["kohya"])), tmp_path / "lora.pt")
    pickled = load_lora_file(tmp_path / "lora.pt", allow_pickle=True)
    safe = load_lora_file(files["v1"]["kohya"])
    assert [(r.module, r.keys) for r in pickled.records] == [(r.module, r.keys) for r in safe.records]
    pairs = zip(pickled.records, safe.records, strict=True)
    assert all(p.factors.up.equal(s.factors.up) and p.factors.alpha == s.factors.alpha for p, s in pairs)


def test_truncated_safetensors_is_reported_as_corrupt(files, tmp_path):
    path = tmp_path / "cut.safetensors"
    path.write_bytes(files["v1"]["kohya"].read_bytes()[:-100])
    with pytest.raises(ValueError, match=r"cut\.safetensors is corrupt or truncated"):
        load_lora_file(path)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        load_lora_file(tmp_path / "nope.safetensors")


# ---- 5. half precision ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_fuses_in_float32_then_casts(model_dirs, files, dtype):
    """Each fused weight is exactly (w.float() + scale * delta).to(dtype), delta the float32 closed form
    (`delta_of`, itself checked against the test's closed forms above), not a sum done in half precision."""
    pipe = Img2ImgPipeline.from_pretrained(model_dirs["v1"], dtype=dtype)
    before = {key: value.clone() for key, value in weight_state(pipe).items()}
    lora = load_lora_file(files["v1"]["kohya"])
    fuse_lora(models_of(pipe), lora, scale=0.7)
    after = weight_state(pipe)
    for record in lora.records:
        key = (record.component, record.module)
        delta = fit_delta(delta_of(record.factors), before[key].shape, record.module)
        assert after[key].dtype == dtype
        assert torch.equal(after[key], (before[key].float() + 0.7 * delta).to(dtype)), key
