"""Job configuration: YAML to dataclasses, --set overrides and flags, strict validation, fingerprints."""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from connectors.storage import StorageOptions
from jobs.config import (
    ComputeConfig,
    ConfigError,
    LoraConfig,
    RetryConfig,
    RunConfig,
    StorageConfig,
    from_dict,
    load_config,
)
from jobs.config_sources import parse_embedding_flag, parse_lora_flag
from jobs.run_flags import add_run_arguments, config_from_args

REQUIRED = {"manifest": "s3://in/m.parquet", "output": "s3://out/run", "model": {"path": "/models/sd15"}}
FULL = {
    "manifest": "s3://in/manifest.parquet",
    "output": "s3://out/run",
    "model": {
        "path": "s3://models/sd15.safetensors",
        "scheduler": "euler_a",
        "dtype": "float16",
        "vae_dtype": "float32",
        "allow_pickle": True,
        "prediction_type": "epsilon",
        "config": "/models/sd15-diffusers",
        "clip_skip": 2,
        "compile": True,
    },
    "adapters": {
        "loras": [{"path": "s3://models/style.safetensors", "scale": 0.8, "text_encoder_scale": 0.5}],
        "embeddings": [{"path": "/models/neg.pt", "token": "<neg>"}],
    },
    "defaults": {
        "prompt": "a watercolour",
        "negative_prompt": "blurry",
        "strength": 0.6,
        "guidance_scale": 5.0,
        "num_inference_steps": 25,
        "num_images": 2,
        "width": 512,
        "height": 768,
        "resize_mode": "crop_and_resize",
        "eta": 0.5,
        "output_format": "webp",
        "quality": 90,
        "guidance_rescale": 0.3,
        "prompt_syntax": "a1111",
        "prompt_2": "sharp focus",
        "negative_prompt_2": "grainy",
        "aesthetic_score": 7.0,
        "negative_aesthetic_score": 2.0,
        "original_width": 2048,
        "original_height": 1536,
        "crop_top": 0,
        "crop_left": 16,
    },
    "compute": {
        "batch_size": 8,
        "rows_per_call": 64,
        "actors_min": 2,
        "actors_max": 4,
        "gpus_per_actor": 0.5,
        "cpus_per_actor": 2.0,
        "device": "cuda",
        "rows_per_part": 128,
    },
    "retry": {"retry_rounds": 3, "max_task_retries": 2, "storage_attempts": 4, "storage_budget_s": 30.0},
    "storage": {"endpoint_url": "http://127.0.0.1:8333", "anonymous": False, "profile": "batch",
                "max_pool_connections": 32},
    "inputs": {"allowed_roots": ["s3://in/images/", "/mnt/data/"]},
    "augment": {
        "variants": 4,
        "prompts": ["a photo of a {label}"],
        "negative_prompts": ["blurry"],
        "strength": {"values": [0.5, 0.7], "low": None, "high": None},
        "guidance_scale": {"values": [], "low": 5.0, "high": 9.0},
        "substitutions": [{"column": "label", "value": "3", "text": "<cls-3>"}],
    },
    "refiner": {
        "path": "s3://models/sdxl-refiner.safetensors",
        "switch_at": 0.75,
        "config": None,
        "adapters": {"loras": [{"path": "s3://models/refiner-style.safetensors", "scale": 0.5,
                                "text_encoder_scale": None}], "embeddings": []},
    },
    "seed": 1234,
    "max_error_rate": 0.05,
    "retry_errors": True,
    "force": True,
    "log_every_s": 5.0,
    "contact_sheet_rows": 8,
    "contact_sheet_title": "nightly edits",
}


def write_yaml(tmp_path: Path, data: dict, name: str = "job.yaml") -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return str(path)


def _load(data: dict) -> RunConfig:
    return from_dict(RunConfig, data)


