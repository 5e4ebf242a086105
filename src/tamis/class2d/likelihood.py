"""The batched E-step: squared differences as GEMMs, weights, 0.999 significance, two passes.

For a batch of B particles, R = (active classes x psi) projections P_r and T translations::

    diff2(i, r, t) = sum_p |c_i P_r - X_i ramp_t|² / (2 sigma²)
                   = const_i + sum_p (c_i² / 2sigma²) |P_r|² - 2 Re sum_p conj(P_r) (c_i X_i ramp_t / 2sigma²)

The last sum is one real GEMM ``(B*T, 2C) x (2C, R)`` and the middle one ``(B, C) x (C, R)``
(``c`` = scale x CTF, DC pixel weight 0). Pass 0 evaluates every coarse (class, psi, t) at the
coarse size; pass 1 evaluates, at the current size, only the oversampled hypotheses (2 psi x 4 t
for order 1) of the coarse samples that carry 99.9% of a particle's weight. Log-weights are
reduced in float64.
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
    "segment_significance",
    "GEMM_STATS",
]

#: Floating-point operations done by the E-step GEMMs and their shapes, for benchmarks.
GEMM_STATS: dict[str, object] = {"flops": 0.0, "shapes": []}


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
    """Significant fine hypotheses of a batch and per-particle results.

    Per hypothesis (H,): ``particle`` (row in the batch), ``cls`` (class index), ``psi`` (fine psi
    index), ``trans`` (fine translation index), ``coarse_trans``, ``weight`` (normalised by the
    particle's total fine weight). Per particle (B,): ``best`` (row of the best hypothesis),
    ``pmax``, ``n_significant`` (coarse), ``loglik``.
    """

    particle: torch.Tensor
    cls: torch.Tensor
    psi: torch.Tensor
    trans: torch.Tensor
    coarse_trans: torch.Tensor
    weight: torch.Tensor
    best: torch.Tensor
    pmax: torch.Tensor
    n_significant: torch.Tensor
    loglik: torch.Tensor
    #: With broad posteriors the fine pass is evaluated densely; then the normalised, pruned
    #: weights of every fine hypothesis ``(B, K, Pf, Tf)`` are here and the per-hypothesis lists
    #: above hold only each particle's best hypothesis.
    dense: torch.Tensor | None = None


def significant_mask(
    logw: torch.Tensor, fraction: float, max_significant: int = -1
) -> torch.Tensor:
    """Per row of ``logw`` ``(B, S)``: the samples that together carry ``fraction`` of the weight.

    RELION's rule: sort descending, accumulate until the running sum exceeds ``fraction x total``;
    the last weight added is the threshold; keep every weight >= threshold (at most
    ``max_significant`` if > 0).
    """
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


def segment_significance(
    segment: torch.Tensor, logw: torch.Tensor, n_segments: int, fraction: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The same rule per segment of a flat list (``segment`` = particle of each hypothesis).

    Returns (keep mask, weight normalised by the segment's total, segment logsumexp).
    """
    seg_max = torch.full((n_segments,), -math.inf, dtype=logw.dtype, device=logw.device)
    seg_max = seg_max.scatter_reduce(0, segment, logw, reduce="amax", include_self=True)
    w = torch.exp(logw - seg_max[segment])
    total = torch.zeros(n_segments, dtype=w.dtype, device=w.device).index_add_(0, segment, w)
    norm_w = w / total[segment]
    # sort by (segment asc, weight desc)
    order = torch.argsort(norm_w, descending=True, stable=True)
    order = order[torch.argsort(segment[order], stable=True)]
    sw = norm_w[order]
    seg_sorted = segment[order]
    exclusive = torch.cumsum(sw, 0) - sw  # running sum before each element, over all segments
    counts = torch.bincount(seg_sorted, minlength=n_segments)
    first = (torch.cumsum(counts, 0) - counts).clamp(max=max(len(sw) - 1, 0))
    before = exclusive - exclusive[first][seg_sorted]  # ... within its own segment
    added = before < fraction  # elements added while the running sum had not yet exceeded it
    thr = torch.full((n_segments,), math.inf, dtype=sw.dtype, device=sw.device)
    thr = thr.scatter_reduce(0, seg_sorted[added], sw[added], reduce="amin", include_self=True)
    keep = norm_w >= thr[segment]
    lse = seg_max + torch.log(total)
    return keep, norm_w, lse


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
    GEMM_STATS["flops"] += 2.0 * b * t * 2 * c * proj.shape[0] + 2.0 * b * c * proj.shape[0]
    shapes = GEMM_STATS["shapes"]
    if len(shapes) < 64:
        shapes.append((b * t, 2 * c, proj.shape[0]))
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
    chunk: int = 4096,
    dense_fraction: float = 0.05,
) -> Hypotheses:
    """Run both E-step passes for one batch.

    ``proj_coarse`` ``(K, Pc, Cc)`` on ``coarse_pixels`` (positions in the window);
    ``proj_fine`` ``(K, Pf, C)`` on the whole current-size window; ``estep_pixels`` are the
    window positions the fine pass uses (all, or the coarse ones with ``--strict_highres_exp``).
    ``ramps_*`` are phase ramps ``(T, C*)`` of the perturbed translations;
    ``log_prior_offset`` ``(B, K, Tc)`` is evaluated at the unperturbed coarse translations.
    ``log_prior_class`` ``(K,)`` is ``-inf`` for empty classes.
    With ``n_over_psi == n_over_trans == 1`` (``--oversampling 0``) pass 0 is the only pass.
    """
    b = data.x.shape[0]
    k, pc, _ = proj_coarse.shape
    tc = ramps_coarse.shape[0]
    w2 = data.weight2
    ctf, x = data.ctf, data.x

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
    sig = significant_mask(logw0, fraction, max_significant)
    n_sig = sig.sum(1)

    cells = torch.nonzero(sig)  # (M, 2): particle, flat (ka, pc, tc)
    ci = cells[:, 0]
    flat = cells[:, 1]
    c_k = active[flat // (pc * tc)]
    c_psi = (flat // tc) % pc
    c_t = flat % tc

    if n_over_psi == 1 and n_over_trans == 1 and proj_fine is proj_coarse:
        # --oversampling 0: the coarse pass is the final one.
        lse = torch.logsumexp(logw0, dim=1)
        norm_w = torch.exp(logw0[ci, flat] - lse[ci])  # normalised by the total over all samples
        keep = torch.ones_like(norm_w, dtype=torch.bool)
        hyp_p, hyp_k, hyp_psi, hyp_t, hyp_tc, hyp_w = ci, c_k, c_psi, c_t, c_t, norm_w
    elif len(ci) > dense_fraction * b * ka * pc * tc:
        # Broad posteriors (early iterations): one dense GEMM beats gathering per cell.
        return _dense_fine_pass(
            data,
            sig,
            n_sig,
            prior,
            active,
            proj_fine,
            ramps_fine,
            estep_pixels,
            n_over_psi,
            n_over_trans,
            fraction,
            k,
        )
    else:
        e_idx = estep_pixels
        w2e, ctfe, xe = w2[:, e_idx], ctf[:, e_idx], x[:, e_idx]
        y_w = w2e * ctfe * xe
        a_w = w2e * ctfe * ctfe
        const_f = (w2e * (xe.real**2 + xe.imag**2)).sum(1).to(torch.float64) + 0.5 * data.high_xi2
        pf = proj_fine[:, :, e_idx]
        rf = ramps_fine[:, e_idx]
        sub_psi = torch.arange(n_over_psi, device=ci.device)
        sub_t = torch.arange(n_over_trans, device=ci.device)
        logws, parts = [], []
        for s in range(0, len(ci), chunk):
            sl = slice(s, s + chunk)
            i_, k_, p_, t_ = ci[sl], c_k[sl], c_psi[sl], c_t[sl]
            fpsi = p_[:, None] * n_over_psi + sub_psi[None]  # (m, a)
            ftr = t_[:, None] * n_over_trans + sub_t[None]  # (m, b)
            proj = pf[k_[:, None], fpsi]  # (m, a, C)
            z = y_w[i_][:, None, :] * rf[ftr]  # (m, b, C)
            cross = torch.einsum("mac,mbc->mab", proj.conj(), z).real
            a = torch.einsum("mc,mac->ma", a_w[i_], proj.real**2 + proj.imag**2)
            d2f = const_f[i_][:, None, None] + (a[:, :, None] - 2.0 * cross).to(torch.float64)
            pri = log_prior_class[k_] + log_prior_offset[i_, k_, t_]
            logws.append((pri[:, None, None] - d2f).reshape(-1))
            parts.append(
                torch.stack(
                    [
                        i_[:, None, None].expand(-1, n_over_psi, n_over_trans),
                        k_[:, None, None].expand(-1, n_over_psi, n_over_trans),
                        fpsi[:, :, None].expand(-1, -1, n_over_trans),
                        ftr[:, None, :].expand(-1, n_over_psi, -1),
                        t_[:, None, None].expand(-1, n_over_psi, n_over_trans),
                    ],
                    dim=-1,
                ).reshape(-1, 5)
            )
        logw = torch.cat(logws)
        idx = torch.cat(parts)
        keep, norm_w, lse = segment_significance(idx[:, 0], logw, b, fraction)
        hyp_p, hyp_k, hyp_psi, hyp_t, hyp_tc = idx.unbind(1)
        hyp_w = norm_w

    hyp_p, hyp_k, hyp_psi, hyp_t, hyp_tc, hyp_w = (
        v[keep] for v in (hyp_p, hyp_k, hyp_psi, hyp_t, hyp_tc, hyp_w)
    )
    pmax = torch.zeros(b, dtype=hyp_w.dtype, device=hyp_w.device)
    pmax = pmax.scatter_reduce(0, hyp_p, hyp_w, reduce="amax", include_self=True)
    is_best = hyp_w == pmax[hyp_p]
    rows = torch.arange(len(hyp_w), device=hyp_w.device)
    best = torch.full((b,), len(hyp_w), dtype=torch.long, device=hyp_w.device)
    best = best.scatter_reduce(0, hyp_p[is_best], rows[is_best], reduce="amin", include_self=True)
    norm_const = torch.where(
        data.dc[None], torch.zeros_like(data.sigma2), torch.log(2 * math.pi * data.sigma2)
    )[:, estep_pixels if n_over_psi * n_over_trans > 1 else coarse_pixels].sum(1)
    return Hypotheses(
        particle=hyp_p,
        cls=hyp_k,
        psi=hyp_psi,
        trans=hyp_t,
        coarse_trans=hyp_tc,
        weight=hyp_w,
        best=best,
        pmax=pmax,
        n_significant=n_sig,
        loglik=lse - norm_const.to(torch.float64),
    )


def _dense_fine_pass(
    data: BatchData,
    sig: torch.Tensor,
    n_sig: torch.Tensor,
    prior: torch.Tensor,
    active: torch.Tensor,
    proj_fine: torch.Tensor,
    ramps_fine: torch.Tensor,
    estep_pixels: torch.Tensor,
    n_over_psi: int,
    n_over_trans: int,
    fraction: float,
    n_classes: int,
) -> Hypotheses:
    """Pass 1 over every fine hypothesis of the active classes; children of non-significant
    coarse samples get zero weight. Same weights as the sparse path, GEMM-shaped."""
    b = data.x.shape[0]
    ka = len(active)
    _, pf, _ = proj_fine.shape
    tf = ramps_fine.shape[0]
    pc, tc = pf // n_over_psi, tf // n_over_trans
    e = estep_pixels
    w2 = data.weight2[:, e]
    ctf, x = data.ctf[:, e], data.x[:, e]
    const = (w2 * (x.real**2 + x.imag**2)).sum(1).to(torch.float64) + 0.5 * data.high_xi2
    p = proj_fine[active][:, :, e].reshape(ka * pf, -1)
    d2 = _diff2_dense(w2 * ctf * x, w2 * ctf * ctf, p, ramps_fine[:, e])  # (B, Ka*Pf, Tf)
    d2 = d2.reshape(b, ka, pf, tf) + const[:, None, None, None]
    parent = sig.reshape(b, ka, pc, tc)
    parent = parent.repeat_interleave(n_over_psi, 2).repeat_interleave(n_over_trans, 3)
    pri = prior.expand(b, ka, 1, tc).repeat_interleave(n_over_trans, 3)  # (B, Ka, 1, Tf)
    logw = torch.where(parent, pri - d2, torch.full_like(d2, -math.inf)).reshape(b, -1)
    lse = torch.logsumexp(logw, dim=1)
    keep = significant_mask(logw, fraction)
    w = torch.where(keep, torch.exp(logw - lse[:, None]), torch.zeros_like(logw))
    dense = torch.zeros((b, n_classes, pf, tf), dtype=w.dtype, device=w.device)
    dense[:, active] = w.reshape(b, ka, pf, tf)
    pmax, arg = w.max(dim=1)
    bk = active[arg // (pf * tf)]
    bpsi = (arg // tf) % pf
    bt = arg % tf
    norm_const = torch.where(
        data.dc[None], torch.zeros_like(data.sigma2), torch.log(2 * math.pi * data.sigma2)
    )[:, e].sum(1)
    rows = torch.arange(b, device=w.device)
    return Hypotheses(
        particle=rows,
        cls=bk,
        psi=bpsi,
        trans=bt,
        coarse_trans=bt // n_over_trans,
        weight=pmax,
        best=rows,
        pmax=pmax,
        n_significant=n_sig,
        loglik=lse - norm_const.to(torch.float64),
        dense=dense,
    )
