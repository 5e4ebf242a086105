"""Gold-standard 3D auto-refine (tamis.refine.auto_refine; ``tamis refine --auto_refine
--split_random_halves``) on simulated particles with known orientations, and its kernels against
slow references."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from tamis.cli.main import app
from tamis.errors import TamisError
from tamis.io.mrc import read_mrc, write_mrc
from tamis.io.star import read_star, write_star
from tamis.padded_grid import relion_round
from tamis.refine.auto_refine import AutoRefineOptions, run_auto_refine
from tamis.refine.compare import compare_to_truth, orientation_errors
from tamis.refine.gold_standard import (
    downsampled_average,
    half_sums_fsc,
    image_size_increment,
    join_low_resolution,
)
from tamis.refine.local_search import local_priors
from tamis.refine.maps import resize_map
from tamis.refine.sampling import Sampling3D
from tamis.simulate.particles import ParticleSimulation, simulate_particles
from tamis.simulate.truth import truth_for

BOX, PIXEL = 32, 5.0
ANGLES = ["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]


@pytest.fixture(scope="module")
def sim(tmp_path_factory) -> Path:
    """300 particles of a random 1,500-residue pseudo-protein at SNR 1, and the true map on the
    particles' grey scale as the reference."""
    out = tmp_path_factory.mktemp("autorefine") / "sim"
    sim = ParticleSimulation(
        structures=["random:7:1500"], n_particles=300, box_size=BOX, pixel_size=PIXEL, snr=1.0,
        seed=3,
    )  # fmt: skip
    simulate_particles(sim, out)
    scale = json.loads((out / "simulation.json").read_text())["intensity_scale"]
    vol, px = read_mrc(out / "structures" / "structure_01.mrc")
    write_mrc(out / "ref.mrc", vol * scale, px, stack=False)
    return out


def _options(sim: Path, **kw) -> AutoRefineOptions:
    base = dict(
        ref=str(sim / "ref.mrc"), ini_high=40.0, particle_diameter=130.0, j=2, random_seed=1,
        iter=6, healpix_order=1, auto_local_healpix_order=2,
    )  # fmt: skip
    base.update(kw)
    return AutoRefineOptions(**base)


@pytest.fixture(scope="module")
def refined(sim: Path, tmp_path_factory):
    root = tmp_path_factory.mktemp("refine3d") / "Refine3D" / "run"
    logs: list[str] = []
    res = run_auto_refine(str(sim / "particles.star"), str(root), _options(sim), log=logs.append)
    return root, res, logs


def test_refinement_finds_the_orientations_and_the_map(sim: Path, refined):
    root, res, logs = refined
    data = read_star(res.data)["particles"]
    truth = truth_for(data, sim / "ground_truth.csv")
    err, _ = orientation_errors(data[ANGLES].to_numpy(), truth[["rot", "tilt", "psi"]].to_numpy())
    # 7.5 deg fine sampling at the end; the rest of the errors are whole flips to the opposite
    # view (at 13-20 A these small maps are nearly mirror-symmetric: RELION flips as many)
    assert np.median(err) < 12.0, np.percentile(err, [25, 50, 75])
    true_map = torch.from_numpy(read_mrc(sim / "structures" / "structure_01.mrc")[0])
    cmp = compare_to_truth(torch.from_numpy(read_mrc(res.map)[0]), true_map, PIXEL)
    assert cmp.correlation > 0.9 and cmp.resolution_05 < 16.0, cmp.resolution_05
    # local searches were reached (HEALPix order 2 = auto_local_healpix_order)
    assert any("local searches" in line for line in logs)
    model = read_star(f"{root}_it005_half1_model.star")
    assert float(model["model_general"]["rlnSigmaPriorRotAngle"]) == pytest.approx(15.0)
    assert res.iteration == 6 and math.isfinite(res.resolution)


