"""An SDXL run of the job end to end: a single-file base model and a refiner on the real S3 test server,
per-row second prompts, aesthetic scores and micro-conditioning, on the suite's real Ray cluster."""

from __future__ import annotations

import hashlib
import io

import numpy as np
import PIL.Image
import pyarrow as pa
import pytest

from connectors.output import OutputSink
from connectors.storage import join_uri
from jobs.img2img import EXIT_OK
from jobs.plan import PlanError, make_plan
from jobs.verify import verify_output
from sd_core import Img2ImgPipeline
from sd_core.ensemble import ExpertEnsemble
from tests.jobs.test_img2img import (
    core_image,
    make_config,
    metadata_of,
    png_bytes,
    run_job,
    s3_job,
    write_manifest,
)

__all__ = ["s3_job"]  # the fixture, shared with test_img2img

pytestmark = pytest.mark.slow
SWITCH_AT = 0.6


@pytest.fixture(scope="module")
def single_files(xl_model_dirs, tmp_path_factory) -> dict[str, bytes]:
    """The tiny SDXL base and refiner as single-file checkpoints (SGM layout), as bytes."""
    root = tmp_path_factory.mktemp("xl-single")
    files = {}
    for family, folder in xl_model_dirs.items():
        path = root / f"{family}.safetensors"
        Img2ImgPipeline.from_pretrained(folder).save_single_file(path)
        files[family] = path.read_bytes()
    return files


def sdxl_manifest(storage, root: str) -> str:
    """7 rows of two sizes; prompt_2, aesthetic_score and the micro-conditioning set on some rows."""
    sizes = [(64, 64), (64, 48), (64, 64), (64, 48), (64, 64), (64, 48), (64, 64)]
    for i, (width, height) in enumerate(sizes):
        storage.write_bytes(join_uri(root, "inputs", f"{i}.png"), png_bytes(i, width, height))
    table = pa.table(
        {
            "id": [f"row-{i}" for i in range(len(sizes))],
            "image": [f"inputs/{i}.png" for i in range(len(sizes))],
            "prompt": [f"a picture number {i}" for i in range(len(sizes))],
            "prompt_2": ["sharp", None, "watercolour", "", "detailed", None, "night"],
            "negative_prompt": ["blurry", None, "", "grainy", None, "ugly", None],
            "aesthetic_score": [7.5, None, 3.0, None, 9.0, 6.5, None],
            "original_width": pa.array([1024, None, None, 256, None, None, None], pa.int64()),
            "original_height": pa.array([768, None, None, 192, None, None, None], pa.int64()),
            "crop_top": pa.array([None, 8, None, None, 0, None, None], pa.int64()),
            "crop_left": pa.array([None, 16, None, None, 4, None, None], pa.int64()),
            "label": ["a", "b", "c", "d", "e", "f", "g"],
        }
    )
    return write_manifest(storage, root, table)


def expected_image(ensemble: ExpertEnsemble, storage, row: dict) -> np.ndarray:
    """The core called directly on one metadata row's input and (realised) settings."""
    return core_image(
        ensemble,
        storage,
        row,
        prompts_2=[row["prompt_2"] or None],
        aesthetic_score=[row["aesthetic_score"]],
        original_size=[(row["original_height"], row["original_width"])],
        crops_coords_top_left=[(row["crop_top"], row["crop_left"])],
    )


