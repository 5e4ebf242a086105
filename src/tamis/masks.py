"""Soft circular masks with RELION's edge semantics (``mask.cpp``: ``softMaskOutsideMap``).

Radii are in pixels from the origin pixel ``(n // 2, n // 2)``. The soft edge lies *outside* the
radius: for ``R <= r <= R + w`` the image is blended towards the background with
``c = 1/2 + 1/2 cos(pi (R + w - r) / w)`` (0 at ``R``, 1 at ``R + w``); beyond ``R + w`` it is the
background. By default the background is the c-weighted mean of the pixels at ``r >= R``.
"""

from __future__ import annotations

import torch

__all__ = ["radius_map", "soft_edge", "soft_mask_outside", "solvent_mask"]


def radius_map(size: int, *, device: torch.device | str | None = None) -> torch.Tensor:
    """Distance of every pixel of a ``size x size`` image from pixel ``(size // 2, size // 2)``."""
    c = torch.arange(size, device=device, dtype=torch.float64) - size // 2
    return torch.sqrt(c[:, None] ** 2 + c[None, :] ** 2)


def soft_edge(size: int, radius: float, width: float, *, device=None) -> torch.Tensor:
    """The background weight ``c`` (0 inside, raised cosine over the edge, 1 outside), ``(n, n)``."""
    r = radius_map(size, device=device)
    c = 0.5 + 0.5 * torch.cos(torch.pi * (radius + width - r) / width)
    c = torch.where(r < radius, torch.zeros_like(r), c)
    return torch.where(r > radius + width, torch.ones_like(r), c)


def soft_mask_outside(
    images: torch.Tensor,
    radius: float,
    width: float = 5.0,
    *,
    background: torch.Tensor | None = None,
) -> torch.Tensor:
    """RELION's ``softMaskOutsideMap`` on ``(..., n, n)`` images.

    ``background`` is either None (use the c-weighted mean of the pixels with ``r >= radius``,
    RELION's ``--zero_mask`` behaviour) or images of the same shape (e.g. noise).
    """
    n = images.shape[-1]
    c = soft_edge(n, radius, width, device=images.device).to(images.dtype)
    if background is None:
        # c is 0 inside the radius, so this is the c-weighted mean over r >= radius.
        bg = (images * c).sum(dim=(-2, -1), keepdim=True) / c.sum().clamp(min=1e-12)
    else:
        bg = background
    return images * (1 - c) + bg * c


def solvent_mask(size: int, radius: float, width: float = 5.0, *, device=None) -> torch.Tensor:
    """RELION's solvent-flattening mask for class averages: 1 inside, cosine edge to 0 outside."""
    return 1.0 - soft_edge(size, radius, width, device=device)
