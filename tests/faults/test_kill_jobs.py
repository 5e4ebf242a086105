"""SIGKILL of pipeline jobs at seeded random points: whatever the kill leaves under a final name
is complete, and running the job again gives the same outputs as an uninterrupted run (issue 19;
class2d's continue and the schemer have their own kill tests). Movie import and motion
correction, micrograph import, 2D classification, the class ranker with its particle screen, a person's
class selection, the 3D initial model and auto-refine, the deep (Topaz-role) picker and an External
program included."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tamis.io.mrc import mrc_is_complete, read_mrc
from tamis.io.star import read_star
from tamis.pipeline.job import JobStar, exit_status
from tests.helpers import run_job_in

ROOT = Path(__file__).resolve().parents[2]

JOBS = [
    ("AutoPick/job002", "relion.autopick.log",
     {"fn_input_autopick": "Import/job001/micrographs.star", "log_diam_min": "90",
      "log_diam_max": "130"}),
    ("Extract/job003", "relion.extract",
     {"star_mics": "Import/job001/micrographs.star",
      "coords_suffix": "AutoPick/job002/autopick.star", "extract_size": "64",
      "do_float16": "No"}),
    ("MaskCreate/job004", "relion.maskcreate",
     {"fn_in": "Refine3D/job001/run_class001.mrc", "lowpass_filter": "10",
      "inimask_threshold": "0.3"}),
    ("PostProcess/job005", "relion.postprocess",
     {"fn_in": "Refine3D/job001/run_half1_class001_unfil.mrc",
      "fn_mask": "MaskCreate/job004/mask.mrc"}),
    ("CtfFind/job006", "relion.ctffind",
     {"input_star_mics": "Import/job001/micrographs.star", "box": "256", "resmax": "8",
      "dfmin": "5000", "dfmax": "30000", "dfstep": "1000"}),
    ("Select/job007", "relion.select.onvalue",
     {"fn_mic": "CtfFind/job006/micrographs_ctf.star", "select_label": "rlnCtfMaxResolution",
      "select_maxval": "50"}),
    ("Import/job008", "relion.import.movies",
     {"fn_in_raw": "MovieSim/Movies/*.tif", "is_multiframe": "Yes", "angpix": "2.0"}),
    ("MotionCorr/job009", "relion.motioncorr.own",
     {"input_star_mics": "Import/job008/movies.star", "fn_gain_ref": "MovieSim/gain.mrc",
      "patch_x": "3", "patch_y": "3", "do_float16": "No", "do_save_noDW": "Yes",
      "group_for_ps": "4", "dose_per_frame": "1"}),
    ("Class2D/job010", "relion.class2d",
     {"fn_img": "Extract/job003/particles.star", "do_em": "Yes", "do_grad": "No",
      "nr_classes": "2", "nr_iter_em": "3", "particle_diameter": "120", "nr_threads": "1",
      "other_args": "--random_seed 7 --pool 3"}),
    ("Select/job011", "relion.select.class2dauto",
     {"fn_model": "Class2D/job010/run_it003_optimiser.star", "rank_threshold": "0.0"}),
    ("Import/job012", "relion.import",
     {"fn_in_raw": "Import/job001/Micrographs/*.mrc", "is_multiframe": "No", "angpix": "3.0"}),
    ("InitialModel/job013", "relion.initialmodel",
     {"fn_img": "Extract/job003/particles.star", "nr_iter": "4", "particle_diameter": "120",
      "nr_threads": "1", "other_args": "--random_seed 7"}),
    ("Refine3D/job014", "relion.refine3d",
     {"fn_img": "Extract/job003/particles.star", "fn_ref": "InitialModel/job013/initial_model.mrc",
      "particle_diameter": "120", "ini_high": "30", "sampling": "30 degrees",
      "auto_local_sampling": "15 degrees", "tamis_iter_max": "2", "nr_threads": "1",
      "other_args": "--random_seed 7"}),
    ("Select/job015", "relion.select.interactive",
     {"fn_model": "Class2D/job010/run_it003_optimiser.star", "tamis_selected_classes": "1 2"}),
    ("AutoPick/job016", "relion.autopick.topaz.pick",
     {"fn_input_autopick": "Import/job001/micrographs.star", "topaz_particle_diameter": "120"}),
    ("External/job017", "relion.external",
     {"fn_exe": f"{sys.executable} external_tool.py", "in_mic": "Import/job001/micrographs.star",
      "param1_label": "factor", "param1_value": "3"}),
]  # fmt: skip

#: An External program as users write them: reads its input, works a while, writes its result
#: (atomically) and declares it in RELION_OUTPUT_NODES.star.
EXTERNAL_TOOL = """
import argparse, os, sys, time
ap = argparse.ArgumentParser()
ap.add_argument("--in_mics"); ap.add_argument("--o"); ap.add_argument("--factor", type=int)
ap.add_argument("--j"); ap.add_argument("--hold", type=float, default=0.0)
a = ap.parse_args()
open(os.path.join(a.o, "tool.pid"), "w").write(str(os.getpid()))
lines = open(a.in_mics).read().splitlines()
time.sleep(0.6 + a.hold)
tmp = os.path.join(a.o, ".result.txt.tmp")
with open(tmp, "w") as f:
    f.write(f"{len(lines) * a.factor}\\n")