def config_with(**sections) -> RunConfig:
    """A config from REQUIRED with some sections or keys replaced."""
    return _load({**REQUIRED, **sections})


def problems_of(data: dict) -> dict[str, str]:
    """{key path: message} for every problem in `data`."""
    with pytest.raises(ConfigError) as raised:
        _load(data)
    return dict(raised.value.problems)


def parse_args(*argv: str) -> RunConfig:
    parser = argparse.ArgumentParser()
    add_run_arguments(parser)
    return config_from_args(parser.parse_args(list(argv)))


# -- reading ------------------------------------------------------------------------------------------


def test_full_yaml_round_trips_through_to_dict(tmp_path):
    config = load_config(write_yaml(tmp_path, FULL))
    assert config.to_dict() == FULL
    again = load_config(write_yaml(tmp_path, config.to_dict(), "again.yaml"))
    assert again == config


def test_nested_sections_become_dataclasses_and_lists_tuples(tmp_path):
    config = load_config(write_yaml(tmp_path, FULL))
    assert config.adapters.loras == (LoraConfig("s3://models/style.safetensors", 0.8, 0.5),)
    assert config.compute == ComputeConfig(8, 64, 2, 4, 0.5, 2.0, "cuda", 128)


def test_defaults_fill_everything_but_the_required_keys(tmp_path):
    config = load_config(write_yaml(tmp_path, REQUIRED))
    assert config.model.scheduler is None and config.model.dtype == "auto" and not config.model.allow_pickle
    assert config.defaults.strength == 0.75 and config.defaults.num_inference_steps == 30
    assert config.defaults.resize_mode == "just_resize" and config.defaults.output_format == "png"
    assert config.compute.batch_size == 4 and config.compute.call_rows == 16
    assert config.retry == RetryConfig() and config.storage == StorageConfig()
    assert (config.seed, config.max_error_rate, config.retry_errors, config.force) == (0, 0.01, False, False)


def test_an_empty_section_means_its_defaults(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(REQUIRED) + "compute:\nretry:\n")
    assert load_config(str(path)).compute == ComputeConfig()


def test_ints_are_accepted_for_floats():
    config = config_with(defaults={"guidance_scale": 7, "strength": 1})
    assert config.defaults.guidance_scale == 7.0 and isinstance(config.defaults.guidance_scale, float)


def test_to_dict_is_json_serialisable(tmp_path):
    config = load_config(write_yaml(tmp_path, FULL))
    assert json.loads(json.dumps(config.to_dict())) == FULL


def test_storage_options_carry_the_retry_policy():
    config = config_with(storage={"endpoint_url": "http://s3.local", "max_pool_connections": 8},
                         retry={"storage_attempts": 3, "storage_budget_s": 9.0})
    options = config.storage.to_options(config.retry)
    assert isinstance(options, StorageOptions)
    assert (options.endpoint_url, options.max_pool_connections) == ("http://s3.local", 8)
    assert (options.retry.attempts, options.retry.budget_s) == (3, 9.0)


def test_importing_the_module_loads_neither_torch_nor_sd_core():
    code = "import sys, jobs.config; print(any(m.split('.')[0] in ('torch', 'sd_core') for m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            cwd=Path(__file__).parents[2])
    assert result.stdout.strip() == "False"


def test_a_missing_config_file_is_an_error_naming_it(tmp_path):
    with pytest.raises(ConfigError, match=r"(?s)nope\.yaml.*not found"):
        load_config(str(tmp_path / "nope.yaml"))


def test_invalid_yaml_is_an_error_naming_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match=r"(?s)bad\.yaml.*not valid YAML"):
        load_config(str(path))


# -- overrides and flags ------------------------------------------------------------------------------