def test_files_are_relions(refined):
    root, res, _ = refined
    for name in (
        "_it001_half1_class001.mrc", "_it001_half2_class001.mrc", "_it001_half1_model.star",
        "_it001_half2_model.star", "_it001_data.star", "_it001_optimiser.star",
        "_it001_sampling.star", "_class001.mrc", "_half1_class001_unfil.mrc",
        "_half2_class001_unfil.mrc", "_model.star", "_data.star", "_optimiser.star",
    ):  # fmt: skip
        assert Path(f"{root}{name}").is_file(), name
    opt = read_star(f"{root}_it003_optimiser.star")["optimiser_general"]
    assert opt["rlnModelStarFile2"] == f"{root}_it003_half2_model.star"
    assert int(opt["rlnDoAutoRefine"]) == 1 and int(opt["rlnDoSplitRandomHalves"]) == 1
    model = read_star(f"{root}_it003_half1_model.star")
    fsc = model["model_class_1"]["rlnGoldStandardFsc"].to_numpy(float)
    assert fsc[0] == 1.0 and fsc[1] > 0.9 and fsc[-1] < 0.5
    assert model["model_classes"]["rlnReferenceImage"].iloc[0] == f"{root}_it003_half1_class001.mrc"
    data = read_star(res.data)["particles"]
    assert set(data["rlnRandomSubset"].unique()) == {1, 2}
    assert {"rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst"} <= set(data.columns)
    final = read_mrc(res.map)
    assert final[0].shape == (BOX,) * 3 and final[1] == pytest.approx(PIXEL)


def test_image_size_follows_relions_gold_standard_rule(sim: Path, tmp_path: Path):
    """RELION's updateImageSizeAndResolutionPointers: twice the resolution shell plus a quarter
    of the box's radius (4 here) once the FSC at an image's edge has been above 0.2 and while the
    average Pmax is above 0.1, else plus incr_size (which the FSC may have grown)."""
    from tamis.io.particles import ParticleSet
    from tamis.refine.auto_refine import AutoRefineRun

    run = AutoRefineRun(
        ParticleSet.from_file(sim / "particles.star"), _options(sim), str(tmp_path / "run")
    )
    run.initialise()
    st = run.state
    st.maxres, st.avg_pmax = 5, 0.5
    assert run.sizes()[0] == 2 * (5 + 10)
    run.history.has_high_fsc_at_limit = True
    assert run.sizes()[0] == 2 * (5 + 4)
    st.avg_pmax = 0.05  # broad posteriors: back to incr_size
    assert run.sizes()[0] == 2 * (5 + 10)
    run.incr_size = 12
    assert run.sizes()[0] == min(BOX, 2 * (5 + 12))
    # the final iteration uses every pixel
    run.history.final = True
    assert run.sizes()[0] == BOX


def test_continue_resumes_from_the_written_iteration(sim: Path, refined):
    root, res, _ = refined
    logs: list[str] = []
    more = run_auto_refine(
        None, "", _options(sim), continue_from=f"{root}_it004_optimiser.star", log=logs.append
    )
    assert any("continuing from iteration 4" in line for line in logs)
    assert more.iteration == 6 and more.map == res.map
    # the sampling state came back: iteration 5 ran locally at HEALPix order 2
    assert any("iteration   5" in line and "(local)" in line for line in logs)


