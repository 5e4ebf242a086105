"""Whole maps in Fourier space: rotation (RELION's ``Projector::rotate3D``: the padded, gridding
pre-corrected transform read by trilinear interpolation at ``pad A^T k``, so the rotated map is
``V(A^T r)``), group averages, re-centring and hand flips.

Samples are taken on the half grid (``kx >= 0``) of the box's 3D frequencies inside a sphere;
:class:`HalfGrid` carries their positions, their place in an ``rfftn`` array and the weight that
turns a sum over them into a sum over the whole grid (Parseval).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tamis.fourier import irfft3_centered, rfft_frequencies
from tamis.padded_grid import interpolate, reference_grids, relion_round

__all__ = [
    "HalfGrid",
    "map_grid",
    "sample",
    "rotate_volumes",
    "symmetrise_map",
    "centre_of_mass",
    "shift_volume",
    "flip_hand",
    "resize_map",
]

#: Interpolated samples per call of grid_sample (bounds the temporaries to ~100 MB).
_MAX_SAMPLES = 1 << 22


@dataclass
class HalfGrid:
    """The frequencies ``|k| <= r_max`` of an ``n³`` box with ``kx >= 0``."""

    box: int
    k: torch.Tensor  # (P, 3) float64, (kx, ky, kz)
    index: torch.Tensor  # (P,) flat index into the (n, n, n // 2 + 1) rfftn array
    mult: torch.Tensor  # (P,) 1 on the kx = 0 and Nyquist planes, 2 elsewhere

    @classmethod
    def create(cls, box: int, r_max: float, device=None) -> HalfGrid:
        kz, ky, kxx = rfft_frequencies((box, box, box), device=device, dtype=torch.float64)
        keep = (kz**2 + ky**2 + kxx**2 <= r_max * r_max).reshape(-1)
        index = torch.nonzero(keep).squeeze(1)
        k = torch.stack([kxx.reshape(-1), ky.reshape(-1), kz.reshape(-1)], 1)[index]
        edge = (k[:, 0] == 0) | ((box % 2 == 0) & (k[:, 0] == box // 2))
        mult = torch.where(edge, 1.0, 2.0).to(torch.float64)
        return cls(box=box, k=k, index=index, mult=mult)

    def to_volume(self, values: torch.Tensor) -> torch.Tensor:
        """``(..., P)`` complex samples on RELION's 3D scale (:mod:`tamis.padded_grid`: ``n`` times
        the forward-normalised transform) -> real maps ``(..., n, n, n)`` (zero elsewhere)."""
        n = self.box
        lead = values.shape[:-1]
        half = torch.zeros(
            lead + (n * n * (n // 2 + 1),), dtype=torch.complex128, device=values.device
        )
        half[..., self.index] = values.to(torch.complex128) / n
        return irfft3_centered(half.reshape(lead + (n, n, n // 2 + 1)), (n, n, n))


def map_grid(volume: torch.Tensor, *, pad: int = 2) -> torch.Tensor:
    """The padded, gridding pre-corrected transform of one map ``(n, n, n)``, ready for
    :func:`sample`: ``(1, 2, E, E, E)`` float64 (real and imaginary planes)."""
    grid = reference_grids(volume.to(torch.float64)[None], pad=pad).to(torch.complex128)
    return torch.view_as_real(grid).permute(0, 4, 1, 2, 3).contiguous()


def sample(grid: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Trilinear samples of :func:`map_grid`'s ``grid`` at padded-grid positions ``(..., 3)``
    (x, y, z, about the centre); complex128 ``(...)``, zero outside. Differentiable in the
    positions."""
    v = interpolate(grid, positions.reshape(-1, 3), max_points=_MAX_SAMPLES)[0]
    return torch.complex(v[0], v[1]).reshape(positions.shape[:-1])


