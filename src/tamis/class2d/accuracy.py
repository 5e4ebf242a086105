"""Expected alignment accuracy per class (RELION's ``calculateExpectedAngularErrors``).

For a few particles (their CTF and noise; 10 in 2D, 100 in 3D) and each class with at least 1%
of the particles: the smallest rotation (2D: of psi; 3D: of rot, tilt or psi, one per particle),
and the smallest shift, of the class's projection at which
``sum_k |CTF (F1 - F2)|² / (2 sigma²)`` over shells >= 1 exceeds ``-ln 0.01 = 4.60517``. Rotations
are searched from 0.05 to 30 degrees, shifts from 0.1 to 10 pixels (x and y averaged; RELION
picks one at random); when nothing reaches the threshold RELION's 35 degrees / 12 pixels are
reported; classes below 1% get 999, as in RELION. Results feed ``rlnAccuracyRotations`` and
``rlnAccuracyTranslationsAngst`` (and, later, the class ranker).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from tamis.class2d.fourier2d import FourierWindow
from tamis.class2d.space import InPlaneSpace, ReferenceSpace

__all__ = ["expected_accuracy"]

_THRESHOLD = -math.log(0.01)


def expected_accuracy(
    grids: torch.Tensor,
    pdf_class: torch.Tensor,
    window: FourierWindow,
    ctf: torch.Tensor,
    sigma2: torch.Tensor,
    turned: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    *,
    space: ReferenceSpace | None = None,
    pad: int = 2,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rotation accuracy in degrees, translation accuracy in pixels), each ``(K,)``.

    ``ctf``, ``sigma2``: ``(P, C)`` on the window for the particles used; ``turned(turns)``
    gives their orientations ``(P, ...)`` and those turned by each of ``turns`` (degrees)
    ``(P * A, ...)``, projected by ``space`` (default: 2D, orientations are psi).
    """
    space = InPlaneSpace() if space is None else space
    k = grids.shape[0]
    dev = grids.device
    angles = torch.logspace(math.log10(0.05), math.log10(30.0), 60, device=dev, dtype=torch.float64)
    shifts = torch.logspace(-1.0, 1.0, 40, device=dev, dtype=torch.float64)
    w = torch.where(
        window.shell >= 1,
        0.5 / sigma2.to(torch.float64),
        torch.zeros_like(sigma2, dtype=torch.float64),
    )
    c2w = ctf.to(torch.float64) ** 2 * w  # (P, C)
    rot = torch.full((k,), 999.0, dtype=torch.float64, device=dev)
    trans = torch.full((k,), 999.0, dtype=torch.float64, device=dev)
    for c in range(k):
        if pdf_class[c] < 0.01:
            continue
        g = grids[c : c + 1]
        first, moved = turned(angles)
        f1 = space.project(g, first, window, pad)[0].to(torch.complex128)  # (P, C)
        f2 = space.project(g, moved, window, pad)[0]
        f2 = f2.reshape(len(f1), len(angles), -1).to(torch.complex128)
        e_rot = ((f1[:, None] - f2).abs() ** 2 * c2w[:, None]).sum(-1)  # (P, A)
        rot[c] = _first_above(e_rot, angles, 35.0).mean()
        p1 = f1.abs() ** 2 * c2w  # (P, C)
        errs = []
        for k_axis in (window.kx, window.ky):
            phase = 2 * math.pi * k_axis[None] * shifts[:, None] / window.box  # (S, C)
            factor = 2 - 2 * torch.cos(phase)  # |1 - exp(i phase)|²
            e_tr = p1 @ factor.T  # (P, S)
            errs.append(_first_above(e_tr, shifts, 12.0))
        trans[c] = torch.stack(errs).mean()
    return rot, trans


def _first_above(energy: torch.Tensor, steps: torch.Tensor, none: float) -> torch.Tensor:
    """Per row, the first step whose energy exceeds the threshold (``none`` if none does, the
    value RELION reports: 35 degrees, 12 pixels)."""
    above = energy > _THRESHOLD
    first = steps[above.to(torch.int8).argmax(1)]
    return torch.where(above.any(1), first, torch.full_like(first, none))
