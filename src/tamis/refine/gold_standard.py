"""Gold-standard pieces of RELION's auto-refine (``Experiment::divideParticlesInRandomHalves``,
``BackProjector::updateSSNRarrays`` with the FSC, ``MlOptimiser::updateCurrentResolution``):
random half sets, the FSC -> SSNR -> tau2 step, and the current resolution from the SSNR."""

from __future__ import annotations

import math

import numpy as np
import torch

from tamis.errors import TamisError
from tamis.padded_grid import relion_round

__all__ = [
    "random_halves",
    "ssnr_tau2_from_fsc",
    "resolution_shell",
    "join_low_resolution",
    "downsampled_average",
    "half_sums_fsc",
    "image_size_increment",
]


def random_halves(existing: np.ndarray | None, n: int, seed: int) -> np.ndarray:
    """``rlnRandomSubset`` (1 or 2) per particle: an existing column where every value is 1 or 2
    is kept; otherwise each particle draws its half independently (not by micrograph, as RELION
    for single particles). A column mixing 0 with 1/2, or holding other values, is an error."""
    if existing is not None:
        v = np.asarray(existing).astype(int)
        if len(v) != n:
            raise TamisError(f"rlnRandomSubset has {len(v)} values for {n} particles")
        if np.isin(v, (1, 2)).all():
            return v
        if (v == 0).all():
            existing = None
        else:
            bad = sorted(set(np.unique(v).tolist()) - {1, 2})
            raise TamisError(
                f"rlnRandomSubset holds {bad}: every particle needs 1 or 2 (or remove the column)"
            )
    return np.random.default_rng(seed).integers(1, 3, size=n)


