"""Soft circular masks with RELION's edge semantics (``mask.cpp``: ``softMaskOutsideMap``).

Radii are in pixels from the origin pixel ``(n // 2, n // 2)``. The soft edge lies *outside* the
radius: for ``R <= r <= R + w`` the image is blended towards the background with
``c = 1/2 + 1/2 cos(pi (R + w - r) / w)`` (0 at ``R``, 1 at ``R + w``); beyond ``R + w`` it is the
background. By default the background is the c-weighted mean of the pixels at ``r >= R``.
"""

from __future__ import annotations

import torch

__all__ = ["radius_map", "soft_edge", "soft_mask_outside", "solvent_mask"]


def radius_map(
    size: int, *, device: torch.device | str | None = None, ndim: int = 2
) -> torch.Tensor:
    """Distance of every pixel (voxel, with ``ndim=3``) of a ``size`` box from the origin pixel
    ``size // 2`` on every axis; ``(size,) * ndim``."""
    c = torch.arange(size, device=device, dtype=torch.float64) - size // 2
    axes = torch.meshgrid(*([c] * ndim), indexing="ij")
    return torch.sqrt(sum(a * a for a in axes))


def soft_edge(
    size: int, radius: float, width: float, *, device=None, ndim: int = 2
) -> torch.Tensor:
    """The background weight ``c`` (0 inside, raised cosine over the edge, 1 outside),
    ``(size,) * ndim``."""
    r = radius_map(size, device=device, ndim=ndim)
    c = 0.5 + 0.5 * torch.cos(torch.pi * (radius + width - r) / width)
    c = torch.where(r < radius, torch.zeros_like(r), c)
    return torch.where(r > radius + width, torch.ones_like(r), c)


def soft_mask_outside(
    images: torch.Tensor,
    radius: float,
    width: float = 5.0,
    *,
    background: torch.Tensor | None = None,
    ndim: int = 2,
) -> torch.Tensor:
    """RELION's ``softMaskOutsideMap`` on ``(..., n, n)`` images (``(..., n, n, n)`` volumes
    with ``ndim=3``).

    ``background`` is either None (use the c-weighted mean of the pixels with ``r >= radius``,
    RELION's ``--zero_mask`` behaviour) or images of the same shape (e.g. noise).
    """
    n = images.shape[-1]
    c = soft_edge(n, radius, width, device=images.device, ndim=ndim).to(images.dtype)
    if background is None:
        # c is 0 inside the radius, so this is the c-weighted mean over r >= radius.
        dims = tuple(range(-ndim, 0))
        bg = (images * c).sum(dim=dims, keepdim=True) / c.sum().clamp(min=1e-12)
    else:
        bg = background
    return images * (1 - c) + bg * c


def solvent_mask(
    size: int, radius: float, width: float = 5.0, *, device=None, ndim: int = 2
) -> torch.Tensor:
    """RELION's solvent-flattening mask for class averages (and, with ``ndim=3``, maps): 1
    inside, cosine edge to 0 outside."""
    return 1.0 - soft_edge(size, radius, width, device=device, ndim=ndim)
