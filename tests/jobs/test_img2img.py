"""The Ray Data img2img job end to end on a real local Ray cluster and the real S3 test server."""

from __future__ import annotations

import io
import json
import time

import numpy as np
import PIL.Image
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from connectors.image_resize import resize_for_model, target_size
from connectors.output import OutputSink
from connectors.storage import Storage, StorageOptions, join_uri
from jobs.config import load_config
from jobs.denoise_stage import to_uint8
from jobs.img2img import EXIT_OK, run
from jobs.plan import make_plan
from jobs.verify import verify_output
from jobs.write_stage import png_pixels
from sd_core import Img2ImgPipeline
from tests.ray_services import POISON_PROMPT

pytestmark = pytest.mark.slow
STEPS = 4


def png_bytes(seed: int, width: int, height: int) -> bytes:
    pixels = (np.random.default_rng(seed).random((height, width, 3)) * 255).astype(np.uint8)
    buffer = io.BytesIO()
    PIL.Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def write_manifest(storage: Storage, root: str, table: pa.Table) -> str:
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    uri = join_uri(root, "manifest.parquet")
    storage.write_bytes(uri, buffer.getvalue())
    return uri


def write_dataset(storage: Storage, root: str, sizes: list[tuple[int, int]], **columns) -> str:
    """PNG inputs under `root/inputs/` and a manifest naming them relatively."""
    for i, (width, height) in enumerate(sizes):
        storage.write_bytes(join_uri(root, "inputs", f"{i}.png"), png_bytes(i, width, height))
    table = {
        "id": [f"row-{i}" for i in range(len(sizes))],
        "image": [f"inputs/{i}.png" for i in range(len(sizes))],
        "prompt": [f"a picture number {i}" for i in range(len(sizes))],
        **columns,
    }
    return write_manifest(storage, root, pa.table(table))


def make_config(model: str, manifest: str, output: str, endpoint: str | None = None, **settings):
    flags = {
        "model.path": model,
        "manifest": manifest,
        "output": output,
        "defaults.num_inference_steps": STEPS,
        "defaults.strength": 0.75,
        "compute.batch_size": 2,
        "compute.gpus_per_actor": 0,
        "compute.actors_max": 1,
        "storage.endpoint_url": endpoint,
        "contact_sheet_rows": 4,
        **settings,
    }
    return load_config(None, flags=flags)


def run_job(config) -> dict:
    return run(make_plan(config))


def metadata_of(storage: Storage, output: str) -> list[dict]:
    rows = OutputSink(storage, output).read_metadata().to_pylist()
    return sorted(rows, key=lambda r: (r["id"], r["variant"]))


def core_image(pipe: Img2ImgPipeline, storage: Storage, row: dict, **extra) -> np.ndarray:
    """What sd_core gives for one metadata row when called directly, as uint8 pixels; `extra`: more of
    the call's keyword arguments (per-row lists of one)."""
    import torch

    image = PIL.Image.open(io.BytesIO(storage.read_bytes(row["input"]))).convert("RGB")
    width, height = target_size(image.size, None, None)
    image = resize_for_model(image, width, height, "just_resize")
    tensor = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float().div(255)
    out = pipe(
        tensor,
        [row["prompt"]],
        negative_prompts=[row["negative_prompt"] or None],  # as the job passes an empty one: none
        strength=row["strength"],
        guidance_scale=row["guidance_scale"],
        num_inference_steps=row["num_inference_steps"],
        seeds=[row["seed"]],
        output_type="np",
        **extra,
    )
    return to_uint8(np.asarray(out))[0]


@pytest.fixture
def s3_job(ray_driver, s3_server, model_dirs):
    """Storage on the S3 test server with a fresh root, and the tiny SD1 model uploaded there."""
    import uuid

    storage = Storage(StorageOptions(endpoint_url=s3_server.endpoint_url))
    root = f"s3://{s3_server.bucket}/job-{uuid.uuid4().hex[:8]}"
    return storage, root, s3_server.endpoint_url


def upload_model(storage: Storage, folder, uri: str) -> str:
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        storage.write_bytes(join_uri(uri, str(path.relative_to(folder))), path.read_bytes())
    return uri


