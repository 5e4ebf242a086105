"""Micrographs for picking: normalisation and Fourier binning (reading is
:mod:`tamis.io.images`, re-exported here).

Coordinates everywhere are RELION's: pixels of the original micrograph, x along columns, y along
rows, origin at the first array element.
"""

from __future__ import annotations

import torch

from tamis.errors import TamisError
from tamis.io.images import IMAGE_SUFFIXES, Micrograph, read_micrograph

__all__ = [
    "Micrograph",
    "read_micrograph",
    "normalise",
    "fourier_bin",
    "working_image",
    "IMAGE_SUFFIXES",
]


def normalise(image: torch.Tensor, outlier_z: float = 8.0) -> torch.Tensor:
    """Zero mean, unit standard deviation; pixels more than ``outlier_z`` standard deviations
    from the mean are first set to the mean (RELION's autopicker does the same)."""
    img = image.to(torch.float32)
    mean, std = img.mean(), img.std().clamp(min=1e-12)
    img = torch.where((img - mean).abs() / std > outlier_z, mean, img)
    return (img - img.mean()) / img.std().clamp(min=1e-12)


def fourier_bin(image: torch.Tensor, factor: float) -> tuple[torch.Tensor, tuple[float, float]]:
    """Fourier-crop ``(..., H, W)`` by ``factor`` >= 1 (new pixel = ``factor`` x old) to even sizes.

    Returns the binned image (same mean) and the exact ``(scale_y, scale_x)`` = new / old size.
    """
    if factor < 1:
        raise TamisError(f"binning factor {factor} < 1")
    h, w = image.shape[-2:]
    nh = max(2, 2 * int(round(h / factor / 2)))
    nw = max(2, 2 * int(round(w / factor / 2)))
    if (nh, nw) == (h, w):
        return image, (1.0, 1.0)
    spec = torch.fft.rfft2(image, norm="forward")
    out = torch.zeros((*image.shape[:-2], nh, nw // 2 + 1), dtype=spec.dtype, device=image.device)
    out[..., : nh // 2, :] = spec[..., : nh // 2, : nw // 2 + 1]
    out[..., nh // 2 :, :] = spec[..., h - nh // 2 :, : nw // 2 + 1]
    return torch.fft.irfft2(out, s=(nh, nw), norm="forward"), (nh / h, nw / w)


def working_image(
    mic: Micrograph, lowpass: float, invert: bool = False
) -> tuple[torch.Tensor, tuple[float, float], float]:
    """What the LoG and template pickers work on: the micrograph normalised, particles made
    white (negated unless ``invert``: particles already white) and Fourier-binned to a pixel of
    ``lowpass / 2`` Å (never finer than recorded). Returns the image, its ``(scale_y, scale_x)``
    against the micrograph and its pixel size."""
    img = normalise(mic.image)
    if not invert:
        img = -img
    small, (sy, sx) = fourier_bin(img, max(1.0, lowpass / 2.0 / mic.pixel_size))
    return small, (sy, sx), mic.pixel_size / ((sy + sx) / 2)
