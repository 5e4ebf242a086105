"""Importing micrographs or movies into a RELION project (``relion_import``): the files matching a
pattern become ``micrographs.star`` (or ``movies.star``) with one optics group.

Re-running the import (a scheme's ``continue`` job) picks up files that appeared since, as
RELION's ``--continue``: the rows already listed keep their order, new files follow in sorted
order. Files still being written are left for the next pass: an MRC file until it holds every
byte its header promises, other formats (TIFF, EER) until they have not changed for
``min_age_s`` seconds.
"""

from __future__ import annotations

import glob
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from tamis.errors import TamisError
from tamis.io.mrc import mrc_is_complete
from tamis.io.star import write_star

__all__ = ["ImportOptions", "import_micrographs", "is_complete"]


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
    min_age_s: float = 10.0  # non-MRC files younger than this may still be being written

    def check(self) -> None:
        if self.angpix <= 0:
            raise TamisError(f"angpix {self.angpix}: give the pixel size in A (> 0)")
        if self.voltage <= 0:
            raise TamisError(f"kV {self.voltage}: must be positive")
        if not 0 <= self.amplitude_contrast < 1:
            raise TamisError(f"Q0 {self.amplitude_contrast}: must be in [0, 1)")


def is_complete(path: str | Path, min_age_s: float, now: float | None = None) -> bool:
    """Whether a micrograph or movie file is fully written: an MRC file holds every byte its
    header promises; another file has not been modified for ``min_age_s`` seconds."""
    p = Path(path)
    if p.suffix.lower() in (".mrc", ".mrcs"):
        return mrc_is_complete(p)
    age = (time.time() if now is None else now) - p.stat().st_mtime
    return age >= min_age_s


def import_micrographs(
    pattern: str,
    out_dir: str | Path,
    options: ImportOptions,
    log: Callable[[str], None] = lambda s: None,
) -> Path:
    """Write ``<out_dir>/micrographs.star`` (``movies.star`` for multi-frame movies) listing every
    complete file matching ``pattern`` (a glob, relative to the working directory as in RELION);
    files still being written wait for the next pass."""
    options.check()
    matching = sorted(glob.glob(pattern))
    if not matching:
        raise TamisError(f"fn_in_raw {pattern!r}: no file matches")
    files = [f for f in matching if is_complete(f, options.min_age_s)]
    if len(files) < len(matching):
        log(f"{len(matching) - len(files)} file(s) still being written, left for the next pass")
    if not files:
        raise TamisError(
            f"fn_in_raw {pattern!r}: all {len(matching)} matching files are still being written"
        )
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
    out = Path(out_dir) / ("movies.star" if movies else "micrographs.star")
    if out.is_file():  # a continued import: earlier rows first, in their order
        from tamis.io.star import read_star

        old = read_star(out).get("movies" if movies else "micrographs")
        if isinstance(old, pd.DataFrame) and label in old:
            listed = [str(n) for n in old[label]]
            seen = set(listed)
            files = listed + [f for f in files if f not in seen]
    table = pd.DataFrame({label: files, "rlnOpticsGroup": 1})
    write_star({"optics": pd.DataFrame(optics), "movies" if movies else "micrographs": table}, out)
    return out
