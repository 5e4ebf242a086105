"""The command line: help, version, commands end to end, and one-line errors for user mistakes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from tamis import __version__
from tamis.cli.main import app
from tamis.io.mrc import write_mrc
from tamis.io.star import write_star

DATA = Path(__file__).parent / "data" / "star"
runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, list(args))


def test_help_and_version():
    result = run("--help")
    assert result.exit_code == 0
    for group in ("simulate", "star", "demo"):
        assert group in result.output
    result = run("--version")
    assert result.exit_code == 0 and __version__ in result.output


def test_console_script_runs():
    """The installed entry point, as a user calls it."""
    out = subprocess.run(
        [sys.executable, "-m", "tamis.cli.main", "--version"], capture_output=True, text=True
    )
    assert out.returncode == 0 and __version__ in out.stdout


def test_star_info_lists_blocks_and_optics(tmp_path):
    result = run("star", "info", str(DATA / "run_it025_optimiser_2D.star"))
    assert result.exit_code == 0
    assert "data_optimiser_general" in result.output and "rlnRandomSeed" in result.output


def test_simulate_then_check(tmp_path):
    out = tmp_path / "sim"
    result = run(
        "simulate",
        "particles",
        "--o",
        str(out),
        "--n",
        "30",
        "--box",
        "40",
        "--angpix",
        "3.5",
        "--junk",
        "0.2",
        "--structure",
        "builtin:8zpm",
    )
    assert result.exit_code == 0, result.output
    assert (out / "particles.star").is_file()
    result = run("star", "check", str(out / "particles.star"))
    assert result.exit_code == 0 and "30 particles" in result.output
    result = run("star", "info", str(out / "particles.star"))
    assert "data_particles" in result.output and "30" in result.output


def test_simulate_micrographs_command(tmp_path):
    out = tmp_path / "mics"
    result = run(
        "simulate",
        "micrographs",
        "--o",
        str(out),
        "--n",
        "1",
        "--size",
        "256",
        "--angpix",
        "2",
        "--per_mic",
        "5",
    )
    assert result.exit_code == 0, result.output
    assert (out / "micrographs.star").is_file() and (out / "truth" / "coordinates.star").is_file()


def _particles(tmp_path: Path, names: list[str], with_cs: bool = True) -> Path:
    optics = {
        "rlnOpticsGroup": [1],
        "rlnVoltage": [300.0],
        "rlnImagePixelSize": [1.0],
        "rlnImageSize": [8],
    }
    if with_cs:
        optics["rlnSphericalAberration"] = [2.7]
    star = tmp_path / "particles.star"
    write_star(
        {"optics": pd.DataFrame(optics), "particles": pd.DataFrame({"rlnImageName": names})}, star
    )
    return star


def assert_one_line_error(result, *fragments: str) -> None:
    assert result.exit_code == 1
    text = result.output.strip()
    assert text.startswith("error:"), text
    assert "\n" not in text and "Traceback" not in text
    for f in fragments:
        assert f in text, text


@pytest.mark.parametrize("command", [["star", "info"], ["star", "check"]])
def test_missing_file(tmp_path, command):
    assert_one_line_error(run(*command, str(tmp_path / "nope.star")), "nope.star", "not found")


def test_missing_required_column(tmp_path):
    star = _particles(tmp_path, ["1@s.mrcs"], with_cs=False)
    assert_one_line_error(run("star", "check", str(star)), "rlnSphericalAberration", str(star))


def test_index_past_end_of_stack(tmp_path):
    write_mrc(tmp_path / "s.mrcs", np.zeros((2, 8, 8), np.float32), 1.0)
    star = _particles(tmp_path, ["1@s.mrcs", "3@s.mrcs"])
    assert_one_line_error(run("star", "check", str(star)), "s.mrcs", "image 3", "holds 2")


def test_truncated_mrc(tmp_path):
    write_mrc(tmp_path / "s.mrcs", np.zeros((4, 8, 8), np.float32), 1.0)
    raw = (tmp_path / "s.mrcs").read_bytes()
    (tmp_path / "s.mrcs").write_bytes(raw[:-100])
    star = _particles(tmp_path, ["1@s.mrcs"])
    assert_one_line_error(run("star", "check", str(star)), "s.mrcs", "truncated MRC file")


def test_bad_values(tmp_path):
    result = run("simulate", "particles", "--o", str(tmp_path), "--box", "33")
    assert_one_line_error(result, "--box 33")
    result = run("simulate", "particles", "--o", str(tmp_path), "--structure", "builtin:nope")
    assert_one_line_error(result, "unknown built-in structure")
