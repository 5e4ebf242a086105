"""The cross term over a regular translation grid as two small DFTs (tamis.class2d.shifts)
against a numpy loop, and the E-step with and without it."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tamis.class2d import shifts
from tamis.class2d.em import _ramps
from tamis.class2d.fourier2d import FourierWindow
from tamis.class2d.likelihood import BatchData, expectation
from tamis.class2d.sampling import Sampling
from tamis.class2d.shifts import ColumnSums, SeparableShifts


def _fine_grid(perturbation: float = 0.3, offset_range: float = 3.0) -> torch.Tensor:
    smp = Sampling(offset_range=offset_range, offset_step=2, oversampling=1)
    smp.perturbation = perturbation
    return torch.from_numpy(smp.fine_translations())


def _slow_cross(y, proj, t, kx, ky, box):
    """``Re sum_k y_i(k) exp(-2 pi i k.t / box) conj(P_r(k))`` by loops (float64)."""
    y, proj = y.numpy().astype(np.complex128), proj.numpy().astype(np.complex128)
    kx, ky, t = kx.numpy(), ky.numpy(), t.numpy()
    out = np.zeros((y.shape[0], len(t), proj.shape[0]))
    for j, (tx, ty) in enumerate(t):
        ramp = np.exp(-2j * math.pi * (kx * tx + ky * ty) / box)
        for i in range(y.shape[0]):
            for r in range(proj.shape[0]):
                out[i, j, r] = np.sum(y[i] * ramp * np.conj(proj[r])).real
    return out


@pytest.mark.parametrize("size", [10, 13])  # even and odd current sizes
@pytest.mark.parametrize("chunk", [None, 300])  # one chunk; particles and projections split
def test_cross_matches_a_loop(size, chunk, monkeypatch):
    monkeypatch.setattr(shifts, "_WORTH", 10.0)  # small windows save little; take it anyway
    if chunk is not None:
        monkeypatch.setattr(shifts, "_CHUNK_FLOATS", chunk)
        monkeypatch.setattr(shifts, "_MIN_CHUNK_PARTICLES", 2)
    box = 16
    win = FourierWindow.create(box, size)
    t = _fine_grid()
    g = torch.Generator().manual_seed(size)
    y = torch.randn(3, len(win), dtype=torch.complex64, generator=g)
    proj = torch.randn(5, len(win), dtype=torch.complex64, generator=g)
    sep = SeparableShifts.create(t, win.kx, win.ky, box)
    assert sep is not None and sep.n_tx * sep.n_ty >= len(t)
    got = sep.cross(y, sep.prepare(proj)).numpy()
    ref = _slow_cross(y, proj, t, win.kx, win.ky, box)
    np.testing.assert_allclose(got, ref, atol=2e-5 * np.abs(ref).max())


@pytest.mark.parametrize("size", [10, 13])
def test_column_blocks_times_spread_cells_is_the_ramp_sum(size, monkeypatch):
    """The M-step's ``Mix`` by columns (:meth:`ColumnSums.grid_cells`, then
    :meth:`ColumnSums.spread_cells` three columns at a time, then each column's block) against
    ``sum_t exp(-2 pi i k.t / box) w(t, s)`` by a numpy loop, for weights ``(T, 2, 7)``."""
    monkeypatch.setattr(shifts, "_WORTH", 10.0)
    box = 16
    win = FourierWindow.create(box, size)
    t = _fine_grid()
    cs = ColumnSums.create(t, win.kx, win.ky, box)
    assert cs is not None
    g = torch.Generator().manual_seed(size)
    w = torch.rand((len(t), 2, 7), generator=g)
    order, spans, blocks = cs.column_blocks
    assert sorted(order.tolist()) == list(range(len(win)))
    cells = cs.grid_cells(w)
    v = torch.cat([cs.spread_cells(cells, j, j + 3) for j in range(0, len(spans), 3)])
    assert v.shape == (len(spans), 2 * cs.n_ty, 14)
    got = np.zeros((len(win), 14), dtype=np.complex128)
    for (c0, c1), blk, col in zip(spans, blocks, v, strict=True):
        mix = (blk @ col).numpy().reshape(c1 - c0, 2, 14)
        got[order[c0:c1].numpy()] = mix[:, 0] + 1j * mix[:, 1]
    kx, ky, tt = win.kx.numpy(), win.ky.numpy(), t.numpy()
    wn = w.numpy().astype(np.float64).reshape(len(t), 14)
    ref = np.zeros((len(win), 14), dtype=np.complex128)
    for j, (tx, ty) in enumerate(tt):
        ramp = np.exp(-2j * math.pi * (kx * tx + ky * ty) / box)
        for s_ in range(14):
            ref[:, s_] += ramp * wn[j, s_]
    np.testing.assert_allclose(got, ref, atol=2e-5 * np.abs(ref).max())


@pytest.mark.parametrize("size", [10, 13])
def test_class_cross_matches_a_loop(size, monkeypatch):
    """:meth:`ColumnSums.class_cross` (from :meth:`ColumnSums.spread`'s output) against
    ``Re y_i(k) sum_(psi) conj(P_(c, psi)(k)) sum_t w(i, t, c, psi) exp(-2 pi i k.t / box)`` by
    a numpy loop: 3 particles, 2 classes of 4 psi, weights only in part of the grid's cells."""
    monkeypatch.setattr(shifts, "_WORTH", 10.0)
    box, ka, pf = 16, 2, 4
    win = FourierWindow.create(box, size)
    t = _fine_grid(offset_range=5.0)  # a disc of the grid: 84 of its 100 cells
    cs = ColumnSums.create(t, win.kx, win.ky, box)
    assert cs is not None and cs.n_tx * cs.n_ty > len(t)  # some cells of the grid stay empty
    g = torch.Generator().manual_seed(size)
    w = torch.rand((3, len(t), ka * pf), generator=g)
    y = torch.randn(3, len(win), dtype=torch.complex64, generator=g)
    proj = torch.randn(ka * pf, len(win), dtype=torch.complex64, generator=g)
    got = cs.class_cross(cs.spread(w), y, cs.class_refs(proj, ka)).numpy()
    assert got.shape == (ka, 3, len(win))
    kx, ky, tt = win.kx.numpy(), win.ky.numpy(), t.numpy()
    wn, yn = w.numpy().astype(np.float64), y.numpy().astype(np.complex128)
    pn = proj.numpy().astype(np.complex128)
    ref = np.zeros((ka, 3, len(win)))
    for i in range(3):
        for c in range(ka):
            m1 = np.zeros(len(win), dtype=np.complex128)
            for r in range(c * pf, (c + 1) * pf):
                for j, (tx, ty) in enumerate(tt):
                    ramp = np.exp(-2j * math.pi * (kx * tx + ky * ty) / box)
                    m1 += wn[i, j, r] * ramp * np.conj(pn[r])
            ref[c, i] = (yn[i] * m1).real
    np.testing.assert_allclose(got, ref, atol=2e-5 * np.abs(ref).max())


@pytest.mark.parametrize("oversampling", [0, 1, 2])
@pytest.mark.parametrize("step", [2.0, 2 / 1.31, 1.5 / 1.06, 1 / 3, 2.6 / 1.244])
def test_grids_in_any_step_are_found(step, oversampling):
    """Offsets given in Å become steps in pixels that are not round numbers (auto-refine,
    continued runs): the grid is still found, and gives back every translation."""
    smp = Sampling(offset_range=3 * step, offset_step=step, oversampling=oversampling)
    smp.perturbation = 0.37
    for t in (smp.coarse_translations(), smp.fine_translations()):
        t = torch.from_numpy(t)
        grid = shifts._grid_of(t, 64)
        assert grid is not None
        again = torch.stack(
            [grid.origin[a] + grid.step[a] * (grid.ix, grid.iy)[a].double() for a in range(2)], 1
        )
        assert float((again - t).abs().max()) < 1e-9


def test_only_regular_grids_that_save_are_taken():
    win = FourierWindow.create(64, 48)
    fine = _fine_grid(-0.4, 5.0)  # the hard recipe's 84 fine translations on 10 x 10
    assert SeparableShifts.create(fine, win.kx, win.ky, 64) is not None
    assert ColumnSums.create(fine, win.kx, win.ky, 64) is not None
    # 21 coarse translations on 5 x 5: a GEMM is as fast
    smp = Sampling(offset_range=5, offset_step=2, oversampling=1)
    coarse = torch.from_numpy(smp.coarse_translations())
    assert SeparableShifts.create(coarse, win.kx, win.ky, 64) is None
    # translations off any grid
    off = fine.clone()
    off[3] += torch.tensor([0.25, 0.0], dtype=off.dtype)
    assert SeparableShifts.create(off, win.kx, win.ky, 64) is None
    assert ColumnSums.create(off, win.kx, win.ky, 64) is None
    # a grid mostly empty (two far points)
    far = torch.tensor([[0.0, 0.0], [9.0, 9.0]], dtype=torch.float64)
    assert SeparableShifts.create(far, win.kx, win.ky, 64) is None


def test_expectation_is_the_same_with_the_separable_cross_term():
    """A whole E-step (both passes, dense pass 1) on a batch with and without the separable
    cross term: the same best poses and log-likelihoods, weights within float32 rounding."""
    box, size = 32, 24
    win = FourierWindow.create(box, size)
    cwin = FourierWindow.create(box, 16)
    coarse_pixels = win.subset(16)
    smp = Sampling(psi_step=30, offset_range=3, offset_step=2, oversampling=1)
    smp.perturbation = 0.35
    t_c = torch.from_numpy(smp.coarse_translations())
    t_f = torch.from_numpy(smp.fine_translations())
    g = torch.Generator().manual_seed(3)
    b, k = 4, 3
    pf = 2 * smp.nr_psi
    proj_f = torch.randn(k, pf, len(win), dtype=torch.complex64, generator=g)
    proj_c = proj_f[:, ::2][:, :, coarse_pixels].contiguous()
    # particles: a projection shifted by a grid translation, plus noise
    x = proj_f[torch.tensor([0, 1, 2, 0]), torch.tensor([0, 4, 6, 2])]
    x = x * _ramps(t_f[torch.tensor([5, 17, 30, 2])], win, box)
    x = x + 0.7 * torch.randn(b, len(win), dtype=torch.complex64, generator=g)
    data = BatchData(
        x=x,
        xu=x,
        ctf=torch.ones(b, len(win)),
        sigma2=torch.full((b, len(win)), 2.0),
        dc=(win.kx == 0) & (win.ky == 0),
        high_xi2=torch.zeros(b, dtype=torch.float64),
        offset_px=torch.zeros(b, 2, dtype=torch.float64),
    )
    common = dict(
        proj_coarse=proj_c,
        proj_fine=proj_f,
        coarse_pixels=coarse_pixels,
        estep_pixels=torch.arange(len(win)),
        ramps_coarse=_ramps(t_c, cwin, box),
        ramps_fine=_ramps(t_f, win, box),
        log_prior_offset=torch.zeros(b, k, len(t_c), dtype=torch.float64),
        log_prior_class=torch.zeros(k, dtype=torch.float64),
        n_over_psi=2,
        n_over_trans=4,
        dense_pairs=0.0,  # every particle dense
    )
    plain = expectation(data, **common)
    sep = SeparableShifts.create(t_f, win.kx, win.ky, box)
    assert sep is not None
    with_sep = expectation(data, **common, shifts_fine=sep)
    assert plain.dense is not None and with_sep.dense is not None
    for field in ("best_cls", "best_psi", "best_trans"):
        assert torch.equal(getattr(plain, field), getattr(with_sep, field)), field
    np.testing.assert_allclose(with_sep.loglik.numpy(), plain.loglik.numpy(), rtol=1e-6)
    np.testing.assert_allclose(with_sep.dense.numpy(), plain.dense.numpy(), atol=1e-5)