def test_direction_sums_go_to_each_orientation_s_direction(refined, monkeypatch):
    """The learned direction prior's sums in a real E-step, global (iteration 3, HEALPix order
    1, every fine projection made) and local (iteration 4, order 2, made on demand): each
    pair's weight goes to the HEALPix direction nearest to its fine orientation once the
    iteration's perturbation is undone (its parent's), and the model.star tables are the
    iteration's shares (EM: mu 0)."""
    from tamis.class2d import em
    from tamis.class2d.files import continued_options, read_continue
    from tamis.geometry import euler_to_matrix
    from tamis.io.particles import ParticleSet
    from tamis.refine.auto_refine import AutoRefineRun

    root, _, _ = refined
    seen = []
    make_fine, add_sums = em._FineOnDemand.__call__, em.add_direction_sums

    def fine(self, coarse, need=None):
        out = make_fine(self, coarse, need)
        seen.append(self.used)
        return out

    for it in (3, 4):
        cont = read_continue(f"{root}_it00{it - 1}_optimiser.star")
        options = continued_options(cont, AutoRefineOptions(j=2), frozenset())
        run = AutoRefineRun(ParticleSet.from_file(cont.data_path), options, "/tmp/x", log=print)
        run.load_continue(f"{root}_it00{it - 1}_optimiser.star")
        checked = []

        def sums(out, hyp, n_over, nr_psi, batch_ids=None, run=run, checked=checked):
            add_sums(out, hyp, n_over, nr_psi, batch_ids)
            smp, hyp = run.sampling, hyp.to_pairs()
            used = seen[-1] if hyp.coarse_subset is not None else smp.fine_rotations()
            mine = torch.zeros_like(out)
            add_sums(mine, hyp, n_over, nr_psi, batch_ids)
            d = torch.tensor(smp.perturbation * smp.angular_step, dtype=torch.float64)
            rot = used[hyp.psi].to(torch.float64) @ euler_to_matrix(d, d, d).T
            grot, gtilt = (torch.deg2rad(a.to(torch.float64)) for a in smp.direction_angles)
            centres = torch.stack(
                [torch.cos(grot) * torch.sin(gtilt), torch.sin(grot) * torch.sin(gtilt),
                 torch.cos(gtilt)], 1,
            )  # fmt: skip
            # a rotation's viewing direction is its third row (RELION's Euler_angles2matrix)
            nearest = (rot[:, 2, :] @ centres.T).argmax(1)
            w = hyp.weight.sum(1)
            ref = torch.zeros_like(out).index_put_(
                (hyp.cls, nearest), w.to(out.dtype), accumulate=True
            )
            assert torch.allclose(mine, ref)
            checked.append(float(w.sum()))

        monkeypatch.setattr(em._FineOnDemand, "__call__", fine)
        monkeypatch.setattr(em, "add_direction_sums", sums)
        run.iterate(it)
        monkeypatch.undo()
        assert sum(checked) > 100 and run.local_searches() == (it == 4)
        table = read_star(f"{root}_it00{it}_half1_model.star")["model_pdf_orient_class_1"]
        written = table["rlnOrientationDistribution"].to_numpy(float)
        assert np.allclose(run.states[0].pdf_direction[0].numpy(), written, atol=1e-6)


def test_continue_reads_the_run_options_back(refined):
    """On --continue the options RELION keeps in the run's files come back from them, not from
    the command line's defaults: the local-search order, the join resolution, the solvent mask
    and its FSC correction (data_optimiser_general) and the padding (the model); an option the
    user typed (``changed``) wins, as in RELION."""
    from tamis.class2d.files import continued_options, read_continue

    root, _, _ = refined
    src = Path(f"{root}_it004_optimiser.star")
    blocks = read_star(src)
    general = blocks["optimiser_general"]
    general.update(
        rlnJoinHalvesUntilThisResolution=30.0, rlnSolventMaskName="mask.mrc",
        rlnDoSolventFscCorrection=1,
    )  # fmt: skip
    edited = src.with_name("edited_it004_optimiser.star")
    write_star(blocks, edited)
    defaults = AutoRefineOptions()  # what the CLI builds on --continue
    got = continued_options(read_continue(edited), defaults, frozenset())
    assert (got.auto_local_healpix_order, defaults.auto_local_healpix_order) == (2, 4)
    assert got.low_resol_join_halves == 30.0 and got.solvent_mask == "mask.mrc"
    assert got.solvent_correct_fsc and got.pad == 2 and got.sym == "C1"
    typed = replace(defaults, auto_local_healpix_order=3, pad=1)
    got = continued_options(read_continue(edited), typed, {"auto_local_healpix_order", "pad"})
    assert (got.auto_local_healpix_order, got.pad) == (3, 1)


def test_continue_keeps_the_point_group(sim: Path, tmp_path: Path):
    """A symmetric refinement continued without --sym goes on in its own point group (RELION
    reads it back from the sampling file); it used to go on in C1, with four times the
    orientations of a C4 search and unsymmetrised maps."""
    star, root = str(sim / "particles.star"), tmp_path / "Refine3D" / "run"
    run_auto_refine(star, str(root), _options(sim, sym="C2", iter=2))
    options = _options(sim, iter=3)  # as the CLI builds them on --continue: sym C1
    assert options.sym == "C1"
    run_auto_refine(None, "", options, continue_from=f"{root}_it001_optimiser.star")
    sampling = read_star(f"{root}_it002_sampling.star")["sampling_general"]
    assert str(sampling["rlnSymmetryGroup"]) == "C2"


