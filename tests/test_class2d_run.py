"""2D classification end to end on small simulated data: files, truth recovery, continue, control."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tamis.class2d import Class2DOptions, run_class2d
from tamis.errors import TamisError
from tamis.io.mrc import read_mrc
from tamis.io.star import read_star
from tamis.simulate.truth import truth_for
from tests.helpers import tiny_particles

DATA = Path(__file__).parent / "data" / "star"


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    out = tmp_path_factory.mktemp("c2d")
    tiny_particles(out / "sim", n=240, seed=2)
    return out


def assert_same_classification(a_result, b_result) -> None:
    """>= 98% of particles in the same class; class images equal to 1e-3 of their range."""
    a = read_star(a_result.data)["particles"]
    b = read_star(b_result.data)["particles"]
    assert np.mean(a["rlnClassNumber"].to_numpy() == b["rlnClassNumber"].to_numpy()) >= 0.98
    ra, _ = read_mrc(a_result.classes)
    rb, _ = read_mrc(b_result.classes)
    assert np.abs(ra - rb).max() <= 1e-3 * np.abs(ra).max()


def options(**kw) -> Class2DOptions:
    """RELION's GUI EM job, with a coarser sampling for this small box."""
    base = dict(
        K=4,
        iter=4,
        particle_diameter=130.0,
        psi_step=20.0,
        offset_range=3.0,
        offset_step=1.5,
        random_seed=5,
        batch_size=64,
    )
    base.update(kw)
    return Class2DOptions.gui_em(**base)


@pytest.fixture(scope="module")
def full_run(sim):
    root = str(sim / "full" / "run")
    result = run_class2d(sim / "sim" / "particles.star", root, options(), log=lambda s: None)
    return root, result


def test_files_are_relion_shaped(full_run):
    root, result = full_run
    for it in range(5):
        for what in ("model.star", "data.star", "optimiser.star", "classes.mrcs"):
            assert Path(f"{root}_it{it:03d}_{what}").is_file(), (it, what)
    assert not Path(f"{root}_it000_sampling.star").exists()
    classes, apix = read_mrc(result.classes)
    assert classes.shape == (4, 32, 32) and apix == pytest.approx(4.5)
    model = read_star(result.model)
    assert list(model)[:2] == ["model_general", "model_classes"]
    assert [f"model_class_{k}" for k in range(1, 5)] == list(model)[2:6]
    assert list(model)[6:] == ["model_groups", "model_optics_group_1"]
    assert model["model_classes"]["rlnReferenceImage"].iloc[1].startswith("00000002@")
    assert model["model_general"]["rlnNrClasses"] == 4
    data = read_star(result.data)
    assert list(data) == ["optics", "particles"]
    for label in (
        "rlnClassNumber",
        "rlnAnglePsi",
        "rlnOriginXAngst",
        "rlnOriginYAngst",
        "rlnLogLikeliContribution",
        "rlnMaxValueProbDistribution",
        "rlnNrOfSignificantSamples",
        "rlnNormCorrection",
        "rlnGroupNumber",
    ):
        assert label in data["particles"].columns
    # Same blocks and labels as RELION 5's own 2D files (an EM run of RELION 5.0.1), and none
    # of the RELION-3.1 labels RELION 5 no longer knows (it warns about them on --continue)
    ours = read_star(result.optimiser)
    relion = read_star(DATA.parent / "relion_class2d_hard" / "run_it001_optimiser.star")
    assert list(ours) == list(relion)
    missing = set(relion["optimiser_general"]) - set(ours["optimiser_general"])
    assert not missing, missing
    relion31 = set(read_star(DATA / "run_it025_optimiser_2D.star")["optimiser_general"])
    gone = {"rlnSgdInitialIterations", "rlnSgdFinalIterations", "rlnSgdInBetweenIterations"}
    assert gone <= relion31 and not gone & set(ours["optimiser_general"])
    samp = read_star(Path(f"{root}_it004_sampling.star"))
    relion_s = read_star(DATA / "run_it025_sampling_2D.star")
    assert list(samp) == list(relion_s)
    assert list(samp["sampling_general"]) == list(relion_s["sampling_general"])


def test_classes_separate_structures_and_junk(sim, full_run):
    root, result = full_run
    data = read_star(result.data)["particles"]
    truth = truth_for(data, sim / "sim" / "ground_truth.csv")
    cls = data["rlnClassNumber"].to_numpy()
    assert set(cls) <= {1, 2, 3, 4}
    # Junk (ice, empty boxes) ends up away from the particles, in classes that are mostly junk.
    junk = truth["kind"].to_numpy() != "particle"
    junk_class = {c: junk[cls == c].mean() >= 0.5 for c in set(cls)}
    in_junk_class = np.array([junk_class[c] for c in cls])
    assert in_junk_class[junk].mean() >= 0.8
    assert in_junk_class[~junk].mean() <= 0.05
    frac = read_star(result.model)["model_classes"]["rlnClassDistribution"].to_numpy()
    assert frac.sum() == pytest.approx(1.0)


