"""`--dry-run` catches each config/manifest/output error with a precise message before loading a model.

Every case calls `jobs.img2img.main([... "--dry-run"])` in-process; model loading, Ray and the run itself
are made to fail loudly, so a passing test also shows that the dry run touched none of them.
"""

from __future__ import annotations

import json

import pyarrow as pa
import pytest

from connectors.storage import Storage, join_uri
from jobs import img2img
from jobs.img2img import EXIT_OK, EXIT_REFUSED, main
from tests.jobs.test_img2img import png_bytes, write_dataset, write_manifest

REFUSED = "sdbatch: refused before any work:"


def _forbidden(what: str):
    def call(*args, **kwargs):
        raise AssertionError(f"a dry run must not {what}")

    return call


@pytest.fixture(autouse=True)
def no_model_no_ray(monkeypatch):
    """Loading a model, connecting to Ray or starting the run fails the test."""
    import ray

    import sd_core

    monkeypatch.setattr(sd_core.Img2ImgPipeline, "from_pretrained", _forbidden("load a model"))
    monkeypatch.setattr(ray, "init", _forbidden("start or connect to Ray"))
    monkeypatch.setattr(img2img, "run", _forbidden("run the job"))


@pytest.fixture
def job(tmp_path, model_dirs):
    """A good local dataset (3 images), the tiny model and an output path; `args()` builds the flags."""

    class Job:
        storage = Storage()
        root = str(tmp_path / "data")
        model = str(model_dirs["v1"])
        output = str(tmp_path / "out")
        manifest = write_dataset(Storage(), str(tmp_path / "data"), [(64, 64)] * 3)

        def args(self, *extra: str, **flags: str | None) -> list[str]:
            values = {"model": self.model, "manifest": self.manifest, "output": self.output, **flags}
            argv = [
                item for name, value in values.items() if value is not None for item in (f"--{name}", value)
            ]
            return [*argv, "--steps", "4", "--dry-run", *extra]

        def table(self, **columns) -> str:
            """Write a manifest with these columns over the dataset's images; returns its URI."""
            return write_manifest(self.storage, self.root, pa.table(columns))

    return Job()


