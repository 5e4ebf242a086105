"""Single micrograph images: reading MRC, TIFF, PNG and JPEG files into a :class:`Micrograph`.

Coordinates everywhere are RELION's: pixels of the original micrograph, x along columns, y along
rows, origin at the first array element.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tamis.errors import InputFileError
from tamis.io.mrc import read_mrc

__all__ = ["Micrograph", "read_micrograph", "IMAGE_SUFFIXES"]

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
