"""Dataset augmentation (`sdbatch augment`): M variants per row with drawn values recorded in the
metadata, identical reruns, resume after a killed driver, and one VAE encode per input image."""

from __future__ import annotations

import json
import os
import signal

import pyarrow as pa
import pytest
import yaml

from connectors.output import OutputSink
from connectors.storage import Storage, join_uri
from jobs.augment import partitioned
from jobs.augment_policy import TemplateError, fill, realise
from jobs.config import ConfigError, load_config
from jobs.img2img import EXIT_OK, run
from jobs.plan import PlanError, make_plan
from tests.jobs.job_runs import JobDriver, assert_output_sound
from tests.jobs.test_img2img import png_bytes, write_manifest

LABELS = ["cat", "dog", "3", "owl", "fox", "cow"]
POLICY = {
    "augment.variants": 4,
    "augment.prompts": ["a photo of a {label}", "a watercolour of a {label}, {place}"],
    "augment.negative_prompts": ["blurry", "low quality"],
    "augment.strength.values": [0.75],  # one strength: an image's variants share one core call
    "augment.guidance_scale.low": 4.0,
    "augment.guidance_scale.high": 9.0,
    "augment.substitutions": [{"column": "label", "value": "3", "text": "<cls-3>"}],
}


def policy_config(manifest: str = "m.parquet", output: str = "out", **settings):
    flags = {"model.path": "model", "manifest": manifest, "output": output, **POLICY, **settings}
    return load_config(None, flags=flags)


# -- the policy ----------------------------------------------------------------------------------------


def test_values_are_a_stable_function_of_run_seed_id_and_variant():
    augment = policy_config().augment
    row = {"label": "cat", "place": "Oslo"}
    draws = [realise(augment, row, "row-1", variant, run_seed=7) for variant in range(4)]
    assert draws == [realise(augment, row, "row-1", variant, run_seed=7) for variant in range(4)]
    assert draws != [realise(augment, row, "row-1", variant, run_seed=8) for variant in range(4)]
    for draw in draws:
        assert draw["prompt"] in ("a photo of a cat", "a watercolour of a cat, Oslo")
        assert draw["negative_prompt"] in ("blurry", "low quality")
        assert draw["strength"] == 0.75
        assert 4.0 <= draw["guidance_scale"] <= 9.0
    assert len({d["guidance_scale"] for d in draws}) == 4  # a range gives each variant its own value


def test_templates_take_substitutions_and_refuse_null_columns():
    augment = policy_config().augment
    assert fill("a photo of a {label}", {"label": "3"}, augment) == "a photo of a <cls-3>"
    assert fill("a {label}: {{literal}}", {"label": "dog"}, augment) == "a dog: {literal}"
    with pytest.raises(TemplateError, match="column 'label' is null in this row"):
        fill("a photo of a {label}", {"label": None}, augment)


def test_bad_policies_and_partitions_are_refused_before_any_work():
    with pytest.raises(ConfigError, match=r"augment.prompts\[0\] .*placeholder \{label:>3\}"):
        policy_config(**{"augment.prompts": ["{label:>3}"]})
    with pytest.raises(ConfigError, match="augment.guidance_scale.*a uniform range needs both"):
        policy_config(**{"augment.guidance_scale.high": None})
    with pytest.raises(ConfigError, match="augment.variants: must be > 0 for an augmentation run"):
        partitioned(policy_config(**{"augment.variants": 0}), "ds=2026-11-25")
    with pytest.raises(ConfigError, match="--partition '../x'"):
        partitioned(policy_config(), "../x")
    assert partitioned(policy_config(), "ds=2026-11-25").output == "out/ds=2026-11-25"


def test_fingerprint_covers_the_policy_only_when_on():
    plain = load_config(None, flags={"model.path": "model", "manifest": "m", "output": "o"})
    off = load_config(
        None, flags={"model.path": "model", "manifest": "m", "output": "o", "augment.prompts": ["x"]}
    )
    assert plain.fingerprint() == off.fingerprint()  # outputs written before augmentation keep theirs
    assert policy_config().fingerprint() != policy_config(**{"augment.variants": 3}).fingerprint()


# -- the job -------------------------------------------------------------------------------------------


def write_labelled(storage: Storage, root: str, rows: int) -> str:
    """A manifest with no prompt column: id, image, label, place (augmentation writes the prompts)."""
    for i in range(rows):
        storage.write_bytes(join_uri(root, "inputs", f"{i}.png"), png_bytes(i, 64, 64))
    table = pa.table(
        {
            "id": [f"img-{i}" for i in range(rows)],
            "image": [f"inputs/{i}.png" for i in range(rows)],
            "label": [LABELS[i % len(LABELS)] for i in range(rows)],
            "place": ["Oslo", "Lima", "Pune"][:1] * rows,
        }
    )
    return write_manifest(storage, root, table)


def job_settings(model: str, manifest: str, output: str, **settings) -> dict:
    return {
        "model.path": model,
        "manifest": manifest,
        "output": output,
        "defaults.num_inference_steps": 4,
        "compute.batch_size": 4,
        "compute.gpus_per_actor": 0,
        "compute.actors_max": 1,
        "contact_sheet_rows": 4,
        **POLICY,
        **settings,
    }