def test_set_overrides_parse_values_as_yaml_scalars(tmp_path):
    config = load_config(
        write_yaml(tmp_path, REQUIRED),
        ["compute.batch_size=8", "model.allow_pickle=true", "defaults.strength=0.5", "model.scheduler=ddim",
         "defaults.prompt=a cat: sitting", "compute.rows_per_call=null"],
    )
    assert config.compute.batch_size == 8 and config.model.allow_pickle is True
    assert config.defaults.strength == 0.5 and config.model.scheduler == "ddim"
    assert config.defaults.prompt == "a cat: sitting"


def test_set_can_build_a_config_without_a_file():
    config = load_config(None, ["manifest=m.parquet", "output=out", "model.path=s3://m/x.safetensors"])
    assert config.model.path == "s3://m/x.safetensors"


def test_set_without_equals_is_an_error():
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config(None, ["compute.batch_size"])


def test_set_into_a_value_that_is_not_a_section_is_an_error():
    with pytest.raises(ConfigError, match="seed is 0, not a section"):
        load_config(None, ["seed=0", "seed.x=1"])


def test_flags_override_the_file_and_set(tmp_path):
    path = write_yaml(tmp_path, {**REQUIRED, "compute": {"batch_size": 2}, "seed": 5})
    config = parse_args("--config", path, "--set", "compute.batch_size=3", "--batch-size", "6", "--seed", "9",
                        "--steps", "12", "--strength", "0.3", "--guidance", "4", "--scheduler", "euler",
                        "--model", "/other", "--output", "s3://out/other", "--storage-endpoint", "http://x",
                        "--retry-errors", "--force")
    assert (config.compute.batch_size, config.seed, config.model.path) == (6, 9, "/other")
    assert (config.defaults.num_inference_steps, config.defaults.strength) == (12, 0.3)
    assert (config.defaults.guidance_scale, config.model.scheduler, config.output) == (4.0, "euler", "s3://out/other")
    assert config.storage.endpoint_url == "http://x" and config.retry_errors and config.force


def test_absent_flags_leave_the_file_alone(tmp_path):
    config = parse_args("--config", write_yaml(tmp_path, FULL))
    assert config == load_config(write_yaml(tmp_path, FULL, "again.yaml"))


def test_lora_and_embedding_flags_append_to_the_files_lists(tmp_path):
    config = parse_args("--config", write_yaml(tmp_path, FULL), "--lora", "s3://b/extra.safetensors:0.4",
                        "--embedding", "s3://b/tok.pt:<tok>")
    assert [lora.path for lora in config.adapters.loras] == ["s3://models/style.safetensors", "s3://b/extra.safetensors"]
    assert config.adapters.loras[1].scale == 0.4
    assert [e.token for e in config.adapters.embeddings] == ["<neg>", "<tok>"]


def test_a_bad_flag_value_names_the_flag_and_the_key():
    expected = r"defaults\.num_inference_steps \(from --steps\): expected an integer"
    with pytest.raises(ConfigError, match=expected):
        parse_args("--manifest", "m", "--output", "o", "--model", "p", "--steps", "many")


def test_a_bad_value_in_an_appended_lora_names_its_flag(tmp_path):
    with pytest.raises(ConfigError, match=r"adapters\.loras\[1\]\.scale \(from --lora\): must be a finite"):
        parse_args("--config", write_yaml(tmp_path, FULL), "--lora", "x.safetensors:inf")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("style.safetensors", {"path": "style.safetensors"}),
        ("style.safetensors:0.7", {"path": "style.safetensors", "scale": 0.7}),
        ("/abs/style.safetensors:-1", {"path": "/abs/style.safetensors", "scale": -1.0}),
        ("s3://bucket/x.safetensors", {"path": "s3://bucket/x.safetensors"}),
        ("s3://bucket/x.safetensors:0.8", {"path": "s3://bucket/x.safetensors", "scale": 0.8}),
        ("s3://bucket/dir:v2/x.safetensors", {"path": "s3://bucket/dir:v2/x.safetensors"}),
    ],
)
def test_lora_flag_splits_a_scale_only_off_the_last_colon(text, expected):
    assert parse_lora_flag(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("neg.pt", {"path": "neg.pt"}),
        ("neg.pt:<neg>", {"path": "neg.pt", "token": "<neg>"}),
        ("s3://bucket/neg.pt", {"path": "s3://bucket/neg.pt"}),
        ("s3://bucket/neg.pt:easynegative", {"path": "s3://bucket/neg.pt", "token": "easynegative"}),
    ],
)
def test_embedding_flag_splits_a_token_only_off_the_last_colon(text, expected):
    assert parse_embedding_flag(text) == expected


