"""The batched E-step: squared differences as GEMMs, weights, 0.999 significance, two passes.

For a batch of B particles, R = (active classes x psi) projections P_r and T translations::

    diff2(i, r, t) = sum_p |c_i P_r - X_i ramp_t|² / (2 sigma²)
                   = const_i + sum_p (c_i² / 2sigma²) |P_r|² - 2 Re sum_p conj(P_r) (c_i X_i ramp_t / 2sigma²)

Pass 0 (coarse size, coarse psi and t) is dense: the cross term is one real GEMM
``(B*T, 2C) x (2C, R)`` and the middle one ``(B, C) x (C, R)`` (``c`` = scale x CTF; DC weight 0).
Pass 1 (current size, oversampled psi and t) works on *pairs* (particle, fine orientation) whose
coarse parent carried weight: ``Re (conj(P_r) . y_i) @ ramps^T`` is a GEMM ``(M, 2C) x (2C, T_f)``
over every fine translation, masked to the children of significant coarse translations. The same
pair x translation layout drives the M-step sums (:func:`tamis.class2d.mstep.accumulate`).
Log-weights are reduced in float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = [
    "BatchData",
    "Hypotheses",
    "expectation",
    "significant_mask",
    "GEMM_STATS",
]

#: Floating-point operations done by the E-step GEMMs, their shapes, and (set by the driver) the
#: E-step's wall time, for benchmarks.
GEMM_STATS: dict[str, object] = {"flops": 0.0, "shapes": [], "estep_seconds": 0.0}


def _count(m: int, k: int, n: int) -> None:
    GEMM_STATS["flops"] += 2.0 * m * k * n
    shapes = GEMM_STATS["shapes"]
    if len(shapes) < 64:
        shapes.append((m, k, n))


@dataclass
class BatchData:
    """One batch of particles prepared for the E-step (all on one device).

    ``x``/``xu``: masked/unmasked particle spectra on the current-size window ``(B, C)``, already
    norm-corrected and pre-shifted by the rounded previous offset. ``ctf``: scale x CTF ``(B, C)``.
    ``sigma2``: noise variance per pixel ``(B, C)``. ``dc``: bool ``(C,)``, the DC pixel.
    ``high_xi2``: ``sum |X|²`` beyond the current size ``(B,)``. ``offset_px``: rounded previous
    offsets ``(B, 2)``.
    """

    x: torch.Tensor
    xu: torch.Tensor
    ctf: torch.Tensor
    sigma2: torch.Tensor
    dc: torch.Tensor
    high_xi2: torch.Tensor
    offset_px: torch.Tensor

    @property
    def weight2(self) -> torch.Tensor:
        """``1 / (2 sigma²)`` with the DC pixel excluded, ``(B, C)``."""
        w = 0.5 / self.sigma2
        return torch.where(self.dc[None], torch.zeros_like(w), w)


@dataclass
class Hypotheses:
    """The significant fine weights of a batch, as (particle, orientation) pairs x translations.

    Per pair (M,): ``particle`` (row in the batch), ``cls`` (class), ``psi`` (fine psi index).
    ``weight`` ``(M, Tf)``: weights normalised by the particle's total fine weight, zero where
    not significant. Per particle (B,): ``best_cls``, ``best_psi``, ``best_trans``, ``pmax``,
    ``n_significant`` (coarse samples), ``loglik``.
    """

    particle: torch.Tensor
    cls: torch.Tensor
    psi: torch.Tensor
    weight: torch.Tensor
    best_cls: torch.Tensor
    best_psi: torch.Tensor
    best_trans: torch.Tensor
    pmax: torch.Tensor
    n_significant: torch.Tensor
    loglik: torch.Tensor


def significant_mask(
    logw: torch.Tensor, fraction: float, max_significant: int = -1
) -> torch.Tensor:
    """Per row of ``logw`` ``(B, S)``: the samples that together carry ``fraction`` of the weight.

    RELION's rule: sort descending, accumulate until the running sum exceeds ``fraction x total``;
    the last weight added is the threshold; keep every weight >= threshold (at most
    ``max_significant`` if > 0). Without a cap this is the binned selection of
    :func:`_pair_significance` (one row per particle), which gives the same mask without sorting.
    """
    if max_significant <= 0:
        rows = torch.arange(logw.shape[0], device=logw.device)
        return _pair_significance(rows, logw, logw.shape[0], fraction)[1]
    w = torch.exp(logw - logw.max(dim=1, keepdim=True).values)
    sorted_w, _ = torch.sort(w, dim=1, descending=True)
    csum = torch.cumsum(sorted_w, dim=1)
    total = csum[:, -1:]
    # index of the first element at which the running sum exceeds fraction * total
    pos = torch.searchsorted(csum.contiguous(), (fraction * total).contiguous(), right=True)
    pos = pos.clamp(max=w.shape[1] - 1)
    if max_significant > 0:
        pos = pos.clamp(max=max_significant - 1)
    thr = torch.gather(sorted_w, 1, pos)
    return (w >= thr) & (w > 0)


def _diff2_dense(
    y_w: torch.Tensor, a_w: torch.Tensor, proj: torch.Tensor, ramps: torch.Tensor
) -> torch.Tensor:
    """``A(i, r) - 2 cross(i, t, r)`` as ``(B, R, T)`` (float64).

    ``y_w = c X / (2 sigma²)`` ``(B, C)``, ``a_w = c² / (2 sigma²)`` ``(B, C)``, ``proj`` ``(R, C)``,
    ``ramps`` ``(T, C)``.
    """
    b, c = y_w.shape
    t = ramps.shape[0]
    y = (y_w[:, None, :] * ramps[None]).reshape(b * t, c)
    yr = torch.view_as_real(y).reshape(b * t, 2 * c)
    pr = torch.view_as_real(proj.contiguous()).reshape(proj.shape[0], 2 * c)
    cross = (yr @ pr.T).reshape(b, t, -1).transpose(1, 2)  # (B, R, T)
    a = a_w @ (proj.real**2 + proj.imag**2).T  # (B, R)
    _count(b * t, 2 * c, proj.shape[0])
    _count(b, c, proj.shape[0])
    return (a[:, :, None] - 2.0 * cross).to(torch.float64)


def expectation(
    data: BatchData,
    *,
    proj_coarse: torch.Tensor,
    proj_fine: torch.Tensor,
    coarse_pixels: torch.Tensor,
    estep_pixels: torch.Tensor,
    ramps_coarse: torch.Tensor,
    ramps_fine: torch.Tensor,
    log_prior_offset: torch.Tensor,
    log_prior_class: torch.Tensor,
    n_over_psi: int,
    n_over_trans: int,
    fraction: float = 0.999,
    max_significant: int = -1,
    dense_pairs: float = 0.25,
) -> Hypotheses:
    """Run both E-step passes for one batch.

    ``proj_coarse`` ``(K, Pc, Cc)`` on ``coarse_pixels`` (positions in the window);
    ``proj_fine`` ``(K, Pf, C)`` on the whole current-size window; ``estep_pixels`` are the
    window positions the fine pass uses (all, or the coarse ones with ``--strict_highres_exp``).
    ``ramps_*`` are phase ramps ``(T, C*)`` of the perturbed translations;
    ``log_prior_offset`` ``(B, K, Tc)`` is evaluated at the unperturbed coarse translations.
    ``log_prior_class`` ``(K,)`` is ``-inf`` for empty classes.
    With ``n_over_psi == n_over_trans == 1`` and ``proj_fine is proj_coarse``
    (``--oversampling 0``) pass 0 is the only pass. When more than ``dense_pairs`` of all
    (particle, fine orientation) pairs need evaluating, pass 1 is one dense GEMM instead.
    """
    b = data.x.shape[0]
    k, pc, _ = proj_coarse.shape
    tc = ramps_coarse.shape[0]
    w2 = data.weight2
    ctf, x = data.ctf, data.x
    dev = x.device

    # ---- pass 0: dense over active classes x coarse psi x coarse t ---------------------------
    active = torch.nonzero(torch.isfinite(log_prior_class)).squeeze(1)
    ka = len(active)
    w2c, ctfc, xc = w2[:, coarse_pixels], ctf[:, coarse_pixels], x[:, coarse_pixels]
    pc_flat = proj_coarse[active].reshape(ka * pc, -1)
    d2 = _diff2_dense(w2c * ctfc * xc, w2c * ctfc * ctfc, pc_flat, ramps_coarse)  # (B, Ka*Pc, Tc)
    const_c = (w2c * (xc.real**2 + xc.imag**2)).sum(1).to(torch.float64) + 0.5 * data.high_xi2
    d2 = d2.reshape(b, ka, pc, tc) + const_c[:, None, None, None]
    prior = log_prior_class[active][None, :, None, None] + log_prior_offset[:, active, None, :]
    logw0 = (prior - d2).reshape(b, -1)
    sig = significant_mask(logw0, fraction, max_significant).reshape(b, ka, pc, tc)
    n_sig = sig.sum((1, 2, 3))
    pairs = torch.nonzero(sig.any(-1))  # (Mc, 3): particle, active class, coarse psi

    if n_over_psi == 1 and n_over_trans == 1 and proj_fine is proj_coarse:
        # --oversampling 0: the coarse pass is the final one.
        lse = torch.logsumexp(logw0, dim=1)
        logw = logw0.reshape(b, ka, pc, tc)[pairs[:, 0], pairs[:, 1], pairs[:, 2]]
        keep = sig[pairs[:, 0], pairs[:, 1], pairs[:, 2]]
        weight = torch.where(keep, torch.exp(logw - lse[pairs[:, 0], None]), 0.0)
        p_i, p_k, p_psi = pairs[:, 0], active[pairs[:, 1]], pairs[:, 2]
        return _finish(p_i, p_k, p_psi, weight, lse, n_sig, data, coarse_pixels, b)

    # ---- pass 1: (particle, fine psi) pairs x all fine translations, masked ----------------
    sub = torch.arange(n_over_psi, device=dev)
    p_i = pairs[:, 0].repeat_interleave(n_over_psi)
    p_ka = pairs[:, 1].repeat_interleave(n_over_psi)
    p_psi = (pairs[:, 2][:, None] * n_over_psi + sub[None]).reshape(-1)
    p_k = active[p_ka]
    tmask = sig[pairs[:, 0], pairs[:, 1], pairs[:, 2]].repeat_interleave(n_over_trans, dim=1)
    tmask = tmask.repeat_interleave(n_over_psi, dim=0)  # (M, Tf)
    e = estep_pixels
    w2e, ctfe, xe = w2[:, e], ctf[:, e], x[:, e]
    y = w2e * ctfe * xe  # (B, Ce)
    const_f = (w2e * (xe.real**2 + xe.imag**2)).sum(1).to(torch.float64) + 0.5 * data.high_xi2
    pf = proj_fine[:, :, e]
    _, npf, ce = pf.shape
    # A(i, k, psi) for every orientation: one GEMM, then gather the pairs.
    a_all = (w2e * ctfe * ctfe) @ (pf.real**2 + pf.imag**2).reshape(k * npf, ce).T  # (B, K*Pf)
    _count(b, ce, k * npf)
    r_idx = p_k * npf + p_psi
    if len(p_i) > dense_pairs * b * k * npf:
        # Broad posteriors (early iterations): most pairs are needed, so one dense GEMM over
        # every (particle, orientation) beats gathering them.
        d_all = _diff2_dense(y, w2e * ctfe * ctfe, pf.reshape(k * npf, ce), ramps_fine[:, e])
        d2f = const_f[p_i][:, None] + d_all[p_i, r_idx]
    else:
        a = a_all[p_i, r_idx].to(torch.float64)
        cross = _pair_cross(pf[p_k, p_psi], y, p_i, ramps_fine[:, e])  # (M, Tf)
        d2f = const_f[p_i][:, None] + a[:, None] - 2.0 * cross
    t_coarse = torch.arange(ramps_fine.shape[0], device=dev) // n_over_trans
    pri = log_prior_class[p_k][:, None] + log_prior_offset[p_i, p_k][:, t_coarse]
    logw = torch.where(tmask, pri - d2f, -math.inf)
    lse, keep = _pair_significance(p_i, logw, b, fraction)
    weight = torch.where(keep, torch.exp(logw - lse[p_i, None]), 0.0)
    return _finish(p_i, p_k, p_psi, weight, lse, n_sig, data, e, b)


def _pair_cross(
    proj: torch.Tensor,
    y: torch.Tensor,
    particle: torch.Tensor,
    ramps: torch.Tensor,
    chunk: int = 8192,
) -> torch.Tensor:
    """``Re sum_c conj(P_m(c)) y_{i_m}(c) ramp_t(c)`` for pairs m: ``(M, T)`` float64.

    ``(conj(P) . y)`` per pair, then one real GEMM ``[Re, -Im] (M, 2C) x [Re; Im] (2C, T)``.
    """
    m, c = proj.shape
    t = ramps.shape[0]
    rr = torch.cat([ramps.real, ramps.imag], dim=1).T.contiguous()  # (2C, T)
    out = torch.empty((m, t), dtype=torch.float64, device=proj.device)
    for s in range(0, m, chunk):
        u = proj[s : s + chunk].conj() * y[particle[s : s + chunk]]
        out[s : s + chunk] = (torch.cat([u.real, -u.imag], dim=1) @ rr).to(torch.float64)
        _count(u.shape[0], 2 * c, t)
    return out


def _pair_significance(
    particle: torch.Tensor, logw: torch.Tensor, b: int, fraction: float, n_bins: int = 4096
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per particle over all its pairs x translations: (logsumexp ``(B,)``, keep mask).

    RELION's rule on the normalised weights: sort descending, keep adding until the running sum
    exceeds ``fraction``; keep every weight >= the last one added. Without a full sort: the
    weights' mass is binned by log-weight per particle; bins wholly inside the kept set are kept,
    and only the bin where the running sum crosses ``fraction`` is sorted. Weights too small to
    matter together (< (1 - fraction) / 10) are left out. The result equals the full sort's.
    """
    dev = logw.device
    row_max = logw.max(dim=1).values
    seg_max = torch.full((b,), -math.inf, dtype=logw.dtype, device=dev)
    seg_max = seg_max.scatter_reduce(0, particle, row_max, reduce="amax", include_self=True)
    # Relative log-weights have a small range: single precision is enough from here on.
    rel = (logw - seg_max[particle][:, None]).to(torch.float32)
    w = torch.exp(rel)
    total = torch.zeros(b, dtype=torch.float64, device=dev)
    total.index_add_(0, particle, w.sum(1, dtype=torch.float64))
    lse = seg_max + torch.log(total)
    nw = w / total.to(torch.float32)[particle][:, None]
    per_particle = int(torch.bincount(particle, minlength=b).max()) * logw.shape[1]
    if fraction >= 1:
        return lse, nw > 0
    cutoff = math.log(0.1 * (1.0 - fraction) / max(per_particle, 1))
    # bin index: n_bins - 1 for the largest weights, 0 just above the cutoff, -1 below it
    pos = ((rel - cutoff) / -cutoff * n_bins).floor().clamp(max=n_bins - 1)
    pos = torch.where(rel > cutoff, pos, torch.full_like(pos, -1)).to(torch.long)
    seg = particle[:, None].expand_as(pos)
    valid = pos >= 0
    flat = seg[valid] * n_bins + pos[valid]
    mass = torch.zeros(b * n_bins, dtype=torch.float64, device=dev)
    mass.index_add_(0, flat, nw[valid].to(torch.float64))
    mass = mass.view(b, n_bins)
    above = torch.flip(torch.cumsum(torch.flip(mass, [1]), 1), [1]) - mass  # mass of higher bins
    # The crossing bin: the highest bin whose higher bins do not yet exceed the fraction while
    # including it does (every particle has one: the bins hold > 99.99% of its weight).
    crossing = ((above <= fraction) & (above + mass > fraction)).to(torch.int8)
    cbin = (n_bins - 1) - torch.flip(crossing, [1]).argmax(1)
    keep = pos > cbin[seg]
    in_bin = pos == cbin[seg]
    rows, cols = torch.nonzero(in_bin, as_tuple=True)
    if len(rows):
        sg = particle[rows]
        vals = nw[rows, cols].to(torch.float64)
        order = torch.argsort(sg.to(torch.float64) + (1.0 - vals))  # by particle, then descending
        sv, ss = vals[order], sg[order]
        exclusive = torch.cumsum(sv, 0) - sv
        counts = torch.bincount(ss, minlength=b)
        first = (torch.cumsum(counts, 0) - counts).clamp(max=len(sv) - 1)
        before = exclusive - exclusive[first][ss] + above[ss, cbin[ss]]
        added = before < fraction
        thr = torch.full((b,), math.inf, dtype=sv.dtype, device=dev)
        thr = thr.scatter_reduce(0, ss[added], sv[added], reduce="amin", include_self=True)
        keep |= in_bin & (nw >= thr.to(torch.float32)[particle][:, None])
    return lse, keep & (w > 0)


