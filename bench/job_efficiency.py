"""Job efficiency: the whole Ray job vs the bare core loop, same model, rows, batches and seeds.

    python -m bench.job_efficiency [--quick]

What each side includes:

* **core** (one process, no Ray): the pipeline built exactly as the actor builds it
  (`jobs.model_setup.PipelineFactory(config)()`: load, pin, warm-up, model hash), then a plain loop over
  the same rows in the same batches: read the input file, decode + resize (`connectors` functions the
  job uses), the pipeline call (same prompts, strength, steps, guidance, per-row seeds
  `jobs.rows.derived_seed`), uint8 conversion, PNG encode with the A1111 `parameters` text, and a file
  write per image. torch threads = `compute.cpus_per_actor` (set by the factory), as in the actor.
  *steady* = the loop alone; *end-to-end* = factory + loop.
* **job** (`jobs.img2img.run(make_plan(config))` in this process, on a local Ray instance started once
  with `ray.init(num_cpus=<all cores>)`, one CPU actor holding all cores but one): planning (manifest,
  model and output checks), Ray Data read → expand → decode → actor (factory as above, then the core
  call) → PNG encode + write, metadata/error parts, retry-round check, contact sheet, commit.
  *end-to-end* = the `run(make_plan(...))` call at N rows. *steady* = the marginal rate between two
  runs at N_small and N rows, (N - N_small) / (T_N - T_small): every fixed cost (planning, actor start
  and model load, pool start-up, commit) cancels; what is left is the per-image cost in the stream.
  The Ray instance start (`ray.init`) is reported separately; a small untimed warm-up job runs first so
  Ray's worker processes exist (as they would on a cluster that has run anything).
* **job on S3**: the same, with the model, manifest, input images and output on the SeaweedFS S3 test
  server (a real S3 gateway on loopback). The model is put in the node cache (`local_copy`) before the
  timed runs; that download is reported separately.

Full mode also runs the local job with Ray Data's default target block size instead of the job's 64 KiB
`STREAM_BLOCK_BYTES`, to see what streaming small blocks costs.
"""

from __future__ import annotations

import os

os.environ["RAY_AUTH_MODE"] = "disabled"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import argparse  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from bench.common import print_table, save  # noqa: E402
from bench.models import MID_SIZE, MID_STEPS, MID_STRENGTH, mid_model, png_bytes  # noqa: E402

GUIDANCE = 7.5
NEGATIVE = "blurry"
RAY_DEFAULT_BLOCK_BYTES = 128 * 1024 * 1024


# ---- data ----------------------------------------------------------------------------------------


def write_local_dataset(root: Path, rows: int, size: int) -> Path:
    """`rows` distinct PNG inputs under root/inputs and a manifest naming them relatively."""
    (root / "inputs").mkdir(parents=True, exist_ok=True)
    for i in range(rows):
        (root / "inputs" / f"{i}.png").write_bytes(png_bytes(i, size, size))
    return write_manifest(root / f"manifest-{rows}.parquet", rows)


def manifest_table(rows: int) -> pa.Table:
    return pa.table(
        {
            "id": [f"row-{i:05d}" for i in range(rows)],
            "image": [f"inputs/{i}.png" for i in range(rows)],
            "prompt": [f"a picture number {i}, oil painting" for i in range(rows)],
        }
    )


def write_manifest(path: Path, rows: int) -> Path:
    pq.write_table(manifest_table(rows), path)
    return path


def make_config(model: str, manifest: str, output: str, batch: int, cpus: int, endpoint: str | None = None):
    from jobs.config import load_config

    flags = {
        "model.path": model,
        "manifest": manifest,
        "output": output,
        "defaults.num_inference_steps": MID_STEPS,
        "defaults.strength": MID_STRENGTH,
        "defaults.guidance_scale": GUIDANCE,
        "defaults.negative_prompt": NEGATIVE,
        "compute.batch_size": batch,
        "compute.gpus_per_actor": 0,
        "compute.actors_max": 1,
        "compute.cpus_per_actor": cpus,
        "storage.endpoint_url": endpoint,
    }
    return load_config(None, flags=flags)


# ---- the bare core loop ----------------------------------------------------------------------------