def _iteration_one(sim: Path, root: Path) -> tuple[np.ndarray, np.ndarray]:
    """Iteration 1's orientation errors (deg) and half 1's map."""
    data = read_star(f"{root}_it001_data.star")["particles"]
    truth = truth_for(data, sim / "ground_truth.csv")
    err, _ = orientation_errors(data[ANGLES].to_numpy(), truth[["rot", "tilt", "psi"]].to_numpy())
    return err, read_mrc(f"{root}_it001_half1_class001.mrc")[0]


def test_firstiter_cc_takes_a_reference_on_another_grey_scale(sim: Path, tmp_path: Path):
    """A reference 1,000x off the particles' grey scale: likelihood weights in iteration 1 pick
    wrong orientations (the squared differences are all reference power); RELION's
    ``--firstiter_cc`` picks each particle's best cross-correlation instead, blind to the scale,
    and its maps come out on the particles' scale."""
    vol, px = read_mrc(sim / "ref.mrc")
    far = tmp_path / "far.mrc"
    write_mrc(far, vol * 1000.0, px, stack=False)
    star = str(sim / "particles.star")
    logs: list[str] = []
    cc_root = tmp_path / "cc" / "run"
    run_auto_refine(
        star, str(cc_root), _options(sim, ref=str(far), firstiter_cc=True, iter=2), log=logs.append
    )
    ml_root = tmp_path / "ml" / "run"
    run_auto_refine(star, str(ml_root), _options(sim, ref=str(far), iter=2))
    err_cc, map_cc = _iteration_one(sim, cc_root)
    err_ml, _ = _iteration_one(sim, ml_root)
    # 15 deg sampling at 40 A, one orientation per particle: median 19 deg (10 deg by
    # likelihood from the true scale); without the cross-correlation most are lost (122 deg)
    assert np.median(err_cc) < 30.0, np.percentile(err_cc, [25, 50, 75])
    assert np.median(err_ml) > 3 * np.median(err_cc), (np.median(err_ml), np.median(err_cc))
    # the new map is on the particles' grey scale (the true map's, low-passed), not 1,000x
    ratio = float(np.std(map_cc) / np.std(read_mrc(sim / "ref.mrc")[0]))
    assert 0.2 < ratio < 2.0, ratio
    model = read_star(f"{cc_root}_it001_half1_model.star")["model_general"]
    # RELION's model.star of that iteration: the average CC as the log-likelihood, Pmax 1,
    # and --ini_high's resolution kept for iteration 2
    assert 0.0 < float(model["rlnLogLikelihood"]) <= 1.0
    assert float(model["rlnAveragePmax"]) == 1.0
    assert float(model["rlnCurrentResolution"]) == pytest.approx(BOX * PIXEL / 4)
    # iteration 2 ran by likelihood on the new maps, and found the orientations
    data = read_star(f"{cc_root}_data.star")["particles"]
    truth = truth_for(data, sim / "ground_truth.csv")
    err, _ = orientation_errors(data[ANGLES].to_numpy(), truth[["rot", "tilt", "psi"]].to_numpy())
    assert np.median(err) < 15.0, np.percentile(err, [25, 50, 75])  # 11 deg