os.replace(tmp, os.path.join(a.o, "result.txt"))
with open(os.path.join(a.o, "RELION_OUTPUT_NODES.star"), "w") as f:
    f.write("data_output_nodes\\nloop_\\n_rlnPipeLineNodeName #1\\n_rlnPipeLineNodeTypeLabel #2\\n"
            + os.path.join(a.o, "result.txt") + " LogFile.txt\\n")
"""


def _project(root: Path) -> None:
    from tamis.io.mrc import write_mrc
    from tests.helpers import tiny_micrographs

    root.mkdir(parents=True)
    cwd = os.getcwd()
    os.chdir(root)
    try:
        tiny_micrographs("Import/job001", n=2, size=512, per=25, snr=0.3, seed=2)
        rng = np.random.default_rng(3)
        n = 32
        c = np.arange(n) - n // 2
        z, y, x = np.meshgrid(c, c, c, indexing="ij")
        truth = np.exp(-(z**2 + y**2 + (x / 2) ** 2) / 20.0)
        Path("Refine3D/job001").mkdir(parents=True)
        for h in (1, 2):
            half = truth + rng.normal(scale=0.05, size=truth.shape)
            write_mrc(f"Refine3D/job001/run_half{h}_class001_unfil.mrc", half, 3.0)
        write_mrc("Refine3D/job001/run_class001.mrc", truth, 3.0)
        from tamis.simulate.movies import MovieSimulation, simulate_movies

        simulate_movies(
            MovieSimulation(n_movies=2, height_px=256, width_px=256, n_frames=8, pixel_size=2.0,
                            particles_per_movie=3, seed=5),
            "MovieSim",
        )  # fmt: skip
        for movie in Path("MovieSim/Movies").iterdir():  # finished writing a minute ago
            os.utime(movie, (time.time() - 60, time.time() - 60))
        Path("external_tool.py").write_text(EXTERNAL_TOOL)
    finally:
        os.chdir(cwd)


def _outputs(job_dir: Path) -> dict[str, object]:
    """The job's data outputs, read (logs and markers left out)."""
    out: dict[str, object] = {}
    for p in sorted(job_dir.rglob("*")):
        if (
            not p.is_file()
            or p.name.startswith(("run.", "RELION_", ".", "job"))
            or p.suffix == ".png"
        ):
            continue
        rel = str(p.relative_to(job_dir))
        if p.suffix == ".star":
            out[rel] = read_star(p)
        elif p.suffix in (".mrc", ".mrcs"):
            out[rel] = np.asarray(read_mrc(p)[0])
    return out


