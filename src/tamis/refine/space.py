"""The 3D engine's :class:`~tamis.class2d.space.ReferenceSpace`: references are volumes,
orientations rotation matrices ``(P, 3, 3)`` (RELION's ``Euler_angles2matrix``); sums are
back-projected and then symmetrised over the point group (the orientation search covers one
asymmetric unit)."""

from __future__ import annotations

import torch

from tamis.class2d.fourier2d import FourierWindow
from tamis.padded_grid import GridSplat, SliceTiles
from tamis.refine.fourier3d import project, project_sources, splat_sections, symmetrise
from tamis.symmetry import canonical_symmetry, symmetry_operators

__all__ = ["VolumeSpace"]


class VolumeSpace:
    """3D references in point group ``sym``."""

    ndim = 3

    def __init__(self, sym: str = "C1") -> None:
        self.sym = canonical_symmetry(sym)
        self.operators = symmetry_operators(self.sym)

    def prepare(self, grids: torch.Tensor, window: FourierWindow, pad: int) -> SliceTiles:
        return project_sources(grids, window, pad=pad)

    def project(
        self,
        grids: torch.Tensor | SliceTiles,
        orientations: torch.Tensor,
        window: FourierWindow,
        pad: int,
    ) -> torch.Tensor:
        return project(grids, orientations, window, pad=pad)

    def splat(
        self,
        acc: GridSplat,
        data: torch.Tensor,
        weight: torch.Tensor,
        orientations: torch.Tensor,
        window: FourierWindow,
        pad: int,
    ) -> None:
        splat_sections(acc, data, weight, orientations, window, pad=pad)

    def finish(self, acc: GridSplat, r_max: float, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
        d, w = acc.grids()
        if len(self.operators) > 1:
            d, w = symmetrise(d, w, self.operators, r_max=r_max, pad=pad)
        return d, w
