"""Importing micrographs or movies into a RELION project (``relion_import``): the files matching a
pattern become ``micrographs.star`` (or ``movies.star``) with one optics group.

Re-running the import (a scheme's ``continue`` job) picks up files that appeared since: the
output is rewritten with every matching file, in sorted order, as RELION does.
"""

from __future__ import annotations

import glob
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from tamis.errors import TamisError
from tamis.io.star import write_star

__all__ = ["ImportOptions", "import_micrographs"]


@dataclass
class ImportOptions:
    """RELION's import options: ``angpix``, ``kV``, ``Cs``, ``Q0``, ``optics_group_name``,
    ``is_multiframe``."""

    angpix: float
    voltage: float = 300.0
    spherical_aberration: float = 2.7
    amplitude_contrast: float = 0.1
    optics_group_name: str = "opticsGroup1"
    is_multiframe: bool = False
    mtf: str = ""

    def check(self) -> None:
        if self.angpix <= 0:
            raise TamisError(f"angpix {self.angpix}: give the pixel size in A (> 0)")
        if self.voltage <= 0:
            raise TamisError(f"kV {self.voltage}: must be positive")
        if not 0 <= self.amplitude_contrast < 1:
            raise TamisError(f"Q0 {self.amplitude_contrast}: must be in [0, 1)")


def import_micrographs(pattern: str, out_dir: str | Path, options: ImportOptions) -> Path:
    """Write ``<out_dir>/micrographs.star`` (``movies.star`` for multi-frame movies) listing every
    file matching ``pattern`` (a glob, relative to the working directory as in RELION)."""
    options.check()
    files = sorted(glob.glob(pattern))
    if not files:
        raise TamisError(f"fn_in_raw {pattern!r}: no file matches")
    movies = options.is_multiframe
    optics = {
        "rlnOpticsGroupName": [options.optics_group_name],
        "rlnOpticsGroup": [1],
    }
    if options.mtf:
        optics["rlnMtfFileName"] = [options.mtf]
    optics.update(
        {
            "rlnMicrographOriginalPixelSize": [options.angpix],
            "rlnVoltage": [options.voltage],
            "rlnSphericalAberration": [options.spherical_aberration],
            "rlnAmplitudeContrast": [options.amplitude_contrast],
        }
    )
    if not movies:
        optics["rlnMicrographPixelSize"] = [options.angpix]
    label = "rlnMicrographMovieName" if movies else "rlnMicrographName"
    table = pd.DataFrame({label: files, "rlnOpticsGroup": 1})
    out = Path(out_dir) / ("movies.star" if movies else "micrographs.star")
    write_star({"optics": pd.DataFrame(optics), "movies" if movies else "micrographs": table}, out)
    return out
