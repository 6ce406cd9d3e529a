"""`make demo` / `sdbatch demo`: the job end to end on generated pictures, through the tiny random model it
makes (saying so: its outputs are noise by design) or through a checkpoint it is given."""

from __future__ import annotations

import PIL.Image
import pyarrow.parquet as pq
import pytest

from connectors.storage import join_uri
from jobs.demo import TINY_NOTE, main, model_folder_name, native_side, picture_sizes
from jobs.img2img import EXIT_OK, EXIT_REFUSED
from sd_core import Img2ImgPipeline
from sd_core.families import bundled_config
from tests.conftest import s3_store


def sheet_title(path) -> str:
    """The contact sheet's heading, as its PNG `Title` text chunk keeps it."""
    with PIL.Image.open(path) as sheet:
        return sheet.text["Title"]


def after_summary(printed: str) -> str:
    return printed[printed.index("sdbatch run summary"):]


@pytest.mark.slow
def test_the_tiny_demo_says_its_outputs_are_noise_by_design_on_every_run(ray_driver, tmp_path, capsys):
    for attempt in ("first run", "rerun: nothing left to do"):
        assert main(["--output", str(tmp_path)]) == EXIT_OK, attempt
        summary = after_summary(capsys.readouterr().out)
        assert "images         16" in summary, attempt
        assert "tiny model with random weights: its outputs are noise by design" in summary, attempt
        assert "make demo MODEL=" in summary, attempt  # and how to see real pictures
    assert sheet_title(tmp_path / "run" / "contact_sheet.png") == f"sdbatch demo · {TINY_NOTE}"


@pytest.mark.slow
def test_the_demo_runs_a_given_checkpoint_at_its_native_size_in_a_folder_of_its_own(
    ray_driver, s3_server, model_dirs, tmp_path, capsys, monkeypatch
):
    store = s3_store(s3_server, monkeypatch)
    checkpoint = tmp_path / "tiny-v1.safetensors"
    Img2ImgPipeline.from_pretrained(model_dirs["v1"]).save_single_file(checkpoint)
    model = join_uri(store.root, "tiny-v1.safetensors")
    store.storage.write_bytes(model, checkpoint.read_bytes())
    output = tmp_path / "demo"
    flags = ["--output", str(output), "--model", model, "--storage-endpoint", s3_server.endpoint_url]
    assert main([*flags, "--steps", "2"], prog="sdbatch demo") == EXIT_OK
    printed = capsys.readouterr().out
    assert "random weights" not in printed  # the user's model is not the demo's
    assert f"model {model} (SD 1.x): the demo pictures drawn at 256x256 and 384x256" in after_summary(printed)
    folder = output / model_folder_name(model)
    metadata = pq.read_table(folder / "run" / "metadata", columns=["width", "height"]).to_pylist()
    # a UNet sampling 32x32 latents under a VAE of scale 8: 256 pixels is this model's native side
    assert {(row["width"], row["height"]) for row in metadata} == {(256, 256), (384, 256)}
    assert sheet_title(folder / "run" / "contact_sheet.png") == f"sdbatch demo · {model}"
    assert not (output / "run").exists()  # the tiny model's output is another folder


def test_a_model_that_is_not_there_is_refused_before_any_work(tmp_path, capsys):
    missing = tmp_path / "nowhere.safetensors"
    flags = ["--output", str(tmp_path / "demo"), "--model", str(missing)]
    assert main(flags, prog="sdbatch demo") == EXIT_REFUSED
    error = capsys.readouterr().err
    assert error.startswith("sdbatch demo: refused before any work") and str(missing) in error


@pytest.mark.parametrize(
    ("family", "side"), [("v1", 512), ("v2", 768), ("xl_base", 1024), ("xl_refiner", 1024)]
)
def test_a_given_models_pictures_are_drawn_at_its_native_size(family, side):
    assert native_side(bundled_config(family)) == side
    assert picture_sizes(side) == ((side, side), (side * 3 // 2, side))


def test_each_given_model_gets_an_output_folder_of_its_own():
    models = ("s3://a/sd15.safetensors", "s3://b/sd15.safetensors", "/m/sd15/")
    names = {model_folder_name(model) for model in models}
    assert len(names) == 3 and all(name.startswith("model-sd15-") for name in names)


def test_the_demo_names_the_command_it_runs_as(capsys):
    with pytest.raises(SystemExit):
        main(["--help"], prog="sdbatch demo")
    assert capsys.readouterr().out.startswith("usage: sdbatch demo")
