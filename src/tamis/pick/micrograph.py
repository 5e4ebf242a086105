"""Micrographs for picking: reading (MRC, TIFF, PNG, JPEG), normalisation and Fourier binning.

Coordinates everywhere are RELION's: pixels of the original micrograph, x along columns, y along
rows, origin at the first array element.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tamis.errors import InputFileError, TamisError
from tamis.io.mrc import read_mrc

__all__ = [
    "Micrograph",
    "read_micrograph",
    "normalise",
    "fourier_bin",
    "working_image",
    "IMAGE_SUFFIXES",
]

IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg")


@dataclass
class Micrograph:
    """One micrograph: ``image`` float32 ``(H, W)`` and its pixel size in Å."""

    name: str
    image: torch.Tensor
    pixel_size: float

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.image.shape[0]), int(self.image.shape[1])


def read_micrograph(path: str | Path, pixel_size: float | None = None) -> Micrograph:
    """Read a micrograph. MRC files carry their pixel size (``pixel_size`` overrides it); TIFF, PNG
    and JPEG files need ``pixel_size``. Multi-frame files give their first frame."""
    path = Path(path)
    if not path.is_file():
        raise InputFileError(path, "micrograph not found")
    suffix = path.suffix.lower()
    if suffix in (".mrc", ".mrcs", ".map"):
        data, apix = read_mrc(path)
        if data.ndim == 3:
            data = data[0]
        apix = pixel_size if pixel_size else apix
    elif suffix in IMAGE_SUFFIXES:
        from PIL import Image

        try:
            with Image.open(path) as im:
                if im.mode in ("RGB", "RGBA", "P", "LA"):
                    im = im.convert("L")
                data = np.asarray(im, dtype=np.float32)
        except OSError as exc:
            raise InputFileError(path, f"cannot be read as an image ({exc})") from None
        if not pixel_size:
            raise InputFileError(path, "is not an MRC file: give its pixel size (--angpix)")
        apix = pixel_size
    else:
        raise InputFileError(path, "unknown micrograph format (MRC, TIFF, PNG or JPEG)")
    if data.ndim != 2 or min(data.shape) < 16:
        raise InputFileError(path, f"is not a 2D micrograph (shape {data.shape})")
    if not apix or apix <= 0:
        raise InputFileError(path, "has no pixel size in its header: give --angpix")
    return Micrograph(
        str(path), torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32)), apix
    )


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
