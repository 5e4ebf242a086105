"""A PNG of a micrograph with its picks circled, for a person to check."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from tamis.io.star import atomic_path
from tamis.pick.micrograph import fourier_bin, normalise
from tamis.pictures import to_uint8

__all__ = ["overlay_image", "write_overlay"]


def write_overlay(
    path: str | Path,
    image: torch.Tensor,
    x: np.ndarray,
    y: np.ndarray,
    diameter_px: float,
    *,
    truth: np.ndarray | None = None,
    max_side: int = 1024,
) -> None:
    """:func:`overlay_image` written to ``path`` as a PNG (atomically)."""
    im = overlay_image(image, x, y, diameter_px, truth=truth, max_side=max_side)
    with atomic_path(Path(path)) as tmp:
        im.save(tmp, format="PNG")


def overlay_image(
    image: torch.Tensor,
    x: np.ndarray,
    y: np.ndarray,
    diameter_px: float,
    *,
    truth: np.ndarray | None = None,
    max_side: int = 1024,
) -> Image.Image:
    """Low-passed, binned micrograph (at most ``max_side`` px) with picks as green circles of
    the particle diameter (and true positions, when given, as small red dots)."""
    h, w = image.shape
    factor = max(1.0, max(h, w) / max_side)
    small, (sy, sx) = fourier_bin(normalise(image), factor)
    im = Image.fromarray(to_uint8(small.numpy())).convert("RGB")
    draw = ImageDraw.Draw(im)
    r = diameter_px / 2 * (sx + sy) / 2
    for xi, yi in zip(np.asarray(x) * sx, np.asarray(y) * sy, strict=True):
        draw.ellipse([xi - r, yi - r, xi + r, yi + r], outline=(0, 255, 0), width=2)
    if truth is not None:
        for xi, yi in zip(truth[:, 0] * sx, truth[:, 1] * sy, strict=True):
            draw.ellipse([xi - 2, yi - 2, xi + 2, yi + 2], fill=(255, 0, 0))
    return im
