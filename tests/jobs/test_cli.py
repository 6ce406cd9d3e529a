"""The `sdbatch` command: dispatch, usage, help and the run's flags (the job and the demo themselves are
tested elsewhere)."""

from __future__ import annotations

import argparse
import importlib
import subprocess
import sys
from importlib import metadata as package_metadata

import pytest

from jobs.cli import COMMANDS, main
from jobs.config import ComputeConfig, ConfigError, RowDefaults, RunConfig
from jobs.config_sources import SCHEDULERS
from jobs.run_flags import add_run_arguments, config_from_args

REQUIRED = ["--model", "m", "--manifest", "m.parquet", "--output", "o"]


def parse_run_flags(*argv: str) -> RunConfig:
    parser = argparse.ArgumentParser()
    add_run_arguments(parser)
    return config_from_args(parser.parse_args([*REQUIRED, *argv]))


def exit_code(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as exited:
        main(argv)
    return exited.value.code


# -- the command itself -------------------------------------------------------------------------------


def test_help_lists_every_command(capsys):
    assert exit_code(["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: sdbatch")
    assert all(f"  {name} " in out for name in COMMANDS)


def test_no_command_prints_usage_on_stderr_and_exits_2(capsys):
    assert main([]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("usage: sdbatch") and "verify" in captured.err and not captured.out


def test_version_prints_the_package_version(capsys):
    assert exit_code(["--version"]) == 0
    assert capsys.readouterr().out == f"sdbatch {package_metadata.version('sdbatch')}\n"


def test_an_unknown_command_is_named_with_a_suggestion_and_the_command_list(capsys):
    assert main(["verfy", "out"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sdbatch: unknown command 'verfy' (did you mean 'verify'?)")
    assert all(f"  {name} " in err for name in COMMANDS)
    assert main(["bogus"]) == 2
    assert "unknown command 'bogus'" in capsys.readouterr().err


def test_each_command_gets_the_rest_of_the_line_and_its_own_prog(monkeypatch):
    calls = []
    for name, command in COMMANDS.items():
        module = importlib.import_module(command.module)
        fake = lambda argv, prog, name=name: calls.append((name, argv, prog)) or 7  # noqa: E731
        monkeypatch.setattr(module, "main", fake)
    for name in COMMANDS:
        assert main([name, "--flag", "value"]) == 7
    assert calls == [(name, ["--flag", "value"], f"sdbatch {name}") for name in COMMANDS]


# -- per-command help ------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["run", "augment", "verify"])
def test_command_help_is_headed_by_its_own_prog(command, capsys):
    assert exit_code([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: sdbatch {command} ")
    assert "--storage-endpoint" in out and "--storage-profile" in out and "--storage-anonymous" in out


def test_run_help_shows_the_defaults_and_the_scheduler_names(capsys):
    assert exit_code(["run", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    defaults, compute = RowDefaults(), ComputeConfig()
    assert f"num_inference_steps: of the full schedule (default: {defaults.num_inference_steps})" in out
    assert f"(default: {defaults.strength})" in out and f"(default: {defaults.guidance_scale})" in out
    assert f"images per UNet call (default: {compute.batch_size})" in out
    assert "--actors N|MIN-MAX compute.actors_min and actors_max" in out
    assert f"(default: {compute.actors_min} up to every GPU the cluster has" in out
    assert f"model.scheduler: one of {', '.join(SCHEDULERS)} (default: the model's own)" in out


def test_the_help_s_scheduler_names_are_sd_core_s():
    from sd_core.schedulers import SCHEDULER_NAMES

    assert SCHEDULERS == SCHEDULER_NAMES


def test_help_and_a_bad_run_load_no_torch():
    code = (
        "import sys\n"
        "from jobs.cli import main\n"
        "try:\n    main(['run', '--help'])\nexcept SystemExit:\n    pass\n"
        "assert main(['run', '--actors', '0', '--model', 'm', '--manifest', 'm', '--output', 'o']) == 2\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


# -- the run's flags -----------------------------------------------------------------------------------


def test_run_refuses_bad_flags_before_any_work(capsys, tmp_path):
    code = main(["run", "--model", str(tmp_path / "none"), "--manifest", "m.parquet", "--output", "o"])
    assert code == 2
    assert "model.path" in capsys.readouterr().err


def test_actors_n_sets_a_fixed_pool():
    compute = parse_run_flags("--actors", "3").compute
    assert (compute.actors_min, compute.actors_max) == (3, 3)


def test_actors_min_max_sets_the_autoscaling_range():
    compute = parse_run_flags("--actors", "2-8", "--set", "compute.actors_max=1").compute
    assert (compute.actors_min, compute.actors_max) == (2, 8)


@pytest.mark.parametrize("text", ["0", "3-1", "x", "2-", "-1", "1.5", "0-4", ""])
def test_bad_actors_text_is_a_config_error_naming_the_flag(text):
    with pytest.raises(ConfigError) as raised:
        parse_run_flags("--actors", text)
    message = str(raised.value)
    assert f"--actors {text!r}" in message and "N or MIN-MAX" in message and "1 <= MIN <= MAX" in message


def test_run_refuses_bad_actors_before_any_work(capsys):
    assert main(["run", *REQUIRED, "--actors", "3-1"]) == 2
    assert "--actors '3-1': expected N or MIN-MAX" in capsys.readouterr().err


def test_storage_flags_set_the_storage_section():
    storage = parse_run_flags("--storage-profile", "batch", "--storage-endpoint", "http://s3.local").storage
    assert (storage.profile, storage.endpoint_url, storage.anonymous) == ("batch", "http://s3.local", False)
    assert parse_run_flags("--storage-anonymous").storage.anonymous is True


def test_conflicting_storage_flags_name_the_flag():
    with pytest.raises(ConfigError) as raised:
        parse_run_flags("--storage-anonymous", "--storage-profile", "batch")
    assert "storage.anonymous (from --storage-anonymous)" in str(raised.value)