@pytest.mark.parametrize("text", ["x.safetensors:", ":0.5", ""])
def test_lora_flag_without_a_path_or_with_a_dangling_colon_is_an_error(text):
    with pytest.raises(ConfigError, match="--lora"):
        parse_lora_flag(text)


@pytest.mark.parametrize("text", ["neg.pt:", ":<tok>"])
def test_embedding_flag_without_a_path_or_with_a_dangling_colon_is_an_error(text):
    with pytest.raises(ConfigError, match="--embedding"):
        parse_embedding_flag(text)


# -- unknown, missing and mistyped keys ----------------------------------------------------------------


def test_an_unknown_top_level_key_is_named_with_a_suggestion(tmp_path):
    with pytest.raises(ConfigError) as raised:
        load_config(write_yaml(tmp_path, {**REQUIRED, "sede": 3}))
    message = str(raised.value)
    assert "job.yaml" in message and "sede: unknown key (did you mean 'seed'?)" in message
    assert "valid keys here: manifest, output, model" in message


def test_an_unknown_nested_key_is_named_by_its_path_with_the_valid_keys():
    problems = problems_of({**REQUIRED, "compute": {"batchsize": 8}})
    assert "did you mean 'batch_size'?" in problems["compute.batchsize"]
    assert "rows_per_call" in problems["compute.batchsize"]


def test_an_unknown_key_inside_a_list_item_is_named_by_its_index():
    problems = problems_of({**REQUIRED, "adapters": {"loras": [{"path": "a"}, {"path": "b", "scal": 2}]}})
    assert "did you mean 'scale'?" in problems["adapters.loras[1].scal"]


def test_missing_required_keys_are_all_named_with_their_flags():
    problems = problems_of({})
    assert set(problems) == {"manifest", "output", "model.path"}
    assert "--manifest" in problems["manifest"] and "--model" in problems["model.path"]


@pytest.mark.parametrize(
    ("section", "values", "key", "expected"),
    [
        ("compute", {"batch_size": "eight"}, "compute.batch_size", "expected an integer, got 'eight'"),
        ("compute", {"batch_size": True}, "compute.batch_size", "expected an integer, got True"),
        ("compute", {"batch_size": 2.5}, "compute.batch_size", "expected an integer, got 2.5"),
        ("defaults", {"strength": "high"}, "defaults.strength", "expected a number, got 'high'"),
        ("defaults", {"strength": False}, "defaults.strength", "expected a number, got False"),
        ("model", {"path": "p", "allow_pickle": "yes"}, "model.allow_pickle", "expected true or false"),
        ("model", {"path": 123}, "model.path", "expected a string, got 123 (quote it"),
        ("compute", [1, 2], "compute", "expected a section with keys batch_size"),
        ("adapters", {"loras": {"path": "x"}}, "adapters.loras", "expected a list, got a section"),
    ],
)
def test_wrong_types_are_named_with_what_was_expected(section, values, key, expected):
    data = {**REQUIRED, section: values}
    assert expected in problems_of(data)[key]


def test_every_problem_is_reported_at_once():
    problems = problems_of({**REQUIRED, "compute": {"batch_size": 0}, "defaults": {"strength": 2},
                            "seed": "x", "retri": {}})
    assert set(problems) == {"compute.batch_size", "defaults.strength", "seed", "retri"}