def core_loop(config: Any, root: Path, rows: int, out: Path) -> dict[str, Any]:
    """The factory, then every row through read/decode/resize → pipeline → encode/write, in batches."""
    import PIL.Image
    import torch

    from connectors.image_decode import decode_image
    from connectors.image_encode import a1111_parameters, encode_image
    from connectors.image_resize import resize_for_model, target_size
    from jobs.denoise_stage import to_uint8
    from jobs.infotext import a1111_sampler
    from jobs.model_setup import PipelineFactory
    from jobs.rows import derived_seed

    started = time.perf_counter()
    pipe, info = PipelineFactory(config)()
    factory_s = time.perf_counter() - started
    sampler, schedule_type = a1111_sampler(info["scheduler"], karras_sigmas=False)
    table = manifest_table(rows).to_pylist()
    batch = config.compute.batch_size
    out.mkdir(parents=True, exist_ok=True)
    loop_started = time.perf_counter()
    for start in range(0, rows, batch):
        chosen = table[start : start + batch]
        arrays = []
        for row in chosen:
            source = str(root / row["image"])
            image = decode_image(Path(source).read_bytes(), source)
            width, height = target_size(image.size, None, None)
            arrays.append(np.asarray(resize_for_model(image, width, height, "just_resize")))
        tensor = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float().div(255)
        seeds = [derived_seed(config.seed, row["id"], 0) for row in chosen]
        images = pipe(
            tensor,
            [row["prompt"] for row in chosen],
            negative_prompts=[NEGATIVE] * len(chosen),
            strength=MID_STRENGTH,
            guidance_scale=[GUIDANCE] * len(chosen),
            num_inference_steps=MID_STEPS,
            seeds=seeds,
            eta=0.0,
            clip_skip=None,
            output_type="np",
        )
        for row, seed, pixels in zip(chosen, seeds, to_uint8(np.asarray(images)), strict=True):
            parameters = a1111_parameters(
                prompt=row["prompt"],
                negative_prompt=NEGATIVE,
                steps=MID_STEPS,
                sampler=sampler,
                schedule_type=schedule_type,
                cfg_scale=GUIDANCE,
                seed=seed,
                width=pixels.shape[1],
                height=pixels.shape[0],
                denoising_strength=MID_STRENGTH,
                model_hash=info["model_sha256"][:10],
            )
            data = encode_image(PIL.Image.fromarray(pixels), "png", 95, parameters)
            (out / f"{row['id']}.png").write_bytes(data)
    loop_s = time.perf_counter() - loop_started
    return {"factory_s": factory_s, "loop_s": loop_s, "end_to_end_s": factory_s + loop_s}


# ---- the job -----------------------------------------------------------------------------------------


def run_job(config: Any) -> dict[str, Any]:
    from jobs.img2img import run
    from jobs.plan import make_plan

    started = time.perf_counter()
    summary = run(make_plan(config))
    seconds = time.perf_counter() - started
    if summary["exit_code"] != 0 or summary.get("errors"):
        raise RuntimeError(f"job failed: {summary}")
    return {
        "seconds": seconds,
        "images": summary["images"],
        "actor_start_s": summary.get("actor_start_s"),
        "stage_seconds": summary.get("stage_seconds"),
        "batch_fill": summary.get("batch_fill"),
        "job_elapsed_s": summary.get("elapsed_s"),
    }


def compare_outputs(storage: Any, output: str, core_out: Path, limit: int = 8) -> int:
    """Largest per-pixel difference (0-255) between the job's images and the core loop's, first rows."""
    from connectors.output import OutputSink
    from jobs.write_stage import png_pixels

    rows = OutputSink(storage, output).read_metadata().to_pylist()
    worst = 0
    for row in sorted(rows, key=lambda r: r["id"])[:limit]:
        job = png_pixels(storage.read_bytes(row["output"])).astype(int)
        core = png_pixels((core_out / f"{row['id']}.png").read_bytes()).astype(int)
        worst = max(worst, int(np.abs(job - core).max()))
    return worst