def dry_run(capsys, argv: list[str]) -> tuple[int, str, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def refused(capsys, argv: list[str]) -> str:
    code, out, err = dry_run(capsys, argv)
    assert code == EXIT_REFUSED, (code, out, err)
    assert REFUSED in err and "dry run:" not in out, err
    return err


def test_good_dry_run_prints_the_plan_and_writes_nothing(job, capsys, tmp_path):
    code, out, err = dry_run(capsys, job.args())
    assert code == EXIT_OK, (out, err)
    lines = out.splitlines()
    assert f"manifest  {job.manifest}: 3 rows (3 image URIs, 0 inline images)" in lines
    assert "work      3 images (rows x variants); 0 already done; 3 to do" in lines
    assert any(line.startswith(f"model     {job.model} ") for line in lines), out
    assert f"output    {job.output}" in lines
    assert lines[-1] == "dry run: configuration, manifest and output checked; nothing was run"
    assert "bad rows" not in out and "missing" not in out
    assert not (tmp_path / "out").exists()


def test_unknown_key_in_the_config_file_is_named_with_a_suggestion(job, capsys, tmp_path):
    config = tmp_path / "job.yaml"
    config.write_text("compute:\n  batch_sise: 4\n")
    err = refused(capsys, job.args("--config", str(config)))
    assert f"invalid configuration in {config}:" in err
    assert "compute.batch_sise: unknown key (did you mean 'batch_size'?)" in err


def test_wrong_type_from_set_names_the_key_and_the_override(job, capsys):
    err = refused(capsys, job.args("--set", "compute.batch_size=zero"))
    assert "compute.batch_size (from --set compute.batch_size=zero): expected an integer, got 'zero'" in err


@pytest.mark.parametrize(("missing", "key"), [("manifest", "manifest"), ("model", "model.path")])
def test_missing_required_flag_says_which_flag(job, capsys, missing, key):
    err = refused(capsys, job.args(**{missing: None}))
    assert f"{key}: missing required key; set it in the config file or pass --{missing}" in err


def test_model_path_that_does_not_exist(job, capsys, tmp_path):
    model = str(tmp_path / "no-such-model")
    err = refused(capsys, job.args(model=model))
    assert "these inputs do not exist" in err and f"model.path: {model}" in err


def test_lora_path_that_does_not_exist(job, capsys):
    err = refused(capsys, job.args("--lora", "/nope.safetensors:0.5"))
    assert "these inputs do not exist" in err and "adapters.loras[0].path: /nope.safetensors" in err
    assert "model.path" not in err  # the model exists


def test_manifest_that_does_not_exist(job, capsys, tmp_path):
    manifest = str(tmp_path / "nowhere.parquet")
    err = refused(capsys, job.args(manifest=manifest))
    assert f"{manifest}: manifest not found" in err


def test_manifest_that_is_not_parquet(job, capsys):
    job.storage.write_bytes(job.manifest, b"id,image,prompt\nrow-0,inputs/0.png,hello\n")
    err = refused(capsys, job.args())
    assert f"{job.manifest}: not a Parquet file or dataset" in err


def test_manifest_without_a_prompt_column(job, capsys):
    manifest = job.table(id=["a", "b"], image=["inputs/0.png", "inputs/1.png"])
    err = refused(capsys, job.args(manifest=manifest))
    assert "column 'prompt': missing required column" in err


def test_duplicate_ids_are_named(job, capsys):
    manifest = job.table(id=["a", "twin", "b", "twin"], image=["inputs/0.png"] * 4, prompt=["p"] * 4)
    err = refused(capsys, job.args(manifest=manifest))
    assert "column 'id': duplicate ids (2 rows share them); ids must be unique [1 id: 'twin']" in err


def test_empty_manifest(job, capsys):
    empty = pa.array([], pa.string())
    manifest = job.table(id=empty, image=empty, prompt=empty)
    err = refused(capsys, job.args(manifest=manifest))
    assert "the manifest has 0 rows; it needs at least one" in err


def test_bad_row_values_are_listed_but_do_not_refuse(job, capsys):
    manifest = job.table(
        id=["fine", "too-strong"],
        image=["inputs/0.png", "inputs/1.png"],
        prompt=["p", "p"],
        strength=[0.5, 1.5],
    )
    code, out, err = dry_run(capsys, job.args(manifest=manifest))
    assert code == EXIT_OK, (out, err)
    lines = out.splitlines()
    bad = lines.index("bad rows  (these become error rows; the run goes on):")
    assert "column 'strength': out of range" in lines[bad + 1] and "'too-strong'" in lines[bad + 1]
    assert "'fine'" not in out
    assert "dry run:" in out


def test_missing_input_images_are_listed_and_refused(job, capsys):
    job.storage.write_bytes(join_uri(job.root, "inputs", "extra.png"), png_bytes(9, 64, 64))
    manifest = job.table(
        id=["here", "gone"], image=["inputs/extra.png", "inputs/nope.png"], prompt=["p", "p"]
    )
    code, out, err = dry_run(capsys, job.args(manifest=manifest))
    assert code == EXIT_REFUSED, (out, err)
    lines = out.splitlines()
    assert "missing   1 of the first 16 input images:" in lines
    assert f"  - {join_uri(job.root, 'inputs', 'nope.png')}" in lines
    assert "extra.png" not in out
    assert "dry run:" in out


def test_output_written_by_another_configuration_needs_force(job, capsys, tmp_path):
    job.storage.write_bytes(
        join_uri(job.output, "_job.json"), json.dumps({"fingerprint": "something-else"}).encode()
    )
    err = refused(capsys, job.args())
    assert f"output {job.output} was written by a run with a different configuration" in err
    assert "--force" in err

    code, out, err = dry_run(capsys, job.args("--force"))
    assert code == EXIT_OK, (out, err)
    assert "dry run:" in out
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["_job.json"]