def _same(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        if isinstance(a[k], np.ndarray):
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
        else:
            assert list(a[k]) == list(b[k]), k
            for blk in a[k]:
                x, y = a[k][blk], b[k][blk]
                if isinstance(x, pd.DataFrame):
                    pd.testing.assert_frame_equal(x, y, obj=f"{k}/{blk}")
                else:
                    assert x == y, (k, blk)


def _complete(job_dir: Path) -> None:
    """Every file under a final name is whole (a kill may leave temporaries, never torn files)."""
    for p in job_dir.rglob("*"):
        if p.is_file() and p.suffix in (".mrc", ".mrcs"):
            assert mrc_is_complete(p), p
        elif p.is_file() and p.suffix == ".star" and not p.name.startswith("."):
            read_star(p)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_sigkill_jobs_at_random_points_then_rerun(tmp_path, seed):
    kills, mid_run = kill_round(tmp_path, seed)
    assert kills == len(JOBS)
    # the seeded delays do stop jobs part-way (not only after they finished)
    assert mid_run >= 1, mid_run


def kill_round(tmp_path: Path, seed: int) -> tuple[int, int]:
    """One round over :data:`JOBS` in a fresh pair of projects: each job runs uninterrupted in
    one, is killed at a seeded random point of its run and run again in the other; asserts
    whole files after the kill and equal outputs after the re-run. Returns (kills, kills that
    landed before the job's exit marker)."""
    rng = np.random.default_rng(seed)
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    _project(ref)
    _project(killed)
    mid_run = 0
    for job_dir, label, opts in JOBS:
        for root in (ref, killed):
            (root / job_dir).mkdir(parents=True)
            JobStar(label, options=opts).write(root / job_dir)
        t0 = time.perf_counter()
        assert run_job_in(ref, job_dir) == "Succeeded", (ref / job_dir / "run.err").read_text()
        seconds = time.perf_counter() - t0
        # kill at a random point of the job's own run (after the interpreter has started it)
        proc = subprocess.Popen(
            [sys.executable, "-c", f"from tamis.pipeline.jobs import run_job; run_job({job_dir!r})"],
            cwd=killed, start_new_session=True,
            env={**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'src'}"},
        )  # fmt: skip
        started = killed / job_dir / "run.err"
        t_start = time.time()
        while not started.exists() and time.time() - t_start < 60:
            time.sleep(0.01)
        time.sleep(float(rng.uniform(0.0, 1.0)) * seconds)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        mid_run += exit_status(killed / job_dir) is None  # killed before its exit marker
        _complete(killed / job_dir)
        assert run_job_in(killed, job_dir) == "Succeeded", (
            killed / job_dir / "run.err"
        ).read_text()
        _same(_outputs(ref / job_dir), _outputs(killed / job_dir))
    return len(JOBS), mid_run


def test_external_program_dies_with_its_job(tmp_path):
    """SIGKILL of the job process alone (as the OOM killer or ``kill -9`` does) takes its
    External program with it: nothing runs on, orphaned, beside the job's next run."""
    root = tmp_path / "p"
    (root / "Import/job001").mkdir(parents=True)
    (root / "Import/job001/micrographs.star").write_text("data_micrographs\n")
    (root / "external_tool.py").write_text(EXTERNAL_TOOL)
    job_dir = "External/job002"
    (root / job_dir).mkdir(parents=True)
    JobStar("relion.external", options={
        "fn_exe": f"{sys.executable} external_tool.py", "in_mic": "Import/job001/micrographs.star",
        "param1_label": "factor", "param1_value": "3", "param2_label": "hold",
        "param2_value": "60"}).write(root / job_dir)  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-c", f"from tamis.pipeline.jobs import run_job; run_job({job_dir!r})"],
        cwd=root, env={**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'src'}"},
    )  # fmt: skip
    pid_file = root / job_dir / "tool.pid"
    deadline = time.time() + 60
    while not pid_file.exists() or not pid_file.read_text():
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.02)
    tool = int(pid_file.read_text())
    os.kill(proc.pid, signal.SIGKILL)  # the job process only, not its group
    proc.wait()
    deadline = time.time() + 10
    while Path(f"/proc/{tool}").exists() and time.time() < deadline:
        # a zombie until reaped by init counts as gone
        if "Z" in (Path(f"/proc/{tool}/stat").read_text().rsplit(")", 1)[1].split()[:1] or [""]):
            break
        time.sleep(0.05)
    alive = (
        Path(f"/proc/{tool}").exists()
        and "Z" not in Path(f"/proc/{tool}/stat").read_text().rsplit(")", 1)[1].split()[0]
    )
    assert not alive, "the External program outlived its job"
    assert not (root / job_dir / "result.txt").exists()