def _finish(
    p_i: torch.Tensor,
    p_k: torch.Tensor,
    p_psi: torch.Tensor,
    weight: torch.Tensor,
    lse: torch.Tensor,
    n_sig: torch.Tensor,
    data: BatchData,
    pixels: torch.Tensor,
    b: int,
) -> Hypotheses:
    """Best hypothesis, Pmax and log-likelihood per particle."""
    dev = weight.device
    row_max, row_arg = weight.max(dim=1)
    pmax = torch.zeros(b, dtype=weight.dtype, device=dev)
    pmax = pmax.scatter_reduce(0, p_i, row_max, reduce="amax", include_self=True)
    is_best = (row_max == pmax[p_i]) & (row_max > 0)
    rows = torch.arange(len(p_i), device=dev)
    best = torch.full((b,), len(p_i), dtype=torch.long, device=dev)
    best = best.scatter_reduce(0, p_i[is_best], rows[is_best], reduce="amin", include_self=True)
    ok = best < len(p_i)
    bb = best.clamp(max=max(len(p_i) - 1, 0))
    norm_const = torch.where(
        data.dc[None], torch.zeros_like(data.sigma2), torch.log(2 * math.pi * data.sigma2)
    )[:, pixels].sum(1)
    none = torch.full((b,), -1, dtype=torch.long, device=dev)
    return Hypotheses(
        particle=p_i,
        cls=p_k,
        psi=p_psi,
        weight=weight,
        best_cls=torch.where(ok, p_k[bb], none) if len(p_i) else none,
        best_psi=torch.where(ok, p_psi[bb], none) if len(p_i) else none,
        best_trans=torch.where(ok, row_arg[bb], none) if len(p_i) else none,
        pmax=pmax,
        n_significant=n_sig,
        loglik=lse - norm_const.to(torch.float64),
    )
