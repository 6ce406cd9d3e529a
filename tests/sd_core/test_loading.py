"""Loading models of every family: diffusers folders, single files with our export (read by ours and by
diffusers' `from_single_file`), pickles, and the errors users see."""

from __future__ import annotations

import json
import shutil
import socket
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import diffusers
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sd_core import Img2ImgPipeline
from sd_core.families import detect_family, read_header_shapes
from sd_core.loading import single_file_parts
from sd_core.tiny import make_tiny_model
from tests.conftest import diffusers_images, make_images
from tests.sd_core.test_single_file import FULL_UNET_PARAMS, TEXT_PREFIXES, full_join

PROMPTS = ["a watercolour fox", "a city street in the rain"]
KWARGS = dict(strength=0.75, guidance_scale=7.5, num_inference_steps=8, seeds=[3, 4], output_type="np")


def run_oracle(oracle, images) -> np.ndarray:
    """diffusers' img2img with the same settings as KWARGS."""
    return diffusers_images(
        oracle, images, PROMPTS, KWARGS["seeds"], strength=0.75, guidance_scale=7.5, num_inference_steps=8
    )


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a non-loopback connection fails the test."""
    real_connect = socket.socket.connect

    def guarded(self, address):
        host = address[0] if isinstance(address, tuple) else address
        if host not in ("127.0.0.1", "localhost", "::1"):
            raise AssertionError(f"network access attempted: {address}")
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)


ORACLE_PIPELINES = {
    "v1": diffusers.StableDiffusionImg2ImgPipeline,
    "v2": diffusers.StableDiffusionImg2ImgPipeline,
    "xl_base": diffusers.StableDiffusionXLImg2ImgPipeline,
    "xl_refiner": diffusers.StableDiffusionXLImg2ImgPipeline,
}
XL_FAMILIES = ["xl_base", "xl_refiner"]


@dataclass(frozen=True)
class Export:
    """A model folder written by diffusers, a copy of it without weights, our single-file export of it,
    and our output for it (images, PROMPTS, KWARGS)."""

    family: str
    folder: Path
    configs_only: Path
    single_file: Path
    images: list
    expected: np.ndarray


@pytest.fixture(scope="module")
def exports(model_dirs, xl_model_dirs, tmp_path_factory):
    """family -> Export, made on first use."""
    folders = model_dirs | xl_model_dirs
    root = tmp_path_factory.mktemp("exports")

    @cache
    def export(family: str) -> Export:
        folder = folders[family]
        configs_only = root / f"{family}-configs"
        shutil.copytree(folder, configs_only, ignore=shutil.ignore_patterns("*.safetensors"))
        reference = Img2ImgPipeline.from_pretrained(folder)
        images = make_images(2, seed=9)
        single_file = root / f"{family}.safetensors"
        reference.save_single_file(single_file)
        expected = reference(images, PROMPTS, **KWARGS)
        return Export(family, folder, configs_only, single_file, images, expected)

    return export


@pytest.fixture(params=list(ORACLE_PIPELINES))
def exported(request, exports) -> Export:
    return exports(request.param)


def assert_outputs_equal(pipe: Img2ImgPipeline, export: Export) -> None:
    assert np.abs(pipe(export.images, PROMPTS, **KWARGS) - export.expected).max() <= 1e-4


def without_metadata(path: Path, folder: Path) -> Path:
    """A copy of a safetensors file without its metadata (so without the configs we embed)."""
    bare = folder / "no-metadata.safetensors"
    save_file(load_file(str(path)), str(bare))
    with safe_open(str(bare), "pt") as f:
        assert f.metadata() is None
    return bare


def test_single_file_export_has_the_sgm_layout(exported):
    family = exported.family
    shapes = read_header_shapes(exported.single_file)
    assert detect_family(shapes) == family
    prefixes = ("model.diffusion_model.", "first_stage_model.", *TEXT_PREFIXES[family])
    assert all(key.startswith(prefixes) for key in shapes)
    assert all(any(key.startswith(prefix) for key in shapes) for prefix in prefixes)


def test_single_file_export_reloads_in_ours_from_its_embedded_configs(exported, no_network):
    pipe = Img2ImgPipeline.from_pretrained(exported.single_file)
    assert pipe.family.name == exported.family
    assert_outputs_equal(pipe, exported)


def test_single_file_export_reloads_in_ours_with_a_config_folder(exported, tmp_path, no_network):
    configs = exported.configs_only
    assert_outputs_equal(Img2ImgPipeline.from_pretrained(exported.single_file, config=configs), exported)
    bare = without_metadata(exported.single_file, tmp_path)
    assert_outputs_equal(Img2ImgPipeline.from_pretrained(bare, config=configs), exported)


def test_single_file_without_metadata_or_config_gets_the_bundled_configs(exported, tmp_path):
    """Those are the released full-size architectures, so a tiny model's weights are refused by shape."""
    bare = without_metadata(exported.single_file, tmp_path)
    with pytest.raises(ValueError, match=r"weights do not match its config .*wrong shape \(file vs config\)"):
        Img2ImgPipeline.from_pretrained(bare)


@pytest.mark.parametrize("family", list(ORACLE_PIPELINES))
def test_full_size_single_file_without_metadata_builds_from_the_bundled_configs(family, no_network):
    """A released model's key and shape map (meta tensors: the real layout, no memory) fits our modules
    as the bundled configs build them, every key and shape checked."""
    parts = single_file_parts(full_join(family), source=f"full-size {family}", metadata={})
    pipe = Img2ImgPipeline(parts, device="meta")
    assert pipe.family.name == family
    assert sum(p.numel() for p in pipe.unet.parameters()) == FULL_UNET_PARAMS[family]
    assert pipe.unet.conv_in.weight.is_meta
    assert list(pipe.tokenizers) == [tower.tokenizer for tower in pipe.family.towers]
    assert [t.pad_token for t in pipe.tokenizers.values()] == [t.pad_token for t in pipe.family.towers]