def test_half_one_does_not_see_half_two(sim: Path, tmp_path: Path):
    """Replacing every half-2 image by noise changes nothing in half 1's first iteration: its
    particles' orientations and its sums beyond the join resolution are the same."""
    from tamis.io.particles import ParticleBatch, ParticleSet
    from tamis.refine.auto_refine import AutoRefineRun

    ps = ParticleSet.from_file(sim / "particles.star")
    opts = _options(sim, iter=2)
    runs = []
    for noisy in (False, True):
        run = AutoRefineRun(
            ParticleSet.from_file(sim / "particles.star"), opts, str(tmp_path / "r")
        )
        if noisy:
            half2 = frozenset(run.order[run.half_of == 2].tolist())
            original = run.ps.load_images

            def load(indices, *, device="cpu", _half2=half2, _orig=original):
                img = _orig(indices, device=device)
                g = torch.Generator().manual_seed(5)
                for j, i in enumerate(np.asarray(indices)):
                    if int(i) in _half2:
                        img[j] = torch.randn(img.shape[1:], generator=g).to(img)
                return img

            run.ps.load_images = load
            run.ps.batches = lambda size, *, indices, device="cpu", prefetch=True, _l=load: (
                ParticleBatch(indices[s : s + size], _l(indices[s : s + size], device=device))
                for s in range(0, len(indices), size)
            )
        run.initialise()
        run.iterate(1)
        runs.append(run)
    a, b = runs
    h1 = a.half_of == 1
    assert np.array_equal(a.half_of, b.half_of) and len(ps) == a.n
    np.testing.assert_allclose(a.angles_of(np.flatnonzero(h1)), b.angles_of(np.flatnonzero(h1)))
    np.testing.assert_allclose(a.origin[h1], b.origin[h1])
    assert not np.allclose(a.angles_of(np.flatnonzero(~h1)), b.angles_of(np.flatnonzero(~h1)))


def test_both_halves_share_one_sampling_perturbation_per_iteration(sim: Path, tmp_path: Path):
    """RELION perturbs the sampling once per iteration (``expectationSetup``), for both halves:
    each half's E-step sees the same instance, the one written to the sampling file, and the
    instance moves by RELION's step (U(f/2, f), wrapped into [-f, f]) from one iteration to the
    next, drawn as RELION draws it for the run's seed."""
    from tamis.io.particles import ParticleSet
    from tamis.refine.auto_refine import AutoRefineRun

    run = AutoRefineRun(ParticleSet.from_file(sim / "particles.star"), _options(sim, iter=3), "x")
    seen: list[tuple[int, float]] = []
    estep = run.expectation_step

    def spy(it, rows, **kw):
        out = estep(it, rows, **kw)
        seen.append((it, run.sampling.perturbation))
        return out

    run.expectation_step = spy
    run.initialise()
    for it in (1, 2):
        run.iterate(it)
        assert run.state.perturbation == seen[-1][1]
    assert [it for it, _ in seen] == [1, 1, 2, 2]
    assert seen[0][1] == seen[1][1] and seen[2][1] == seen[3][1]
    # --random_seed 1: RELION 5.0.1's instances for that seed (its run_it001/2_sampling.star)
    assert [seen[0][1], seen[2][1]] == pytest.approx([-0.11471, 0.275636], abs=1e-5)
    f = run.sampling.perturb_factor
    step = (seen[2][1] - seen[0][1]) % (2 * f)
    assert 0.5 * f <= step <= f, (seen, step)


def test_local_priors_match_a_slow_loop():
    smp = Sampling3D(offset_range=3, offset_step=1, oversampling=1, healpix_order=2, sym="C1")
    rng = np.random.default_rng(0)
    angles = np.stack(
        [rng.uniform(-180, 180, 5), rng.uniform(0, 180, 5), rng.uniform(-180, 180, 5)], 1
    )
    sigma = 10.0
    ids, logp = local_priors(angles, smp, sigma)
    grot, gtilt = (t.numpy() for t in smp.direction_angles)
    psis = smp.psi.numpy()

    def unit(rot, tilt):
        r, t = np.deg2rad(rot), np.deg2rad(tilt)
        return np.array([np.cos(r) * np.sin(t), np.sin(r) * np.sin(t), np.cos(t)])

    for i, (rot, tilt, psi) in enumerate(angles):
        p = unit(rot, tilt)
        dd = np.array(
            [
                np.degrees(np.arccos(np.clip(p @ unit(a, b), -1, 1)))
                for a, b in zip(grot, gtilt, strict=True)
            ]
        )
        dp = np.array([abs((psi - q + 180) % 360 - 180) for q in psis])
        kd, kp = dd < 3 * sigma, dp < 3 * sigma
        wd = np.where(kd, np.exp(-(dd**2) / (2 * sigma**2)), 0)
        wp = np.where(kp, np.exp(-(dp**2) / (2 * sigma**2)), 0)
        wd, wp = wd / wd.sum(), wp / wp.sum()
        want = {
            d * len(psis) + q: wd[d] * wp[q] for d in np.flatnonzero(kd) for q in np.flatnonzero(kp)
        }
        got = {
            int(j): float(np.exp(v))
            for j, v in zip(ids.tolist(), logp[i].tolist(), strict=True)
            if np.isfinite(v)
        }
        assert set(got) == set(want)
        for j in want:
            assert got[j] == pytest.approx(want[j], rel=1e-9)


