"""Junk that 2D classification and class selection must learn to reject, as real-space images.

Every generator returns a batch ``(b, h, w)`` of clean (noise-free, CTF-free) density in units of
the particle signal, so the caller scales and CTF-modulates it like a particle:

* ``ice``: crystalline-ice contamination, a dense soft-edged blob with a faceted outline,
  much stronger than a particle;
* ``carbon``: the edge of the support film, dense textured carbon on one side of a straight line;
* ``aggregate``: several particles clumped together (made by the caller from projections);
* ``empty``: a box with nothing in it but noise.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from tamis.fourier import (
    fourier_shift,
    irfft2_centered,
    pad_images,
    rfft2_centered,
    rfft_frequencies,
)
from tamis.geometry import random_euler_angles

if TYPE_CHECKING:
    from tamis.simulate.common import StructureSet

__all__ = ["JUNK_KINDS", "aggregates", "ice_blobs", "carbon_edges", "smooth_noise"]

JUNK_KINDS = ("ice", "carbon", "aggregate", "empty")


def smooth_noise(
    b: int, shape: tuple[int, int], corr_px: float, generator: torch.Generator
) -> torch.Tensor:
    """Gaussian random fields ``(b, h, w)`` with correlation length ``corr_px``, unit variance."""
    h, w = shape
    white = torch.randn((b, h, w), generator=generator, dtype=torch.float64)
    spec = torch.fft.rfft2(white)
    ky, kx = rfft_frequencies(shape, dtype=torch.float64)
    r2 = (ky / h) ** 2 + (kx / w) ** 2
    field = torch.fft.irfft2(spec * torch.exp(-2 * (torch.pi * corr_px) ** 2 * r2), s=shape)
    return field / field.std(dim=(-2, -1), keepdim=True).clamp(min=1e-12)


def _centered_coords(shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    h, w = shape
    y = torch.arange(h, dtype=torch.float64) - h // 2
    x = torch.arange(w, dtype=torch.float64) - w // 2
    return torch.meshgrid(y, x, indexing="ij")


def ice_blobs(
    b: int, shape: tuple[int, int], generator: torch.Generator, *, radius_px: float
) -> torch.Tensor:
    """Dense faceted blobs of radius about ``radius_px`` near the box centre, peak value ~1."""
    yy, xx = _centered_coords(shape)
    u = torch.rand((b, 6), generator=generator, dtype=torch.float64)
    cx = (u[:, 0] - 0.5) * radius_px
    cy = (u[:, 1] - 0.5) * radius_px
    rad = radius_px * (0.6 + 0.8 * u[:, 2])
    sides = torch.floor(5 + 3 * u[:, 3])  # 5..7 facets
    rot = 2 * torch.pi * u[:, 4]
    dx = xx[None] - cx[:, None, None]
    dy = yy[None] - cy[:, None, None]
    r = torch.sqrt(dx * dx + dy * dy)
    theta = torch.atan2(dy, dx) - rot[:, None, None]
    n = sides[:, None, None]
    # Distance to a regular polygon's edge along theta: R cos(pi/n) / cos(theta mod (2pi/n) - pi/n)
    sector = torch.remainder(theta, 2 * torch.pi / n) - torch.pi / n
    edge = rad[:, None, None] * torch.cos(torch.pi / n) / torch.cos(sector)
    inside = torch.sigmoid((edge - r) / 1.5)
    texture = 1.0 + 0.15 * smooth_noise(b, shape, 3.0, generator)
    return inside * texture


def carbon_edges(
    b: int, shape: tuple[int, int], generator: torch.Generator, *, max_offset_px: float
) -> torch.Tensor:
    """A straight film edge through the box at a random angle; textured carbon on one side, ~1."""
    yy, xx = _centered_coords(shape)
    u = torch.rand((b, 2), generator=generator, dtype=torch.float64)
    angle = 2 * torch.pi * u[:, 0]
    offset = (2 * u[:, 1] - 1) * max_offset_px
    d = xx[None] * angle.cos()[:, None, None] + yy[None] * angle.sin()[:, None, None]
    side = torch.sigmoid((d - offset[:, None, None]) / 1.0)
    texture = 1.0 + 0.3 * smooth_noise(b, shape, 1.5, generator)
    # The film edge is thicker (darker) over the first few nanometres.
    rim = 0.5 * torch.exp(-((d - offset[:, None, None]) ** 2) / (2 * 3.0**2))
    return side * texture + rim


def aggregates(structures: StructureSet, b: int, gen: torch.Generator, size: int) -> torch.Tensor:
    """Real-space clumps ``(b, size, size)`` of 3 to 6 particles, offsets up to 0.2 particle box."""
    nb = structures.box_size
    counts = 3 + torch.randint(0, 4, (b,), generator=gen).numpy()
    owner = np.repeat(np.arange(b), counts)
    m = len(owner)
    which = structures.draw(m, gen)
    angles = random_euler_angles(m, gen)
    offsets = (torch.rand((m, 2), generator=gen, dtype=torch.float32) - 0.5) * (0.4 * nb)
    parts = pad_images(irfft2_centered(structures.slices(which, angles), (nb, nb)), size)
    parts = irfft2_centered(
        fourier_shift(rfft2_centered(parts), offsets.to(parts.device), (size, size)), (size, size)
    )
    out = torch.zeros((b, size, size), dtype=parts.dtype, device=parts.device)
    return out.index_add_(0, torch.as_tensor(owner, device=parts.device), parts)