def comparable(storage: Storage, output: str) -> list[dict]:
    """Metadata rows without what differs between runs (where, how fast, which actor), plus image bytes."""
    rows = OutputSink(storage, output).read_metadata().to_pylist()
    for row in rows:
        row["image_bytes"] = storage.read_bytes(row.pop("output"))
        for name in ("elapsed_ms", "actor_id"):
            row.pop(name)
    return sorted(rows, key=lambda r: (r["id"], r["variant"]))


@pytest.mark.slow
def test_augmentation_run_records_its_draws_reruns_identically_and_encodes_each_image_once(
    ray_driver, model_dirs, tmp_path
):
    storage = Storage()
    root = str(tmp_path)
    manifest = write_labelled(storage, root, rows=3)
    outputs = []
    for run_name in ("first", "second"):
        config = partitioned(
            load_config(None, flags=job_settings(str(model_dirs["v1"]), manifest, join_uri(root, run_name))),
            "ds=2026-11-25",
        )
        summary = run(make_plan(config))
        assert summary["exit_code"] == EXIT_OK, summary
        assert summary["images"] == 12 and summary["errors"] == 0
        outputs.append(config.output)
    assert outputs[0].endswith("/first/ds=2026-11-25")
    first, second = (comparable(storage, output) for output in outputs)
    assert first == second  # same draws, same seeds, same images
    assert {(r["id"], r["variant"]) for r in first} == {(f"img-{i}", v) for i in range(3) for v in range(4)}
    augment = config.augment
    for row in first:
        source = {"label": LABELS[int(row["id"][4:])], "place": "Oslo"}
        drawn = realise(augment, source, row["id"], row["variant"], config.seed)
        assert {k: row[k] for k in drawn} == drawn  # the realised values are the metadata's
        assert row["label"] == source["label"]  # manifest columns are carried too
    assert any("<cls-3>" in r["prompt"] for r in first)
    record = json.loads(storage.read_bytes(join_uri(outputs[0], "_run.json")))
    assert record["encoded_images"] == 3  # 12 images, each input image through the VAE encoder once


@pytest.mark.slow
def test_augmentation_driver_killed_then_rerun_finishes_exactly_once(ray_cluster, model_dirs, tmp_path):
    storage = Storage()
    root = str(tmp_path)
    manifest = write_labelled(storage, root, rows=6)
    output_root = join_uri(root, "out")
    settings = {
        **POLICY,
        "compute.gpus_per_actor": 0,
        "compute.actors_max": 1,
        "compute.rows_per_call": 1,
        "compute.rows_per_part": 1,
    }
    config_path = tmp_path / "aug.yaml"
    config_path.write_text(yaml.safe_dump(nested(settings)))  # lists and sections: a file, as users write
    args = ["--config", str(config_path), "--model", str(model_dirs["v1"]), "--manifest", manifest]
    args += ["--output", output_root, "--partition", "ds=2026-11-25", "--steps", "24", "--batch-size", "1"]
    output = join_uri(output_root, "ds=2026-11-25")
    sink = OutputSink(storage, output)
    env = {**ray_cluster.client_env(), "PYTHONPATH": os.getcwd()}
    driver = JobDriver(args, env, str(tmp_path / "first.log"), module="jobs.augment")
    driver.wait_for(lambda: len(sink.metadata_parts()) >= 2, "two committed parts")
    driver.kill(signal.SIGKILL)
    done = len(sink.read_metadata())
    assert 0 < done < 24 and not sink.is_committed()
    rerun = JobDriver(args, env, str(tmp_path / "second.log"), module="jobs.augment")
    assert rerun.wait() == EXIT_OK, rerun.log()[-4000:]
    counts = assert_output_sound(storage, output, manifest, complete=True)
    assert counts["images"] == 24 and counts["errors"] == 0


def nested(settings: dict) -> dict:
    """{"a.b": 1} -> {"a": {"b": 1}}: dotted keys as a YAML config's sections."""
    data: dict = {}
    for key, value in settings.items():
        *sections, leaf = key.split(".")
        node = data
        for name in sections:
            node = node.setdefault(name, {})
        node[leaf] = value
    return data


def test_template_columns_missing_from_the_manifest_are_refused(model_dirs, tmp_path):
    storage = Storage()
    manifest = write_labelled(storage, str(tmp_path), rows=1)
    settings = job_settings(str(model_dirs["v1"]), manifest, str(tmp_path / "out"))
    settings["augment.prompts"] = ["a {colour} {label}"]
    with pytest.raises(PlanError, match=r"use column\(s\) 'colour', which the manifest .* lacks"):
        make_plan(load_config(None, flags=settings))


def test_the_plan_counts_the_policys_variants_and_describes_it(model_dirs, tmp_path):
    storage = Storage()
    manifest = write_labelled(storage, str(tmp_path), rows=3)
    plan = make_plan(
        load_config(None, flags=job_settings(str(model_dirs["v1"]), manifest, str(tmp_path / "o")))
    )
    assert plan.expected_rows == 12
    lines = "\n".join(plan.describe())
    assert "augment   4 variants per row; 2 prompt and 2 negative templates (columns label, place)" in lines
    assert "drawn: strength, guidance_scale" in lines