def test_continue_equals_uninterrupted(sim, full_run):
    root_full, result_full = full_run
    root = str(sim / "split" / "run")
    star = sim / "sim" / "particles.star"
    run_class2d(star, root, options(iter=2), log=lambda s: None)
    result = run_class2d(
        None,
        root,
        options(iter=4),
        continue_from=f"{root}_it002_optimiser.star",
        log=lambda s: None,
    )
    assert result.iteration == 4
    assert_same_classification(result_full, result)


def test_batches_from_the_memory_budget_give_the_same_result(sim, full_run, monkeypatch):
    """Batches sized by --max_memory (here ~16 particles, so every path and batch boundary
    differs from the 64-particle batches of the full run) give the same classes."""
    from tamis.class2d import em

    monkeypatch.setattr(em.Class2DRun, "_work_budget", lambda self: 6 << 20)
    _, result_full = full_run
    root = str(sim / "budget" / "run")
    sizes = []
    real = em.Class2DRun._batch_size

    def spy(self, *args):
        sizes.append(real(self, *args))
        return sizes[-1]

    monkeypatch.setattr(em.Class2DRun, "_batch_size", spy)
    result = run_class2d(
        sim / "sim" / "particles.star",
        root,
        options(batch_size=None, max_memory=0.5),
        log=lambda s: None,
    )
    assert sizes and max(sizes) < 64
    assert_same_classification(result_full, result)


def test_bad_max_memory_is_a_clear_error(sim):
    with pytest.raises(TamisError, match="--max_memory"):
        run_class2d(
            sim / "sim" / "particles.star",
            str(sim / "bad" / "run"),
            options(max_memory=0.0),
            log=lambda s: None,
        )