def test_single_file_export_loads_in_diffusers_as_the_folder_does(exported, no_network):
    oracle_class = ORACLE_PIPELINES[exported.family]
    no_safety_checker = {} if exported.family in XL_FAMILIES else {"safety_checker": None}
    from_file = oracle_class.from_single_file(
        str(exported.single_file),
        config=str(exported.configs_only),  # no weights there: all of them come from the file
        local_files_only=True,
        **no_safety_checker,
    )
    from_folder = oracle_class.from_pretrained(
        str(exported.folder), local_files_only=True, **no_safety_checker
    )
    got = run_oracle(from_file, exported.images)
    assert np.abs(got - run_oracle(from_folder, exported.images)).max() <= 1e-4
    assert np.abs(got - exported.expected).max() <= 1e-4


def test_tiny_model_maker_writes_a_folder_diffusers_loads(tmp_path):
    folder = make_tiny_model(tmp_path / "tiny", family="v2")
    oracle = diffusers.StableDiffusionImg2ImgPipeline.from_pretrained(str(folder), safety_checker=None)
    ours = Img2ImgPipeline.from_pretrained(folder)
    assert oracle.scheduler.config.prediction_type == "v_prediction"
    assert oracle.tokenizer.pad_token == "!" and ours.tokenizer.pad_token == "!"
    images = make_images(2, seed=2)
    expected = run_oracle(oracle, images)
    assert np.abs(ours(images, PROMPTS, **KWARGS) - expected).max() <= 1e-4


def test_save_pretrained_round_trips(model_dirs, tmp_path):
    pipe = Img2ImgPipeline.from_pretrained(model_dirs["v1"])
    pipe.save_pretrained(tmp_path / "copy")
    again = Img2ImgPipeline.from_pretrained(tmp_path / "copy")
    images = make_images(2)
    assert np.abs(pipe(images, PROMPTS, **KWARGS) - again(images, PROMPTS, **KWARGS)).max() == 0


@pytest.mark.parametrize("family", XL_FAMILIES)
def test_sdxl_save_pretrained_reloads_in_diffusers_and_ours_equally(exports, tmp_path, no_network, family):
    export = exports(family)
    copy = tmp_path / "copy"
    Img2ImgPipeline.from_pretrained(export.folder).save_pretrained(copy)
    assert_outputs_equal(Img2ImgPipeline.from_pretrained(copy), export)
    oracle = diffusers.StableDiffusionXLImg2ImgPipeline.from_pretrained(str(copy), local_files_only=True)
    assert np.abs(run_oracle(oracle, export.images) - export.expected).max() <= 1e-4


def _pickle_copy(src, dst):
    """The folder with its UNet weights as a pickled diffusion_pytorch_model.bin instead."""
    shutil.copytree(src, dst)
    weights = dst / "unet" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(str(weights)), dst / "unet" / "diffusion_pytorch_model.bin")
    weights.unlink()
    return dst


def test_pickle_weights_refused_by_default(model_dirs, tmp_path):
    folder = _pickle_copy(model_dirs["v1"], tmp_path / "pickled")
    with pytest.raises(ValueError, match=r"pickle file.*allow_pickle=True"):
        Img2ImgPipeline.from_pretrained(folder)


def test_pickle_weights_load_with_opt_in(model_dirs, tmp_path):
    folder = _pickle_copy(model_dirs["v1"], tmp_path / "pickled")
    images = make_images(2)
    expected = Img2ImgPipeline.from_pretrained(model_dirs["v1"])(images, PROMPTS, **KWARGS)
    got = Img2ImgPipeline.from_pretrained(folder, allow_pickle=True)(images, PROMPTS, **KWARGS)
    assert np.abs(got - expected).max() == 0


def test_pickle_single_file_refused_by_default(model_dirs, tmp_path):
    path = tmp_path / "model.safetensors"
    Img2ImgPipeline.from_pretrained(model_dirs["v1"]).save_single_file(path)
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": load_file(str(path))}, ckpt)
    with pytest.raises(ValueError, match="pickle file"):
        Img2ImgPipeline.from_pretrained(ckpt)
    trusted = Img2ImgPipeline.from_pretrained(ckpt, allow_pickle=True, config=model_dirs["v1"])
    assert trusted.family.name == "v1"


@pytest.mark.parametrize("component", ["unet", "vae", "text_encoder", "tokenizer", "scheduler"])
def test_missing_component_is_named(model_dirs, tmp_path, component):
    folder = tmp_path / "broken"
    shutil.copytree(model_dirs["v1"], folder)
    shutil.rmtree(folder / component)
    with pytest.raises(FileNotFoundError, match=f"lacks {component}/"):
        Img2ImgPipeline.from_pretrained(folder)


def test_missing_weights_file_is_named(model_dirs, tmp_path):
    folder = tmp_path / "broken"
    shutil.copytree(model_dirs["v1"], folder)
    (folder / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"no weights for 'vae'"):
        Img2ImgPipeline.from_pretrained(folder)


def test_missing_model_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Img2ImgPipeline.from_pretrained(tmp_path / "nope")


def test_weights_that_do_not_fit_the_config_are_refused(model_dirs, tmp_path):
    folder = tmp_path / "mismatch"
    shutil.copytree(model_dirs["v1"], folder)
    config_path = folder / "unet" / "config.json"
    config = json.loads(config_path.read_text())
    config["layers_per_block"] = 1
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="UNet weights do not match its config"):
        Img2ImgPipeline.from_pretrained(folder)
