"""The bad-input corpus (issue #6): every kind of bad input, and exactly what the job does with it.

The two tables below are the documentation of the outcomes:

- ROW_CASES: bad values in single rows. They all go into one manifest on the real S3 test server, next to
  a few good rows, and one real job run (`run(make_plan(config))` on the test Ray cluster); the cases with
  inline image bytes need a binary `image` column, so they get a second, small manifest and run. Each row ends
  as an error row with the stage, type and message given here, or (hostile ids) as an image under a safe
  key. The run itself completes and commits; nothing is lost, nothing is written twice, no partial object
  is visible, `_SUCCESS` is there (`assert_output_sound`).
- REFUSAL_CASES: inputs that make the run impossible. `load_config` / `make_plan` refuse them up front with
  the message given here (ConfigError, or PlanError carrying the ManifestError's text) and nothing is
  written to the output.

Placeholders in expected messages: {data} is the dataset's root (manifest and `inputs/`), {elsewhere} a
prefix of the same bucket outside the allowed roots, {local} a local directory; in refusals {tmp} is the
test's directory, {manifest}, {model} and {output} the job's.
"""

from __future__ import annotations

import math
import os
import re
import struct
import uuid
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import PIL.Image
import pyarrow as pa
import pytest
import torch
from safetensors.torch import load_file

from connectors.keys import safe_segment
from connectors.output import OutputSink
from connectors.storage import Storage, StorageOptions, join_uri
from jobs.config import ConfigError, load_config
from jobs.img2img import EXIT_FAILED, EXIT_OK, run
from jobs.plan import PlanError, make_plan
from tests.connectors.test_images import png_chunk, saved
from tests.jobs.job_runs import assert_output_sound
from tests.jobs.test_img2img import make_config, png_bytes, write_dataset, write_manifest
from tests.jobs.test_preflight import PICKLE_WORDS, loras, single_file  # noqa: F401 - loras is a fixture
from tests.jobs.test_resume import object_listing
from tests.sd_core.test_textual_inversion import WIDTH, vectors, write_safetensors

# ---- inputs ----------------------------------------------------------------------------------------------

PROMPT = "a test picture"
GOOD_PNG = png_bytes(7, 64, 64)