def test_end_to_end_on_s3_matches_the_core(s3_job, model_dirs):
    storage, root, endpoint = s3_job
    model = upload_model(storage, model_dirs["v1"], join_uri(root, "model"))
    sizes = [(64, 64), (72, 64), (64, 64), (64, 80), (64, 64)]
    manifest = write_dataset(
        storage, root, sizes, label=["cat", "dog", "cow", "owl", "fox"], num_images=[2, 1, 1, 1, 1]
    )
    output = join_uri(root, "out")
    summary = run_job(make_config(model, manifest, output, endpoint))
    assert summary["exit_code"] == EXIT_OK and summary["committed"], summary
    assert summary["images"] == 6 and summary["errors"] == 0

    sink = OutputSink(storage, output)
    assert sink.is_committed()
    run_manifest = sink.read_run_manifest()
    assert run_manifest["counts"] == {"images": 6, "errors": 0}
    assert run_manifest["model_sha256"] and run_manifest["config"]["model"]["path"] == model
    rows = metadata_of(storage, output)
    assert [(r["id"], r["variant"]) for r in rows] == [("row-0", 0), ("row-0", 1)] + [
        (f"row-{i}", 0) for i in range(1, 5)
    ]
    assert [r["label"] for r in rows] == ["cat", "cat", "dog", "cow", "owl", "fox"]
    assert rows[0]["seed"] != rows[1]["seed"]
    pipe = Img2ImgPipeline.from_pretrained(model_dirs["v1"])
    for row in rows:
        produced = png_pixels(storage.read_bytes(row["output"]))
        width, height = sizes[int(row["id"].split("-")[1])]
        assert produced.shape == (height, width, 3) and (row["width"], row["height"]) == (width, height)
        assert row["steps_run"] == 3 and row["scheduler"] and row["input_sha256"]
        expected = core_image(pipe, storage, row)
        difference = np.abs(produced.astype(int) - expected.astype(int))
        assert difference.max() <= 1 and difference.mean() < 0.01, (row["id"], difference.max())
    assert storage.exists(join_uri(output, "contact_sheet.png"))
    assert verify_output(storage, output, manifest, check_all_images=True).ok


def test_bad_rows_become_error_rows_and_the_run_completes(s3_job, model_dirs, tmp_path):
    storage, root, endpoint = s3_job
    storage.write_bytes(join_uri(root, "inputs", "good.png"), png_bytes(1, 64, 64))
    storage.write_bytes(join_uri(root, "inputs", "corrupt.png"), b"\x89PNG\r\n\x1a\n not really a png")
    table = pa.table(
        {
            "id": ["good", "missing", "corrupt", "strong"],
            "image": ["inputs/good.png", "inputs/nope.png", "inputs/corrupt.png", "inputs/good.png"],
            "prompt": ["ok"] * 4,
            "strength": [0.5, 0.5, 0.5, 1.5],
        }
    )
    manifest = write_manifest(storage, root, table)
    output = join_uri(root, "out")
    summary = run_job(make_config(str(model_dirs["v1"]), manifest, output, endpoint, max_error_rate=1.0))
    assert summary["committed"] and summary["images"] == 1 and summary["errors"] == 3
    errors = {r["id"]: r for r in OutputSink(storage, output).read_errors().to_pylist()}
    assert set(errors) == {"missing", "corrupt", "strong"}
    assert errors["missing"]["stage"] == "read" and "does not exist" in errors["missing"]["message"]
    assert errors["corrupt"]["stage"] == "decode"
    assert errors["strong"]["stage"] == "validate" and "'strength'" in errors["strong"]["message"]
    assert "1.5" in errors["strong"]["message"]
    assert [r["id"] for r in metadata_of(storage, output)] == ["good"]
    # Over the error-rate limit the run still commits but exits non-zero.
    again = run_job(make_config(str(model_dirs["v1"]), manifest, join_uri(root, "out2"), endpoint))
    assert again["committed"] and again["exit_code"] == 1


