"""The cross-correlation E-step (RELION's ``--firstiter_cc``) against a slow loop."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tamis.class2d.cross_correlation import cc_expectation
from tamis.class2d.em import _ramps
from tamis.class2d.fourier2d import FourierWindow
from tamis.class2d.likelihood import BatchData
from tamis.class2d.shifts import SeparableShifts

BOX, CS, CCS = 24, 24, 16


def _slow_best(x, ctf, proj, ramps, pixels, psis, transes, classes, allowed=None):
    """Best (CC, class, psi, translation) of one particle by loops over the hypotheses."""
    best = (-math.inf, -1, -1, -1)
    xi = math.sqrt(sum(abs(x[p]) ** 2 for p in pixels))
    for k in classes:
        for j in psis:
            if allowed is not None and not allowed(j):
                continue
            den = math.sqrt(sum(abs(ctf[p] * proj[k, j, p]) ** 2 for p in range(len(pixels))))
            for t in transes:
                num = sum(
                    (np.conj(ctf[q] * proj[k, j, p]) * x[q] * ramps[t, p]).real
                    for p, q in enumerate(pixels)
                )
                cc = num / den / xi
                if cc > best[0]:
                    best = (cc, k, j, t)
    return best


def _problem(b=4, k=2, pc=6, n_over_psi=2, n_over_trans=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    window = FourierWindow.create(BOX, CS)
    cwin = FourierWindow.create(BOX, CCS)
    c = len(window)
    r = range(-3, 4)  # a grid the separable sums take (tamis.class2d.shifts)
    t_c = torch.tensor([(x, y) for x in r for y in r], dtype=torch.float64)
    sub = torch.tensor([(-1, -1), (-1, 1), (1, -1), (1, 1)], dtype=torch.float64) / 4
    t_f = (t_c[:, None, :] + sub[None, :n_over_trans]).reshape(-1, 2)
    proj_f = torch.randn((k, pc * n_over_psi, c), dtype=torch.complex64, generator=gen)
    # the coarse projections: each coarse psi's first child on the coarse pixels, noisier
    proj_c = proj_f[:, ::n_over_psi][..., window.subset(CCS)].clone()
    proj_c += 0.3 * torch.randn(proj_c.shape, dtype=torch.complex64, generator=gen)
    # particles: a scaled class-k projection (on another grey scale), shifted, plus noise
    x = torch.randn((b, c), dtype=torch.complex64, generator=gen)
    ctf = 0.2 + torch.rand((b, c), generator=gen)
    ramps_f = _ramps(t_f, window, BOX)
    for i in range(b):
        r = n_over_psi * int(torch.randint(0, pc, (1,), generator=gen))  # a coarse one's child
        t = int(torch.randint(0, len(t_f), (1,), generator=gen))
        signal = ctf[i] * proj_f[i % k, r] * 50.0
        x[i] += signal * ramps_f[t].conj()
    data = BatchData(
        x=x, xu=x, ctf=ctf, sigma2=torch.full((b, c), 2.0), dc=window.shell == 0,
        high_xi2=torch.zeros(b, dtype=torch.float64),
        offset_px=torch.zeros((b, 2), dtype=torch.float64),
    )  # fmt: skip
    return dict(
        data=data, window=window, cwin=cwin, proj_c=proj_c, proj_f=proj_f, t_c=t_c, t_f=t_f,
        ramps_c=_ramps(t_c, cwin, BOX), ramps_f=ramps_f, k=k, pc=pc,
        n_over_psi=n_over_psi, n_over_trans=n_over_trans, coarse=window.subset(CCS),
    )  # fmt: skip


def _run(p, *, separable: bool, on_demand: bool, log_prior_class=None, prior_orient=None):
    shifts = (
        SeparableShifts.create(p["t_c"], p["cwin"].kx, p["cwin"].ky, BOX) if separable else None
    )
    if separable:
        assert shifts is not None
    proj_fine = p["proj_f"]
    if on_demand:
        n_over = p["n_over_psi"]

        def proj_fine(coarse, need):
            ids = (coarse[:, None] * n_over + torch.arange(n_over)).reshape(-1)
            out = torch.zeros((p["k"], len(ids), p["proj_f"].shape[-1]), dtype=torch.complex64)
            # only the needed (class, coarse orientation) pairs are made
            mask = need.repeat_interleave(n_over, dim=1)
            out[mask] = p["proj_f"][:, ids][mask]
            return out

    k = p["k"]
    return cc_expectation(
        p["data"],
        proj_coarse=p["proj_c"],
        proj_fine=proj_fine,
        coarse_pixels=p["coarse"],
        estep_pixels=torch.arange(len(p["window"])),
        ramps_coarse=p["ramps_c"],
        ramps_fine=p["ramps_f"],
        log_prior_offset=torch.zeros((p["data"].x.shape[0], k, len(p["t_c"]))),
        log_prior_class=(
            torch.zeros(k, dtype=torch.float64) if log_prior_class is None else log_prior_class
        ),
        n_over_psi=p["n_over_psi"],
        n_over_trans=p["n_over_trans"],
        log_prior_orient=prior_orient,
        shifts_coarse=shifts,
        fraction=0.999,
    )


@pytest.mark.parametrize("separable", [False, True])
@pytest.mark.parametrize("on_demand", [False, True])
def test_cross_correlation_search_matches_slow_loops(separable: bool, on_demand: bool):
    p = _problem()
    hyp = _run(p, separable=separable, on_demand=on_demand)
    data, b = p["data"], p["data"].x.shape[0]
    x, ctf = data.x.numpy(), data.ctf.numpy()
    coarse = p["coarse"].numpy()
    no, nt = p["n_over_psi"], p["n_over_trans"]
    for i in range(b):
        _, k, j, t = _slow_best(
            x[i], ctf[i], p["proj_c"].numpy(), p["ramps_c"].numpy(), coarse,
            range(p["pc"]), range(len(p["t_c"])), range(p["k"]),
        )  # fmt: skip
        cc, kf, jf, tf = _slow_best(
            x[i], ctf[i], p["proj_f"].numpy(), p["ramps_f"].numpy(), range(len(p["window"])),
            [j * no + a for a in range(no)], [t * nt + u for u in range(nt)], [k],
        )  # fmt: skip
        psi = int(hyp.best_psi[i])
        if on_demand:  # numbered among the children of the coarse subset
            psi = int(hyp.coarse_subset[psi // no]) * no + psi % no
        assert (int(hyp.best_cls[i]), psi, int(hyp.best_trans[i])) == (kf, jf, tf)
        assert float(hyp.loglik[i]) == pytest.approx(cc, rel=1e-4)
        # weight 1 on the best translation of the particle's one pair, 0 elsewhere
        rows = torch.nonzero(hyp.particle == i).squeeze(1)
        assert len(rows) == 1 and float(hyp.weight[rows[0]].sum()) == 1.0
        assert float(hyp.weight[rows[0], tf]) == 1.0
    assert torch.all(hyp.pmax == 1.0) and torch.all(hyp.n_significant == 1)
    # the particles were made from their best projection: the search finds it
    assert float(hyp.loglik.min()) > 0.5


def test_cross_correlation_is_blind_to_the_grey_scale_and_respects_excluded_samples():
    p = _problem(seed=1)
    one = _run(p, separable=False, on_demand=False)
    p["proj_c"] = p["proj_c"] * 1000.0
    p["proj_f"] = p["proj_f"] * 1000.0
    scaled = _run(p, separable=False, on_demand=False)
    for f in ("best_cls", "best_psi", "best_trans"):
        assert torch.equal(getattr(one, f), getattr(scaled, f))
    torch.testing.assert_close(one.loglik, scaled.loglik)
    # an inactive class and orientations outside a local neighbourhood are never chosen
    inactive = torch.tensor([0.0, -math.inf], dtype=torch.float64)
    h = _run(p, separable=False, on_demand=False, log_prior_class=inactive)
    assert torch.all(h.best_cls == 0)
    prior = torch.full((p["data"].x.shape[0], p["pc"]), -math.inf, dtype=torch.float64)
    prior[:, [1, 4]] = 0.0
    h = _run(p, separable=True, on_demand=True, prior_orient=prior)
    coarse_of = h.coarse_subset[h.best_psi // p["n_over_psi"]]
    assert set(coarse_of.tolist()) <= {1, 4}
