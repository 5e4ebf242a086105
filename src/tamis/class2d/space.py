"""Where references live, as the E-step and M-step see them (the one point where 2D and 3D
differ): projections of the references at a set of orientations, and the splat of the
per-orientation sums back into padded Fourier grids.

:class:`InPlaneSpace` is 2D classification's: images, orientations are psi angles (degrees).
The 3D engine's :class:`tamis.refine.space.VolumeSpace` has the same methods over volumes and
rotation matrices (with point-group symmetrisation after the splat). Everything else (grids,
reconstruction, SSNR, VDAM's moments) works on either through :mod:`tamis.padded_grid`.

The splat is linear, so sums can be splatted once (:meth:`back`) or batch by batch into one
:class:`~tamis.padded_grid.GridSplat` (:meth:`splat`, then :meth:`finish`) when the
per-orientation sums of every orientation would not fit in memory.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from tamis.class2d.fourier2d import FourierWindow, project, splat_rotated
from tamis.padded_grid import GridSplat

__all__ = ["ReferenceSpace", "InPlaneSpace"]


class ReferenceSpace(Protocol):
    ndim: int

    def prepare(self, grids: torch.Tensor, window: FourierWindow, pad: int) -> Any:
        """The padded grids ``(K, M+1, ..., M+1)`` as :meth:`project` reads them fastest, for
        windows up to ``window``'s size (made once for many projections; supports ``len`` and
        slicing by class)."""
        ...

    def project(
        self, grids: Any, orientations: torch.Tensor, window: FourierWindow, pad: int
    ) -> torch.Tensor:
        """``(K, P, C)`` projections of every reference at every orientation (``grids``: the
        padded grids or :meth:`prepare` of them)."""
        ...

    def splat(
        self,
        acc: GridSplat,
        data: torch.Tensor,
        weight: torch.Tensor,
        orientations: torch.Tensor,
        window: FourierWindow,
        pad: int,
    ) -> None:
        """Add per-(reference, orientation) sums ``(K, P, C)`` into ``acc``."""
        ...

    def finish(self, acc: GridSplat, r_max: float, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The padded grids ``(D, W)`` of everything splatted into ``acc``."""
        ...


def back(
    space: ReferenceSpace,
    data: torch.Tensor,
    weight: torch.Tensor,
    orientations: torch.Tensor,
    window: FourierWindow,
    pad: int,
    r_max: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-(reference, orientation) sums ``(K, P, C)`` -> padded grids ``(D, W)`` in one go."""
    acc = GridSplat.for_window(data.shape[0], window, pad, space.ndim, data.device)
    space.splat(acc, data, weight, orientations, window, pad)
    return space.finish(acc, r_max, pad)


class InPlaneSpace:
    """2D: references are images, orientations psi angles ``(P,)`` in degrees."""

    ndim = 2

    def prepare(self, grids: torch.Tensor, window: FourierWindow, pad: int) -> torch.Tensor:
        return grids

    def project(
        self, grids: torch.Tensor, orientations: torch.Tensor, window: FourierWindow, pad: int
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
        splat_rotated(acc, data, weight, orientations, window, pad=pad)

    def finish(self, acc: GridSplat, r_max: float, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
        return acc.grids()
