"""Motion correction end to end on simulated movies with known motion: accuracy against the
truth, RELION's output files, continue / do_at_most, binning, bad input, and the pipeline job."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import torch

from tamis.errors import InputFileError, TamisError
from tamis.fourier import frc
from tamis.io.motion_star import read_motion_star
from tamis.io.movies import open_movie
from tamis.io.mrc import read_mrc
from tamis.io.star import read_star, write_star
from tamis.motion_model import evaluate_polynomial
from tamis.prep.motioncorr import MotionCorrOptions, output_root, parse_other_args, run_motioncorr
from tamis.simulate.movies import MovieSimulation, simulate_movies

SIM = MovieSimulation(
    n_movies=2, height_px=512, width_px=512, n_frames=20, pixel_size=1.5, particles_per_movie=12,
    drift_px=12.0, local_px=4.0, seed=3,
)  # fmt: skip
N = SIM.n_frames


@pytest.fixture(scope="module")
def movies(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("movies")
    simulate_movies(SIM, root)
    return root


@pytest.fixture
def project(movies, tmp_path, monkeypatch) -> Path:
    for name in ("Movies", "truth", "gain.mrc", "movies.star", "micrographs.star"):
        src = movies / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, tmp_path / name)
    for movie in (tmp_path / "Movies").iterdir():  # written a minute ago: complete for import
        os.utime(movie, (movie.stat().st_atime - 60, movie.stat().st_mtime - 60))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _error(est, truth, z):
    """RMS error of the total shift (global + local) over a 5 x 5 grid at frame z."""
    g = np.linspace(-0.4, 0.4, 5)
    xx, yy = (a.ravel() for a in np.meshgrid(g, g))
    zz = np.full(xx.size, z)

    def total(m):
        loc = 0 if m.local_coeffs is None else evaluate_polynomial(m.local_coeffs, xx, yy, zz)
        return m.global_shifts[z] + loc

    return float(np.sqrt(((total(est) - total(truth)) ** 2).sum(1).mean()))


def test_motion_is_recovered_and_the_sum_is_sharper(project):
    o = MotionCorrOptions(patch_x=4, patch_y=4, gain="gain.mrc", dose_per_frame=1.0,
                          save_noDW=True, grouping_for_ps=4, ps_size=128)  # fmt: skip
    star = run_motioncorr("movies.star", "MotionCorr/job002", o, log=lambda s: None)
    for i in (1, 2):
        est = read_motion_star(f"MotionCorr/job002/Movies/movie_{i:05d}.star")
        truth = read_motion_star(f"truth/movie_{i:05d}.star")
        err = np.hypot(*(est.global_shifts - truth.global_shifts).T)
        assert np.median(err) < 0.3, err
        assert est.local_coeffs is not None
        # the local model brings the total shift closer to the truth than the global one alone
        glob = type(est)(**{**est.__dict__, "local_coeffs": None})
        assert _error(est, truth, N - 1) < 0.7 * _error(glob, truth, N - 1)
    # the aligned sum (not dose-weighted) against the clean specimen beats the unaligned sum
    clean, _ = read_mrc("truth/movie_00001_clean.mrc")
    aligned, apix = read_mrc("MotionCorr/job002/Movies/movie_00001_noDW.mrc")
    assert apix == pytest.approx(1.5)
    gain, _ = read_mrc("gain.mrc")
    with open_movie("Movies/movie_00001.tif") as m:
        raw = (m.read() * gain).sum(0)
    shells = slice(26, 160)  # 7 A to 3 A
    a = frc(torch.from_numpy(aligned), torch.from_numpy(clean))[shells].mean()
    u = frc(torch.from_numpy(raw), torch.from_numpy(clean))[shells].mean()
    assert a > u + 0.05, (float(a), float(u))
    # intensity scales as RELION's: the plain sum is n x the frame mean, dose weighting 1/sqrt(n)
    dw, _ = read_mrc("MotionCorr/job002/Movies/movie_00001.mrc")
    frame_mean = aligned.mean() / N
    assert dw.mean() == pytest.approx(frame_mean * N / N**0.5, rel=1e-3)
    # the job's STAR file
    blocks = read_star(star)
    mics = blocks["micrographs"]
    assert list(mics.columns) == [
        "rlnMicrographNameNoDW", "rlnCtfPowerSpectrum", "rlnMicrographName",
        "rlnMicrographMetadata", "rlnOpticsGroup", "rlnAccumMotionTotal",
        "rlnAccumMotionEarly", "rlnAccumMotionLate",
    ]  # fmt: skip
    assert mics["rlnMicrographName"].tolist() == [
        "MotionCorr/job002/Movies/movie_00001.mrc", "MotionCorr/job002/Movies/movie_00002.mrc"
    ]  # fmt: skip
    assert float(blocks["optics"]["rlnMicrographPixelSize"].iloc[0]) == pytest.approx(1.5)
    est = read_motion_star("MotionCorr/job002/Movies/movie_00001.star")
    steps = np.hypot(*np.diff(est.global_shifts, axis=0).T)
    assert mics["rlnAccumMotionTotal"].iloc[0] == pytest.approx(steps.sum())
    assert mics["rlnAccumMotionEarly"].iloc[0] == pytest.approx(steps[:3].sum())  # frames 2-4
    # the per-movie metadata file as RELION writes it
    meta = read_star("MotionCorr/job002/Movies/movie_00001.star")
    assert list(meta) == ["general", "global_shift", "local_motion_model", "hot_pixels",
                          "local_shift"]  # fmt: skip
    g = meta["general"]
    assert (g["rlnImageSizeX"], g["rlnImageSizeZ"], g["rlnMotionModelVersion"]) == (512, N, 1)
    assert g["rlnMicrographGainName"] == "gain.mrc"
    assert len(meta["local_motion_model"]) == 36
    hot = meta["hot_pixels"]
    assert len(hot) >= SIM.hot_pixels  # every simulated hot pixel found
    ps, ps_apix = read_mrc("MotionCorr/job002/Movies/movie_00001_PS.mrc")
    assert ps.shape == (128, 128) and ps_apix == pytest.approx(1.5)
    for suffix in ("_shifts.png", ".log"):
        assert Path(f"MotionCorr/job002/Movies/movie_00001{suffix}").is_file()
    assert Path("MotionCorr/job002/logfile.pdf").read_bytes()[:4] == b"%PDF"


def test_continue_and_do_at_most(project):
    o = MotionCorrOptions(gain="gain.mrc")
    run_motioncorr("movies.star", "MC", o, do_at_most=1, log=lambda s: None)
    mics = read_star("MC/corrected_micrographs.star")["micrographs"]
    assert len(mics) == 1
    first = Path("MC/Movies/movie_00001.mrc")
    stamp = first.stat().st_mtime_ns
    run_motioncorr("movies.star", "MC", o, only_do_unfinished=True, log=lambda s: None)
    assert first.stat().st_mtime_ns == stamp  # not redone
    assert len(read_star("MC/corrected_micrographs.star")["micrographs"]) == 2
    # past the limit, movies done before are still listed (RELION's --do_at_most)
    first.unlink()
    run_motioncorr("movies.star", "MC", o, only_do_unfinished=True, do_at_most=0,
                   log=lambda s: None)  # fmt: skip
    names = read_star("MC/corrected_micrographs.star")["micrographs"]["rlnMicrographName"]
    assert names.tolist() == ["MC/Movies/movie_00002.mrc"]


def test_binning_keeps_shifts_in_unbinned_pixels(project):
    o = MotionCorrOptions(gain="gain.mrc", bin_factor=2, patch_x=4, patch_y=4)
    run_motioncorr("movies.star", "MC", o, log=lambda s: None)
    img, apix = read_mrc("MC/Movies/movie_00001.mrc")
    assert img.shape == (256, 256) and apix == pytest.approx(3.0)
    est = read_motion_star("MC/Movies/movie_00001.star")
    truth = read_motion_star("truth/movie_00001.star")
    assert np.median(np.hypot(*(est.global_shifts - truth.global_shifts).T)) < 0.5
    assert est.local_coeffs is not None
    # unbinned local model: it still describes the truth's local motion on the unbinned grid
    glob = type(est)(**{**est.__dict__, "local_coeffs": None})
    assert _error(est, truth, N - 1) < 0.7 * _error(glob, truth, N - 1)
    with pytest.raises(TamisError, match="even"):
        run_motioncorr("movies.star", "MC3", MotionCorrOptions(bin_factor=6), log=lambda s: None)


def test_frame_range_marks_unused_frames(project):
    o = MotionCorrOptions(first_frame_sum=3, last_frame_sum=12, gain="gain.mrc")
    run_motioncorr("movies.star", "MC", o, log=lambda s: None)
    shifts = read_star("MC/Movies/movie_00001.star")["global_shift"]
    x = shifts["rlnMicrographShiftX"].to_numpy()
    assert len(x) == N and (x[:2] == -9999).all() and (x[12:] == -9999).all()
    assert x[2] == 0
    assert read_star("MC/Movies/movie_00001.star")["general"]["rlnMicrographStartFrame"] == 3


def test_bad_input_is_one_clear_error(project):
    # a gain of the wrong size stops the job before any movie
    with mrcfile.new("small_gain.mrc") as mrc:
        mrc.set_data(np.ones((100, 100), np.float32))
    with pytest.raises(InputFileError, match="100 x 100"):
        run_motioncorr("movies.star", "MC", MotionCorrOptions(gain="small_gain.mrc"))
    # a truncated movie is recorded as failed with its reason; the others go on
    data = Path("Movies/movie_00002.tif").read_bytes()
    Path("Movies/movie_00002.tif").write_bytes(data[: len(data) // 2])
    logs: list[str] = []
    star = run_motioncorr("movies.star", "MC", MotionCorrOptions(), log=logs.append)
    assert len(read_star(star)["micrographs"]) == 1
    failed = read_star("MC/failed_movies.star")["failed"]
    assert failed["rlnMicrographMovieName"].tolist() == ["Movies/movie_00002.tif"]
    assert not Path("MC/Movies/movie_00002.mrc").exists()  # nothing half-written
    # fewer than 3 frames; dose weighting without a dose
    with pytest.raises(TamisError, match="dose"):
        run_motioncorr("movies.star", "MC2", MotionCorrOptions(dose_per_frame=0))
    with pytest.raises(TamisError, match="not a motion-correction option"):
        parse_other_args("--do_at_most 5 --frobnicate 3", MotionCorrOptions())
    assert (
        parse_other_args("--do_at_most 5 --skip_defect", o := MotionCorrOptions())
        == {"do_at_most": 5}
        and o.skip_defect
    )


def test_output_names_follow_relion():
    assert output_root("Movies/a.b_EER.eer", "MotionCorr/job002") == Path(
        "MotionCorr/job002/Movies/a_b_EER"
    )
    assert output_root("Import/job001/Movies/x.tif", "MC") == Path("MC/Movies/x")


def test_the_motioncorr_job_in_a_project(project):
    from tamis.pipeline.job import JobStar
    from tamis.pipeline.jobs import run_job

    d = Path("MotionCorr/job002")
    d.mkdir(parents=True)
    JobStar(
        "relion.motioncorr.own", False, False,
        {"input_star_mics": "movies.star", "fn_gain_ref": "gain.mrc", "patch_x": "3",
         "patch_y": "3", "dose_per_frame": "1", "do_save_ps": "Yes", "group_for_ps": "4",
         "gain_rot": "No rotation (0)", "other_args": "--do_at_most 1"},
    ).write(d)  # fmt: skip
    assert run_job(d) == "Succeeded"
    assert (d / "RELION_JOB_EXIT_SUCCESS").exists()
    nodes = read_star(d / "RELION_OUTPUT_NODES.star")["output_nodes"]
    assert "MicrographGroupMetadata.star.relion.motioncorr" in nodes.iloc[:, 1].tolist()
    mics = read_star(d / "corrected_micrographs.star")["micrographs"]
    assert len(mics) == 1  # do_at_most
    _, apix = read_mrc(mics["rlnMicrographName"].iloc[0])
    # float16 (the GUI default) is written as mode 12
    with mrcfile.open(mics["rlnMicrographName"].iloc[0]) as mrc:
        assert mrc.header.mode == 12
    bad = Path("MotionCorr/job003")
    bad.mkdir(parents=True)
    JobStar("relion.motioncorr.own", False, False,
            {"input_star_mics": "movies.star", "gain_rot": "sideways"}).write(bad)  # fmt: skip
    assert run_job(bad) == "Failed"
    assert "gain_rot" in (bad / "run.err").read_text()
    assert os.path.exists(bad / "RELION_JOB_EXIT_FAILURE")


def test_the_prep_scheme_from_movies(project):
    """RELION's prep scheme: import movies, motion correction, CTF estimation (on the sums
    without dose weighting), through the schemer, with the options `tamis it --movies` sets."""
    from tamis.schemes import it
    from tamis.schemes.run import SchemeRunner

    it.install_schemes(project)
    opts = it.complete_options(
        {
            "prep__importmovies__fn_in_raw": "Movies/*.tif",
            "prep__importmovies__angpix": SIM.pixel_size,
            "prep__motioncorr__fn_gain_ref": "gain.mrc",
            "prep__motioncorr__dose_per_frame": 1.0,
            "prep__motioncorr__patch_x": 1,
            "prep__motioncorr__patch_y": 1,
            "prep__ctffind__box": 256,
            "prep__ctffind__resmax": 6,
            "prep__nr_mics_to_process": 2,
            "prep__wait_sec": 0,
        },
        project,
    )
    assert opts["prep__do_movies"] is True
    it.apply_options(project, opts)
    outcome = SchemeRunner(project, "prep", log=lambda s: None, background=False).run()
    assert outcome == "Succeeded"
    ctf = read_star("CtfFind/job003/micrographs_ctf.star")["micrographs"]
    assert ctf["rlnMicrographName"].tolist() == [
        "MotionCorr/job002/Movies/movie_00001.mrc", "MotionCorr/job002/Movies/movie_00002.mrc"
    ]  # fmt: skip
    assert "rlnMicrographNameNoDW" in ctf
    true = read_star("micrographs.star")["micrographs"]["rlnDefocusU"].to_numpy()  # the truth
    assert np.abs(ctf["rlnDefocusU"].to_numpy() - true).max() < 0.05 * true.max()


def test_relions_motion_metadata_reads_and_gives_relions_accumulated_motion():
    """A per-movie STAR written by RELION 5.0.1 (tests/data): read back, and the accumulated
    motion recomputed from its shifts equals what RELION wrote in corrected_micrographs.star."""
    from tamis.prep.motion import accumulated_motion

    m = read_motion_star(Path(__file__).parent / "data" / "star" / "relion_motioncorr_movie.star")
    assert (m.n_frames, m.shape, m.first) == (40, (1024, 1024), 0)
    assert m.local_coeffs is not None and m.local_coeffs.shape == (2, 18)
    assert m.global_shifts[1] == pytest.approx([-0.06941, -0.26835])
    total, early, late = accumulated_motion(m.global_shifts, dose_per_frame=1.0)
    assert (total, early, late) == pytest.approx((16.672851, 2.462960, 14.209891), abs=2e-5)


def test_ctf_from_motion_corrections_power_spectrum(project):
    """RELION's use_given_ps: the CTF fitted on motion correction's _PS.mrc (amplitudes of
    unaligned frame groups) instead of the sum; defocus within 10% of the truth. (On the demo's
    16 movies it was less accurate than the noDW sum: median error 20 A against 11 A.)"""
    from tamis.prep.ctffind import CtfFindOptions, run_ctffind

    o = MotionCorrOptions(gain="gain.mrc", grouping_for_ps=4, ps_size=256)
    star = run_motioncorr("movies.star", "MC", o, log=lambda s: None)
    ctf = run_ctffind(star, "CTF", CtfFindOptions(box=256, max_resolution=6), use_given_ps=True,
                      log=lambda s: None)  # fmt: skip
    est = read_star(ctf)["micrographs"]["rlnDefocusU"].to_numpy()
    true = read_star("micrographs.star")["micrographs"]["rlnDefocusU"].to_numpy()
    assert np.abs(est - true).max() < 0.1 * true.max()
    blocks = read_star(star)
    blocks["micrographs"] = blocks["micrographs"].drop(columns="rlnCtfPowerSpectrum")
    write_star(blocks, "no_ps.star")
    with pytest.raises(TamisError, match="rlnCtfPowerSpectrum"):
        run_ctffind("no_ps.star", "CTF2", use_given_ps=True)
