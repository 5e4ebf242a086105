"""Class references on RELION's padded Fourier grid in 2D: projection (rotation) and
back-rotation. The grids themselves (transforms, tau2, reconstruction, SSNR) are
:mod:`tamis.padded_grid`'s, shared with 3D; their names are re-exported here.

Grids are full-plane, centred (frequency 0 at index ``M // 2``), ``M = pad * N``, complex, in the
units of an ``N``-box forward-normalised transform (RELION's ``x pad²``), so a sample at
``pad * A^T k`` *is* the model value at image frequency ``k``. Sampling and splatting are bilinear
(RELION's ``Projector::rotate2D`` / ``BackProjector::backrotate2D``); a splat also writes the
Hermitian mate so the grid stays Hermitian.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tamis.fourier import duplicate_half_column, rfft_frequencies
from tamis.padded_grid import (
    GridSplat,
    grid_shells,
    grid_tau2,
    interpolate,
    padded_to_real,
    padded_transforms,
    reconstruct,
    reference_grids,
    relion_round,
    ssnr_arrays,
)

__all__ = [
    "FourierWindow",
    "reference_grids",
    "padded_transforms",
    "padded_to_real",
    "grid_shells",
    "project",
    "back_rotate",
    "splat_rotated",
    "grid_tau2",
    "reconstruct",
    "ssnr_arrays",
    "relion_round",
]


@dataclass
class FourierWindow:
    """The half-plane pixels of an ``N`` box used at current size ``n``.

    Kept: ``ROUND(|k|) <= n // 2``, ``ky > -(n // 2)`` (RELION's window drops the ``-n/2`` row), and
    not the duplicated half column ``kx = 0, ky < 0``. Attributes are 1D over those pixels.
    """

    box: int
    size: int
    index: torch.Tensor  # flat index into the (N, N // 2 + 1) half plane
    kx: torch.Tensor
    ky: torch.Tensor
    shell: torch.Tensor
    in_disc: torch.Tensor  # kx² + ky² <= (n//2)²: pixels projected and back-rotated

    @classmethod
    def create(cls, box: int, size: int, device: torch.device | str = "cpu") -> FourierWindow:
        ky, kx = rfft_frequencies((box, box), device=device, dtype=torch.float64)
        shell = relion_round(torch.sqrt(kx * kx + ky * ky))
        half = size // 2
        rows = (ky > -half) if size % 2 == 0 else (ky >= -half)  # odd sizes keep -(n-1)/2
        keep = (shell <= half) & rows & ~duplicate_half_column((box, box), device=device)
        index = torch.nonzero(keep.reshape(-1)).squeeze(1)
        kxs, kys = kx.reshape(-1)[index], ky.reshape(-1)[index]
        return cls(
            box=box,
            size=size,
            index=index,
            kx=kxs,
            ky=kys,
            shell=shell.reshape(-1)[index],
            in_disc=(kxs * kxs + kys * kys) <= (size // 2) ** 2,
        )

    def __len__(self) -> int:
        return self.index.shape[0]

    def gather(self, half_plane: torch.Tensor) -> torch.Tensor:
        """``(..., N, N // 2 + 1)`` -> ``(..., C)``."""
        return half_plane.reshape(*half_plane.shape[:-2], -1)[..., self.index]

    def subset(self, size: int) -> torch.Tensor:
        """Positions (into this window's pixel list) of the pixels of the smaller window ``size``."""
        half = size // 2
        keep = self.shell <= half
        keep &= (self.ky > -half) if size % 2 == 0 else (self.ky >= -half)
        return torch.nonzero(keep).squeeze(1)


def _positions(psi_deg: torch.Tensor, window: FourierWindow, pad: int) -> tuple[torch.Tensor, ...]:
    """Grid positions ``pad * A^T k`` ``(P, C)`` (x, y) for every psi and window pixel."""
    g = torch.deg2rad(psi_deg.to(torch.float64))[:, None]
    c, s = torch.cos(g), torch.sin(g)
    kx, ky = window.kx[None], window.ky[None]
    return pad * (c * kx - s * ky), pad * (s * kx + c * ky)


def project(
    grids: torch.Tensor, psi_deg: torch.Tensor, window: FourierWindow, *, pad: int = 2
) -> torch.Tensor:
    """Projections ``(K, P, C)`` of every class at every psi, on the window's pixels.

    ``P(k) = F_ref(A^T k)`` with ``A = [[cos, sin], [-sin, cos]]``, bilinear on the padded grid;
    zero outside the current size's disc.
    """
    k = grids.shape[0]
    qx, qy = _positions(psi_deg.to(grids.device), window, pad)
    p_, c_ = qx.shape
    planes = torch.view_as_real(grids).permute(0, 3, 1, 2)  # (K, 2, M + 1, M + 1)
    centre = pad * window.box // 2
    out = interpolate(planes, torch.stack([qx, qy], dim=-1).reshape(-1, 2), centre=centre)
    out = torch.complex(out[:, 0], out[:, 1]).reshape(k, p_, c_)
    return out * window.in_disc.to(out.device)


def back_rotate(
    data: torch.Tensor,
    weight: torch.Tensor,
    psi_deg: torch.Tensor,
    window: FourierWindow,
    *,
    pad: int = 2,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Bilinear splat of per-(class, psi) sums into padded grids (adjoint of :func:`project`).

    ``data`` complex ``(K, P, C)``, ``weight`` real ``(K, P, C)``. Returns ``(D, W)``, each
    ``(K, M, M)``, Hermitian (:class:`~tamis.padded_grid.GridSplat`).
    """
    splat = GridSplat.for_window(data.shape[0], window, pad, 2, data.device)
    splat_rotated(splat, data, weight, psi_deg, window, pad=pad)
    return splat.grids()


def splat_rotated(
    splat: GridSplat,
    data: torch.Tensor,
    weight: torch.Tensor,
    psi_deg: torch.Tensor,
    window: FourierWindow,
    *,
    pad: int = 2,
) -> None:
    """Add :func:`back_rotate`'s splat of ``data``/``weight`` ``(K, P, C)`` into ``splat``."""
    # RELION back-rotates only pixels within r_max = size // 2 (not the half shell beyond).
    disc = window.in_disc.to(data.device)
    qx, qy = _positions(psi_deg.to(data.device), window, pad)
    splat.add(torch.stack([qx, qy], dim=-1).reshape(-1, 2), data * disc, weight * disc)