def test_killed_run_continues_to_the_same_result(sim, full_run):
    """SIGKILL once iteration 3 is on disk; --continue from it finishes like an uninterrupted run."""
    _, result_full = full_run
    root = sim / "killed" / "run"
    code = (
        "import sys; from tamis.class2d import Class2DOptions, run_class2d; "
        "from tests.test_class2d_run import options; "
        f"run_class2d({str(sim / 'sim' / 'particles.star')!r}, {str(root)!r}, options(iter=4), "
        "log=lambda s: None)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=Path(__file__).parents[1])
    optimiser3 = Path(f"{root}_it003_optimiser.star")
    deadline = time.time() + 120
    while not optimiser3.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert optimiser3.exists()
    # Whatever was being written when killed is either complete or absent (atomic writes).
    for f in root.parent.glob("*.star"):
        read_star(f)
    result = run_class2d(
        None, str(root), options(iter=4), continue_from=optimiser3, log=lambda s: None
    )
    a = read_star(result_full.data)["particles"]["rlnClassNumber"].to_numpy()
    b = read_star(result.data)["particles"]["rlnClassNumber"].to_numpy()
    assert np.mean(a == b) >= 0.98


def test_pipeline_control_markers_and_abort(sim):
    job = sim / "job"
    root = str(job / "run")
    run_class2d(
        sim / "sim" / "particles.star",
        root,
        options(iter=1, pipeline_control=job),
        log=lambda s: None,
    )
    assert (job / "RELION_JOB_EXIT_SUCCESS").exists()
    (job / "RELION_JOB_ABORT_NOW").touch()
    with pytest.raises(TamisError, match="aborted"):
        run_class2d(
            sim / "sim" / "particles.star",
            root,
            options(iter=1, pipeline_control=job),
            log=lambda s: None,
        )
    assert (job / "RELION_JOB_EXIT_ABORTED").exists()
    assert not (job / "RELION_JOB_EXIT_SUCCESS").exists()


def test_without_zero_mask_and_oversampling_zero(sim):
    result = run_class2d(
        sim / "sim" / "particles.star",
        str(sim / "plain" / "run"),
        options(iter=2, zero_mask=False, oversampling=0, norm=False, scale=False, K=2),
        log=lambda s: None,
    )
    data = read_star(result.data)["particles"]
    assert set(data["rlnClassNumber"]) <= {1, 2}
    assert np.isfinite(data["rlnLogLikeliContribution"]).all()


def test_translation_grid_sums_give_the_same_run(sim, full_run, monkeypatch):
    """The separable sums over the translation grid (tamis.class2d.shifts), taken everywhere
    (pass 0 and the fine pass; at this small box they would save too little to be taken):
    the same classification as the GEMMs."""
    from tamis.class2d import shifts

    monkeypatch.setattr(shifts, "_WORTH", 10.0)
    result = run_class2d(
        sim / "sim" / "particles.star", str(sim / "grid" / "run"), options(), log=lambda s: None
    )
    assert_same_classification(full_run[1], result)


def test_strict_highres_exp_with_oversampling_zero(sim, monkeypatch):
    """The single pass of --oversampling 0 compared on the pixels within
    --strict_highres_exp, with the GEMMs and with the separable sums."""
    from tamis.class2d import shifts

    for worth, name in ((0.45, "strict"), (10.0, "strict_grid")):
        monkeypatch.setattr(shifts, "_WORTH", worth)
        result = run_class2d(
            sim / "sim" / "particles.star",
            str(sim / name / "run"),
            options(iter=2, oversampling=0, strict_highres_exp=30.0),
            log=lambda s: None,
        )
        data = read_star(result.data)["particles"]
        assert np.isfinite(data["rlnLogLikeliContribution"]).all()


def test_cli_class2d(sim):
    from typer.testing import CliRunner

    from tamis.cli.main import app

    out = CliRunner().invoke(
        app,
        [
            "class2d",
            "--i",
            str(sim / "sim" / "particles.star"),
            "--o",
            str(sim / "cli" / "run"),
            "--K",
            "2",
            "--iter",
            "1",
            "--ctf",
            "--zero_mask",
            "--psi_step",
            "30",
            "--offset_range",
            "2",
            "--offset_step",
            "2",
            "--random_seed",
            "1",
            "--device",
            "cpu",
        ],
    )
    assert out.exit_code == 0, out.output
    assert (sim / "cli" / "run_it001_optimiser.star").is_file()
    more = CliRunner().invoke(
        app,
        [
            "class2d",
            "--continue",
            str(sim / "cli" / "run_it001_optimiser.star"),
            "--iter",
            "2",
            "--device",
            "cpu",
        ],
    )
    assert more.exit_code == 0, more.output
    opt = read_star(sim / "cli" / "run_it002_optimiser.star")["optimiser_general"]
    assert opt["rlnDoCorrectCtf"] == 1 and opt["rlnDoZeroMask"] == 1  # read back, not defaults
    bad = CliRunner().invoke(app, ["class2d", "--i", str(sim / "missing.star"), "--o", "x/run"])
    assert bad.exit_code == 1 and bad.output.strip().startswith("error:")


def test_fine_projections_on_demand_give_the_same_e_step(sim, monkeypatch):
    """2D EM with a work budget too small for every fine psi's projections and sums: the
    E-step makes them on demand and back-rotates batch by batch, with the same result."""
    from tamis.class2d.em import Class2DRun
    from tamis.io.particles import ParticleSet

    def run(name):
        ps = ParticleSet.from_file(sim / "sim" / "particles.star")
        r = Class2DRun(ps, options(), str(sim / name / "run"), log=lambda s: None)
        r.initialise()
        return r

    rows = np.arange(0, 200)
    a, b = run("dense"), run("stream")
    full = a.expectation_step(1, rows)
    monkeypatch.setattr(Class2DRun, "_work_budget", lambda self: 1 << 16)
    streamed = b.expectation_step(1, rows)
    assert streamed.streamed and not full.streamed
    for x, y in ((streamed.d, full.d), (streamed.w, full.w)):
        assert float((x - y).abs().max()) <= 1e-6 * float(y.abs().max())
    assert np.array_equal(a.cls[rows], b.cls[rows]) and np.allclose(a.psi[rows], b.psi[rows])


def test_out_of_memory_splits_the_batch_and_gives_the_same_result(sim, full_run, monkeypatch):
    # Issue 19: an E-step that cannot allocate is retried on half the batch (nothing was added
    # to the sums yet), down to one particle; the result equals the unhindered run's.
    import tamis.class2d.em as em

    real = em.expectation
    calls = {"oom": 0}

    def small_memory(data, **kw):
        if data.x.shape[0] > 20:
            calls["oom"] += 1
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate")
        return real(data, **kw)

    monkeypatch.setattr(em, "expectation", small_memory)
    log: list[str] = []
    result = run_class2d(
        sim / "sim" / "particles.star", str(sim / "oom" / "run"), options(), log=log.append
    )
    assert calls["oom"] > 0 and any("out of memory with 64 particles" in s for s in log)
    assert_same_classification(full_run[1], result)

    def no_memory(data, **kw):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory")

    monkeypatch.setattr(em, "expectation", no_memory)
    with pytest.raises(TamisError, match="out of memory with one particle"):
        run_class2d(sim / "sim" / "particles.star", str(sim / "oom2" / "run"), options(),
                    log=lambda s: None)  # fmt: skip
    # other runtime errors are bugs and keep their traceback
    monkeypatch.setattr(em, "expectation", lambda data, **kw: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        run_class2d(sim / "sim" / "particles.star", str(sim / "oom3" / "run"), options(),
                    log=lambda s: None)  # fmt: skip