def forged_png_header(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims `width` x `height`: a decompression bomb as far as any reader knows."""
    data = png_bytes(0, 8, 8)
    return data[:8] + png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) + data[33:]


def sparse_png(side: int) -> bytes:
    """A real, valid `side` x `side` 1-bit PNG of zeros: 32 kB on disk for 16k x 16k."""
    rows = zlib.compress(bytes(side * (1 + side // 8)), 9)
    header = png_chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + header + png_chunk(b"IDAT", rows) + png_chunk(b"IEND", b"")


def truncated_jpeg() -> bytes:
    data = saved(PIL.Image.effect_noise((64, 64), 50).convert("RGB"), "JPEG")
    return data[: len(data) // 2]


def animated_gif() -> bytes:
    frames = [PIL.Image.new("RGB", (16, 16), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    return saved(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100)


# ---- row-level cases: one real job run -------------------------------------------------------------------


@dataclass(frozen=True)
class Failed:
    """The row ends in the errors table with this stage, type and message (a fragment of it)."""

    stage: str
    error_type: str
    message: str


@dataclass(frozen=True)
class Edited:
    """The row ends in the metadata with its exact id, its image under one safe segment of images/."""


IMAGE = Edited()


def bad_value(message: str) -> Failed:
    """A bad manifest value: turned into an error row before any read, naming the column and the value."""
    return Failed("validate", "BadManifestRow", message)


def range_error(column: str, expected: str, got: str) -> Failed:
    return bad_value(
        f"column {column!r}: out of range; expected {expected} (null means the run default) (got {got})"
    )


def decode_error(name: str, problem: str) -> Failed:
    return Failed("decode", "ImageDecodeError", f"{{data}}/inputs/{name}: {problem}")


TOO_LONG = "CLIP reads only the first 77 tokens, so shorten it"
TOO_LARGE = "image too large to decode safely ({detail}; limit 64000000 pixels); downscale it before the job"


@dataclass(frozen=True)
class RowCase:
    kind: str
    row: dict[
        str, Any
    ]  # manifest values; id defaults to the kind's slug, image to a good PNG, prompt to PROMPT
    expect: Failed | Edited
    files: dict[str, bytes] = field(default_factory=dict)  # written before the run: URI template -> bytes

    @property
    def manifest(self) -> str:
        """Which manifest holds the row: "inline" (a binary image column) or "uris" (a string column)."""
        return "inline" if isinstance(self.row.get("image"), bytes) else "uris"

    @property
    def row_id(self) -> str:
        return self.row.get("id", re.sub(r"[^a-z0-9]+", "-", self.kind.lower()).strip("-"))


ROW_CASES = [
    # -- values (stage validate: nothing is read for these rows) --
    RowCase(
        "null prompt",
        {"prompt": None},
        bad_value("column 'prompt': null values; this column is required in every row"),
    ),
    RowCase(
        "huge prompt",
        {"prompt": "x" * 10_001},
        bad_value(f"column 'prompt': longer than 10000 characters; {TOO_LONG} (got 10001 characters)"),
    ),
    RowCase(
        "huge negative prompt",
        {"negative_prompt": "y" * 20_000},
        bad_value(
            f"column 'negative_prompt': longer than 10000 characters; {TOO_LONG} (got 20000 characters)"
        ),
    ),
    RowCase(
        "strength NaN", {"strength": math.nan}, range_error("strength", "a finite number in [0, 1]", "nan")
    ),
    RowCase(
        "strength -0.1", {"strength": -0.1}, range_error("strength", "a finite number in [0, 1]", "-0.1")
    ),
    RowCase("strength 1.5", {"strength": 1.5}, range_error("strength", "a finite number in [0, 1]", "1.5")),
    RowCase(
        "steps 0",
        {"num_inference_steps": 0},
        range_error("num_inference_steps", "an integer in 1..1000", "0"),
    ),
    RowCase(
        "steps 10**6",
        {"num_inference_steps": 10**6},
        range_error("num_inference_steps", "an integer in 1..1000", "1000000"),
    ),
    RowCase(
        "guidance NaN",
        {"guidance_scale": math.nan},
        range_error("guidance_scale", "a finite number >= 0", "nan"),
    ),
    RowCase(
        "guidance negative",
        {"guidance_scale": -1.0},
        range_error("guidance_scale", "a finite number >= 0", "-1.0"),
    ),
    RowCase(
        "seed out of int64 (uint64 2**64-1)",
        {"seed": 2**64 - 1},
        range_error("seed", "an integer in 0..2**63-1", "18446744073709551615"),
    ),
    RowCase("num_images 0", {"num_images": 0}, range_error("num_images", "an integer in 1..64", "0")),
    RowCase("num_images 65", {"num_images": 65}, range_error("num_images", "an integer in 1..64", "65")),
    RowCase(
        "width not a multiple of 8",
        {"width": 100},
        range_error("width", "a multiple of 8 in 64..4096", "100"),
    ),
    RowCase(
        "height over 4096", {"height": 8192}, range_error("height", "a multiple of 8 in 64..4096", "8192")
    ),
    RowCase(
        "unknown resize_mode",
        {"resize_mode": "stretch"},
        range_error("resize_mode", "one of just_resize, crop_and_resize, resize_and_fill", "'stretch'"),
    ),
    RowCase(
        "empty image value",
        {"image": ""},
        bad_value("column 'image': empty values; give an image URI or the image bytes (got '')"),
    ),
    RowCase(
        "relative image climbing out with ..",
        {"image": "../secret.png"},
        bad_value(
            "column 'image': relative paths that climb out of the manifest's directory with '..'; "
            "write them as absolute URIs (got '../secret.png')"
        ),
    ),
    # -- where the image is --
    RowCase(
        "image outside the allowed roots",
        {"image": "{elsewhere}/secret.png"},
        Failed(
            "validate",
            "InputNotAllowed",
            "image URI '{elsewhere}/secret.png' is outside the allowed input roots ({data}/, {local}/); "
            "move the file under an allowed root or add its root to inputs.allowed_roots",
        ),
        files={"{elsewhere}/secret.png": GOOD_PNG},  # it exists and is readable: the roots alone refuse it
    ),
    RowCase(
        "image missing",
        {"image": "inputs/nope.png"},
        Failed(
            "read",
            "FileNotFoundError",
            "input image {data}/inputs/nope.png does not exist; fix the manifest's image value",
        ),
    ),
    RowCase(  # S3 has no directories: no object has this key, objects only live under it
        "image is an S3 prefix (directory)",
        {"image": "inputs/a-prefix"},
        Failed(
            "read",
            "IsADirectoryError",
            "input image {data}/inputs/a-prefix is a directory, not an image file; name one file",
        ),
        files={"{data}/inputs/a-prefix/inside.png": GOOD_PNG},
    ),
    RowCase(
        "image is a local directory",
        {"image": "{local}/a-directory"},
        Failed(
            "read",
            "IsADirectoryError",
            "input image {local}/a-directory is a directory, not an image file; name one file",
        ),
        files={"{local}/a-directory/inside.png": GOOD_PNG},
    ),
    # -- what the image bytes are (stage decode: refused from the header, before any pixel is decoded) --
    RowCase(
        "0-byte file",
        {"image": "inputs/empty.png"},
        decode_error("empty.png", "the file is empty (0 bytes); check the upload or drop the row"),
        files={"{data}/inputs/empty.png": b""},
    ),
    RowCase(
        "truncated JPEG",
        {"image": "inputs/truncated.jpg"},
        decode_error(
            "truncated.jpg",
            "the JPEG data is truncated or corrupt (image file is truncated (51 bytes not processed)); "
            "re-export or re-upload the file, or drop the row",
        ),
        files={"{data}/inputs/truncated.jpg": truncated_jpeg()},
    ),
    RowCase(
        "PNG bomb (header says 10000x10000, 100 bytes)",
        {"image": "inputs/bomb.png"},
        decode_error("bomb.png", TOO_LARGE.format(detail="header says 10000x10000 = 100000000 pixels")),
        files={"{data}/inputs/bomb.png": forged_png_header(10_000, 10_000)},
    ),
    RowCase(  # over twice Pillow's own limit: Pillow refuses it while reading the header
        "16k x 16k image (real, 32 kB compressed)",
        {"image": "inputs/huge.png"},
        decode_error(
            "huge.png",
            TOO_LARGE.format(
                detail="Image size (268435456 pixels) exceeds limit of 178956970 pixels, "
                "could be decompression bomb DOS attack."
            ),
        ),
        files={"{data}/inputs/huge.png": sparse_png(16_384)},
    ),
    RowCase(
        "animated GIF",
        {"image": "inputs/animated.gif"},
        decode_error(
            "animated.gif",
            "animated GIF (more than one frame); img2img edits still images. Extract a frame first, "
            "or set DecodeOptions(allow_animated=True) to use the first frame",
        ),
        files={"{data}/inputs/animated.gif": animated_gif()},
    ),
    RowCase(
        "1x1 image",
        {"image": "inputs/dot.png"},
        decode_error(
            "dot.png",
            "image is 1x1, smaller than the minimum side of 8 pixels; upscale it first, drop the row, "
            "or lower DecodeOptions.min_side",
        ),
        files={"{data}/inputs/dot.png": png_bytes(1, 1, 1)},
    ),
    RowCase(
        "non-image bytes",
        {"image": "inputs/forbidden.png"},
        decode_error(
            "forbidden.png",
            "not an image Pillow can read (unrecognised format; 26 bytes starting b'<html>403 Forbid'); "
            "check that the data is a PNG/JPEG/WebP/GIF/BMP/TIFF file",
        ),
        files={"{data}/inputs/forbidden.png": b"<html>403 Forbidden</html>"},
    ),
    # -- inline image bytes (a second manifest, whose image column is binary) --
    RowCase(
        "inline image bytes that are garbage",
        {"image": b"GIF89a but not really"},
        Failed(
            "decode",
            "ImageDecodeError",
            "inline image of row 'inline-image-bytes-that-are-garbage': not an image Pillow can read "
            "(unrecognised format; 21 bytes starting b'GIF89a but not r'); check that the data is a "
            "PNG/JPEG/WebP/GIF/BMP/TIFF file",
        ),
    ),
    RowCase(
        "inline image of 0 bytes",
        {"image": b""},
        bad_value("column 'image': empty values; give an image URI or the image bytes (got b'')"),
    ),
    # -- hostile ids: fine rows, written under one safe key segment each --
    RowCase("hostile id ../../x", {"id": "../../x"}, IMAGE),
    RowCase("hostile id /abs", {"id": "/abs"}, IMAGE),
    RowCase("hostile id a/b", {"id": "a/b"}, IMAGE),
    RowCase("hostile id with NUL", {"id": "nul\x00id"}, IMAGE),
    RowCase("hostile id of 10 kB", {"id": "z" * 10_240}, IMAGE),
]
GOOD_IDS = {"uris": ["good-0", "good-1", "good-2"], "inline": ["good-inline"]}
RESUME_KIND = "manifest with 0 rows to do after resume"  # test_rerun_with_nothing_to_do_touches_nothing
MANIFEST_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("image", pa.string()),
        ("prompt", pa.string()),
        ("negative_prompt", pa.string()),
        ("strength", pa.float64()),
        ("guidance_scale", pa.float64()),
        ("num_inference_steps", pa.int64()),
        ("seed", pa.uint64()),  # as pandas writes unsigned ids: 2**64-1 does not fit int64
        ("num_images", pa.int64()),
        ("width", pa.int64()),
        ("height", pa.int64()),
        ("resize_mode", pa.string()),
    ]
)


@dataclass
class CorpusRun:
    storage: Storage
    manifest: str
    output: str
    names: dict[str, str]  # the placeholders' values
    summary: dict[str, Any]
    config: Any
    kind: str  # "uris" or "inline": RowCase.manifest

    @property
    def good_ids(self) -> list[str]:
        return GOOD_IDS[self.kind]

    @property
    def cases(self) -> list[RowCase]:
        return [case for case in ROW_CASES if case.manifest == self.kind]

    def fill(self, template: str) -> str:
        return template.format(**self.names)


def run_corpus(s3_server, model_dirs, local_root: str) -> dict[str, CorpusRun]:
    """One manifest per image column type, each with its good rows and its cases, each run once."""
    storage = Storage(StorageOptions(endpoint_url=s3_server.endpoint_url))
    root = f"s3://{s3_server.bucket}/corpus-{uuid.uuid4().hex[:8]}"
    names = {"data": join_uri(root, "data"), "elsewhere": join_uri(root, "elsewhere"), "local": local_root}
    storage.write_bytes(join_uri(names["data"], "inputs", "good.png"), GOOD_PNG)
    runs = {}
    for kind, image_type in (("uris", pa.string()), ("inline", pa.binary())):
        good_image = "inputs/good.png" if kind == "uris" else GOOD_PNG
        rows = [{"id": row_id, "image": good_image, "prompt": PROMPT} for row_id in GOOD_IDS[kind]]
        for case in ROW_CASES:
            if case.manifest != kind:
                continue
            for where, data in case.files.items():
                storage.write_bytes(where.format(**names), data)
            row = {"image": good_image, "prompt": PROMPT, **case.row, "id": case.row_id}
            if isinstance(row["image"], str):
                row["image"] = row["image"].format(**names)
            rows.append(row)
        schema = MANIFEST_SCHEMA.set(1, pa.field("image", image_type))
        at = (
            names["data"] if kind == "uris" else join_uri(root, "inline")
        )  # relative images resolve from here
        manifest = write_manifest(storage, at, pa.Table.from_pylist(rows, schema=schema))
        output = join_uri(root, f"out-{kind}")
        allowed = {"inputs.allowed_roots": [names["data"] + "/", local_root + "/"]}
        # max_error_rate stays at its default (0.01): these runs are mostly bad rows, so they must commit
        # every row and still exit 1. The rerun test shows the same output passing with max_error_rate 1.0.
        config = make_config(str(model_dirs["v1"]), manifest, output, s3_server.endpoint_url, **allowed)
        summary = run(make_plan(config))
        runs[kind] = CorpusRun(storage, manifest, output, names, summary, config, kind)
    return runs


@pytest.fixture(scope="module")
def corpus_cache() -> dict[str, dict[str, CorpusRun]]:
    return {}


@pytest.fixture
def corpus(corpus_cache, ray_driver, s3_server, model_dirs, tmp_path_factory) -> dict[str, CorpusRun]:
    """The corpus jobs, run once per module on first use (ray_driver is per test, so no module fixture)."""
    if "runs" not in corpus_cache:
        local_root = str(tmp_path_factory.mktemp("corpus-local"))
        corpus_cache["runs"] = run_corpus(s3_server, model_dirs, local_root)
    return corpus_cache["runs"]


def outcomes(corpus: CorpusRun) -> tuple[dict[str, dict], dict[str, dict]]:
    sink = OutputSink(corpus.storage, corpus.output)
    errors = {row["id"]: row for row in sink.read_errors().to_pylist()}
    images = {row["id"]: row for row in sink.read_metadata().to_pylist()}
    return errors, images


@pytest.mark.slow
@pytest.mark.parametrize("case", ROW_CASES, ids=[case.kind for case in ROW_CASES])
def test_row_level_bad_input(corpus, case):
    run_of_case = corpus[case.manifest]
    errors, images = outcomes(run_of_case)
    if isinstance(case.expect, Failed):
        assert case.row_id not in images
        error = errors[case.row_id]
        assert (error["variant"], error["stage"], error["error_type"]) == (
            0,
            case.expect.stage,
            case.expect.error_type,
        ), error
        assert run_of_case.fill(case.expect.message) in error["message"], error["message"]
        assert error["retryable"] is False and error["attempts"] == 1
    else:
        assert case.row_id not in errors, errors.get(case.row_id)
        image = images[case.row_id]
        assert image["id"] == case.row_id and image["variant"] == 0  # the exact id, NUL and 10 kB included
        segment = safe_segment(case.row_id)
        assert "/" not in segment and segment not in (".", "..") and len(segment) <= 100
        assert image["output"] == f"{run_of_case.output}/images/{segment}/0.png"
        assert run_of_case.storage.exists(image["output"])


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["uris", "inline"])
def test_the_corpus_run_commits_every_row_and_exits_1_over_the_error_rate(corpus, kind):
    corpus_run = corpus[kind]
    rows = len(corpus_run.good_ids) + len(corpus_run.cases)
    failed = sum(isinstance(case.expect, Failed) for case in corpus_run.cases)
    summary = corpus_run.summary
    assert summary["committed"] and summary["rows"] == rows, summary
    assert (summary["images"], summary["errors"]) == (rows - failed, failed)
    assert summary["exit_code"] == EXIT_FAILED  # complete, but failed/rows > max_error_rate (0.01)
    counts = assert_output_sound(corpus_run.storage, corpus_run.output, corpus_run.manifest, complete=True)
    assert (counts["images"], counts["errors"]) == (rows - failed, failed)
    errors, images = outcomes(corpus_run)
    assert set(images) | set(errors) == set(corpus_run.good_ids) | {case.row_id for case in corpus_run.cases}
    assert set(corpus_run.good_ids) <= set(images)


@pytest.mark.slow
def test_rerun_with_nothing_to_do_touches_nothing(corpus):
    """RESUME_KIND: a rerun of the committed output has 0 rows to do: it exits at once and writes nothing."""
    corpus_run = corpus["uris"]
    before = object_listing(corpus_run.storage, corpus_run.output)
    plan = make_plan(corpus_run.config)
    assert (plan.expected_rows, plan.todo_rows) == (len(corpus_run.good_ids) + len(corpus_run.cases), 0)
    assert run(plan)["exit_code"] == EXIT_FAILED  # the recorded error rate is still over the default
    config = corpus_run.config
    lenient = make_config(
        config.model.path,
        config.manifest,
        config.output,
        config.storage.endpoint_url,
        max_error_rate=1.0,
        **{"inputs.allowed_roots": list(config.inputs.allowed_roots)},
    )
    summary = run(make_plan(lenient))
    assert summary["exit_code"] == EXIT_OK and summary["committed"], summary
    assert object_listing(corpus_run.storage, corpus_run.output) == before


# ---- up-front refusals: no Ray, nothing written ----------------------------------------------------------


class Env:
    """A good local dataset (2 images), the tiny SD1 model and an output path, for one refusal case."""

    def __init__(self, tmp_path: Path, model_dirs: dict, lora_files: dict):
        self.tmp = tmp_path
        self.root = str(tmp_path / "data")
        self.model = str(model_dirs["v1"])
        self.model_dirs = model_dirs
        self.loras = lora_files
        self.output = str(tmp_path / "out")
        self.manifest = write_dataset(Storage(), self.root, [(64, 64)] * 2)

    def names(self) -> dict[str, str]:
        return {"tmp": str(self.tmp), "manifest": self.manifest, "model": self.model, "output": self.output}

    def table(self, **columns) -> str:
        """Replace the manifest with these columns (over the dataset's images); returns its URI."""
        return write_manifest(Storage(), self.root, pa.table(columns))

    def write(self, name: str, data: bytes) -> str:
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return str(path)

    def directory(self, name: str) -> str:
        (self.tmp / name).mkdir()
        return str(self.tmp / name)

    def plan(self, manifest: str | None = None, model: str | None = None, **settings):
        config = make_config(model or self.model, manifest or self.manifest, self.output, **settings)
        return make_plan(config)

    def plan_with_file(self, text: str):
        path = self.write("job.yaml", text.encode())
        flags = {"model.path": self.model, "manifest": self.manifest, "output": self.output}
        return make_plan(load_config(path, flags=flags))

    def plan_over_another_configuration(self):
        """Plan into an output that a run with the default configuration has begun (its `_job.json`)."""
        begun = make_config(self.model, self.manifest, self.output)
        OutputSink(Storage(), self.output).write_job_record({"fingerprint": begun.fingerprint()})
        return self.plan(**{"defaults.strength": 0.5})

    def wide_embedding(self) -> str:
        """A textual inversion of SD2's text width (64), for the SD1 model (32)."""
        return str(write_safetensors(self.tmp / "wide.safetensors", {"<w>": vectors(2, WIDTH["v2"], 0)}))

    def pickled_checkpoint(self) -> str:
        """The SD1 model as an A1111-style pickled .ckpt (torch.save of its state dict)."""
        safe = single_file(self.model_dirs, "v1", self.tmp / "model.safetensors")
        pickled = self.tmp / "model.ckpt"
        torch.save({"state_dict": load_file(str(safe))}, pickled)
        return str(pickled)


@dataclass(frozen=True)
class RefusalCase:
    kind: str
    attempt: Callable[[Env], Any]  # what the user does: build the config and the plan
    error: type[Exception]
    message: str  # a fragment of the refusal ({tmp}, {manifest}, {model}, {output} filled in)
    output_files: tuple[str, ...] = ()  # what the output holds afterwards (() = it does not exist)


TWO = ["inputs/0.png", "inputs/1.png"]
CONVERT = "so convert the column before writing"
NO_STRINGS = pa.array([], pa.string())

REFUSAL_CASES = [
    # -- the manifest's ids --
    RefusalCase(
        "missing id column",
        lambda env: env.plan(env.table(image=TWO, prompt=["p", "p"])),
        PlanError,
        "column 'id': missing required column; add it to every manifest file",
    ),
    RefusalCase(
        "null id",
        lambda env: env.plan(env.table(id=[None, "b"], image=TWO, prompt=["p", "p"])),
        PlanError,
        "column 'id': null values; this column is required in every row [1 row: row #0]",
    ),
    RefusalCase(
        "empty id",
        lambda env: env.plan(env.table(id=["", "b"], image=TWO, prompt=["p", "p"])),
        PlanError,
        "column 'id': empty ids; every row needs a non-empty, unique id [1 row: '']",
    ),
    RefusalCase(
        "duplicate ids",
        lambda env: env.plan(env.table(id=["twin", "twin"], image=TWO, prompt=["p", "p"])),
        PlanError,
        "column 'id': duplicate ids (2 rows share them); ids must be unique [1 id: 'twin']",
    ),
    # -- column types --
    RefusalCase(
        "non-string prompt column (int64)",
        lambda env: env.plan(env.table(id=["a", "b"], image=TWO, prompt=[1, 2])),
        PlanError,
        f"column 'prompt': wrong type int64; expected a string, {CONVERT}",
    ),
    RefusalCase(
        "strength column of strings",
        lambda env: env.plan(env.table(id=["a", "b"], image=TWO, prompt=["p", "p"], strength=["0.5", "0.7"])),
        PlanError,
        f"column 'strength': wrong type string; expected a number (e.g. float64), {CONVERT}",
    ),
    RefusalCase(
        "num_images as float (pandas with nulls)",
        lambda env: env.plan(env.table(id=["a", "b"], image=TWO, prompt=["p", "p"], num_images=[2.0, None])),
        PlanError,
        "column 'num_images': wrong type double; expected an integer (e.g. int64; in pandas use the "
        f"nullable 'Int64' dtype), {CONVERT}",
    ),
    RefusalCase(
        "image column of integers",
        lambda env: env.plan(env.table(id=["a", "b"], image=[0, 1], prompt=["p", "p"])),
        PlanError,
        f"column 'image': wrong type int64; expected a string URI or binary image bytes, {CONVERT}",
    ),
    # -- the manifest file --
    RefusalCase(
        "manifest not Parquet (CSV named .parquet)",
        lambda env: env.plan(env.write("manifest.parquet", b"id,image,prompt\na,inputs/0.png,p\n")),
        PlanError,
        "{tmp}/manifest.parquet: not a Parquet file or dataset; write the manifest as Parquet (",
    ),
    RefusalCase(
        "empty manifest (0 rows)",
        lambda env: env.plan(env.table(id=NO_STRINGS, image=NO_STRINGS, prompt=NO_STRINGS)),
        PlanError,
        "{manifest}: 1 problem(s) in the manifest:\n  - the manifest has 0 rows; it needs at least one",
    ),
    RefusalCase(
        "manifest path missing",
        lambda env: env.plan("{tmp}/nowhere.parquet".format(**env.names())),
        PlanError,
        "{tmp}/nowhere.parquet: manifest not found; give a Parquet file, a directory, a glob or a hive "
        "prefix",
    ),
    RefusalCase(
        "manifest directory without Parquet files",
        lambda env: env.plan(env.directory("empty-dir")),
        PlanError,
        "{tmp}/empty-dir: the directory holds no Parquet files",
    ),
    # -- configuration --
    RefusalCase(
        "unknown config key",
        lambda env: env.plan_with_file("compute:\n  batch_sise: 4\n"),
        ConfigError,
        "invalid configuration in {tmp}/job.yaml:\n"
        "  - compute.batch_sise: unknown key (did you mean 'batch_size'?)",
    ),
    RefusalCase(
        "default strength out of range",
        lambda env: env.plan(**{"defaults.strength": 1.5}),
        ConfigError,
        "defaults.strength (from --strength): must be a finite number in [0, 1], got 1.5",
    ),
    RefusalCase(
        "allowed_roots relative",
        lambda env: env.plan(**{"inputs.allowed_roots": ["data/images/"]}),
        ConfigError,
        "'data/images/' is a relative path; give an absolute path (/mnt/data/) or a URI prefix "
        "(s3://bucket/data/)",
    ),
    RefusalCase(
        "allowed_roots with ..",
        lambda env: env.plan(**{"inputs.allowed_roots": ["/mnt/data/../etc/"]}),
        ConfigError,
        "'/mnt/data/../etc/' contains '..'; write the root without it",
    ),
    # -- model and adapters (read as headers only; see test_preflight.py) --
    RefusalCase(
        "model path missing",
        lambda env: env.plan(model="{tmp}/no-such-model".format(**env.names())),
        PlanError,
        "these inputs do not exist; fix the paths in the config or flags:\n"
        "  - model.path: {tmp}/no-such-model",
    ),
    RefusalCase(
        "LoRA for a different model family (SD2 LoRA, SD1 model)",
        lambda env: env.plan(**{"adapters.loras": [{"path": str(env.loras["v2"]["kohya"])}]}),
        PlanError,
        "does not fit the model {model} (SD 1.x): shape mismatch at v2_kohya: ",
    ),
    RefusalCase(
        "textual inversion of the wrong width",
        lambda env: env.plan(**{"adapters.embeddings": [{"path": env.wide_embedding()}]}),
        PlanError,
        f"has {WIDTH['v2']}-wide vectors but this text encoder's token embeddings are {WIDTH['v1']}-wide",
    ),
    RefusalCase(
        "pickle checkpoint without opt-in",
        lambda env: env.plan(model=env.pickled_checkpoint()),
        PlanError,
        "model.path {tmp}/model.ckpt: {tmp}/model.ckpt is a pickle file",
    ),
    RefusalCase(
        "output written by another configuration",
        Env.plan_over_another_configuration,
        PlanError,
        "output {output} was written by a run with a different configuration (model, adapters, defaults "
        "or seed differ), so its images would not match this run's. Write to a new output, or pass --force",
        output_files=("_job.json",),
    ),
]


@pytest.fixture
def env(tmp_path, model_dirs, loras) -> Env:  # noqa: F811 - loras is the fixture imported above
    return Env(tmp_path, model_dirs, loras)


def listing(path: str) -> tuple[str, ...]:
    return tuple(
        sorted(os.path.relpath(os.path.join(d, f), path) for d, _, files in os.walk(path) for f in files)
    )


@pytest.mark.parametrize("case", REFUSAL_CASES, ids=[case.kind for case in REFUSAL_CASES])
def test_refused_up_front(env, case):
    with pytest.raises(case.error) as caught:
        case.attempt(env)
    message = str(caught.value)
    assert case.message.format(**env.names()) in message, message
    if "pickle" in case.kind:
        assert all(words in message for words in PICKLE_WORDS), message
    assert listing(env.output) == case.output_files, "a refused run wrote to its output"
    if not case.output_files:
        assert not os.path.exists(env.output), "a refused run must not create its output"


def test_the_corpus_has_at_least_30_distinct_kinds():
    kinds = [case.kind for case in ROW_CASES] + [case.kind for case in REFUSAL_CASES] + [RESUME_KIND]
    assert len(kinds) == len(set(kinds)) >= 30, len(kinds)
    row_ids = [row_id for ids in GOOD_IDS.values() for row_id in ids] + [case.row_id for case in ROW_CASES]
    assert len(row_ids) == len(set(row_ids)), "two row cases share an id"