# -- ranges and choices -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("section", "values", "key"),
    [
        ("model", {"dtype": "fp16"}, "model.dtype"),
        ("model", {"vae_dtype": "half"}, "model.vae_dtype"),
        ("model", {"prediction_type": "sample"}, "model.prediction_type"),
        ("model", {"clip_skip": 0}, "model.clip_skip"),
        ("model", {"path": " "}, "model.path"),
        ("defaults", {"strength": 1.5}, "defaults.strength"),
        ("defaults", {"strength": -0.1}, "defaults.strength"),
        ("defaults", {"guidance_scale": -1}, "defaults.guidance_scale"),
        ("defaults", {"num_inference_steps": 0}, "defaults.num_inference_steps"),
        ("defaults", {"num_inference_steps": 1001}, "defaults.num_inference_steps"),
        ("defaults", {"num_images": 65}, "defaults.num_images"),
        ("defaults", {"width": 500}, "defaults.width"),
        ("defaults", {"height": 32}, "defaults.height"),
        ("defaults", {"height": 4104}, "defaults.height"),
        ("defaults", {"resize_mode": "stretch"}, "defaults.resize_mode"),
        ("defaults", {"eta": 1.5}, "defaults.eta"),
        ("defaults", {"output_format": "gif"}, "defaults.output_format"),
        ("defaults", {"quality": 0}, "defaults.quality"),
        ("defaults", {"quality": 101}, "defaults.quality"),
        ("compute", {"batch_size": 0}, "compute.batch_size"),
        ("compute", {"rows_per_call": 0}, "compute.rows_per_call"),
        ("compute", {"actors_min": 0}, "compute.actors_min"),
        ("compute", {"actors_min": 3, "actors_max": 2}, "compute.actors_max"),
        ("compute", {"gpus_per_actor": -1}, "compute.gpus_per_actor"),
        ("compute", {"cpus_per_actor": -1}, "compute.cpus_per_actor"),
        ("compute", {"device": "tpu"}, "compute.device"),
        ("compute", {"device": "cuda", "gpus_per_actor": 0}, "compute.device"),
        ("retry", {"retry_rounds": -1}, "retry.retry_rounds"),
        ("retry", {"max_task_retries": -1}, "retry.max_task_retries"),
        ("retry", {"storage_attempts": 0}, "retry.storage_attempts"),
        ("retry", {"storage_budget_s": -1}, "retry.storage_budget_s"),
        ("storage", {"max_pool_connections": 0}, "storage.max_pool_connections"),
        ("storage", {"anonymous": True, "profile": "p"}, "storage.anonymous"),
        ("adapters", {"loras": [{"path": "x", "scale": float("nan")}]}, "adapters.loras[0].scale"),
        ("adapters", {"embeddings": [{"path": "x", "token": ""}]}, "adapters.embeddings[0].token"),
    ],
)
def test_out_of_range_section_values_are_errors(section, values, key):
    assert key in problems_of({**REQUIRED, section: {**REQUIRED.get(section, {}), **values}})


@pytest.mark.parametrize(
    ("key", "value"),
    [("seed", -1), ("seed", 2**63), ("max_error_rate", 1.5), ("max_error_rate", -0.1), ("log_every_s", 0),
     ("contact_sheet_rows", -1), ("manifest", ""), ("output", "")],
)
def test_out_of_range_top_level_values_are_errors(key, value):
    assert key in problems_of({**REQUIRED, key: value})


def test_range_messages_say_what_is_allowed():
    problems = problems_of({**REQUIRED, "defaults": {"width": 500, "num_inference_steps": 0}})
    assert problems["defaults.width"] == "must be a multiple of 8 in 64..4096, got 500"
    assert problems["defaults.num_inference_steps"] == "must be an integer in 1..1000, got 0"