def test_poison_row_fails_alone_in_bounded_time(s3_job, model_dirs, ray_driver):
    storage, root, endpoint = s3_job
    sizes = [(64, 64)] * 6
    manifest_uri = write_dataset(storage, root, sizes)
    table = pq.read_table(io.BytesIO(storage.read_bytes(manifest_uri)))
    prompts = table["prompt"].to_pylist()
    prompts[3] = POISON_PROMPT
    manifest = write_manifest(storage, root, table.set_column(2, "prompt", pa.array(prompts)))
    output = join_uri(root, "out")
    started = time.monotonic()
    summary = run_job(make_config(str(model_dirs["v1"]), manifest, output, endpoint, max_error_rate=0.5))
    elapsed = time.monotonic() - started
    assert summary["committed"] and summary["images"] == 5 and summary["errors"] == 1, summary
    errors = OutputSink(storage, output).read_errors().to_pylist()
    assert [e["id"] for e in errors] == ["row-3"] and errors[0]["error_type"] == "WorkerDied"
    assert elapsed < 240
    # Every pass released its actors, the restarted ones included: no GPU stays held.
    from ray.util.state import list_actors

    def denoisers_alive() -> list:
        alive = list_actors(address=ray_driver.dashboard_url, filters=[("state", "!=", "DEAD")])
        return [a for a in alive if "Denoiser" in a.class_name]

    deadline = time.monotonic() + 20  # ray.kill is asynchronous
    while denoisers_alive() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not denoisers_alive()


def test_mixed_sizes_fill_batches_and_match_batch_size_one(s3_job, model_dirs):
    storage, root, endpoint = s3_job
    sizes = [(64, 64), (80, 64)] * 8  # two sizes interleaved
    manifest = write_dataset(storage, root, sizes)
    batched = run_job(
        make_config(
            str(model_dirs["v1"]), manifest, join_uri(root, "b4"), endpoint, **{"compute.batch_size": 4}
        )
    )
    assert batched["exit_code"] == EXIT_OK and batched["batch_fill"] >= 0.75, batched["batch_fill"]
    single = run_job(
        make_config(
            str(model_dirs["v1"]), manifest, join_uri(root, "b1"), endpoint, **{"compute.batch_size": 1}
        )
    )
    assert single["exit_code"] == EXIT_OK
    for four, one in zip(
        metadata_of(storage, join_uri(root, "b4")), metadata_of(storage, join_uri(root, "b1")), strict=True
    ):
        assert (four["id"], four["seed"]) == (one["id"], one["seed"])
        a = png_pixels(storage.read_bytes(four["output"])).astype(int)
        b = png_pixels(storage.read_bytes(one["output"])).astype(int)
        assert np.abs(a - b).max() <= 1


def test_rerun_skips_committed_rows_and_refuses_another_configuration(s3_job, model_dirs):
    storage, root, endpoint = s3_job
    manifest = write_dataset(storage, root, [(64, 64)] * 3)
    output = join_uri(root, "out")
    config = make_config(str(model_dirs["v1"]), manifest, output, endpoint)
    assert run_job(config)["exit_code"] == EXIT_OK
    before = {r["id"]: r["output"] for r in metadata_of(storage, output)}
    again = run_job(config)
    assert again["exit_code"] == EXIT_OK and again["images"] == 3
    assert make_plan(config).todo_rows == 0
    assert {r["id"]: r["output"] for r in metadata_of(storage, output)} == before
    different = make_config(str(model_dirs["v1"]), manifest, output, endpoint, **{"defaults.strength": 0.5})
    with pytest.raises(ValueError, match="different configuration.*--force"):
        make_plan(different)
    assert json.loads(storage.read_bytes(join_uri(output, "_SUCCESS")))["images"] == 3


def test_retry_errors_redoes_failed_rows_only_when_asked(s3_job, model_dirs):
    storage, root, endpoint = s3_job
    manifest = write_dataset(storage, root, [(64, 64)] * 3)
    missing = join_uri(root, "inputs", "2.png")
    kept = storage.read_bytes(missing)
    storage.delete(missing)
    output = join_uri(root, "out")
    config = make_config(str(model_dirs["v1"]), manifest, output, endpoint, max_error_rate=1.0)
    first = run_job(config)
    assert (first["images"], first["errors"]) == (2, 1)
    storage.write_bytes(missing, kept)
    assert make_plan(config).todo_rows == 0  # recorded errors count as done by default
    retry = make_config(str(model_dirs["v1"]), manifest, output, endpoint, retry_errors=True)
    assert make_plan(retry).todo_rows == 1
    second = run_job(retry)
    assert second["exit_code"] == EXIT_OK and second["images"] == 3 and second["errors"] == 0
    sink = OutputSink(storage, output)
    assert sink.read_errors().num_rows == 0 and len(sink.read_metadata()) == 3
