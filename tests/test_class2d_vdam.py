"""VDAM (--grad): schedules against RELION's formulas, moment and update kernels against slow
numpy loops, and small end-to-end runs (files, truth recovery, continue, CLI)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from tamis.class2d import Class2DOptions, run_class2d
from tamis.class2d.mstep import shift_classes
from tamis.class2d.schedule import VdamSchedule
from tamis.class2d.vdam import (
    Moments,
    gradient_update,
    moments_from_half,
    moments_to_half,
    shift_moments,
    update_moments,
)
from tamis.errors import TamisError
from tamis.io.mrc import read_mrc
from tamis.io.star import read_star
from tamis.masks import soft_mask_outside
from tamis.simulate.truth import truth_for
from tests.helpers import tiny_particles

# ---- schedules -------------------------------------------------------------------------------


def relion_sigmoid(x, b, a):
    return 1.0 / (10 ** ((x - b - a / 2.0) / (a / 4.0)) + 1.0)


def test_schedule_phases_and_subsets_follow_relion():
    o = Class2DOptions.gui_vdam(K=10)
    sch = VdamSchedule.create(o, 100_000)
    assert (sch.ini_iter, sch.between_iter, sch.fin_iter, sch.n_iter) == (60, 100, 40, 200)
    assert (sch.ini_subset, sch.fin_subset) == (500, 5000)
    for it in range(1, 201):
        if it < 60:
            want = 500
        elif it < 160:
            want = 500 + math.floor((it - 60) / 100 * 4500 + 0.5)
        else:
            want = 5000
        if it == 200:
            want = -1  # final pass over every particle (K > 1)
        assert sch.subset_size(it) == want, it
    assert sch.subset_size(110) == 2750
    # K = 1: no final all-particle pass; tiny data sets use every particle
    assert VdamSchedule.create(Class2DOptions.gui_vdam(K=1), 100_000).subset_size(200) == 5000
    small = VdamSchedule.create(o, 3000)
    assert (small.ini_subset, small.fin_subset) == (200, 1000)
    assert small.subset_size(150) == 200 + 720
    tiny = VdamSchedule.create(o, 900)
    assert tiny.subset_size(100) == 520 and tiny.subset_size(150) == -1  # 920 >= 900: all
    assert tiny.mu(150, 0.9) == 0.0 and tiny.mu(100, 0.9) == 0.9
    # mini-batch bounds: 10,000 and 100,000
    big = VdamSchedule.create(o, 10_000_000)
    assert (big.ini_subset, big.fin_subset) == (10000, 100000)
    total = sum(sch.subset_size(it) if sch.subset_size(it) > 0 else 100_000 for it in range(1, 201))
    assert sch.particles_evaluated() == total


def test_step_size_and_tau2_schedules_follow_relion():
    o = Class2DOptions.gui_vdam(K=10)  # T = 2 from the GUI
    sch = VdamSchedule.create(o, 100_000)
    for it in range(0, 201):
        s = relion_sigmoid(it, 60, 50)
        assert sch.step_size(it) == pytest.approx(0.9 * s + 0.3 * (1 - s), rel=1e-12)
        t = relion_sigmoid(it, 60, 25)
        assert sch.tau2_fudge_at(it) == pytest.approx(1 * t + 2 * (1 - t), rel=1e-12)
    # the reference doc's worked numbers
    assert sch.step_size(50) == pytest.approx(0.9, abs=0.005)
    assert sch.step_size(85) == pytest.approx(0.6, abs=1e-9)
    assert sch.step_size(100) == pytest.approx(0.34, abs=0.01)
    assert sch.step_size(130) == pytest.approx(0.3, abs=0.002)
    assert sch.tau2_fudge_at(72.5) == pytest.approx(1.5)
    assert sch.tau2_fudge_at(0) == pytest.approx(1.0, abs=1e-6)
    # per-class step and momentum
    pdf = torch.tensor([0.0, 0.01, 0.1])
    eta = sch.class_step_sizes(100, pdf)
    want = sch.step_size(100) * (1 - torch.exp(-(3 * 10 + 10) * pdf))
    assert torch.allclose(eta, want)
    assert sch.mu(199, 0.9) == 0.9 and sch.mu(200, 0.9) == 0.0
    assert [sch.replaces_classes(i) for i in (60, 61, 159, 160)] == [False, True, True, False]
    assert [sch.centres(i) for i in (159, 160, 199, 200)] == [True, False, False, True]
    assert [sch.writes(i, 10) for i in (0, 5, 10, 199, 200)] == [True, False, True, False, True]
    # iterations over every particle are always written (RELION writes unless subset > 0)
    tiny = VdamSchedule.create(o, 900)
    assert tiny.writes(155, 10) and not tiny.writes(105, 10)
    with pytest.raises(TamisError, match="grad_ini_frac"):
        VdamSchedule.create(Class2DOptions(grad=True, grad_ini_frac=1.0), 10)
    odd = VdamSchedule.create(
        Class2DOptions(grad=True, iter=100, grad_ini_frac=0.6, grad_fin_frac=0.5), 10
    )
    assert (odd.ini_iter, odd.fin_iter, odd.between_iter) == (
        49,
        41,
        10,
    )  # fractions / 1.2 (0.6 / 1.2 < 0.5 in floating point, as in RELION)
    # default T for VDAM without --tau2_fudge: 4 (RELION's internal default)
    assert VdamSchedule.create(Class2DOptions(grad=True, iter=200), 1000).tau2_fudge_at(200) == (
        pytest.approx(4.0, rel=1e-6)
    )
    plain = VdamSchedule.create(
        Class2DOptions(grad=True, grad_stepsize_scheme="plain", tau2_fudge_scheme="plain"), 10
    )
    assert plain.step_size(3) == 0.3 and plain.tau2_fudge_at(0) == 4.0
    with pytest.raises(TamisError, match="grad_stepsize_scheme"):
        VdamSchedule.create(Class2DOptions(grad=True, grad_stepsize_scheme="fast"), 10)


# ---- kernels against loops -------------------------------------------------------------------


def _shells(m: int, pad: int):
    c = np.arange(m) - m // 2
    q = np.hypot(*np.meshgrid(c, c, indexing="ij"))
    return q, np.floor(q / pad + 0.5).astype(int)


def test_update_moments_against_loop():
    g = torch.Generator().manual_seed(0)
    k, m, pad, r_max, nsh = 2, 16, 2, 3.0, 5
    d = torch.complex(torch.randn(2 * k, m, m, generator=g), torch.randn(2 * k, m, m, generator=g))
    d = d.to(torch.complex128)
    w = (torch.rand(2 * k, m, m, generator=g, dtype=torch.float64) * 3).clamp(min=0.0)
    mom = Moments.initial(k, m, "cpu")
    mom.m1[1] = torch.randn(m, m, generator=g, dtype=torch.float64) + 0j  # class 1 half 1 seen
    mom.m1[3] = torch.randn(m, m, generator=g, dtype=torch.float64) + 0j
    mom.m2[1] = 1 + torch.rand(m, m, generator=g, dtype=torch.float64)
    m1_old, m2_old = mom.m1.numpy().copy(), mom.m2.numpy().copy()
    update = torch.tensor([True, True])
    u, noise = update_moments(mom, d, w, update=update, r_max=r_max, pad=pad, n_shells=nsh)

    dn, wn = d.numpy(), w.numpy()
    q, ires = _shells(m, pad)
    lim = math.floor(r_max * pad + 0.5) ** 2
    m1, m2 = m1_old.copy(), m2_old.copy()
    u_ref = np.zeros((k, m, m), complex)
    noise_sum = np.zeros((k, nsh))
    count = np.zeros(nsh)
    for c in range(k):
        for h in range(2):
            s = c + h * k
            first = m1_old[s].sum() == 0
            for i in range(m):
                for j in range(m):
                    if q[i, j] ** 2 < lim:
                        gv = dn[s, i, j] / max(1.0, wn[s, i, j])
                        m1[s, i, j] = gv if first else 0.9 * m1_old[s, i, j] + 0.1 * gv
        for i in range(m):
            for j in range(m):
                if q[i, j] ** 2 < lim:
                    g1 = dn[c, i, j] / max(1.0, wn[c, i, j])
                    g2 = dn[c + k, i, j] / max(1.0, wn[c + k, i, j])
                    ratio = abs(g2 - g1) ** 2 / (abs((g1 + g2) / 2) ** 2 + 1e-12)
                    m2[c, i, j] = 0.999 * m2_old[c, i, j] + 0.001 * ratio
                    u_ref[c, i, j] = (
                        (m1[c, i, j] + m1[c + k, i, j]) / 2 / (np.sqrt(m2[c, i, j]) + 1e-12)
                    )
                    noise_sum[c, ires[i, j]] += abs(m1[c, i, j] - m1[c + k, i, j])
                    if c == 0:
                        count[ires[i, j]] += 1
    np.testing.assert_allclose(mom.m1.numpy(), m1, atol=1e-12)
    np.testing.assert_allclose(mom.m2.numpy(), m2, atol=1e-12)
    np.testing.assert_allclose(u.numpy(), u_ref, atol=1e-12)
    np.testing.assert_allclose(noise.numpy(), noise_sum / np.maximum(count, 1), atol=1e-12)


def test_gradient_update_against_loop():
    g = torch.Generator().manual_seed(1)
    k, n, pad, r_max, t = 2, 8, 2, 3.0, 1.7
    m = pad * n
    refs = torch.randn(k, n, n, generator=g, dtype=torch.float64)
    u = torch.complex(torch.randn(k, m, m, generator=g), torch.randn(k, m, m, generator=g))
    u = u.to(torch.complex128)
    noise = torch.rand(k, n // 2 + 1, generator=g, dtype=torch.float64) + 0.1
    noise[0, 2] = 0.0  # no noise estimate in a shell -> SNR 0 there
    step = torch.tensor([0.9, 0.2], dtype=torch.float64)
    out = gradient_update(refs, u, noise, step=step, tau2_fudge=t, r_max=r_max, pad=pad)

    q, ires = _shells(m, pad)
    lim = math.floor(r_max * pad + 0.5) ** 2
    want = []
    for c in range(k):
        padded = np.zeros((m, m))
        padded[m // 2 - n // 2 : m // 2 + n // 2, m // 2 - n // 2 : m // 2 + n // 2] = refs[c]
        f = np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(padded))) / (m * m) * pad * pad
        f[q**2 > lim] = 0
        amp, cnt = np.zeros(n // 2 + 1), np.zeros(n // 2 + 1)
        for i in range(m):
            for j in range(m):
                if q[i, j] ** 2 < lim:
                    amp[ires[i, j]] += abs(f[i, j])
                    cnt[ires[i, j]] += 1
        fsc = np.zeros(n // 2 + 1)
        for s in range(n // 2 + 1):
            if cnt[s] > 0:
                a = amp[s] / cnt[s]
                nz = noise[c, s].item()
                snr = 2 * t * a / nz if nz > 0 else 0.0
                fsc[s] = min(max(snr / (1 + snr), 0.0), 1.0)
        new = np.zeros((m, m), complex)
        for i in range(m):
            for j in range(m):
                if q[i, j] ** 2 < lim:
                    fs = fsc[ires[i, j]]
                    new[i, j] = f[i, j] + step[c].item() * (
                        fs * u[c, i, j].item() - (1 - fs) * f[i, j]
                    )
                elif q[i, j] ** 2 == lim:
                    new[i, j] = f[i, j]  # the outermost ring keeps the reference
        img = np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(new / (pad * pad)))).real * m * m
        want.append(img[m // 2 - n // 2 : m // 2 + n // 2, m // 2 - n // 2 : m // 2 + n // 2])
    want = soft_mask_outside(torch.from_numpy(np.stack(want)), n / 2, 3.0)
    np.testing.assert_allclose(out.numpy(), want.numpy(), atol=1e-5 * float(want.abs().max()))


def test_shift_moments_follows_the_centring_shift():
    from tamis.class2d.fourier2d import padded_transforms

    n, pad = 16, 2
    img = torch.zeros(1, n, n, dtype=torch.float64)
    img[0, 6:9, 7:11] = torch.arange(12, dtype=torch.float64).reshape(3, 4) + 1
    com = torch.tensor([[2.0, -1.0]], dtype=torch.float64)
    moved = shift_classes(img, com)
    grid = padded_transforms(img, pad=pad, gridding=False)
    mom = Moments(m1=torch.cat([grid, grid]), m2=torch.ones(1, pad * n, pad * n))
    shift_moments(mom, com)
    want = padded_transforms(moved, pad=pad, gridding=False)
    assert torch.allclose(mom.m1[0], want[0], atol=1e-9)
    assert torch.allclose(mom.m1[1], want[0], atol=1e-9)


def test_moment_images_round_trip_relion_half_plane_layout():
    from tamis.class2d.fourier2d import padded_transforms

    g = torch.Generator().manual_seed(3)
    grid = padded_transforms(torch.randn(3, 8, 8, generator=g, dtype=torch.float64), pad=2)
    half = moments_to_half(grid)
    assert half.shape == (3, 16, 2 * 9)
    # row 0 is ky = -M/2, column pair 0 is kx = 0 (real, imaginary)
    assert half[0, 8, 0] == pytest.approx(float(grid[0, 8, 8].real), rel=1e-6)
    back = moments_from_half(half)
    assert torch.allclose(back, grid, atol=1e-5 * float(grid.abs().max()))


# ---- end to end ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    out = tmp_path_factory.mktemp("vdam")
    tiny_particles(out / "sim", n=600, seed=4)
    return out


def options(**kw) -> Class2DOptions:
    base = dict(
        K=4,
        iter=20,
        particle_diameter=130.0,
        psi_step=20.0,
        offset_range=3.0,
        offset_step=1.5,
        random_seed=5,
        batch_size=64,
        grad_ini_subset=100,
        grad_fin_subset=300,
        grad_write_iter=5,
    )
    base.update(kw)
    return Class2DOptions.gui_vdam(**base)


@pytest.fixture(scope="module")
def full_run(sim):
    root = str(sim / "full" / "run")
    lines: list[str] = []
    result = run_class2d(sim / "sim" / "particles.star", root, options(), log=lines.append)
    return root, result, lines


def test_vdam_files_and_labels(full_run):
    root, result, lines = full_run
    written = sorted(int(p.name[6:9]) for p in Path(root).parent.glob("run_it*_optimiser.star"))
    assert written == [0, 5, 10, 15, 20]
    assert result.particles_evaluated == VdamSchedule.create(options(), 600).particles_evaluated()
    model = read_star(result.model)
    classes = model["model_classes"]
    assert classes["rlnGradMoment1"].iloc[1] == f"000002@{root}_it020_1moment.mrcs"
    m1, _ = read_mrc(f"{root}_it020_1moment.mrcs")
    m2, _ = read_mrc(f"{root}_it020_2moment.mrcs")
    assert m1.shape == (8, 64, 66) and m2.shape == (4, 64, 66)
    assert model["model_general"]["rlnTau2FudgeFactor"] == pytest.approx(2.0, rel=1e-3)
    opt = read_star(result.optimiser)["optimiser_general"]
    assert opt["rlnDoGradientRefine"] == 1 and opt["rlnDoStochasticGradientDescent"] == 1
    assert opt["rlnSgdInitialSubsetSize"] == 100 and opt["rlnSgdFinalSubsetSize"] == 300
    assert opt["rlnSgdClassInactivityThreshold"] == pytest.approx(0.1)
    assert opt["rlnTau2FudgeArg"] == pytest.approx(2.0)
    # the log names the mini-batch of each iteration; the final pass takes every particle
    assert "iteration   1: 100 particles" in lines[1]
    assert any(line.startswith("iteration  20: 600 particles") for line in lines)


def test_vdam_assigns_every_particle_and_separates_junk(sim, full_run):
    root, result, _ = full_run
    data = read_star(result.data)["particles"]
    cls = data["rlnClassNumber"].to_numpy()
    assert set(cls) <= {1, 2, 3, 4}
    truth = truth_for(data, sim / "sim" / "ground_truth.csv")
    kind = truth["kind"].to_numpy()
    junk = kind != "particle"
    junk_class = {c: junk[cls == c].mean() >= 0.5 for c in set(cls)}
    in_junk_class = np.array([junk_class[c] for c in cls])
    # Ice gets a class of its own and true particles stay out of junk classes. (With K = 4 and
    # 20 short mini-batch steps the 30 empty boxes are not separated; EM's test does that.)
    assert in_junk_class[kind == "ice"].mean() >= 0.8
    assert in_junk_class[~junk].mean() <= 0.05


def test_vdam_continue_equals_uninterrupted(sim, full_run):
    root, result_full, _ = full_run
    result = run_class2d(
        None,
        str(sim / "cont" / "run"),
        options(iter=20),
        continue_from=f"{root}_it010_optimiser.star",
        log=lambda s: None,
    )
    assert result.iteration == 20
    a = read_star(result_full.data)["particles"]
    b = read_star(result.data)["particles"]
    assert np.mean(a["rlnClassNumber"].to_numpy() == b["rlnClassNumber"].to_numpy()) >= 0.95
    ra, _ = read_mrc(result_full.classes)
    rb, _ = read_mrc(result.classes)
    assert np.abs(ra - rb).max() <= 0.05 * np.abs(ra).max()


def test_cli_grad(sim):
    from typer.testing import CliRunner

    from tamis.cli.main import app

    args = ["class2d", "--i", str(sim / "sim" / "particles.star"), "--o", str(sim / "cli" / "run")]
    args += ["--grad", "--iter", "4", "--grad_write_iter", "2", "--K", "2", "--ctf"]
    args += ["--zero_mask", "--psi_step", "30", "--offset_range", "2", "--offset_step", "2"]
    args += ["--random_seed", "1", "--device", "cpu", "--class_inactivity_threshold", "0.1"]
    args += ["--grad_ini_subset", "100", "--grad_fin_subset", "200"]
    out = CliRunner().invoke(app, args)
    assert out.exit_code == 0, out.output
    assert (sim / "cli" / "run_it004_optimiser.star").is_file()
    assert not (sim / "cli" / "run_it003_optimiser.star").exists()
    opt = read_star(sim / "cli" / "run_it004_optimiser.star")["optimiser_general"]
    assert opt["rlnDoGradientRefine"] == 1 and opt["rlnTau2FudgeArg"] == -1.0
    model = read_star(sim / "cli" / "run_it004_model.star")["model_general"]
    assert model["rlnTau2FudgeFactor"] == pytest.approx(4.0, rel=0.01)  # VDAM's default T


def _vdam_run(sim, **kw):
    from tamis.class2d.vdam import VdamRun
    from tamis.io.particles import ParticleSet

    ps = ParticleSet.from_file(sim / "sim" / "particles.star")
    run = VdamRun(ps, options(**kw), str(sim / "unit" / "run"), log=lambda s: None)
    run.initialise()
    return run


def test_pseudo_half_sets_split_the_em_sums_by_row_parity(sim):
    from tamis.class2d.em import Class2DRun
    from tamis.io.particles import ParticleSet

    rows = np.arange(0, 200)
    a = _vdam_run(sim)
    step_h = a.expectation_step(1, rows, halves=True)
    ps = ParticleSet.from_file(sim / "sim" / "particles.star")
    b = Class2DRun(ps, options(grad=False), str(sim / "unit2" / "run"), log=lambda s: None)
    b.initialise()
    step = b.expectation_step(1, rows, halves=False)
    k = 4
    # the splatted weights (the E-step hands over padded grids, 2K of them with half-sets)
    assert step_h.w.shape[0] == 2 * k and step.w.shape[0] == k
    assert torch.allclose(step_h.w[:k] + step_h.w[k:], step.w, rtol=1e-4, atol=1e-6)
    assert torch.allclose(step_h.sums.pdf_class, step.sums.pdf_class)
    # odd rows (RELION's part_id % 2 == 1) only in the second half-set
    odd = _vdam_run(sim).expectation_step(1, np.arange(1, 200, 2), halves=True)
    assert float(odd.w[:k].sum()) == 0.0 and float(odd.w[k:].sum()) > 0


def test_inactive_class_replaced_by_the_class_with_largest_gradient(sim):
    run = _vdam_run(sim)
    st = run.state
    st.pdf_class = torch.tensor([0.5, 0.3, 0.195, 0.005], dtype=torch.float64)
    run.moments.m1[1] = 1.0 + 2.0j
    run.moments.m1[5] = 3.0
    run.moments.m2[1] = 7.0
    avg_err = torch.tensor([0.1, 0.9, 0.2, 0.0], dtype=torch.float64)
    assert run._replace_inactive(st, avg_err) == 3  # 0.005 < 0.1 / 4
    assert torch.equal(st.refs[3], st.refs[1])
    assert float(st.pdf_class[3]) == 0.3
    assert torch.equal(run.moments.m1[3], run.moments.m1[1])
    assert torch.equal(run.moments.m1[7], run.moments.m1[5])
    assert torch.equal(run.moments.m2[3], run.moments.m2[1])
    st.pdf_class = torch.tensor([0.5, 0.3, 0.17, 0.03], dtype=torch.float64)
    assert run._replace_inactive(st, avg_err) == -1  # 0.03 >= 0.025: still active
    run.options.class_inactivity_threshold = 0.0
    st.pdf_class[3] = 0.0001
    assert run._replace_inactive(st, avg_err) == -1  # threshold 0 disables substitution