def test_a_choice_error_lists_the_choices_and_a_suggestion():
    message = problems_of({**REQUIRED, "defaults": {"resize_mode": "crop_and_resiz"}})["defaults.resize_mode"]
    assert "did you mean 'crop_and_resize'?" in message
    assert "just_resize, crop_and_resize, resize_and_fill" in message


def test_an_unknown_scheduler_lists_the_valid_names():
    from sd_core.schedulers import SCHEDULER_NAMES

    message = problems_of({**REQUIRED, "model": {"path": "p", "scheduler": "eulr_a"}})["model.scheduler"]
    assert "did you mean 'euler_a'?" in message and ", ".join(SCHEDULER_NAMES) in message


def test_every_known_scheduler_is_accepted():
    from sd_core.schedulers import SCHEDULER_NAMES

    for name in SCHEDULER_NAMES:
        assert config_with(model={"path": "p", "scheduler": name}).model.scheduler == name


def test_a_cpu_pool_needs_no_gpus():
    assert config_with(compute={"gpus_per_actor": 0, "device": "cpu"}).compute.gpus_per_actor == 0.0


# -- fingerprint ----------------------------------------------------------------------------------------


def full_config() -> RunConfig:
    return _load(FULL)


@pytest.mark.parametrize(
    "change",
    [
        {"output": "s3://elsewhere"},
        {"compute": {**FULL["compute"], "batch_size": 1, "actors_max": 8}},
        {"retry": {"retry_rounds": 0}},
        {"storage": {"endpoint_url": "http://other"}},
        {"force": False, "retry_errors": False, "log_every_s": 1.0, "contact_sheet_rows": 0},
        {"contact_sheet_title": "another heading"},
        {"max_error_rate": 0.5, "manifest": "s3://in/other.parquet"},
        {"model": {**FULL["model"], "compile": False}},
    ],
)
def test_fingerprint_ignores_where_outputs_go_and_how_fast(change):
    assert _load({**FULL, **change}).fingerprint() == full_config().fingerprint()


@pytest.mark.parametrize(
    "change",
    [
        {"defaults": {**FULL["defaults"], "strength": 0.61}},
        {"seed": 1235},
        {"adapters": {**FULL["adapters"], "loras": [{**FULL["adapters"]["loras"][0], "scale": 0.9}]}},
        {"model": {**FULL["model"], "scheduler": "ddim"}},
        {"refiner": {**FULL["refiner"], "switch_at": 0.7}},
        {"refiner": {**FULL["refiner"], "path": "s3://models/other-refiner.safetensors"}},
        {"refiner": None},
        {"defaults": {**FULL["defaults"], "aesthetic_score": 6.5}},
        {"defaults": {**FULL["defaults"], "prompt_syntax": "plain"}},
        {"defaults": {**FULL["defaults"], "guidance_rescale": 0.0}},
    ],
)
def test_fingerprint_changes_with_what_shapes_the_images(change):
    assert _load({**FULL, **change}).fingerprint() != full_config().fingerprint()


def test_settings_added_later_leave_older_fingerprints_alone_at_their_defaults():
    """An output written before the SDXL settings existed resumes: at their defaults (and with no
    refiner) they are left out of the fingerprint, which is then what the older version computed."""
    import hashlib

    config = config_with(defaults={"prompt": "a fox"})
    shaping = {name: value for name, value in config.to_dict().items() if name in ("model", "adapters",
                                                                                  "defaults", "seed")}
    del shaping["model"]["compile"]
    for name in ("guidance_rescale", "prompt_syntax", "prompt_2", "negative_prompt_2", "aesthetic_score",
                 "negative_aesthetic_score", "original_width", "original_height", "crop_top", "crop_left"):
        del shaping["defaults"][name]
    text = json.dumps(shaping, sort_keys=True, separators=(",", ":"))
    assert config.fingerprint() == hashlib.sha256(text.encode()).hexdigest()


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"refiner": {"path": "/m/refiner", "switch_at": 1.0}}, "must lie strictly between 0 and 1"),
        ({"refiner": {"path": ""}}, "must not be empty"),
        ({"defaults": {"original_width": 1024}}, "original_width and original_height go together"),
        ({"defaults": {"aesthetic_score": 11.0}}, r"a finite number in \[0, 10\]"),
        ({"defaults": {"prompt_syntax": "a1112"}}, "did you mean 'a1111'"),
        ({"defaults": {"guidance_rescale": -0.1}}, r"a finite number in \[0, 1\]"),
    ],
)
def test_bad_sdxl_settings_are_refused(section, message):
    assert any(re.search(message, text) for text in problems_of({**REQUIRED, **section}).values())


