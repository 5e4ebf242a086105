"""RELION's 3D orientation sampling for one iteration (``HealpixSampling`` with ``is_3D``): HEALPix
directions in the asymmetric unit x psi as rotation matrices, their oversampled children, and
the per-iteration random perturbation; translations as in 2D (:class:`tamis.class2d.sampling.
Sampling`, whose perturbation this shares).

- Coarse orientation ``d * nr_psi + p`` is direction ``d`` (RELION's order) at psi ``p``.
- Fine orientations of a coarse one: its ``4**k`` direction children (y outer, x inner) each
  with the ``2**k`` psi children, in that order (``getOrientations``,
  ``pushbackOversampledPsiAngles``); fine ``j * 8**k + a`` refines coarse ``j``.
- Perturbation: every orientation ``A(rot, tilt, psi)`` becomes ``A . A(r s, r s, r s)``, with
  ``r`` the perturbation instance and ``s`` the coarse angular step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from tamis.class2d.sampling import Sampling
from tamis.geometry import euler_to_matrix
from tamis.orientations import (
    angular_sampling,
    directions,
    oversampled_directions,
    oversampled_psi,
    psi_angles,
)

__all__ = ["Sampling3D"]


@dataclass
class Sampling3D(Sampling):
    """3D sampling at HEALPix ``healpix_order`` in point group ``sym``."""

    healpix_order: int = 1
    sym: str = "C1"
    _grid: object = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.set_order(self.healpix_order)

    def set_order(self, order: int) -> None:
        """(Re)build the grid at HEALPix ``order``; psi uses the same angular step."""
        self.healpix_order = order
        self._grid = directions(order, self.sym)
        psi, step = psi_angles(order)
        self._psi = psi
        self.psi_step = step
        self.nr_psi = len(psi)

    @property
    def angular_step(self) -> float:
        return angular_sampling(self.healpix_order)

    @property
    def nr_directions(self) -> int:
        return len(self._grid.pixel)

    @property
    def n_over_orient(self) -> int:
        return 8**self.oversampling

    def _perturbed(self, rot: torch.Tensor, tilt: torch.Tensor, psi: torch.Tensor) -> torch.Tensor:
        a = euler_to_matrix(rot, tilt, psi)
        if self.perturbation != 0:
            d = torch.tensor(self.perturbation * self.angular_step, dtype=torch.float64)
            a = a @ euler_to_matrix(d, d, d)
        return a

    def coarse_angles(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Unperturbed (rot, tilt, psi) of the coarse orientations, ``(D * P,)`` each."""
        g, p = self._grid, self._psi
        return (
            g.rot.repeat_interleave(len(p)),
            g.tilt.repeat_interleave(len(p)),
            p.repeat(len(g.rot)),
        )

    def coarse_rotations(self, ids: torch.Tensor | None = None) -> torch.Tensor:
        """``(D * P, 3, 3)`` perturbed coarse orientations (only those at ``ids`` when given)."""
        rot, tilt, psi = self.coarse_angles()
        if ids is not None:
            ids = ids.cpu()
            rot, tilt, psi = rot[ids], tilt[ids], psi[ids]
        return self._perturbed(rot, tilt, psi)

    @property
    def direction_angles(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Unperturbed (rot, tilt) of the coarse directions ``(D,)`` each (RELION's order)."""
        return self._grid.rot, self._grid.tilt

    @property
    def psi(self) -> torch.Tensor:
        """The coarse psi angles ``(P,)`` (degrees)."""
        return self._psi

    def fine_rotations_of(self, ids: torch.Tensor) -> torch.Tensor:
        """The perturbed fine children ``(U * 8**k, 3, 3)`` of the coarse orientations ``ids``
        ``(U,)``, in the order of :meth:`fine_rotations` (fine ``j * 8**k + a`` refines
        ``ids[j]``), without making the others."""
        ids = ids.cpu()
        if self.oversampling == 0:
            return self.coarse_rotations(ids)
        g, p = self._grid, self._psi
        d, q = ids // self.nr_psi, ids % self.nr_psi
        _, krot, ktilt = oversampled_directions(g.pixel[d], self.healpix_order, self.oversampling)
        kpsi = oversampled_psi(p[q], self.psi_step, self.oversampling)  # (U, 2**k)
        u, nk = krot.shape
        npk = kpsi.shape[1]
        rot = krot[:, :, None].expand(u, nk, npk)
        tilt = ktilt[:, :, None].expand(u, nk, npk)
        psi = kpsi[:, None, :].expand(u, nk, npk)
        return self._perturbed(rot.reshape(-1), tilt.reshape(-1), psi.reshape(-1))

    def fine_rotations(self) -> torch.Tensor:
        """``(D * P * 8**k, 3, 3)`` perturbed fine orientations (coarse-major)."""
        if self.oversampling == 0:
            return self.coarse_rotations()
        g, p = self._grid, self._psi
        _, krot, ktilt = oversampled_directions(g.pixel, self.healpix_order, self.oversampling)
        kpsi = oversampled_psi(p, self.psi_step, self.oversampling)  # (P, 2**k)
        nd, nk = krot.shape
        npsi, npk = kpsi.shape
        # (direction, psi, direction child, psi child)
        rot = krot[:, None, :, None].expand(nd, npsi, nk, npk)
        tilt = ktilt[:, None, :, None].expand(nd, npsi, nk, npk)
        psi = kpsi[None, :, None, :].expand(nd, npsi, nk, npk)
        return self._perturbed(rot.reshape(-1), tilt.reshape(-1), psi.reshape(-1))
