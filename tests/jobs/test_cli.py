"""The `sdbatch` command's dispatch (the job and the demo themselves are tested elsewhere)."""

from __future__ import annotations

import pytest

from jobs.cli import main


def test_usage_lists_the_commands(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "run" in out and "demo" in out
    assert main([]) == 2 and main(["frobnicate"]) == 2


def test_run_takes_the_job_flags(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["run", "--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: sdbatch run") and "--manifest" in out and "--dry-run" in out


def test_run_refuses_bad_flags_before_any_work(capsys, tmp_path):
    code = main(["run", "--model", str(tmp_path / "none"), "--manifest", "m.parquet", "--output", "o"])
    assert code == 2
    assert "model.path" in capsys.readouterr().err
