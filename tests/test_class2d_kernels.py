"""2D-classification kernels against slow, independent references (loops in numpy)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tamis.class2d import likelihood
from tamis.class2d.fourier2d import (
    FourierWindow,
    back_rotate,
    grid_tau2,
    project,
    reconstruct,
    reference_grids,
)
from tamis.class2d.likelihood import (
    BatchData,
    _diff2_dense,
    _pair_significance,
    expectation,
    pair_cross,
    significant_mask,
)
from tamis.class2d.mstep import center_classes
from tamis.class2d.sampling import Sampling
from tamis.masks import soft_mask_outside


def rround(x: float) -> int:
    return int(math.floor(x + 0.5))


# ---- sampling ----------------------------------------------------------------------------------


def test_sampling_matches_relion_counts():
    s = Sampling(psi_step=12, offset_range=5, offset_step=2, oversampling=1)
    assert s.nr_psi == 30 and len(s.coarse_translations()) == 21  # RELION GUI defaults
    assert len(s.fine_translations()) == 84 and len(s.fine_psi()) == 60
    np.testing.assert_allclose(s.fine_psi()[:2], [-3.0, 3.0])  # psi 0 -> -step/4, +step/4
    ft = s.fine_translations()[:4]
    c = s.coarse_translations()[0]
    np.testing.assert_allclose(
        ft, c + np.array([[-0.5, -0.5], [-0.5, 0.5], [0.5, -0.5], [0.5, 0.5]])
    )
    s2 = Sampling(psi_step=7)
    assert s2.nr_psi == 52 and s2.psi_step == pytest.approx(360 / 52)


def test_perturbation_stays_in_range_and_moves_everything():
    s = Sampling(psi_step=10, offset_range=4, offset_step=2)
    for it in range(1, 51):
        s.advance_perturbation(7, it)
        assert -0.5 <= s.perturbation <= 0.5
    np.testing.assert_allclose(s.coarse_psi()[0], s.perturbation * s.psi_step)
    np.testing.assert_allclose(
        s.coarse_translations() - s.coarse_translations(perturbed=False), s.perturbation * 2.0
    )


# ---- windows, projection, back-rotation, reconstruction ----------------------------------------


def test_window_pixels_follow_relion_rules():
    n, size = 16, 10
    w = FourierWindow.create(n, size)
    expected = []
    for i in range(n):
        ky = i if i <= n // 2 else i - n
        for kx in range(n // 2 + 1):
            if (
                rround(math.hypot(kx, ky)) <= size // 2
                and ky > -(size // 2)
                and not (kx == 0 and ky < 0)
            ):
                expected.append(i * (n // 2 + 1) + kx)
    assert w.index.tolist() == expected


def slow_bilinear(grid: np.ndarray, x: float, y: float) -> complex:
    m = grid.shape[0]
    x0, y0 = math.floor(x), math.floor(y)
    out = 0j
    for dy in (0, 1):
        for dx in (0, 1):
            xi, yi = x0 + dx, y0 + dy
            if 0 <= xi < m and 0 <= yi < m:
                wt = (x - x0 if dx else 1 - (x - x0)) * (y - y0 if dy else 1 - (y - y0))
                out += wt * grid[yi, xi]
    return out


def test_projection_matches_slow_rotation():
    rng = np.random.default_rng(0)
    n, pad = 12, 2
    refs = torch.from_numpy(rng.normal(size=(2, n, n))).float()
    grids = reference_grids(refs, pad=pad)
    window = FourierWindow.create(n, 10)
    psi = torch.tensor([0.0, 33.0, 250.0])
    ours = project(grids, psi, window, pad=pad).numpy()
    g = grids.numpy()
    m = pad * n
    for k in range(2):
        for j, angle in enumerate(psi.tolist()):
            c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
            for p, (kx, ky) in enumerate(zip(window.kx.tolist(), window.ky.tolist(), strict=True)):
                if kx * kx + ky * ky > 25:
                    assert ours[k, j, p] == 0
                    continue
                x = pad * (c * kx - s * ky) + m // 2
                y = pad * (s * kx + c * ky) + m // 2
                assert ours[k, j, p] == pytest.approx(slow_bilinear(g[k], x, y), rel=1e-4, abs=1e-6)


def test_projection_at_zero_is_the_reference_transform():
    """At psi = 0 the projection equals the image's own centred FFT (gridding pre-correction and
    the x pad² scale make the padded grid exact on its lattice)."""
    rng = np.random.default_rng(1)
    n = 16
    ref = torch.from_numpy(rng.normal(size=(1, n, n)))
    grids = reference_grids(ref, pad=2)
    window = FourierWindow.create(n, n)
    p0 = project(grids, torch.tensor([0.0]), window)[0, 0]
    from tamis.fourier import rfft2_centered

    direct = window.gather(
        rfft2_centered(
            ref[0]
            / torch.sinc(
                torch.from_numpy(
                    np.hypot(*np.meshgrid(np.arange(n) - n // 2, np.arange(n) - n // 2)) / (2 * n)
                )
            )
            ** 2
        )
    )
    inside = window.in_disc
    np.testing.assert_allclose(
        p0[inside].numpy(), direct[inside].numpy().astype(np.complex64), rtol=1e-4, atol=1e-5
    )


def test_back_rotate_is_the_adjoint_of_project():
    rng = np.random.default_rng(2)
    n, pad, k = 12, 2, 2
    window = FourierWindow.create(n, 10)
    psi = torch.tensor([10.0, 95.0, 200.0])
    m = pad * n
    g = torch.complex(
        torch.from_numpy(rng.normal(size=(k, m, m))), torch.from_numpy(rng.normal(size=(k, m, m)))
    )
    g = g.to(torch.complex64)
    data = torch.complex(
        torch.from_numpy(rng.normal(size=(k, 3, len(window)))),
        torch.from_numpy(rng.normal(size=(k, 3, len(window)))),
    )
    data = data * window.in_disc
    d, _ = back_rotate(data, torch.zeros(data.shape, dtype=torch.float64), psi, window, pad=pad)
    lhs = (project(g, psi, window, pad=pad).to(torch.complex128).conj() * data).sum()
    # The splat also writes conjugated mates at -q; the adjoint pairing counts both halves.
    not_dc = (window.kx != 0) | (window.ky != 0)
    mates = data[..., not_dc].conj()
    gm = g.to(torch.complex128)
    # <P g, d> over the half plane + <P g(-q), conj d> over mates == <g, D>
    from tamis.class2d.fourier2d import _positions  # noqa: PLC0415

    qx, qy = _positions(psi, window, pad)
    mate_vals = []
    for kk in range(k):
        for j in range(3):
            for p_ in torch.nonzero(not_dc).squeeze(1).tolist():
                mate_vals.append(
                    slow_bilinear(
                        gm[kk].numpy(), -qx[j, p_].item() + m // 2, -qy[j, p_].item() + m // 2
                    )
                )
    mate_vals = torch.tensor(mate_vals).reshape(k, 3, -1)
    lhs = lhs + (mate_vals.conj() * mates).sum()
    rhs = (gm.conj() * d).sum()
    assert abs(lhs - rhs) / abs(rhs) < 1e-5
    # the weights go through the same splat, per class: real data gives them back
    w_in = data.real.abs()
    _, w = back_rotate(data, w_in, psi, window, pad=pad)
    d_real, _ = back_rotate(w_in.to(torch.complex128), w_in, psi, window, pad=pad)
    torch.testing.assert_close(w, d_real.real)
    torch.testing.assert_close(d_real.imag, torch.zeros_like(w))


def test_back_rotate_weights_sum_and_hermitian():
    n, pad = 12, 2
    window = FourierWindow.create(n, 8)
    data = torch.ones((1, 2, len(window)), dtype=torch.complex128) * (1 + 2j)
    data[..., (window.kx == 0) & (window.ky == 0)] = 3.0  # the DC term of a real image is real
    weight = torch.ones((1, 2, len(window)), dtype=torch.float64)
    d, w = back_rotate(data, weight, torch.tensor([0.0, 45.0]), window, pad=pad)
    dc = ((window.kx == 0) & (window.ky == 0)).sum().item()
    inside = int(window.in_disc.sum())  # only pixels within r_max = size // 2 are splatted
    assert w.sum().item() == pytest.approx(2 * (2 * inside - dc))
    # Hermitian: D(-q) = conj D(q)
    m = pad * n
    flipped = torch.roll(torch.flip(d[0], dims=(0, 1)), shifts=(1, 1), dims=(0, 1))
    torch.testing.assert_close(flipped, d[0].conj())
    assert m == d.shape[-1]


def slow_reconstruct(d, w, tau2, t, r_max, pad, box, minres=5):
    """RELION's reconstruct written out per voxel (no gridding/masking steps)."""
    m = d.shape[-1]
    out = np.zeros_like(d)
    max_r2 = rround(r_max * pad) ** 2
    wp = np.zeros(w.shape)
    for y in range(m):
        for x in range(m):
            q = math.hypot(x - m // 2, y - m // 2)
            if q * q >= max_r2:
                continue
            ires = rround(q / pad)
            extra = 0.0
            if tau2 is not None and ires >= minres:
                extra = (
                    1.0 / (4 * t * tau2[ires])
                    if tau2[ires] > 0
                    else (1 / (0.001 * w[y, x]) if w[y, x] > 1e-20 else 0)
                )
            wp[y, x] = w[y, x] + extra
    sums, counts = {}, {}
    for y in range(m):
        for x in range(m):
            q = math.hypot(x - m // 2, y - m // 2)
            if q * q >= max_r2:
                continue
            s = min(math.floor(q / pad), int(r_max) - 1)
            sums[s] = sums.get(s, 0.0) + wp[y, x]
            counts[s] = counts.get(s, 0) + 1
    for y in range(m):
        for x in range(m):
            q = math.hypot(x - m // 2, y - m // 2)
            if q * q >= max_r2:
                continue
            s = min(math.floor(q / pad), int(r_max) - 1)
            den = max(wp[y, x], sums[s] / counts[s] / 1000)
            out[y, x] = d[y, x] / den if den > 0 else 0
    return out


def test_reconstruct_matches_slow_formula(monkeypatch):
    rng = np.random.default_rng(3)
    box, pad, r_max = 8, 2, 3.0
    m = box * pad
    d = rng.normal(size=(1, m, m)) + 1j * rng.normal(size=(1, m, m))
    w = rng.uniform(0.0, 2.0, size=(1, m, m))
    tau2 = np.abs(rng.normal(size=(1, box // 2 + 1))) + 0.1
    tau2[0, 2] = 0.0
    captured = {}
    import tamis.class2d.fourier2d as f2

    orig = torch.fft.ifftshift

    def capture(x, dim=None):
        if x.dim() == 3 and x.is_complex():
            captured["f"] = x.clone()
        return orig(x, dim=dim)

    monkeypatch.setattr(f2.torch.fft, "ifftshift", capture)
    reconstruct(
        torch.from_numpy(d),
        torch.from_numpy(w),
        box=box,
        r_max=r_max,
        tau2=torch.from_numpy(tau2),
        tau2_fudge=2.0,
        pad=pad,
        minres_map=2,
    )
    ours = captured["f"][0].numpy() * pad * pad
    ref = slow_reconstruct(d[0], w[0], tau2[0], 2.0, r_max, pad, box, minres=2)
    np.testing.assert_allclose(ours, ref, rtol=1e-10, atol=1e-12)


def test_tau2_is_mean_half_power_per_shell():
    rng = np.random.default_rng(4)
    refs = torch.from_numpy(rng.normal(size=(1, 8, 8)))
    grids = reference_grids(refs, pad=2)
    t2 = grid_tau2(grids, 3.0, 5, pad=2)[0].numpy()
    g = grids[0].numpy()
    m = 16
    for s in range(5):
        vals = [
            abs(g[y, x]) ** 2 / 2
            for y in range(m)
            for x in range(m)
            if math.hypot(x - 8, y - 8) ** 2 <= 36 and rround(math.hypot(x - 8, y - 8) / 2) == s
        ]
        assert t2[s] == pytest.approx(np.mean(vals) if vals else 0.0, rel=1e-4)


# ---- likelihood ---------------------------------------------------------------------------------


def random_problem(seed=0):
    rng = np.random.default_rng(seed)

    def cplx(*shape):
        re = torch.from_numpy(rng.normal(size=shape))
        im = torch.from_numpy(rng.normal(size=shape))
        return torch.complex(re, im).to(torch.complex64)

    return rng, cplx


def test_diff2_gemm_matches_per_pose_loop():
    rng, cplx = random_problem()
    b, r, t, c = 3, 7, 5, 40
    x = cplx(b, c)
    ctf = torch.from_numpy(rng.uniform(-1, 1, size=(b, c))).float()
    sig = torch.from_numpy(rng.uniform(0.5, 2, size=(b, c))).float()
    proj = cplx(r, c)
    ramps = torch.polar(torch.ones(t, c), torch.from_numpy(rng.uniform(-3, 3, size=(t, c))).float())
    w2 = 0.5 / sig
    ours = _diff2_dense(w2 * ctf * x, w2 * ctf * ctf, proj, ramps).numpy()
    xn, cn, sn, pn, rn = (v.numpy().astype(np.complex128) for v in (x, ctf, sig, proj, ramps))
    for i in range(b):
        const = np.sum(np.abs(xn[i]) ** 2 / (2 * sn[i].real))
        for rr in range(r):
            for tt in range(t):
                full = np.sum(np.abs(cn[i].real * pn[rr] - xn[i] * rn[tt]) ** 2 / (2 * sn[i].real))
                assert ours[i, rr, tt] + const == pytest.approx(full, rel=1e-4)


def test_significant_mask_matches_loop():
    rng = np.random.default_rng(5)
    logw = torch.from_numpy(rng.normal(scale=3, size=(4, 50)))
    ours = significant_mask(logw, 0.9).numpy()
    for row in range(4):
        w = np.exp(logw[row].numpy() - logw[row].max().item())
        order = np.argsort(-w)
        run, thr = 0.0, None
        for j in order:
            if run > 0.9 * w.sum():
                break
            run += w[j]
            thr = w[j]
        np.testing.assert_array_equal(ours[row], w >= thr)
    # The pair version: each particle's weights split over several pairs (rows).
    particle = torch.tensor([0] * 5 + [1] * 5)
    lse, keep = _pair_significance(particle, logw[:2].reshape(10, 10), 2, 0.9)
    np.testing.assert_array_equal(keep.reshape(2, 50).numpy(), ours[:2])
    np.testing.assert_allclose(lse.numpy(), torch.logsumexp(logw[:2], 1).numpy())


@pytest.mark.parametrize("cap", [1, 7, 30, 200])
@pytest.mark.parametrize(
    "path", ["topk", "sorted few", "sorted few, 15 blocks", "sorted few, 7 blocks", "histograms"]
)
def test_capped_significance_matches_full_sort(cap, path, monkeypatch):
    # rows as short as 2D's take topk; long rows (3D pass 0) sort the few weights that can be
    # significant (found in the blocks of the row that can hold them, and a tail), or bin them
    # all when there are many: each path forced here on short rows
    if path != "topk":
        monkeypatch.setattr(likelihood, "_TOPK_COLUMNS", 0)
        monkeypatch.setattr(likelihood, "_FEW_CANDIDATES", 0.0 if path == "histograms" else 1.0)
    if "blocks" in path:
        monkeypatch.setattr(likelihood, "_BLOCK", 8 if "15" in path else 16)
    rng = np.random.default_rng(9)
    # broad rows, and sharp ones where few weights are above (1 - fraction) / (10 S)
    scale = np.array([2, 2, 2, 30, 30, 60])[:, None]
    logw = torch.from_numpy(rng.normal(size=(6, 120)) * scale)
    ours = significant_mask(logw, 0.95, max_significant=cap).numpy()
    for row in range(6):
        w = np.exp(logw[row].numpy() - logw[row].max().item())
        sw = np.sort(w)[::-1]
        csum = np.cumsum(sw)
        pos = min(int(np.searchsorted(csum, 0.95 * w.sum(), side="right")), len(w) - 1, cap - 1)
        np.testing.assert_array_equal(ours[row], w >= sw[pos])


def make_batch(seed: int, b: int, window: FourierWindow, cplx, rng) -> BatchData:
    c = len(window)
    return BatchData(
        x=cplx(b, c),
        xu=cplx(b, c),
        ctf=torch.from_numpy(rng.uniform(0.2, 1, size=(b, c))).float(),
        sigma2=torch.from_numpy(rng.uniform(5, 10, size=(b, c))).float(),
        dc=(window.kx == 0) & (window.ky == 0),
        high_xi2=torch.zeros(b, dtype=torch.float64),
        offset_px=torch.zeros((b, 2), dtype=torch.float64),
    )


def slow_two_pass(
    data, proj_c, proj_f, cpix, ramps_c, ramps_f, lpo, lpc, nop, nott, frac, lpd=None
):
    """Both passes with explicit loops over particles, classes, psi and translations
    (``lpd`` ``(K, Pc)``: a log-prior per class and coarse psi, the fine children's too)."""
    b = data.x.shape[0]
    k, pc, _ = proj_c.shape
    tc = ramps_c.shape[0]
    x, ctf, sig = (v.numpy().astype(np.complex128) for v in (data.x, data.ctf, data.sigma2))
    dc = data.dc.numpy()
    w2 = np.where(dc[None], 0, 1 / (2 * sig.real))
    pcn, pfn, rcn, rfn = (
        v.numpy().astype(np.complex128) for v in (proj_c, proj_f, ramps_c, ramps_f)
    )
    cp = cpix.numpy()
    out = []
    for i in range(b):
        lw = {}
        for kk in range(k):
            for p in range(pc):
                for t in range(tc):
                    d2 = np.sum(
                        w2[i, cp] * np.abs(ctf[i, cp].real * pcn[kk, p] - x[i, cp] * rcn[t]) ** 2
                    )
                    lw[(kk, p, t)] = lpc[kk].item() + lpo[i, kk, t].item() - d2
                    if lpd is not None:
                        lw[(kk, p, t)] += lpd[kk, p].item()
        keys = list(lw)
        v = np.array([lw[q] for q in keys])
        w = np.exp(v - v.max())
        order = np.argsort(-w)
        run, thr = 0.0, 0.0
        for j in order:
            if run > frac * w.sum():
                break
            run += w[j]
            thr = w[j]
        sig_cells = [keys[j] for j in range(len(keys)) if w[j] >= thr]
        fine = {}
        for kk, p, t in sig_cells:
            for a in range(nop):
                for bb in range(nott):
                    fp, ft = p * nop + a, t * nott + bb
                    d2 = np.sum(w2[i] * np.abs(ctf[i].real * pfn[kk, fp] - x[i] * rfn[ft]) ** 2)
                    fine[(kk, fp, ft)] = lpc[kk].item() + lpo[i, kk, t].item() - d2
                    if lpd is not None:
                        fine[(kk, fp, ft)] += lpd[kk, p].item()
        keys = list(fine)
        v = np.array([fine[q] for q in keys])
        w = np.exp(v - v.max())
        w /= w.sum()
        order = np.argsort(-w)
        run, thr = 0.0, 0.0
        for j in order:
            if run > frac:
                break
            run += w[j]
            thr = w[j]
        out.append({keys[j]: w[j] for j in range(len(keys)) if w[j] >= thr})
    return out


# pair GEMMs, one dense GEMM, and both in one batch (a sharp, a middling and a flat particle);
# the fine projections given, or made on demand for the (class, coarse psi) pairs pass 0 needs;
# pass 0's significance uncapped, or capped (a cap that does not bind) as 3D's long rows take it
# (indices from the few candidates, or from the histograms' thresholds); with a log-prior per
# (class, coarse psi) as 3D's learned direction prior (one pair excluded by a zero prior)
@pytest.mark.parametrize("dir_prior", [False, True])
@pytest.mark.parametrize("long_rows", ["uncapped", "few", "histograms"])
@pytest.mark.parametrize("on_demand", [False, True])
@pytest.mark.parametrize("dense_pairs", [2.0, 0.0, 0.5])
def test_two_pass_expectation_matches_slow_reference(
    dense_pairs, on_demand, long_rows, dir_prior, monkeypatch
):
    if long_rows != "uncapped":
        monkeypatch.setattr(likelihood, "_TOPK_COLUMNS", 0)
        monkeypatch.setattr(likelihood, "_FEW_CANDIDATES", 1.0 if long_rows == "few" else 0.0)
        monkeypatch.setattr(likelihood, "_BLOCK", 5)  # rows of 24: four blocks and a tail
    rng, cplx = random_problem(6)
    n = 16
    window = FourierWindow.create(n, 10)
    cwin = FourierWindow.create(n, 6)
    cpix = window.subset(6)
    assert torch.equal(window.index[cpix], cwin.index)
    b, k, pc, tc = 3, 2, 4, 3
    data = make_batch(0, b, window, cplx, rng)
    proj_f = cplx(k, 2 * pc, len(window)) * 0.3
    proj_c = proj_f[:, ::2][:, :, cpix].contiguous()
    ramps_f = torch.polar(
        torch.ones(4 * tc, len(window)),
        torch.from_numpy(rng.uniform(-3, 3, size=(4 * tc, len(window)))).float(),
    )
    ramps_c = ramps_f[::4][:, cpix].contiguous()
    if dense_pairs == 0.5:
        # sharp: particle 0 is class 1, fine psi 3, translation 5 plus a little noise
        data.x[0] = data.ctf[0] * proj_f[1, 3] * ramps_f[5].conj() + 0.1 * data.x[0]
        data.sigma2[0] = 0.05
        data.sigma2[2] *= 50.0  # flat: every pair, dense
    if dense_pairs == 2.0 and on_demand:
        # every particle sharp (class 1): some (class, coarse psi) pairs needed by none
        for i, (p, t) in enumerate(((3, 5), (4, 2), (3, 9))):
            data.x[i] = data.ctf[i] * proj_f[1, p] * ramps_f[t].conj() + 0.01 * data.x[i]
            data.sigma2[i] = 0.002
    lpo = torch.from_numpy(rng.normal(size=(b, k, tc)))
    lpc = torch.log(torch.tensor([0.3, 0.7], dtype=torch.float64))
    lpd = None
    if dir_prior:
        lpd = torch.from_numpy(rng.normal(size=(k, pc)))
        lpd[0, 2] = -math.inf
    needs = []

    def fine_on_demand(coarse: torch.Tensor, need: torch.Tensor) -> torch.Tensor:
        # the fine children of the needed (class, coarse psi) pairs; zeros elsewhere
        needs.append(need)
        ids = (coarse[:, None] * 2 + torch.arange(2)).reshape(-1)
        out = torch.zeros((k, len(ids), len(window)), dtype=proj_f.dtype)
        keep = need.repeat_interleave(2, dim=1)
        out[keep] = proj_f[:, ids][keep]
        return out

    hyp = expectation(
        data,
        proj_coarse=proj_c,
        proj_fine=fine_on_demand if on_demand else proj_f,
        coarse_pixels=cpix,
        estep_pixels=torch.arange(len(window)),
        ramps_coarse=ramps_c,
        ramps_fine=ramps_f,
        log_prior_offset=lpo,
        log_prior_class=lpc,
        n_over_psi=2,
        n_over_trans=4,
        fraction=0.999,
        max_significant=-1 if long_rows == "uncapped" else 10**6,
        dense_pairs=dense_pairs,
        log_prior_dir=lpd,
    )
    assert (hyp.dense is not None) == (dense_pairs != 2.0)
    if dense_pairs == 0.5:
        assert hyp.dense_rows is not None and 2 in hyp.dense_rows.tolist()
        assert 0 not in hyp.dense_rows.tolist() and 0 in hyp.particle.tolist()
    if on_demand:
        assert len(needs) == 1 and hyp.coarse_subset is not None
        if dense_pairs == 2.0:
            assert not bool(needs[0].all())  # zero projections where not needed
    sub = hyp.coarse_subset
    hyp = hyp.to_pairs()

    def whole_grid(fine_psi: torch.Tensor) -> torch.Tensor:
        """Fine psi within the batch's coarse subset -> on the whole grid."""
        return fine_psi if sub is None else sub[fine_psi // 2] * 2 + fine_psi % 2

    psi, best_psi = whole_grid(hyp.psi), whole_grid(hyp.best_psi)
    ref = slow_two_pass(data, proj_c, proj_f, cpix, ramps_c, ramps_f, lpo, lpc, 2, 4, 0.999, lpd)
    got = [dict() for _ in range(b)]
    for m, (p, kk, ps) in enumerate(
        zip(hyp.particle.tolist(), hyp.cls.tolist(), psi.tolist(), strict=True)
    ):
        for t in torch.nonzero(hyp.weight[m] > 0).squeeze(1).tolist():
            got[p][(kk, ps, t)] = hyp.weight[m, t].item()
    for i in range(b):
        assert set(got[i]) == set(ref[i])
        for key, w in ref[i].items():
            assert got[i][key] == pytest.approx(w, rel=1e-3, abs=1e-7)
        best = max(ref[i], key=ref[i].get)
        assert (
            hyp.best_cls[i].item(),
            best_psi[i].item(),
            hyp.best_trans[i].item(),
        ) == best


# ---- masks and centring -------------------------------------------------------------------------


def test_soft_mask_matches_loop():
    rng = np.random.default_rng(7)
    img = rng.normal(size=(20, 20))
    ours = soft_mask_outside(torch.from_numpy(img), 6.0, 3.0).numpy()
    num = den = 0.0
    cs = np.zeros_like(img)
    for y in range(20):
        for x in range(20):
            r = math.hypot(x - 10, y - 10)
            c = 0.0 if r < 6 else (1.0 if r > 9 else 0.5 + 0.5 * math.cos(math.pi * (9 - r) / 3))
            cs[y, x] = c
            num += c * img[y, x]
            den += c
    bg = num / den
    np.testing.assert_allclose(ours, img * (1 - cs) + bg * cs, atol=1e-12)


def test_center_classes_moves_mass_to_origin():
    img = torch.zeros(1, 32, 32)
    img[0, 14:19, 19:24] = 1.0  # centre of mass at (x=21, y=16) -> offset (+5, 0)
    out = center_classes(img, 10.0)
    c = torch.arange(32.0) - 16
    com_x = (out[0].clamp(min=0).sum(0) * c).sum() / out[0].clamp(min=0).sum()
    com_y = (out[0].clamp(min=0).sum(1) * c).sum() / out[0].clamp(min=0).sum()
    assert abs(com_x) < 0.05 and abs(com_y) < 0.05
    capped = center_classes(img, 2.0)
    cx = (capped[0].clamp(min=0).sum(0) * c).sum() / capped[0].clamp(min=0).sum()
    assert cx.item() == pytest.approx(3.0, abs=0.05)


@pytest.mark.parametrize("spread", [0.3, 3.0, 30.0])  # broad, medium and sharp posteriors
def test_pair_significance_matches_full_sort(spread):
    rng = np.random.default_rng(8)
    particle = torch.from_numpy(rng.integers(0, 7, size=300))
    logw = torch.from_numpy(rng.normal(scale=spread, size=(300, 40)))
    logw[torch.from_numpy(rng.random((300, 40)) < 0.3)] = -math.inf
    lse, keep = _pair_significance(particle, logw, 7, 0.999)
    for i in range(7):
        rows = torch.nonzero(particle == i).squeeze(1)
        v = logw[rows].reshape(-1)
        assert lse[i].item() == pytest.approx(torch.logsumexp(v, 0).item())
        w = torch.exp(v - v.max())
        w = w / w.sum()
        run, thr = 0.0, None
        for x in torch.sort(w, descending=True).values.tolist():
            if run > 0.999:
                break
            run += x
            thr = x
        np.testing.assert_array_equal(keep[rows].reshape(-1).numpy(), (w >= thr).numpy())
    # the pass-1 form: only the finite elements, one per row, each with its particle
    r, c = torch.nonzero(torch.isfinite(logw), as_tuple=True)
    lse_el, keep_el = _pair_significance(particle[r], logw[r, c][:, None], 7, 0.999)
    np.testing.assert_array_equal(keep_el[:, 0].numpy(), keep[r, c].numpy())
    np.testing.assert_allclose(lse_el.numpy(), lse.numpy(), rtol=1e-12)


def test_fill_low_shells():
    from tamis.class2d.mstep import fill_low_shells

    spectra = torch.tensor([[0.0, 2.0, -1.0, 0.0, 5.0], [3.0, 1e-20, 4.0, 1e-16, 1.0]])
    out = fill_low_shells(spectra)
    assert out[0].tolist() == [2.0, 2.0, 2.0, 2.0, 5.0]
    assert fill_low_shells(spectra[1], 1e-14).tolist() == [3.0, 3.0, 4.0, 4.0, 1.0]


@pytest.mark.parametrize("chunk", [1, 3, 7, 100])
def test_pair_cross_at_elements_matches_a_loop(chunk):
    """The pass-1 cross terms at chosen (pair, translation) elements, over chunks of pairs (some
    without elements), against a numpy loop."""
    rng = np.random.default_rng(4)
    m, c, t, b = 11, 9, 5, 3
    cplx = lambda *s: torch.from_numpy(rng.normal(size=s) + 1j * rng.normal(size=s)).to(  # noqa: E731
        torch.complex64
    )
    proj, y, ramps = cplx(m, c), cplx(b, c), cplx(t, c)
    particle = torch.from_numpy(rng.integers(0, b, size=m))
    mask = torch.from_numpy(rng.random((m, t)) < 0.3)
    mask[:4] = False  # leading pairs without elements
    el_r, el_t = torch.nonzero(mask, as_tuple=True)
    got = pair_cross(proj, y, particle, ramps, el_r, el_t, chunk=chunk).numpy()
    p, yy, r = (
        proj.numpy().astype(complex),
        y.numpy().astype(complex),
        ramps.numpy().astype(complex),
    )
    want = [
        sum((np.conj(p[i, k]) * yy[particle[i], k] * r[j, k]).real for k in range(c))
        for i, j in zip(el_r.tolist(), el_t.tolist(), strict=True)
    ]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_offset_change_is_relions_per_coordinate_rms():
    """``monitorHiddenVariableChanges`` adds dx² + dy² per particle (Å) and
    ``updateOverallChangesInHiddenVariables`` reports sqrt(sum / (2 count)), also for 3D
    refinements of particle images; not the mean distance (about 1.25 times larger for Gaussian
    moves)."""
    from tamis.class2d.em import offset_change

    rng = np.random.default_rng(4)
    old = rng.normal(0, 3, (50, 2))
    new = old + rng.normal(0, 1.5, (50, 2))
    total, count = 0.0, 0
    for (x0, y0), (x1, y1) in zip(old, new, strict=True):
        total += (x1 - x0) ** 2 + (y1 - y0) ** 2
        count += 1
    assert offset_change(new, old) == pytest.approx(math.sqrt(total / (2.0 * count)))
    assert offset_change(new, old) != pytest.approx(np.linalg.norm(new - old, axis=1).mean())
    assert offset_change(old[:0], old[:0]) == 0.0