def job_pair(make: Any, small: int, rows: int, tag: str) -> dict[str, Any]:
    """The job at `small` then `rows` rows into fresh outputs; end-to-end and marginal (steady) rates."""
    first = run_job(make(small, f"{tag}-{small}"))
    second = run_job(make(rows, f"{tag}-{rows}"))
    marginal = (rows - small) / max(1e-9, second["seconds"] - first["seconds"])
    return {
        "small": first,
        "full": second,
        "end_to_end_ips": rows / second["seconds"],
        "steady_ips": marginal,
        # cross-check: the N-row run less the actor's start (model load, pinning, warm-up) it reported
        "minus_actor_start_ips": rows / max(1e-9, second["seconds"] - (second["actor_start_s"] or 0.0)),
    }


def upload_s3(storage: Any, base: str, root: Path, model: Path, rows: int, small: int) -> dict[str, str]:
    from connectors.storage import join_uri

    for path in sorted(model.rglob("*")):
        if path.is_file():
            storage.write_bytes(
                join_uri(base, "model", path.relative_to(model).as_posix()), path.read_bytes()
            )
    for i in range(rows):
        storage.write_bytes(join_uri(base, "inputs", f"{i}.png"), (root / "inputs" / f"{i}.png").read_bytes())
    manifests = {}
    for count in {rows, small}:
        uri = join_uri(base, f"manifest-{count}.parquet")
        storage.write_bytes(uri, (root / f"manifest-{count}.parquet").read_bytes())
        manifests[str(count)] = uri
    return {"model": join_uri(base, "model"), **manifests}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rows; no block-size variant")
    parser.add_argument("--rows", type=int, default=None)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--no-s3", action="store_true", help="skip the S3 runs")
    args = parser.parse_args(argv)
    rows = args.rows or (12 if args.quick else 32)
    small = max(args.batch, rows // 4)
    cpus = os.cpu_count() or 1
    actor_cpus = max(1, cpus - 1)
    workdir = Path(tempfile.mkdtemp(prefix="sdbatch-job-eff-"))
    os.environ["SDBATCH_CACHE_DIR"] = str(workdir / "model-cache")  # before Ray starts: workers inherit it
    results: dict[str, Any] = {}
    try:
        results = measure(args, rows, small, cpus, actor_cpus, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    name = "job_efficiency_quick" if args.quick else "job_efficiency"
    config = {
        "model": "bench.models.MID_V1 (tiny SD1 layout scaled up), random weights, float32, CPU",
        "model_mb": results.get("model_mb"),
        "image_size": MID_SIZE,
        "steps": MID_STEPS,
        "strength": MID_STRENGTH,
        "guidance": GUIDANCE,
        "rows": rows,
        "rows_small_run": small,
        "batch_size": args.batch,
        "ray_num_cpus": cpus,
        "cpus_per_actor": actor_cpus,
        "torch_threads_core_and_actor": actor_cpus,
        "quick": args.quick,
    }
    path = save(name, config, results)
    print(f"\nsaved {path}")
    return 0


def measure(args: Any, rows: int, small: int, cpus: int, actor_cpus: int, workdir: Path) -> dict[str, Any]:
    from bench.models import folder_bytes

    model = mid_model()
    root = workdir / "data"
    write_local_dataset(root, rows, MID_SIZE)
    write_manifest(root / f"manifest-{small}.parquet", small)
    results: dict[str, Any] = {"model_mb": round(folder_bytes(model) / 1e6, 1)}

    server = None
    if not args.no_s3:
        # The S3 test server lives in tests/ (a real SeaweedFS gateway on loopback); a benchmark may use it.
        from tests.s3_services import SeaweedServer

        server = SeaweedServer()
        os.environ.update(server.env())  # before ray.init, so Ray's workers inherit the credentials
    try:
        import ray

        started = time.perf_counter()
        ray.init(num_cpus=cpus, log_to_driver=False, include_dashboard=False)
        results["ray_init_s"] = time.perf_counter() - started

        def local(count: int, tag: str, batch: int = args.batch) -> Any:
            return make_config(
                str(model),
                str(root / f"manifest-{count}.parquet"),
                str(workdir / "out" / tag),
                batch,
                actor_cpus,
            )

        # untimed: Ray's worker processes, imports and the page cache are warm for every timed run
        warm = workdir / "warm"
        write_local_dataset(warm, args.batch, MID_SIZE)
        run_job(
            make_config(
                str(model),
                str(warm / f"manifest-{args.batch}.parquet"),
                str(warm / "out"),
                args.batch,
                actor_cpus,
            )
        )

        core = core_loop(local(rows, "core"), root, rows, workdir / "core-out")
        core["steady_ips"] = rows / core["loop_s"]
        core["end_to_end_ips"] = rows / core["end_to_end_s"]
        results["core"] = core
        print(f"core: {core}")

        job = job_pair(local, small, rows, "local")
        from connectors.storage import Storage

        job["max_pixel_diff_vs_core"] = compare_outputs(
            Storage(), str(workdir / "out" / f"local-{rows}"), workdir / "core-out"
        )
        results["job_local"] = job
        print(f"job local: {job}")

        if not args.quick:
            import jobs.img2img

            saved = jobs.img2img.STREAM_BLOCK_BYTES
            jobs.img2img.STREAM_BLOCK_BYTES = RAY_DEFAULT_BLOCK_BYTES
            try:
                results["job_local_default_blocks"] = job_pair(local, small, rows, "local-bigblocks")
            finally:
                jobs.img2img.STREAM_BLOCK_BYTES = saved
            print(f"job local, Ray's default block size: {results['job_local_default_blocks']}")

        if server is not None:
            results["job_s3"] = s3_runs(server, root, model, rows, small, args.batch, actor_cpus)
            print(f"job s3: {results['job_s3']}")
        ray.shutdown()
    finally:
        if server is not None:
            server.stop()

    table = []
    core = results["core"]
    table.append(
        [
            "core loop (local disk)",
            core["steady_ips"],
            core["end_to_end_ips"],
            core["steady_ips"],
            1.0,
            1.0,
            f"factory {core['factory_s']:.1f} s",
        ]
    )
    labels, values = ["core"], [core["steady_ips"]]
    for key, title in (
        ("job_local", "job, local disk"),
        ("job_local_default_blocks", "job, local disk, Ray default blocks"),
        ("job_s3", "job, S3 test server"),
    ):
        if key not in results:
            continue
        job = results[key]
        job["steady_ratio"] = job["steady_ips"] / core["steady_ips"]
        job["end_to_end_ratio"] = job["end_to_end_ips"] / core["end_to_end_ips"]
        table.append(
            [
                title,
                job["steady_ips"],
                job["end_to_end_ips"],
                job["minus_actor_start_ips"],
                job["steady_ratio"],
                job["end_to_end_ratio"],
                f"actor start {job['full']['actor_start_s'] or 0:.1f} s",
            ]
        )
        labels.append(key.removeprefix("job_"))
        values.append(job["steady_ips"])
    print_table(
        f"Job vs bare core loop: {rows} rows of {MID_SIZE}x{MID_SIZE}, batch {args.batch}, "
        f"{actor_cpus} torch thread(s); steady = marginal rate (fixed costs excluded)",
        [
            "side",
            "steady img/s",
            "end-to-end img/s",
            "e2e - start img/s",
            "steady ratio",
            "e2e ratio",
            "note",
        ],
        table,
    )
    print(f"Ray instance start (not in any figure): {results['ray_init_s']:.1f} s")
    results["plot"] = {
        "title": f"Job vs core loop, steady state ({MID_SIZE}px, batch {args.batch}, CPU)",
        "labels": labels,
        "values": values,
        "unit": "images/s",
    }
    return results


def s3_runs(server: Any, root: Path, model: Path, rows: int, small: int, batch: int, actor_cpus: int) -> dict:
    from connectors.storage import Storage, StorageOptions
    from jobs.model_cache import local_copy

    storage = Storage(StorageOptions(endpoint_url=server.endpoint_url))
    base = f"s3://{server.bucket}/job-efficiency"
    started = time.perf_counter()
    uris = upload_s3(storage, base, root, model, rows, small)
    upload_s = time.perf_counter() - started
    started = time.perf_counter()
    local_copy(uris["model"], storage)  # the node cache the actors use ($SDBATCH_CACHE_DIR)
    download_s = time.perf_counter() - started

    def make(count: int, tag: str) -> Any:
        return make_config(
            uris["model"],
            uris[str(count)],
            f"{base}/out/{tag}",
            batch,
            actor_cpus,
            endpoint=server.endpoint_url,
        )

    job = job_pair(make, small, rows, "s3")
    job.update(upload_s=upload_s, model_download_to_cache_s=download_s)
    return job


if __name__ == "__main__":
    raise SystemExit(main())