def ssnr_tau2_from_fsc(
    fsc: torch.Tensor,
    sigma2: torch.Tensor,
    tau2_fudge: float = 1.0,
    joined: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per shell, RELION's SSNR and tau2 from the gold-standard FSC: ``F = max(0.001, FSC)``,
    ``sqrt(2F / (1 + F))`` when the halves are joined (the final iteration), at most 0.999;
    ``SSNR = T F / (1 - F)``, ``tau2 = SSNR sigma2`` (``sigma2``: the inverse of the mean
    reconstruction weight of the shell)."""
    f = fsc.to(torch.float64).clamp(min=0.001)
    if joined:
        f = torch.sqrt(2 * f / (1 + f))
    f = f.clamp(max=0.999)
    ssnr = tau2_fudge * f / (1 - f)
    return ssnr, ssnr * sigma2.to(torch.float64)


def resolution_shell(
    ssnr: torch.Tensor, ori_size: int, *, gold_standard: bool, minres: int = 5
) -> int:
    """``updateCurrentResolution``'s maxres: the shell before the first shell >= 1 with SSNR < 1,
    at least ``minres``; gold-standard runs take the last shell below Nyquist with SSNR > 1
    instead when it lies more than 3 shells further out (dips from phase randomisation)."""
    s = ssnr.to(torch.float64)
    half = ori_size // 2
    ires = half
    for i in range(1, half):
        if float(s[i]) < 1.0:
            ires = i
            break
    ires -= 1
    if gold_standard:
        ires2 = ires - 1
        for j in range(half - 1, ires - 1, -1):
            if float(s[j]) > 1.0:
                ires2 = j
                break
        if ires2 > ires + 3:
            ires = ires2
    return max(ires, minres)


def _coordinates(m: int, device) -> torch.Tensor:
    """Integer frequency of each index of a centred axis of ``m`` (index ``i`` holds
    ``i - m/2``)."""
    return torch.arange(m, device=device) - m // 2


def join_low_resolution(
    d1: torch.Tensor,
    w1: torch.Tensor,
    d2: torch.Tensor,
    w2: torch.Tensor,
    *,
    pad: int,
    shell: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``joinTwoHalvesAtLowResolution``: padded voxels with ``|q|² <= ROUND(pad R)²`` (``R``
    = ``shell``) take the mean of the two halves' data and weight; ``(K, M, M, M)`` grids,
    new tensors."""
    m = d1.shape[-1]
    c = _coordinates(m, d1.device).to(torch.float64)
    q2 = c[:, None, None] ** 2 + c[None, :, None] ** 2 + c[None, None, :] ** 2
    inside = q2 <= float(relion_round(torch.tensor(pad * shell, dtype=torch.float64))) ** 2
    dm, wm = (d1 + d2) / 2, (w1 + w2) / 2
    return (
        torch.where(inside, dm, d1),
        torch.where(inside, wm, w1),
        torch.where(inside, dm, d2),
        torch.where(inside, wm, w2),
    )


def downsampled_average(d: torch.Tensor, w: torch.Tensor, pad: int, box: int) -> torch.Tensor:
    """``BackProjector::getDownsampledAverage``: the padded sums of one class ``(M, M, M)``
    gathered onto the unpadded frequencies (each component ``ROUND(q / pad)``, RELION's
    rounding of halves away from zero, so that the bins are symmetric about 0 and the bins with
    ``kx >= 0`` hold only padded voxels with ``qx >= 0``, as RELION's half grid), ``sum D /
    sum W`` (0 where no weight): a complex ``(box, box, box)`` centred grid."""
    m = d.shape[-1]
    c = relion_round(_coordinates(m, d.device).to(torch.float64) / pad)
    half = box // 2
    ok = (c >= -half) & (c < box - half)
    idx = (c + half).clamp(0, box - 1)
    flat = (idx[:, None, None] * box + idx[None, :, None]) * box + idx[None, None, :]
    keep = (ok[:, None, None] & ok[None, :, None] & ok[None, None, :]).reshape(-1)
    flat = flat.reshape(-1)[keep]
    num = torch.zeros(box**3, dtype=torch.complex128, device=d.device)
    den = torch.zeros(box**3, dtype=torch.float64, device=d.device)
    num.index_add_(0, flat, d.reshape(-1)[keep].to(torch.complex128))
    den.index_add_(0, flat, w.reshape(-1)[keep].to(torch.float64))
    avg = torch.where(den > 0, num / den.clamp(min=1e-300), torch.zeros_like(num))
    return avg.reshape(box, box, box)


def half_sums_fsc(
    d1: torch.Tensor,
    w1: torch.Tensor,
    d2: torch.Tensor,
    w2: torch.Tensor,
    *,
    pad: int,
    box: int,
    r_max: float,
) -> torch.Tensor:
    """``compareTwoHalves``: the FSC ``(box // 2 + 1,)`` between the two halves' down-sampled
    averages (:func:`downsampled_average`) over the half grid ``kx >= 0`` with ``|k| <= r_max``,
    shell ``ROUND(|k|)``; FSC(0) = 1."""
    a1 = downsampled_average(d1, w1, pad, box)
    a2 = downsampled_average(d2, w2, pad, box)
    c = _coordinates(box, d1.device).to(torch.float64)
    r = torch.sqrt(c[:, None, None] ** 2 + c[None, :, None] ** 2 + c[None, None, :] ** 2)
    nsh = box // 2 + 1
    use = (r <= r_max) & (c[None, None, :] >= 0)
    sh = relion_round(r).to(torch.int64).clamp(max=nsh)
    sh = torch.where(use & (sh < nsh), sh, torch.full_like(sh, nsh)).reshape(-1)

    def shell_sum(v: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(nsh + 1, dtype=torch.float64, device=d1.device)
        return out.index_add_(0, sh, v.reshape(-1))[:nsh]

    cross = shell_sum((a1 * a2.conj()).real)
    p1 = shell_sum(a1.abs() ** 2)
    p2 = shell_sum(a2.abs() ** 2)
    fsc = torch.where(
        (p1 > 0) & (p2 > 0), cross / torch.sqrt(p1 * p2).clamp(min=1e-300), torch.zeros_like(p1)
    )
    fsc[0] = 1.0
    return fsc


def image_size_increment(fsc: torch.Tensor, incr_size: int, current_size: int) -> tuple[int, bool]:
    """After the FSC (MPI gold-standard runs): ``incr_size`` grows to ``fsc0143 - fsc05 + 5``
    (first shells below 0.143 and 0.5) when larger; and whether the FSC one shell inside the
    current size's edge is above 0.2 (``has_high_fsc_at_limit``)."""
    f = fsc.to(torch.float64).cpu().numpy()

    def first_below(t: float) -> int:
        below = np.flatnonzero(f[1:] < t)
        return int(below[0]) + 1 if len(below) else len(f) - 1

    incr = max(incr_size, first_below(0.143) - first_below(0.5) + 5)
    edge = current_size // 2 - 1
    high = 0 <= edge < len(f) and f[edge] > 0.2
    return incr, bool(high)


def join_shell(box: int, pixel: float, join_angstrom: float, resolution_angstrom: float) -> int:
    """``R = ceil(N p / max(join, current resolution))``: the shell up to which the halves are
    averaged."""
    res = max(join_angstrom, resolution_angstrom)
    return int(math.ceil(box * pixel / res))
