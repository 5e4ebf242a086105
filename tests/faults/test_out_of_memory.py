"""Out of memory where no smaller batch helps (the E-step retries on halves first, tested in
test_class2d_run.py): the M-step sums, a picker on the GPU, the CLI. One clear error line, the job
marked failed, every file under a final name whole, no hang."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tamis.errors import is_out_of_memory
from tamis.io.mrc import mrc_is_complete
from tamis.io.star import read_star
from tamis.pipeline.job import JobStar, exit_status
from tests.helpers import run_job_in


def _oom(*args, **kwargs):
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def _one_error_line(job: Path) -> str:
    err = (job / "run.err").read_text()
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


def test_oom_is_recognised_and_others_are_not():
    assert is_out_of_memory(torch.OutOfMemoryError("x"))
    assert is_out_of_memory(MemoryError())
    assert is_out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory"))
    assert not is_out_of_memory(RuntimeError("shape mismatch"))


def test_class2d_mstep_out_of_memory_fails_the_job_with_one_line(tmp_path, monkeypatch):
    from tamis.class2d import em
    from tamis.simulate.particles import ParticleSimulation, simulate_particles

    simulate_particles(
        ParticleSimulation(structures=["builtin:8zpm"], n_particles=60, box_size=32,
                           pixel_size=4.5, snr=0.3, seed=2),
        tmp_path / "sim",
    )  # fmt: skip
    job = tmp_path / "Class2D/job001"
    job.mkdir(parents=True)
    JobStar("relion.class2d", options={
        "fn_img": "sim/particles.star", "do_em": "Yes", "do_grad": "No", "nr_classes": "2",
        "nr_iter_em": "2", "particle_diameter": "130"}).write(job)  # fmt: skip
    monkeypatch.setattr(em.mstep, "accumulate", _oom)
    assert run_job_in(tmp_path, "Class2D/job001") == "Failed"
    line = _one_error_line(job)
    assert "out of memory" in line and "--max_memory" in line
    assert exit_status(job) == "Failed"
    for f in job.iterdir():
        if f.suffix == ".star" and not f.name.startswith("."):
            read_star(f)
        elif f.suffix in (".mrc", ".mrcs"):
            assert mrc_is_complete(f)
    assert not (job / "run_it001_optimiser.star").exists()


def test_picker_out_of_memory_fails_the_job_with_one_line(tmp_path, monkeypatch):
    from tamis.pick import log as log_picker
    from tests.helpers import tiny_micrographs

    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        tiny_micrographs("Import/job001", n=1, size=256, per=5, seed=2)
    finally:
        os.chdir(cwd)
    job = tmp_path / "AutoPick/job002"
    job.mkdir(parents=True)
    JobStar("relion.autopick.log", options={
        "fn_input_autopick": "Import/job001/micrographs.star", "log_diam_min": "90",
        "log_diam_max": "130"}).write(job)  # fmt: skip
    monkeypatch.setattr(log_picker, "pick_log", _oom)
    assert run_job_in(tmp_path, "AutoPick/job002") == "Failed"
    assert "out of memory" in _one_error_line(job)
    assert not (job / "autopick.star").exists()


def test_cli_out_of_memory_is_one_line_and_exit_1(monkeypatch):
    import typer

    from tamis.cli._common import user_errors

    @user_errors
    def command() -> None:
        _oom()

    with pytest.raises(typer.Exit) as info:
        command()
    assert info.value.exit_code == 1
