"""The CLI contract: subcommands, --help, exit codes 0 / 2 / 1, one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import FAST_MOTION, sha256_of
from nwbflow import cli


def _nwbflow(*args: str, cwd=None, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nwbflow.cli", *args], capture_output=True, text=True,
                          cwd=cwd, env={**os.environ, **env}, timeout=600)


@pytest.mark.parametrize("command", [[], ["run"], ["synth"], ["demo"]])
def test_help(command):
    result = _nwbflow(*command, "--help")
    assert result.returncode == 0
    assert "usage: nwbflow" in result.stdout


def test_run_end_to_end_exit_0(small_session, tmp_path):
    before = sha256_of(small_session)
    out = tmp_path / "out.nwb"
    (tmp_path / "p.json").write_text(json.dumps({"motion": FAST_MOTION}))
    result = _nwbflow("run", str(small_session), "-o", str(out), "--device", "cpu", "--workdir", str(tmp_path / "w"),
                      "--params", str(tmp_path / "p.json"), COLUMNS="100")
    assert result.returncode == 0, result.stderr[-3000:]
    assert out.is_file() and "write-back" in result.stdout
    assert sha256_of(small_session) == before
    # The stage table fits a 100-column terminal (the counts wrap); the output's path is on its own line.
    lines = result.stdout.splitlines()
    table = lines[next(i for i, line in enumerate(lines) if line.startswith("stage ")):
                  next(i for i, line in enumerate(lines) if line.startswith("processed file: "))]
    assert max(len(line) for line in table) <= 100, "\n".join(table)
    assert "units=" in result.stdout and "mean_rate_hz=" in result.stdout
    assert f"processed file: {out}" in lines


@pytest.mark.parametrize("case", ["missing", "not_hdf5", "unknown_param", "bad_stage"])
def test_bad_input_exit_2_one_line_no_traceback(case, small_session, tmp_path):
    args = ["run", str(small_session), "-o", str(tmp_path / "out.nwb")]
    if case == "missing":
        args[1] = str(tmp_path / "nope.nwb")
    elif case == "not_hdf5":
        args[1] = str(tmp_path / "text.nwb")
        (tmp_path / "text.nwb").write_text("hello")
    elif case == "unknown_param":
        (tmp_path / "p.json").write_text('{"peaks": {"threshold": 4}}')
        args += ["--params", str(tmp_path / "p.json")]
    elif case == "bad_stage":
        args += ["--stages", "preprocess,magic"]
    result = _nwbflow(*args)
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("nwbflow: bad input:")]
    assert len(errors) == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out.nwb").exists()


def test_bad_input_names_file_and_object(small_session, tmp_path):
    result = _nwbflow("run", str(small_session), "-o", str(tmp_path / "o.nwb"),
                      "--params", str(tmp_path / "absent.yaml"))
    assert result.returncode == 2
    assert "absent.yaml" in result.stderr


def test_other_failures_exit_1(monkeypatch, small_session, tmp_path, capsys):
    import nwbflow.flows.session as session

    def explode(*_args, **_kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(session, "process_session", explode)
    code = cli.main(["run", str(small_session), "-o", str(tmp_path / "o.nwb")])
    assert code == 1
    assert "disk on fire" in capsys.readouterr().err


def test_synth_writes_session_and_ground_truth(tmp_path):
    out = tmp_path / "s.nwb"
    result = _nwbflow("synth", str(out), "--duration-s", "2", "--num-channels", "16", "--num-units", "3",
                      "--no-ophys", "--seed", "3")
    assert result.returncode == 0, result.stderr[-3000:]
    from nwbflow.synth import load_ground_truth
    assert load_ground_truth(out).ephys_sample_index.size > 0


def test_every_stage_name_says_which_data_it_needs():
    from nwbflow.params import STAGE_ORDER
    from nwbflow.tasks.plan import BUILT_STAGES, STAGE_NEEDS

    assert set(BUILT_STAGES) == set(STAGE_ORDER)
    assert all(BUILT_STAGES[need] == BUILT_STAGES[stage] for stage, needs in STAGE_NEEDS.items() for need in needs)
