"""The cross-correlation E-step of RELION's ``--firstiter_cc`` (and ``--always_cc``).

When the reference is not on the particles' grey scale, RELION's first iteration does not
weigh hypotheses by their likelihood: each particle takes the one orientation, class and
translation of highest normalised cross-correlation::

    CC(i, r, t) = Re sum_p conj(c_i P_r) X_i ramp_t / ( sqrt(sum_p |c_i P_r|²) sqrt(sum_p |X_i|²) )

over the pass's pixels (RELION's ``getAllSquaredDifferences``: no noise weighting, DC included),
with weight 1 on the best and 0 elsewhere (``convertAllSquaredDifferencesToWeights``). Pass 0
searches every coarse sample (cross terms from the likelihood's dense pass,
:func:`~tamis.class2d.likelihood.cross_terms`); pass 1 the oversampled children of the
particle's best coarse sample only, the one coarse sample with any weight (cross terms as the
likelihood's pair pass, :func:`~tamis.class2d.likelihood.pair_cross`). Priors do not enter, except that samples
outside a local search's neighbourhood (prior ``-inf``) are not searched. The particle's
log-likelihood contribution is its best CC (RELION's ``dLL = -min diff2``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace

import torch

from tamis.class2d.likelihood import (
    BatchData,
    Hypotheses,
    PreparedRefs,
    cross_terms,
    pair_cross,
    prepare_refs,
)
from tamis.class2d.shifts import SeparableShifts

__all__ = ["cc_expectation"]


def cc_expectation(
    data: BatchData,
    *,
    proj_coarse: torch.Tensor,
    proj_fine: torch.Tensor | Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    coarse_pixels: torch.Tensor,
    estep_pixels: torch.Tensor,
    ramps_coarse: torch.Tensor,
    ramps_fine: torch.Tensor,
    log_prior_class: torch.Tensor,
    n_over_psi: int,
    n_over_trans: int,
    coarse_refs: PreparedRefs | None = None,
    log_prior_orient: torch.Tensor | None = None,
    shifts_coarse: SeparableShifts | None = None,
    **_likelihood_only: object,
) -> Hypotheses:
    """Both passes of the cross-correlation search for one batch; the arguments are those of
    :func:`tamis.class2d.likelihood.expectation` (its significance and offset-prior arguments
    are accepted and not used). Every particle gets one (class, fine psi) pair with weight 1
    at its best fine translation, Pmax 1, one significant sample and its best CC as
    ``loglik``."""
    b = data.x.shape[0]
    k, pc, _ = proj_coarse.shape
    tc = ramps_coarse.shape[0]
    dev = data.x.device
    active = torch.nonzero(torch.isfinite(log_prior_class)).squeeze(1)
    ka = len(active)
    if ka == 0:
        raise ValueError("no active class")
    ctf, x = data.ctf[:, coarse_pixels], data.x[:, coarse_pixels]
    if ka == k and coarse_refs is not None:
        refs = coarse_refs
    else:
        refs = prepare_refs(proj_coarse[active].reshape(ka * pc, -1), shifts_coarse)
    # pass 0: every (translation, active class, coarse psi)
    score = cross_terms(ctf * x, refs, ramps_coarse, shifts_coarse)  # 2 cross, (B, Tc, R)
    power = (ctf * ctf) @ refs.norm2.T  # sum |c P|², (B, R)
    score = score.view(b, tc, ka, pc) / (2.0 * _safe_sqrt(power)).view(b, 1, ka, pc)
    if log_prior_orient is not None:  # outside a local search's neighbourhood: not searched
        outside = ~torch.isfinite(log_prior_orient)  # (B, Pc)
        score.masked_fill_(outside[:, None, None, :], -math.inf)
    best, at = score.view(b, -1).max(1)
    t_best, rest = at // (ka * pc), at % (ka * pc)
    cls, psi_c = active[rest // pc], rest % pc
    if n_over_psi == 1 and n_over_trans == 1 and proj_fine is proj_coarse:
        cc = best.to(torch.float64) / _xi(x)
        return _one_hot(cls, psi_c, t_best, tc, cc)

    # pass 1: the children of each particle's best coarse sample
    subset = None
    j = psi_c
    if callable(proj_fine):
        subset, j = torch.unique(psi_c, sorted=True, return_inverse=True)
        need = torch.zeros((k, len(subset)), dtype=torch.bool, device=dev)
        need[cls, j] = True
        proj_fine = proj_fine(subset, need)
    e = estep_pixels
    sub_psi = torch.arange(n_over_psi, device=dev)
    sub_t = torch.arange(n_over_trans, device=dev)
    psi_f = j[:, None] * n_over_psi + sub_psi[None]  # (B, Np)
    t_f = t_best[:, None] * n_over_trans + sub_t[None]  # (B, Nt)
    proj = proj_fine[cls[:, None], psi_f][..., e]  # (B, Np, Ce)
    ctf_e, x_e = data.ctf[:, e], data.x[:, e]
    # the pass's cross terms at the pairs (particle, fine psi) x their child translations
    n_pairs = b * n_over_psi
    el_r = torch.arange(n_pairs, device=dev).repeat_interleave(n_over_trans)
    cross = pair_cross(
        proj.reshape(n_pairs, -1), ctf_e * x_e,
        torch.arange(b, device=dev).repeat_interleave(n_over_psi), ramps_fine[:, e],
        el_r, t_f.repeat_interleave(n_over_psi, dim=0).reshape(-1),
    ).view(b, n_over_psi, n_over_trans)  # fmt: skip
    power = ((ctf_e * ctf_e)[:, None, :] * (proj.real**2 + proj.imag**2)).sum(-1)  # (B, Np)
    score = cross / _safe_sqrt(power)[:, :, None]
    best, at = score.view(b, -1).max(1)
    a, u = at // n_over_trans, at % n_over_trans
    cc = best / _xi(x_e)
    rows = torch.arange(b, device=dev)
    hyp = _one_hot(cls, psi_f[rows, a], t_f[rows, u], ramps_fine.shape[0], cc)
    return hyp if subset is None else replace(hyp, coarse_subset=subset)


def _safe_sqrt(power: torch.Tensor) -> torch.Tensor:
    """``sqrt(power)``, infinite where the projection is empty (so its CC is 0, never best
    over a real one)."""
    return torch.where(power > 0, power.clamp(min=1e-30).sqrt(), math.inf)


def _xi(x: torch.Tensor) -> torch.Tensor:
    """``sqrt(sum |X|²)`` per particle ``(B,)`` float64 (1 for an empty image)."""
    xi = (x.real.double() ** 2 + x.imag.double() ** 2).sum(1).sqrt()
    return torch.where(xi > 0, xi, torch.ones_like(xi))


def _one_hot(
    cls: torch.Tensor, psi: torch.Tensor, trans: torch.Tensor, n_trans: int, cc: torch.Tensor
) -> Hypotheses:
    """One pair per particle with weight 1 at ``trans``."""
    b = len(cls)
    dev = cls.device
    rows = torch.arange(b, device=dev)
    weight = torch.zeros((b, n_trans), dtype=torch.float64, device=dev)
    weight[rows, trans] = 1.0
    return Hypotheses(
        particle=rows,
        cls=cls,
        psi=psi,
        weight=weight,
        best_cls=cls,
        best_psi=psi,
        best_trans=trans,
        pmax=torch.ones(b, dtype=torch.float64, device=dev),
        n_significant=torch.ones(b, dtype=torch.long, device=dev),
        loglik=cc,
    )