def test_sdxl_with_a_refiner_on_s3_matches_the_core(s3_job, single_files, tmp_path):
    storage, root, endpoint = s3_job
    base_uri = join_uri(root, "models", "base.safetensors")
    refiner_uri = join_uri(root, "models", "refiner.safetensors")
    storage.write_bytes(base_uri, single_files["xl_base"])
    storage.write_bytes(refiner_uri, single_files["xl_refiner"])
    manifest = sdxl_manifest(storage, root)
    output = join_uri(root, "out")
    config = make_config(
        base_uri,
        manifest,
        output,
        endpoint,
        **{
            "refiner.path": refiner_uri,
            "refiner.switch_at": SWITCH_AT,
            "defaults.num_inference_steps": 6,
            "defaults.strength": 0.9,
            "defaults.guidance_scale": 5.0,
            "model.scheduler": "dpmpp_2m",
        },
    )
    plan = make_plan(config)
    described = "\n".join(plan.describe())
    assert "SDXL base" in described and "refiner" in described
    summary = run_job(config)
    assert summary["exit_code"] == EXIT_OK and summary["committed"], summary
    assert summary["images"] == 7 and summary["errors"] == 0
    assert verify_output(storage, output, manifest, check_all_images=True).ok

    run_record = OutputSink(storage, output).read_run_manifest()
    refiner_sha = hashlib.sha256(single_files["xl_refiner"]).hexdigest()
    assert run_record["family"] == "xl_base" and run_record["refiner_sha256"] == refiner_sha
    assert run_record["model_sha256"] == hashlib.sha256(single_files["xl_base"]).hexdigest()

    base_path, refiner_path = tmp_path / "base.safetensors", tmp_path / "refiner.safetensors"
    base_path.write_bytes(single_files["xl_base"])
    refiner_path.write_bytes(single_files["xl_refiner"])
    ensemble = ExpertEnsemble(
        Img2ImgPipeline.from_pretrained(base_path), Img2ImgPipeline.from_pretrained(refiner_path), SWITCH_AT
    )
    ensemble.set_scheduler("dpmpp_2m")
    rows = metadata_of(storage, output)
    by_id = {row["id"]: row for row in rows}
    for row in rows:
        assert row["family"] == "xl_base" and row["refiner_sha256"] == refiner_sha
        assert row["refiner_switch_at"] == SWITCH_AT and row["prompt_truncated"] is False
        assert row["steps_run"] == sum(ensemble.split_steps(6, 0.9)) == int(6 * 0.9)
        job_pixels = np.asarray(PIL.Image.open(io.BytesIO(storage.read_bytes(row["output"]))).convert("RGB"))
        diff = np.abs(job_pixels.astype(int) - expected_image(ensemble, storage, row).astype(int))
        assert diff.max() <= 1, (row["id"], diff.max())
    # realised values: what the manifest gave, else the defaults the core filled in
    assert (by_id["row-0"]["original_width"], by_id["row-0"]["original_height"]) == (1024, 768)
    assert (by_id["row-2"]["original_width"], by_id["row-2"]["original_height"]) == (64, 64)
    assert (by_id["row-1"]["original_width"], by_id["row-1"]["original_height"]) == (64, 48)
    assert (by_id["row-1"]["crop_top"], by_id["row-1"]["crop_left"]) == (8, 16)
    assert (by_id["row-2"]["crop_top"], by_id["row-2"]["crop_left"]) == (0, 0)
    assert [by_id[f"row-{i}"]["aesthetic_score"] for i in range(7)] == [7.5, 6.0, 3.0, 6.0, 9.0, 6.5, 6.0]
    assert {r["negative_aesthetic_score"] for r in rows} == {2.5}
    assert by_id["row-0"]["prompt_2"] == "sharp" and by_id["row-1"]["prompt_2"] is None
    assert by_id["row-0"]["label"] == "a"  # extra columns still carried


def test_an_sd1_lora_on_an_sdxl_run_is_refused_before_any_work(s3_job, single_files, tmp_path, model_dirs):
    from tests.sd_core.test_lora import KOHYA_UNET_MODULES, pick, weight_shapes, write_kohya

    storage, root, endpoint = s3_job
    base_uri = join_uri(root, "models", "base.safetensors")
    storage.write_bytes(base_uri, single_files["xl_base"])
    shapes = weight_shapes(Img2ImgPipeline.from_pretrained(model_dirs["v1"]))
    lora = tmp_path / "sd1_style.safetensors"
    write_kohya(lora, shapes, pick(shapes, KOHYA_UNET_MODULES), alpha_of=lambda m: 2.0, rank_of=lambda m: 2)
    manifest = sdxl_manifest(storage, root)
    output = join_uri(root, "out")
    config = make_config(base_uri, manifest, output, endpoint, **{"adapters.loras": [{"path": str(lora)}]})
    with pytest.raises(PlanError, match=r"SDXL base"):
        make_plan(config)
    assert not storage.exists(output)


def test_sdxl_columns_on_an_sd1_run_are_refused_before_any_work(s3_job, model_dirs):
    from tests.jobs.test_img2img import upload_model

    storage, root, endpoint = s3_job
    model = upload_model(storage, model_dirs["v1"], join_uri(root, "model"))
    manifest = sdxl_manifest(storage, root)
    with pytest.raises(PlanError, match=r"(?s)SD 1\.x \(v1\).*column .prompt_2. has values in 4 rows"):
        make_plan(make_config(model, manifest, join_uri(root, "out"), endpoint))


def test_sdxl_augmentation_needs_no_new_flags(ray_driver, xl_model_dirs, tmp_path):
    """`sdbatch augment` on an SDXL model: the same policy and flags as for SD 1.x; the manifest's
    prompt_2 column reaches the second text encoder and is recorded."""
    from connectors.storage import Storage
    from jobs.augment import partitioned
    from jobs.config import load_config
    from jobs.img2img import run
    from tests.jobs.test_augment import POLICY, job_settings

    storage = Storage()
    root = str(tmp_path)
    for i in range(2):
        storage.write_bytes(join_uri(root, "inputs", f"{i}.png"), png_bytes(i, 64, 64))
    manifest = write_manifest(
        storage,
        root,
        pa.table({"id": ["a", "b"], "image": ["inputs/0.png", "inputs/1.png"], "label": ["cat", "dog"],
                  "place": ["Oslo", "Lima"], "prompt_2": ["film grain", None]}),
    )
    settings = job_settings(str(xl_model_dirs["xl_base"]), manifest, join_uri(root, "out"))
    settings.update({"augment.variants": 2, "augment.prompts": POLICY["augment.prompts"]})
    config = partitioned(load_config(None, flags=settings), "ds=2026-12-03")
    summary = run(make_plan(config))
    assert summary["exit_code"] == EXIT_OK and summary["images"] == 4, summary
    rows = metadata_of(storage, config.output)
    assert {r["family"] for r in rows} == {"xl_base"}
    assert sorted((r["id"], r["prompt_2"]) for r in rows) == [("a", "film grain")] * 2 + [("b", None)] * 2
