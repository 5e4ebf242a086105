"""M-step weighted sums (pair and dense layouts) and dense significance against slow references."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from tamis.class2d import mstep, shifts
from tamis.class2d.em import _ramps
from tamis.class2d.fourier2d import FourierWindow
from tamis.class2d.likelihood import BatchData, Hypotheses, dense_significance
from tamis.class2d.mstep import accumulate
from tamis.class2d.sampling import Sampling
from tamis.class2d.shifts import ColumnSums
from tamis.class2d.state import WeightedSums


def relion_threshold_keep(w: np.ndarray, fraction: float) -> np.ndarray:
    """RELION's rule with a full sort: add weights in descending order while the running sum is
    still <= ``fraction``; keep every weight >= the last one added."""
    sw = np.sort(w)[::-1]
    before = np.cumsum(sw) - sw  # the running sum before each weight is added
    return w >= sw[before <= fraction].min()


@pytest.mark.parametrize("spread", [0.3, 3.0, 30.0])  # broad, medium and sharp posteriors
@pytest.mark.parametrize("max_elements", [1 << 22, 700])  # one piece; rows in pieces
def test_dense_significance_matches_full_sort(spread, max_elements):
    rng = np.random.default_rng(3)
    logw = rng.normal(scale=spread, size=(9, 400)) + rng.normal(scale=50, size=(9, 1))
    logw[rng.random((9, 400)) < 0.2] = -np.inf
    logw[4, :-1] = -np.inf  # a row with a single sample
    t = torch.from_numpy(logw).to(torch.float32)
    # best=True: the same weights, and each row's largest weight where argmax of logw says
    # (also with every weight kept)
    for fraction in (0.999, 1.0):
        t_plain, t_best = t.clone(), t.clone()
        lse = dense_significance(t_plain, fraction, max_elements=max_elements)
        lse_b, pmax, arg = dense_significance(t_best, fraction, max_elements, best=True)
        assert torch.equal(lse_b, lse) and torch.equal(t_best, t_plain)
        np.testing.assert_array_equal(arg.numpy(), np.argmax(logw.astype(np.float32), 1))
        assert pmax.dtype == torch.float64
        np.testing.assert_array_equal(pmax.numpy(), t_plain.max(1).values.double().numpy())
    lse = dense_significance(t, 0.999, max_elements=max_elements)
    for row in range(9):
        v = logw[row].astype(np.float32).astype(np.float64)
        ref_lse = np.logaddexp.reduce(v)
        assert lse[row].item() == pytest.approx(ref_lse, rel=1e-6)
        w = np.exp(v - ref_lse)
        keep = relion_threshold_keep(w, 0.999) & (w > 0)
        got = t[row].numpy()
        np.testing.assert_array_equal(got > 0, keep)
        np.testing.assert_allclose(got[keep], w[keep], rtol=1e-5)


@pytest.mark.parametrize("spread", [0.003, 1.0])
def test_dense_significance_on_long_flat_rows(spread):
    # Millions of nearly equal weights in a row (broad posteriors of a large problem): the mass
    # must be summed precisely enough to find the crossing, and no weight may become NaN.
    rng = np.random.default_rng(4)
    n = 2_000_000
    logw = rng.normal(scale=spread, size=(2, n)).astype(np.float32)
    t = torch.from_numpy(logw.copy())
    dense_significance(t, 0.999)
    assert torch.isfinite(t).all()
    for row in range(2):
        v = logw[row].astype(np.float64)
        w = np.exp(v - v.max())
        w /= w.sum()
        keep = relion_threshold_keep(w, 0.999)
        got = t[row].numpy() > 0
        # exact up to float32 rounding of weights right at the threshold
        assert np.sum(got != keep) <= 1e-5 * n
        assert got.sum() >= 0.99 * keep.sum()


def test_dense_significance_at_exact_fractions():
    # the running sum reaches the fraction exactly: RELION keeps adding (0.25s kept too)
    w = torch.tensor([[0.5, 0.25, 0.25, 0.0], [0.5, 0.5, 0.0, 0.0]]).log()
    dense_significance(w, 0.5)
    np.testing.assert_array_equal(w.numpy() > 0, [[1, 1, 1, 0], [1, 1, 0, 0]])
    np.testing.assert_allclose(w[0].numpy(), [0.5, 0.25, 0.25, 0.0])


def _problem(seed: int = 0, grid: bool = False):
    """A small batch; ``grid``: the translations on a regular grid (RELION's fine grid moved
    by a perturbation), their ramps as the engine makes them, else random ramps."""
    rng = np.random.default_rng(seed)
    box, size = 16, 10
    win = FourierWindow.create(box, size)
    c = len(win)
    b, k, pf, tf = 6, 3, 4, 5
    t_grid = None
    if grid:
        smp = Sampling(offset_range=2, offset_step=2, oversampling=1, perturbation=0.3)
        t_grid = torch.from_numpy(smp.fine_translations())
        tf = len(t_grid)

    def cplx(*shape):
        return torch.complex(
            torch.from_numpy(rng.normal(size=shape)), torch.from_numpy(rng.normal(size=shape))
        ).to(torch.complex64)

    data = BatchData(
        x=cplx(b, c),
        xu=cplx(b, c),
        ctf=torch.from_numpy(rng.uniform(-1, 1, (b, c))).float(),
        sigma2=torch.from_numpy(rng.uniform(0.5, 2, (b, c))).float(),
        dc=(win.kx == 0) & (win.ky == 0),
        high_xi2=torch.zeros(b, dtype=torch.float64),
        offset_px=torch.from_numpy(rng.integers(-2, 3, (b, 2)).astype(np.float64)),
    )
    proj = cplx(k, pf, c)
    ramps = torch.polar(torch.ones(tf, c), torch.from_numpy(rng.uniform(-3, 3, (tf, c))).float())
    if grid:
        ramps = _ramps(t_grid, win, box)
    active = torch.tensor([0, 2])  # class 1 inactive
    w = rng.random((b, tf, len(active) * pf)) * (rng.random((b, tf, len(active) * pf)) < 0.6)
    w /= w.sum((1, 2), keepdims=True)
    extra = dict(
        full_power=torch.from_numpy(rng.uniform(0, 1, (b, box // 2 + 1))),
        optics=torch.tensor([0, 0, 1, 1, 0, 1]),
        groups=torch.tensor([0, 0, 1, 1, 2, 2]),
        scale=torch.tensor([1.0, 0.8, 1.3], dtype=torch.float64),
        ssnr_mask=torch.from_numpy(rng.random((k, c)) < 0.5),
        translations_px=t_grid if grid else torch.from_numpy(rng.uniform(-2, 2, (tf, 2))),
        prior_offset=torch.from_numpy(rng.normal(size=(k, 2))),
        pixel_size=2.0,
        old_norm=torch.from_numpy(rng.uniform(0.8, 1.2, b)),
        avg_norm=1.1,
        nsh=box // 2 + 1,
    )
    return data, proj, ramps, active, torch.from_numpy(w).float(), win, extra


def _slow_sums(data, proj, ramps, active, w, win, extra, half):
    """Every weighted sum with explicit loops over particles and hypotheses (numpy, float64)."""
    x, xu, ctf, sig = (
        v.numpy().astype(np.complex128) for v in (data.x, data.xu, data.ctf, data.sigma2)
    )
    ctf, sig = ctf.real, sig.real
    p, r = proj.numpy().astype(np.complex128), ramps.numpy().astype(np.complex128)
    w = w.numpy().astype(np.float64)
    b, tf, _ = w.shape
    k, pf, c = p.shape
    nsh = extra["nsh"]
    shell = win.shell.numpy()
    msk = extra["ssnr_mask"].numpy()
    scale = extra["scale"].numpy()
    groups, optics = extra["groups"].numpy(), extra["optics"].numpy()
    slots = 2 * k if half is not None else k
    out = {
        "fimg": np.zeros((slots, pf, c), complex),
        "fweight": np.zeros((slots, pf, c)),
        "sigma2_noise": np.zeros((2, nsh)),
        "sumw_optics": np.zeros(2),
        "pdf_class": np.zeros(k),
        "prior_offset": np.zeros((k, 2)),
        "sigma2_offset": 0.0,
        "xa": np.zeros(3),
        "aa": np.zeros(3),
    }
    norms = np.zeros(b)
    beyond = np.arange(nsh) > win.size // 2
    for i in range(b):
        resid = np.zeros(c)
        h = 0 if half is None else int(half[i])
        for t in range(tf):
            tot = extra["pixel_size"] * (
                data.offset_px[i].numpy() + extra["translations_px"][t].numpy()
            )
            for ra in range(w.shape[2]):
                wt = w[i, t, ra]
                if wt == 0:
                    continue
                kk, ps = int(active[ra // pf]), ra % pf
                slot = kk + k * h
                out["fimg"][slot, ps] += wt * ctf[i] * xu[i] * r[t] / sig[i]
                out["fweight"][slot, ps] += wt * ctf[i] ** 2 / sig[i]
                resid += wt * np.abs(ctf[i] * p[kk, ps] - x[i] * r[t]) ** 2
                g = groups[i]
                out["xa"][g] += (
                    wt
                    * np.sum(msk[kk] * (ctf[i] * x[i] * np.conj(p[kk, ps]) * r[t]).real)
                    / scale[g]
                )
                out["aa"][g] += (
                    wt * np.sum(msk[kk] * ctf[i] ** 2 * np.abs(p[kk, ps]) ** 2) / scale[g] ** 2
                )
                out["pdf_class"][kk] += wt
                out["prior_offset"][kk] += wt * tot
                out["sigma2_offset"] += wt * np.sum((extra["prior_offset"][kk].numpy() - tot) ** 2)
        fp = extra["full_power"][i].numpy()
        for pix in range(c):
            out["sigma2_noise"][optics[i], shell[pix]] += resid[pix]
        out["sigma2_noise"][optics[i]] += fp * beyond
        out["sumw_optics"][optics[i]] += w[i].sum()
        norms[i] = (
            extra["old_norm"][i].item()
            / extra["avg_norm"]
            * math.sqrt(2 * (resid.sum() + (fp * beyond).sum()))
        )
    out["norm_sum"] = norms.sum()
    return out, norms


def _dense_hypotheses(w: torch.Tensor, active: torch.Tensor) -> Hypotheses:
    """Dense E-step output carrying the weights ``w`` ``(B, Tf, Ra)`` (best poses unused)."""
    b = w.shape[0]
    return Hypotheses(
        particle=torch.zeros(0, dtype=torch.long),
        cls=torch.zeros(0, dtype=torch.long),
        psi=torch.zeros(0, dtype=torch.long),
        weight=torch.zeros((0, w.shape[1]), dtype=torch.float64),
        best_cls=torch.zeros(b, dtype=torch.long),
        best_psi=torch.zeros(b, dtype=torch.long),
        best_trans=torch.zeros(b, dtype=torch.long),
        pmax=torch.zeros(b, dtype=torch.float64),
        n_significant=torch.ones(b, dtype=torch.long),
        loglik=torch.zeros(b, dtype=torch.float64),
        dense=w.clone(),
        active=active,
    )


@pytest.mark.parametrize(
    "layout",
    [
        "dense",
        "dense by class",
        "pairs",
        "mixed",
        "dense on a grid",
        "dense by class on a grid",
        "dense on a grid without scale",
    ],
)
@pytest.mark.parametrize("halves", [False, True])
def test_weighted_sums_match_slow_loops(layout, halves, monkeypatch):
    """Every layout against the loops; "on a grid": translations on a regular grid, whose sums
    over translations go column by column of the window and whose cross terms come per class
    from the first DFT stage (:class:`ColumnSums`, taken whatever it saves, here); by class
    on a grid, each class block's sums over translations as two small DFTs."""
    with_scale = not layout.endswith(" without scale")
    layout = layout.removesuffix(" without scale")
    grid = layout.endswith("on a grid")
    data, proj, ramps, active, w, win, extra = _problem(grid=grid)
    separable = {}
    if grid:
        monkeypatch.setattr(shifts, "_WORTH", 10.0)
        t = extra["translations_px"]
        separable = dict(
            col_sums=ColumnSums.create(t, win.kx, win.ky, win.box),
        )
        assert None not in separable.values()
        layout = layout.removesuffix(" on a grid")
    pf = proj.shape[1]
    w.view(w.shape[0], w.shape[1], len(active), pf)[1, :, 0] = 0.0  # particle 1: one class only
    w /= w.sum((1, 2), keepdim=True)
    monkeypatch.setattr(mstep, "BLOCK_FRACTION", 1.1 if layout == "dense by class" else 0.0)
    b = w.shape[0]
    k, pf, c = proj.shape
    half = torch.tensor([0, 1] * (b // 2)) if halves else None
    hyp = _dense_hypotheses(w, active)
    if layout == "pairs":
        hyp = hyp.to_pairs()
        assert hyp.dense is None and len(hyp.particle) > 0
    if layout == "mixed":  # particles 1, 2 and 5 dense, the others as pairs
        rows_d = torch.tensor([1, 2, 5])
        pairs = hyp.to_pairs()
        keep = ~torch.isin(pairs.particle, rows_d)
        hyp = replace(
            pairs,
            particle=pairs.particle[keep],
            cls=pairs.cls[keep],
            psi=pairs.psi[keep],
            weight=pairs.weight[keep],
            dense=w[rows_d].clone(),
            active=active,
            dense_rows=rows_d,
        )
        (rd, hd), (rs, hs) = hyp.split()
        assert rd.tolist() == [1, 2, 5] and rs.tolist() == [0, 3, 4]
        assert set(hs.particle.tolist()) == {0, 1, 2} and hd.dense.shape[0] == 3
    sums = WeightedSums.zeros(k, pf, c, 2, extra["nsh"], 3, "cpu", n_slots=2 * k if halves else k)
    run_extra = extra if with_scale else {**extra, "ssnr_mask": None}
    norms = accumulate(
        sums, data, hyp, proj, ramps, win, half=half, max_rows=14, **run_extra, **separable
    )
    ref, ref_norms = _slow_sums(data, proj, ramps, active, w, win, extra, half)
    np.testing.assert_allclose(norms.numpy(), ref_norms, rtol=1e-4)
    if not with_scale:  # no --scale: the scale's sums stay empty, the others are the same
        assert not sums.xa.any() and not sums.aa.any()
        del ref["xa"], ref["aa"]
    for name, value in ref.items():
        got = getattr(sums, name)
        got = got.numpy() if isinstance(got, torch.Tensor) else got
        np.testing.assert_allclose(got, value, rtol=2e-4, atol=1e-5, err_msg=name)


@pytest.mark.parametrize("layout", ["dense", "dense by class", "pairs", "dense by class on a grid"])
def test_bfloat16_sums_stay_close_to_the_float32_ones(layout, monkeypatch):
    """``--mstep_bf16``: the same sums through bfloat16 GEMMs, within bfloat16's precision of
    the float32 path (each sum as a whole: relative error of its norm below 2%)."""
    grid = layout.endswith("on a grid")
    data, proj, ramps, active, w, win, extra = _problem(grid=grid)
    separable = {}
    if grid:
        monkeypatch.setattr(shifts, "_WORTH", 10.0)
        separable["col_sums"] = ColumnSums.create(extra["translations_px"], win.kx, win.ky, win.box)
        layout = layout.removesuffix(" on a grid")
    w /= w.sum((1, 2), keepdim=True)
    monkeypatch.setattr(mstep, "BLOCK_FRACTION", 1.1 if layout == "dense by class" else 0.0)
    k, pf, c = proj.shape
    hyp = _dense_hypotheses(w, active)
    if layout == "pairs":
        hyp = hyp.to_pairs()
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        sums = WeightedSums.zeros(k, pf, c, 2, extra["nsh"], 3, "cpu")
        norms = accumulate(sums, data, hyp, proj, ramps, win, max_rows=14, gemm_dtype=dtype,
                           **extra, **separable)  # fmt: skip
        out[dtype] = (sums, norms)
    (s32, n32), (s16, n16) = out[torch.float32], out[torch.bfloat16]
    for name in ("fimg", "fweight", "sigma2_noise", "prior_offset"):
        a, b_ = getattr(s32, name), getattr(s16, name)
        assert float((a - b_).abs().norm() / a.abs().norm()) < 2e-2, name
    assert float((n32 - n16).abs().max() / n32.abs().max()) < 2e-2
    # and it is not the float32 path under another name
    assert not torch.equal(s32.fimg, s16.fimg)