def test_orientation_prior_in_the_e_step_equals_a_search_over_the_subset():
    """A -inf prior outside a subset of coarse orientations gives the E-step over that subset."""
    from tamis.class2d.likelihood import BatchData, expectation

    gen = torch.Generator().manual_seed(0)
    b, k, pc, c, tc, nover = 3, 1, 12, 40, 5, 2
    proj_c = torch.randn((k, pc, c), dtype=torch.complex64, generator=gen)
    proj_f = torch.randn((k, pc * nover, c), dtype=torch.complex64, generator=gen)
    x = torch.randn((b, c), dtype=torch.complex64, generator=gen) * 3
    data = BatchData(
        x=x, xu=x, ctf=torch.ones((b, c)), sigma2=torch.full((b, c), 2.0),
        dc=torch.zeros(c, dtype=torch.bool), high_xi2=torch.zeros(b, dtype=torch.float64),
        offset_px=torch.zeros((b, 2), dtype=torch.float64),
    )  # fmt: skip
    ramps = torch.exp(1j * torch.rand((tc, c), generator=gen)).to(torch.complex64)
    pix = torch.arange(c)
    lpo = torch.zeros((b, k, tc), dtype=torch.float64)
    keep = torch.tensor([0, 3, 4, 7, 10])
    prior = torch.full((b, pc), -math.inf, dtype=torch.float64)
    prior[:, keep] = torch.log(torch.tensor([0.1, 0.3, 0.2, 0.25, 0.15], dtype=torch.float64))
    common = dict(
        coarse_pixels=pix, estep_pixels=pix, ramps_coarse=ramps, ramps_fine=ramps,
        log_prior_offset=lpo, log_prior_class=torch.zeros(k, dtype=torch.float64),
        n_over_psi=nover, n_over_trans=1,
    )  # fmt: skip
    full = expectation(data, proj_coarse=proj_c, proj_fine=proj_f, log_prior_orient=prior, **common)
    fine_keep = (keep[:, None] * nover + torch.arange(nover)).reshape(-1)
    sub = expectation(
        data, proj_coarse=proj_c[:, keep], proj_fine=proj_f[:, fine_keep],
        log_prior_orient=prior[:, keep], **common,
    )  # fmt: skip
    assert torch.equal(fine_keep[sub.best_psi], full.best_psi)
    torch.testing.assert_close(full.loglik, sub.loglik)
    torch.testing.assert_close(full.pmax, sub.pmax, rtol=1e-5, atol=1e-6)


def _relion_round(x: float) -> int:
    """macros.h: ``((x) > 0) ? (int)((x) + 0.5) : (int)((x) - 0.5)`` (C casts truncate)."""
    return int(x + 0.5) if x > 0 else int(x - 0.5)