def rotate_volumes(
    volume: torch.Tensor, rotations: torch.Tensor, *, pad: int = 2, r_max: float | None = None
) -> torch.Tensor:
    """``V(A^T r)`` for every rotation ``(R, 3, 3)``: ``(R, n, n, n)`` float64, band-limited to
    ``r_max`` (default ``n / 2``) as RELION's Fourier-space rotation."""
    n = volume.shape[-1]
    hg = HalfGrid.create(n, n / 2 if r_max is None else r_max, device=volume.device)
    grid = map_grid(volume, pad=pad)
    rot = rotations.to(volume.device, torch.float64)
    q = pad * torch.einsum("rji,pj->rpi", rot, hg.k)  # A^T k
    return hg.to_volume(sample(grid, q))


def symmetrise_map(
    volume: torch.Tensor, operators: torch.Tensor, *, pad: int = 2, r_max: float | None = None
) -> torch.Tensor:
    """The group average ``1/G sum_g V(R_g r)`` of one map (operators ``(G, 3, 3)``, the identity
    among them): ``(n, n, n)`` float64."""
    return rotate_volumes(volume, operators, pad=pad, r_max=r_max).mean(0)


def centre_of_mass(volume: torch.Tensor) -> torch.Tensor:
    """Centre of mass of the positive voxels, (x, y, z) in voxels from the box centre (RELION's
    ``selfTranslateCenterOfMassToCenter`` measures the same)."""
    n = volume.shape[-1]
    v = volume.to(torch.float64).clamp(min=0)
    c = torch.arange(n, device=volume.device, dtype=torch.float64) - n // 2
    total = v.sum().clamp(min=1e-300)
    return (
        torch.stack(
            [(v.sum((0, 1)) * c).sum(), (v.sum((0, 2)) * c).sum(), (v.sum((1, 2)) * c).sum()]
        )
        / total
    )


def shift_volume(volume: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """The map moved by ``shift`` (x, y, z) voxels, trilinear, zero where it comes from outside
    the box (no wrap)."""
    n = volume.shape[-1]
    c = torch.arange(n, device=volume.device, dtype=torch.float64)
    z, y, x = torch.meshgrid(c, c, c, indexing="ij")
    src = torch.stack([x - shift[0], y - shift[1], z - shift[2]], -1)
    coords = (src * (2.0 / (n - 1)) - 1.0)[None]
    out = F.grid_sample(
        volume.to(torch.float64)[None, None],
        coords,
        mode="bilinear",
        padding_mode="zeros",
        align_corners=True,
    )
    return out[0, 0]


def flip_hand(volume: torch.Tensor) -> torch.Tensor:
    """The mirror image ``V(x, y, -z)`` about the box centre (the other hand)."""
    n = volume.shape[-1]
    # index i holds z = i - n//2; -z sits at index n - i (mod n)
    return torch.roll(torch.flip(volume, dims=(-3,)), 1 - (n % 2), dims=-3)


def resize_map(volume: torch.Tensor, ref_pixel: float, pixel: float, box: int) -> torch.Tensor:
    """A map of pixel ``ref_pixel`` on the grid of ``box`` voxels of ``pixel`` (RELION's
    ``--trust_ref_size`` path): Fourier-resized to ``ROUND(N ref_pixel / pixel)`` (made even),
    keeping the real-space values, then cropped or zero-padded about the centre to ``box``."""
    n = volume.shape[-1]
    new = int(relion_round(torch.tensor(n * ref_pixel / pixel)))
    new += new % 2
    v = volume.to(torch.float64)
    if new != n:
        spec = torch.fft.fftshift(torch.fft.fftn(torch.fft.ifftshift(v)))
        if new < n:
            o = n // 2 - new // 2
            spec = spec[o : o + new, o : o + new, o : o + new]
        else:
            o = new // 2 - n // 2
            big = torch.zeros((new,) * 3, dtype=spec.dtype, device=spec.device)
            big[o : o + n, o : o + n, o : o + n] = spec
            spec = big
        v = torch.fft.fftshift(torch.fft.ifftn(torch.fft.ifftshift(spec))).real * (new / n) ** 3
    if new > box:
        o = new // 2 - box // 2
        v = v[o : o + box, o : o + box, o : o + box]
    elif new < box:
        o = box // 2 - new // 2
        out = torch.zeros((box,) * 3, dtype=v.dtype, device=v.device)
        out[o : o + new, o : o + new, o : o + new] = v
        v = out
    return v.to(volume.dtype)