def test_fingerprint_is_a_stable_sha256_hex():
    fingerprint = full_config().fingerprint()
    assert len(fingerprint) == 64 and fingerprint == full_config().fingerprint()


def test_configs_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        full_config().seed = 3  # type: ignore[misc]


# -- input roots ------------------------------------------------------------------------------------------


def test_input_roots_come_from_the_file(tmp_path):
    inputs = {"allowed_roots": ["s3://b/data/", "/mnt/in"]}
    config = load_config(write_yaml(tmp_path, {**REQUIRED, "inputs": inputs}))
    assert config.inputs.allowed_roots == ("s3://b/data/", "/mnt/in")


def test_no_input_roots_by_default():
    assert config_with().inputs.allowed_roots == ()


def test_the_input_root_flag_is_repeatable_and_extends_the_files_roots(tmp_path):
    path = write_yaml(tmp_path, {**REQUIRED, "inputs": {"allowed_roots": ["s3://b/data/"]}})
    config = parse_args("--config", path, "--allow-input-root", "gs://g/", "--allow-input-root", "/mnt/in/")
    assert config.inputs.allowed_roots == ("s3://b/data/", "gs://g/", "/mnt/in/")
    assert parse_args("--config", path).inputs.allowed_roots == ("s3://b/data/",)


@pytest.mark.parametrize(
    ("root", "words"),
    [
        ("data/images/", "is a relative path"),
        ("/mnt/data/../etc", "contains '..'"),
        ("", "must not be empty"),
        ("s3:///x", "names no bucket"),
    ],
)
def test_bad_input_roots_are_refused_by_index(root, words):
    problems = problems_of({**REQUIRED, "inputs": {"allowed_roots": ["s3://b/ok/", root]}})
    assert list(problems) == ["inputs.allowed_roots[1]"] and words in problems["inputs.allowed_roots[1]"]


def test_a_bad_input_root_flag_names_the_flag():
    with pytest.raises(ConfigError, match=r"inputs\.allowed_roots\[0\] \(from --allow-input-root\): 'in/'"):
        parse_args("--manifest", "m", "--output", "o", "--model", "p", "--allow-input-root", "in/")


def test_input_roots_must_be_a_list_of_strings():
    problems = problems_of({**REQUIRED, "inputs": {"allowed_roots": "s3://b/"}})
    assert problems["inputs.allowed_roots"].startswith("expected a list")


def test_fingerprint_ignores_input_roots():
    changed = _load({**FULL, "inputs": {"allowed_roots": ["s3://elsewhere/"]}})
    assert changed.fingerprint() == full_config().fingerprint()
    assert _load({**FULL, "inputs": {}}).fingerprint() == full_config().fingerprint()


# -- prompt length ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["prompt", "negative_prompt"])
def test_a_default_prompt_longer_than_the_column_limit_is_refused(name):
    message = problems_of({**REQUIRED, "defaults": {name: "x" * 250_000}})[f"defaults.{name}"]
    assert message == (
        "longer than 10000 characters (got 250000); CLIP reads only the first 77 tokens, so shorten it"
    )
    assert getattr(config_with(defaults={name: "x" * 10_000}).defaults, name) == "x" * 10_000