def _slow_average(d, w, pad, box):
    """getDownsampledAverage as RELION loops: over the padded half grid ``qx >= 0`` only, each
    coordinate ROUND(q / pad); the bins ``kx >= 0`` (those the FSC reads) are compared."""
    m = d.shape[-1]
    num = np.zeros((box,) * 3, dtype=complex)
    den = np.zeros((box,) * 3)
    for z in range(m):
        for y in range(m):
            for x in range(m // 2, m):
                k = [_relion_round((v - m // 2) / pad) for v in (z, y, x)]
                if all(-box // 2 <= v < box // 2 for v in k):
                    idx = tuple(v + box // 2 for v in k)
                    num[idx] += d[z, y, x]
                    den[idx] += w[z, y, x]
    out = np.where(den > 0, num / np.where(den > 0, den, 1), 0)
    return out[..., box // 2 :]


def test_gold_standard_fsc_and_join_match_slow_loops():
    gen = torch.Generator().manual_seed(1)
    box, pad = 6, 2
    m = box * pad
    d1, d2 = (torch.randn((m, m, m), dtype=torch.complex128, generator=gen) for _ in range(2))
    w1, w2 = (torch.rand((m, m, m), dtype=torch.float64, generator=gen) + 0.1 for _ in range(2))
    a1 = _slow_average(d1.numpy(), w1.numpy(), pad, box)
    got_avg = downsampled_average(d1, w1, pad, box).numpy()[..., box // 2 :]
    np.testing.assert_allclose(got_avg, a1, atol=1e-12)
    assert _relion_round(-0.5) == -1 and int(relion_round(torch.tensor(-0.5))) == -1
    assert _relion_round(-1.5) == -2 and int(relion_round(torch.tensor(-1.5))) == -2
    a2 = _slow_average(d2.numpy(), w2.numpy(), pad, box)
    num, p1, p2 = (np.zeros(box // 2 + 1) for _ in range(3))
    for z in range(box):
        for y in range(box):
            for x in range(box // 2, box):
                r = math.sqrt(sum((v - box // 2) ** 2 for v in (z, y, x)))
                s = math.floor(r + 0.5)
                if r <= 2.5 and s <= box // 2:
                    a, b = a1[z, y, x - box // 2], a2[z, y, x - box // 2]
                    num[s] += (a * np.conj(b)).real
                    p1[s] += abs(a) ** 2
                    p2[s] += abs(b) ** 2
    want = np.where(p1 * p2 > 0, num / np.sqrt(np.maximum(p1 * p2, 1e-300)), 0)
    want[0] = 1
    got = half_sums_fsc(d1[None][0], w1, d2, w2, pad=pad, box=box, r_max=2.5)
    np.testing.assert_allclose(got.numpy(), want, atol=1e-12)
    # the join: inside ROUND(pad R)^2 both halves hold the mean, outside their own
    j1, jw1, j2, _ = join_low_resolution(d1[None], w1[None], d2[None], w2[None], pad=pad, shell=1)
    c = torch.arange(m) - m // 2
    q2 = c[:, None, None] ** 2 + c[None, :, None] ** 2 + c[None, None, :] ** 2
    inside = q2 <= 4
    assert torch.equal(j1[0][inside], ((d1 + d2) / 2)[inside])
    assert torch.equal(j2[0][inside], j1[0][inside]) and torch.equal(j1[0][~inside], d1[~inside])
    assert torch.equal(jw1[0][~inside], w1[~inside])


def test_image_size_increment_follows_the_fsc():
    fsc = torch.tensor([1.0, 0.99, 0.9, 0.7, 0.45, 0.3, 0.2, 0.1, 0.05, 0.0])
    incr, high = image_size_increment(fsc, 10, 16)
    assert incr == 10 and not high  # 0.5 at 4, 0.143 at 7: 7 - 4 + 5 = 8 < 10; FSC(7) = 0.1
    incr, high = image_size_increment(fsc, 2, 12)
    assert incr == 8 and high  # FSC(5) = 0.3 > 0.2
    _, high = image_size_increment(fsc, 2, 18)
    assert not high  # FSC(8) = 0.05


def test_resize_map_keeps_a_blob_in_angstrom():
    n, p = 32, 2.0
    c = torch.arange(n, dtype=torch.float64) - n // 2
    r2 = c[:, None, None] ** 2 + c[None, :, None] ** 2 + c[None, None, :] ** 2
    blob = torch.exp(-r2 * p * p / (2 * 8.0**2))  # sigma 8 A
    small = resize_map(blob, p, 4.0, 20)  # 16 voxels of 4 A, padded to 20
    c2 = torch.arange(20, dtype=torch.float64) - 10
    r2b = c2[:, None, None] ** 2 + c2[None, :, None] ** 2 + c2[None, None, :] ** 2
    want = torch.exp(-r2b * 16.0 / (2 * 8.0**2))
    assert float((small - want).abs().max()) < 0.02


def test_bad_input_is_one_clear_error(sim: Path, tmp_path: Path):
    star = str(sim / "particles.star")
    with pytest.raises(TamisError, match="--K must be 1"):
        run_auto_refine(star, str(tmp_path / "a" / "run"), _options(sim, K=2))
    with pytest.raises(TamisError, match="reference map not found"):
        run_auto_refine(star, str(tmp_path / "b" / "run"), _options(sim, ref="nope.mrc"))
    mask = tmp_path / "mask.mrc"
    write_mrc(mask, np.ones((16, 16, 16), np.float32), PIXEL, stack=False)
    with pytest.raises(TamisError, match="mask of 16x16x16 voxels"):
        run_auto_refine(star, str(tmp_path / "c" / "run"), _options(sim, solvent_mask=str(mask)))
    vol, _ = read_mrc(sim / "ref.mrc")
    other = tmp_path / "other.mrc"
    write_mrc(other, vol, 2.5, stack=False)  # wrong pixel size in the header
    with pytest.raises(TamisError, match="--trust_ref_size rescales it"):
        run_auto_refine(
            star, str(tmp_path / "d" / "run"), _options(sim, ref=str(other), trust_ref_size=False)
        )
    # a half-set column holding other values
    blocks = read_star(star)
    blocks["particles"]["rlnRandomSubset"] = 3
    bad = sim / "bad_subset.star"
    write_star(blocks, bad)
    with pytest.raises(TamisError, match="rlnRandomSubset holds"):
        run_auto_refine(str(bad), str(tmp_path / "e" / "run"), _options(sim))


def test_a_reference_of_another_pixel_size_is_rescaled_with_a_warning(sim: Path, tmp_path: Path):
    from tamis.io.particles import ParticleSet
    from tamis.refine.auto_refine import AutoRefineRun

    vol, _ = read_mrc(sim / "ref.mrc")
    big = resize_map(torch.from_numpy(vol), PIXEL, 2.5, 64).numpy()
    other = tmp_path / "big.mrc"
    write_mrc(other, big, 2.5, stack=False)
    logs: list[str] = []
    run = AutoRefineRun(
        ParticleSet.from_file(sim / "particles.star"), _options(sim, ref=str(other), ini_high=-1),
        str(tmp_path / "run"), log=logs.append,
    )  # fmt: skip
    ref = run.reference_map()
    assert any("rescaled to 32 voxels of 5 A" in line for line in logs)
    a, b = ref.flatten().double(), torch.from_numpy(vol).flatten().double()
    assert float(torch.corrcoef(torch.stack([a, b]))[0, 1]) > 0.99


def test_cli_runs_auto_refine(sim: Path, tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(
        app,
        [
            "refine", "--auto_refine", "--split_random_halves", "--i", str(sim / "particles.star"),
            "--ref", str(sim / "ref.mrc"), "--ini_high", "40", "--o", "Refine3D/job001/run",
            "--ctf", "--flatten_solvent", "--zero_mask", "--particle_diameter", "130",
            "--healpix_order", "1", "--auto_local_healpix_order", "2", "--iter", "2",
            "--offset_range", "5", "--offset_step", "2", "--sym", "C1", "--random_seed", "1",
            "--j", "2",
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "Refine3D/job001/run_class001.mrc" in result.output
    assert Path("Refine3D/job001/run_half2_class001_unfil.mrc").is_file()
    bad = CliRunner().invoke(app, ["refine", "--auto_refine", "--i", "x.star", "--o", "R/run"])
    assert bad.exit_code != 0 and "--split_random_halves" in bad.output


def test_refine3d_job_with_a_reference_off_the_grey_scale_runs_firstiter_cc(monkeypatch, tmp_path):
    """The Refine3D job's "Ref. map is on absolute greyscale? No" is ``--firstiter_cc``."""
    import tamis.refine.auto_refine as ar
    from tamis.pipeline import jobs
    from tamis.pipeline.job import JobStar

    seen: list[AutoRefineOptions] = []

    class Captured(Exception):
        pass

    def capture(particles, root, options, **kw):
        seen.append(options)
        raise Captured

    monkeypatch.setattr(ar, "run_auto_refine", capture)
    for answer, want in (("No", True), ("Yes", False)):
        job = JobStar(
            "relion.refine3d",
            options={"fn_img": "p.star", "fn_ref": "r.mrc", "ref_correct_greyscale": answer},
        )
        with pytest.raises(Captured):
            jobs._run_refine3d(job, tmp_path)
        assert seen[-1].firstiter_cc is want
