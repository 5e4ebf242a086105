"""Gold-standard pieces of RELION's auto-refine (``Experiment::divideParticlesInRandomHalves``,
``BackProjector::updateSSNRarrays`` with the FSC, ``MlOptimiser::updateCurrentResolution``):
random half sets, the FSC -> SSNR -> tau2 step, and the current resolution from the SSNR."""

from __future__ import annotations

import numpy as np
import torch

from tamis.errors import TamisError

__all__ = ["random_halves", "ssnr_tau2_from_fsc", "resolution_shell"]


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
