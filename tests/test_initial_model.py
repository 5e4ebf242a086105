"""The de novo 3D initial model (tamis.refine.initial_model; ``tamis refine --denovo_3dref
--grad``) on simulated particles with a known structure."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from tamis.cli.main import app
from tamis.errors import TamisError
from tamis.io.mrc import read_mrc
from tamis.io.particles import ParticleSet
from tamis.io.star import read_star, write_star
from tamis.refine.compare import compare_to_truth
from tamis.refine.initial_model import InitialModelOptions, InitialModelRun, run_initial_model
from tamis.simulate.particles import ParticleSimulation, simulate_particles

BOX, PIXEL = 32, 5.0


@pytest.fixture(scope="module")
def particles(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("inimodel") / "sim"
    sim = ParticleSimulation(
        structures=["builtin:8zpm"], n_particles=400, box_size=BOX, pixel_size=PIXEL, snr=0.1,
        seed=3,
    )  # fmt: skip
    simulate_particles(sim, out)
    return out


def _options(**kw) -> InitialModelOptions:
    base = dict(
        iter=8, K=1, particle_diameter=130.0, j=2, random_seed=1, grad_write_iter=4,
        grad_ini_subset=150, grad_fin_subset=200,
    )  # fmt: skip
    base.update(kw)
    return InitialModelOptions(**base)


def test_the_map_approaches_the_truth_and_files_are_relions(particles: Path, tmp_path: Path):
    root = tmp_path / "InitialModel" / "run"
    logs: list[str] = []
    res = run_initial_model(
        str(particles / "particles.star"), str(root), _options(), log=logs.append
    )
    truth = torch.from_numpy(read_mrc(particles / "structures" / "structure_01.mrc")[0])
    first = torch.from_numpy(read_mrc(f"{root}_it000_class001.mrc")[0])
    final, pixel = read_mrc(res.initial_model)
    assert pixel == pytest.approx(PIXEL)
    before = compare_to_truth(first, truth, PIXEL)
    after = compare_to_truth(torch.from_numpy(final), truth, PIXEL)
    # from a blob to the structure's shape: FSC 0.5 at least a third finer than the start
    assert after.resolution_05 < 0.67 * before.resolution_05, (before, after)
    assert after.resolution_05 < 30.0
    # RELION's files: one map per class, 3D model and sampling, angles in the data.star
    model = read_star(f"{root}_it008_model.star")
    assert int(model["model_general"]["rlnReferenceDimensionality"]) == 3
    assert model["model_classes"]["rlnReferenceImage"].iloc[0] == f"{root}_it008_class001.mrc"
    sampling = read_star(f"{root}_it008_sampling.star")["sampling_general"]
    assert int(sampling["rlnIs3DSampling"]) == 1 and int(sampling["rlnHealpixOrder"]) == 1
    # the three labels RELION's HealpixSampling::read requires of a 3D sampling, and the
    # default step-size and T schemes as RELION writes them ("", any other text is a scheme)
    assert {"rlnHealpixOrder", "rlnSymmetryGroup", "rlnTiltAngleLimit"} <= set(sampling)
    opt = read_star(f"{root}_it008_optimiser.star")["optimiser_general"]
    assert opt["rlnSgdStepsizeScheme"] == "" and opt["rlnTau2FudgeScheme"] == ""
    # MlModel reads the direction prior of each class: one row per direction of HEALPix order
    # 1 in C1 (48 pixels), learned (RELION's pdf_direction: 0.9 old + 0.1 the mini-batch's
    # share of each direction, from 1/48), summing to the class's share
    pdf = model["model_pdf_orient_class_1"]["rlnOrientationDistribution"].to_numpy(float)
    prior = float(model["model_classes"]["rlnClassDistribution"].iloc[0])
    assert len(pdf) == 48 and np.isclose(pdf.sum(), prior, rtol=1e-5)
    assert pdf.min() > 0.9**8 / 48 * 0.99 and pdf.max() > 1.2 / 48  # learned, never zero
    data = read_star(f"{root}_it008_data.star")["particles"]
    assert {"rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"} <= set(data.columns)
    assert float(data["rlnAngleTilt"].std()) > 10  # angles were assigned, not left at 0
    assert Path(f"{root}_it008_1moment002.mrc").is_file()
    assert res.chosen_class == 1 and res.initial_model == root.parent / "initial_model.mrc"

    # --continue reads the learned direction prior back (as RELION's MlModel::read)
    run4 = InitialModelRun(ParticleSet.from_file(particles / "particles.star"), _options(),
                           str(tmp_path / "scratch" / "run"))  # fmt: skip
    run4.load_continue(f"{root}_it004_optimiser.star")
    table4 = read_star(f"{root}_it004_model.star")["model_pdf_orient_class_1"]
    written = table4["rlnOrientationDistribution"].to_numpy(float)
    assert np.allclose(run4.state.pdf_direction[0].numpy(), written, rtol=1e-6)
    assert written.std() > 0

    # --continue from iteration 4 reaches iteration 8 again, from the written state
    more = run_initial_model(
        None, "", _options(), continue_from=f"{root}_it004_optimiser.star", log=logs.append
    )
    assert more.run.iteration == 8
    assert more.initial_model == res.initial_model  # into the job directory, not the cwd
    assert any("continuing from iteration 4" in line for line in logs)
    again = torch.from_numpy(read_mrc(more.initial_model)[0]).to(torch.float64)
    ref = torch.from_numpy(final).to(torch.float64)
    assert float(torch.corrcoef(torch.stack([again.flatten(), ref.flatten()]))[0, 1]) > 0.9

    # --continue into another output root reads the continued run's moments and writes its own
    other = tmp_path / "Elsewhere" / "run"
    run_initial_model(
        None, str(other), _options(iter=5), continue_from=f"{root}_it004_optimiser.star"
    )
    assert Path(f"{other}_it005_1moment001.mrc").is_file()
    assert not Path(f"{other}_it004_1moment001.mrc").exists()


def test_bad_input_is_one_clear_error(particles: Path, tmp_path: Path):
    star = str(particles / "particles.star")
    with pytest.raises(TamisError, match="symmetry"):
        run_initial_model(star, str(tmp_path / "a" / "run"), _options(sym="Q7"))
    with pytest.raises(TamisError, match="more classes than particles"):
        run_initial_model(star, str(tmp_path / "b" / "run"), _options(K=500))
    blocks = read_star(star)
    empty = tmp_path / "empty.star"
    write_star({"optics": blocks["optics"], "particles": blocks["particles"].iloc[:0]}, empty)
    with pytest.raises(TamisError, match="no particles"):
        run_initial_model(str(empty), str(tmp_path / "d" / "run"), _options())
    r = CliRunner().invoke(app, ["refine", "--i", star, "--o", str(tmp_path / "c" / "run")])
    assert r.exit_code != 0 and "--denovo_3dref --grad" in r.output
    assert "Traceback" not in r.output


def test_cli_runs_the_initial_model_job(particles: Path, tmp_path: Path):
    # the first 60 particles: the job's plumbing, not its result
    blocks = read_star(particles / "particles.star")
    table = blocks["particles"].iloc[:60].copy()
    table["rlnImageName"] = [
        f"{name.split('@')[0]}@{particles / name.split('@')[1]}" for name in table["rlnImageName"]
    ]
    small = tmp_path / "small.star"
    write_star({"optics": blocks["optics"], "particles": table}, small)
    out = tmp_path / "InitialModel" / "job012"
    r = CliRunner().invoke(
        app,
        ["refine", "--i", str(small), "--o", str(out / "run"),
         "--denovo_3dref", "--grad", "--iter", "2", "--K", "2", "--ctf", "--zero_mask",
         "--flatten_solvent", "--particle_diameter", "130", "--oversampling", "1",
         "--healpix_order", "1", "--offset_range", "6", "--offset_step", "2", "--auto_sampling",
         "--tau2_fudge", "4", "--pad", "1", "--dont_combine_weights_via_disc", "--pool", "30",
         "--random_seed", "2", "--pipeline_control", str(out)],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    assert (out / "initial_model.mrc").is_file()
    assert (out / "run_it002_class002.mrc").is_file()
    assert (out / "RELION_JOB_EXIT_SUCCESS").is_file()
    vol, _ = read_mrc(out / "initial_model.mrc")
    assert vol.shape == (BOX, BOX, BOX) and np.isfinite(vol).all()


def _run3d(particles: Path, tmp_path: Path, **kw):
    from tamis.io.particles import ParticleSet
    from tamis.refine.initial_model import InitialModelRun

    ps = ParticleSet.from_file(particles / "particles.star")
    run = InitialModelRun(ps, _options(**kw), str(tmp_path / "run"), log=lambda s: None)
    run.initialise()
    return run


def test_fine_projections_on_demand_give_the_same_e_step(particles, tmp_path, monkeypatch):
    """With a work budget too small for every fine orientation's projections and sums, the
    E-step projects only the children of the coarse orientations a batch needs and splats batch
    by batch: the same grids and assignments as with everything in memory."""
    from tamis.class2d.em import Class2DRun

    rows = np.arange(0, 120)
    full = _run3d(particles, tmp_path / "a").expectation_step(1, rows, halves=True)
    run = _run3d(particles, tmp_path / "b")
    monkeypatch.setattr(Class2DRun, "_work_budget", lambda self: 1 << 16)
    streamed = run.expectation_step(1, rows, halves=True)
    ref = _run3d(particles, tmp_path / "c")
    ref.expectation_step(1, rows, halves=True)
    assert streamed.streamed and not full.streamed
    # each splat call sums in float32 (GridSplat in 3D), so other calls, other roundings
    for a, b in ((streamed.d, full.d), (streamed.w, full.w)):
        assert float((a - b).abs().max()) <= 1e-5 * float(b.abs().max())
    assert torch.allclose(streamed.sums.pdf_class, full.sums.pdf_class)
    # the direction prior's sums: the same per (class, direction), whichever fine layout
    assert full.sums.pdf_direction.shape == (1, 48)
    assert torch.allclose(streamed.sums.pdf_direction, full.sums.pdf_direction)
    assert torch.allclose(full.sums.pdf_direction.sum(1), full.sums.pdf_class)
    assert np.array_equal(run.cls[rows], ref.cls[rows])
    assert np.allclose(run.angles_of(rows), ref.angles_of(rows))


def test_pass0_norm_terms_made_ahead_give_the_same_e_step(particles, tmp_path, monkeypatch):
    """Pass 0's A terms made for several batches in one GEMM (as at HEALPix orders 2-3; forced
    here at order 1), with one batch split in two after running out of memory: the same E-step
    as batch by batch."""
    from tamis.class2d import em

    rows = np.arange(0, 120)
    plain = _run3d(particles, tmp_path / "a", batch_size=8)
    ref = plain.expectation_step(1, rows, halves=True)
    monkeypatch.setattr(em, "NORMS_AHEAD_MIN_REFS", 0)
    made: list[int] = []
    made_ahead = em.Class2DRun._coarse_norm_terms

    def spy(self, rows_ahead, *args):
        made.append(len(rows_ahead))
        return made_ahead(self, rows_ahead, *args)

    calls = [0]
    one_batch = em.expectation

    def out_of_memory_once(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 3:  # the third batch (rows 16-23): split into 16-19 and 20-23
            raise MemoryError
        assert kwargs["coarse_norms"].shape[0] == len(args[0].x)
        return one_batch(*args, **kwargs)

    monkeypatch.setattr(em.Class2DRun, "_coarse_norm_terms", spy)
    monkeypatch.setattr(em, "expectation", out_of_memory_once)
    run = _run3d(particles, tmp_path / "b", batch_size=8)
    got = run.expectation_step(1, rows, halves=True)
    assert made == [64, 56] and calls[0] == 120 // 8 + 2
    for a, b in ((got.d, ref.d), (got.w, ref.w)):
        assert float((a - b).abs().max()) <= 1e-5 * float(b.abs().max())
    assert torch.allclose(got.sums.pdf_direction, ref.sums.pdf_direction)
    assert np.array_equal(run.cls[rows], plain.cls[rows])
    assert np.allclose(run.angles_of(rows), plain.angles_of(rows))


def test_turned_orientations_turn_by_the_asked_angle(particles, tmp_path):
    """The 3D accuracy estimate's turns (rot, tilt or psi by turn, per particle) are rotations
    by about that angle (rot and psi exactly; tilt exactly too, being a rotation about y)."""
    run = _run3d(particles, tmp_path)
    angles = np.array([[10.0, 40.0, 70.0], [200.0, 100.0, 300.0], [50.0, 130.0, 20.0]])
    turns = torch.tensor([1.0, 5.0], dtype=torch.float64)
    first, moved = run.turned_orientations(angles, turns)
    moved = moved.reshape(3, 2, 3, 3)
    for i in range(3):
        for j in range(2):
            r = first[i].T @ moved[i, j]
            cos = (torch.trace(r) - 1) / 2
            angle = float(torch.rad2deg(torch.arccos(cos.clamp(-1, 1))))
            assert angle == pytest.approx(float(turns[j]), abs=1e-6)


def test_auto_sampling_refines_when_resolution_stalls(particles, tmp_path):
    """At iteration 10, after an iteration without resolution gain and with the fine step
    coarser than 75% of the accuracy, the HEALPix order goes up one and the translations follow
    RELION's rules; never to the local-search order; not when the accuracy says fine enough."""
    run = _run3d(particles, tmp_path)
    st = run.state
    smp = run.sampling
    assert smp.healpix_order == 1
    st.acc_rot = torch.tensor([4.0, 999.0], dtype=torch.float64)
    st.acc_trans = torch.tensor([2.0, 999.0], dtype=torch.float64)  # Angstrom
    run._offset_change = 1.0  # RMS offset change, Angstrom
    for it in (8, 9):
        run._update_sampling(it)
    run._update_sampling(10)  # maxres unchanged since 9: one iteration without gain
    assert smp.healpix_order == 2 and smp.psi_step == pytest.approx(15.0)
    # RELION: step min(1.5, 0.75 * 2) * 2**os = 3 A; range min(1.3 * 30, 5 * 1) = 5 A >= 4.5 A
    assert smp.offset_step * run.pixel == pytest.approx(3.0)
    assert smp.offset_range * run.pixel == pytest.approx(5.0)
    for it in range(11, 21):
        run._update_sampling(it)
    assert smp.healpix_order == 3  # 7.5 deg fine still above 0.75 * 4 deg
    for it in range(21, 31):
        run._update_sampling(it)
    assert smp.healpix_order == 3  # 4 is the local-search order: VDAM stops at 3
    fine = _run3d(particles, tmp_path / "fine")
    fine.state.acc_rot = torch.tensor([30.0], dtype=torch.float64)  # 15 deg < 0.75 * 30
    for it in range(2, 11):
        fine._update_sampling(it)
    assert fine.sampling.healpix_order == 1
