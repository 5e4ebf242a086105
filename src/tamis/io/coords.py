"""Per-micrograph coordinate files in RELION's autopick layout.

A coordinate file is one unnamed ``data_`` loop with ``rlnCoordinateX``, ``rlnCoordinateY`` (pixels
of the micrograph, origin at the first array element), ``rlnClassNumber``,
``rlnAutopickFigureOfMerit`` and ``rlnAnglePsi``. A picking job also writes ``autopick.star``: a
``data_coordinate_files`` loop of ``rlnMicrographName`` -> ``rlnMicrographCoordinates``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from tamis.errors import InputFileError
from tamis.io.star import read_star, require_columns, write_star

__all__ = [
    "read_coordinates",
    "write_coordinates",
    "read_coordinate_list",
    "write_coordinate_list",
    "coordinate_file_name",
    "pipeline_relative",
    "read_coordinate_file",
]


def read_coordinates(path: str | Path) -> pd.DataFrame:
    """Read a per-micrograph coordinate STAR file (first loop block); empty files give no rows."""
    path = Path(path)
    blocks = read_star(path)
    loops = [b for b in blocks.values() if isinstance(b, pd.DataFrame)]
    if not loops:
        single = next(iter(blocks.values()))
        if isinstance(single, dict) and single:
            table = pd.DataFrame([single])
        else:
            return pd.DataFrame({"rlnCoordinateX": [], "rlnCoordinateY": []})
    else:
        table = loops[0]
    require_columns(table, ["rlnCoordinateX", "rlnCoordinateY"], path, "")
    return table


def write_coordinates(
    path: str | Path,
    x: np.ndarray,
    y: np.ndarray,
    *,
    fom: np.ndarray | None = None,
    class_number: np.ndarray | int = 0,
    psi: np.ndarray | float = 0.0,
    extra: Mapping[str, np.ndarray] | None = None,
) -> None:
    """Write coordinates (pixels) with RELION's autopick columns, atomically.

    ``class_number`` and ``psi`` default to 0, the dummies RELION's LoG picker writes.
    """
    n = len(x)
    table = pd.DataFrame(
        {
            "rlnCoordinateX": np.asarray(x, dtype=np.float64),
            "rlnCoordinateY": np.asarray(y, dtype=np.float64),
            "rlnClassNumber": np.broadcast_to(np.asarray(class_number, dtype=np.int64), (n,)),
            "rlnAutopickFigureOfMerit": (
                np.zeros(n) if fom is None else np.asarray(fom, dtype=np.float64)
            ),
            "rlnAnglePsi": np.broadcast_to(np.asarray(psi, dtype=np.float64), (n,)),
        }
    )
    for label, values in (extra or {}).items():
        table[label] = values
    write_star({"": table}, path)


def pipeline_relative(name: str | Path) -> Path:
    """RELION's ``decomposePipelineFileName``: the part of ``name`` after its ``jobNNN/``
    directory (``MotionCorr/job002/Movies/a.mrc`` -> ``Movies/a.mrc``), else the whole name
    (made relative: a leading ``/`` is dropped)."""
    parts = Path(name).parts
    for i, part in enumerate(parts[:-1]):
        if re.fullmatch(r"job\d{3}.*", part) and i > 0:
            return Path(*parts[i + 1 :])
    return Path(*[p for p in parts if p != "/"])


def coordinate_file_name(
    micrograph: str | Path, job_dir: str | Path, suffix: str = "autopick"
) -> Path:
    """Where RELION puts the coordinates of ``micrograph`` in picking job ``job_dir``:
    ``MotionCorr/job002/Movies/mic1.mrc`` -> ``<job_dir>/Movies/mic1_autopick.star``."""
    rel = pipeline_relative(micrograph)
    return Path(job_dir) / rel.parent / f"{rel.stem}_{suffix}.star"


def write_coordinate_list(path: str | Path, coordinate_files: Mapping[str, str | Path]) -> None:
    """Write ``autopick.star``: micrograph name -> coordinate file (``data_coordinate_files``)."""
    table = pd.DataFrame(
        {
            "rlnMicrographName": [str(k) for k in coordinate_files],
            "rlnMicrographCoordinates": [str(v) for v in coordinate_files.values()],
        }
    )
    write_star({"coordinate_files": table}, path)


def read_coordinate_list(path: str | Path) -> dict[str, str]:
    """Read ``autopick.star`` into a micrograph name -> coordinate file mapping."""
    path = Path(path)
    blocks = read_star(path)
    table = blocks.get("coordinate_files")
    if not isinstance(table, pd.DataFrame):
        raise InputFileError(path, "has no data_coordinate_files loop")
    require_columns(
        table, ["rlnMicrographName", "rlnMicrographCoordinates"], path, "coordinate_files"
    )
    return dict(
        zip(
            table["rlnMicrographName"].astype(str),
            table["rlnMicrographCoordinates"].astype(str),
            strict=True,
        )
    )


def read_coordinate_file(path: str | Path) -> pd.DataFrame:
    """Particle centres from one micrograph's file, as ``rlnCoordinateX/Y`` (pixels):

    - ``.star``: RELION coordinate file;
    - ``.box``: EMAN box file (``x y width height`` of each box's corner; centre = corner +
      size / 2, as RELION imports them);
    - ``.csv``/``.txt``/``.tsv``: columns named x and y (any case, or ``rlnCoordinateX/Y``), or
      else the first two columns.
    """
    path = Path(path)
    if not path.is_file():
        raise InputFileError(path, "coordinate file not found")
    suffix = path.suffix.lower()
    if suffix == ".star":
        return read_coordinates(path)
    try:
        if suffix == ".box":
            raw = np.loadtxt(path, ndmin=2)
            if raw.size == 0:
                return pd.DataFrame({"rlnCoordinateX": [], "rlnCoordinateY": []})
            if raw.shape[1] < 4:
                raise InputFileError(path, "box file rows need x, y, width, height")
            x = raw[:, 0] + raw[:, 2] / 2
            y = raw[:, 1] + raw[:, 3] / 2
            return pd.DataFrame({"rlnCoordinateX": x, "rlnCoordinateY": y})
        sep = "\t" if suffix == ".tsv" else None
        table = pd.read_csv(path, sep=sep, engine="python")
    except (ValueError, pd.errors.ParserError) as exc:
        raise InputFileError(path, f"cannot be read as coordinates ({exc})") from None
    cols = {c.lower().strip(): c for c in table.columns}
    for xs, ys in (("rlncoordinatex", "rlncoordinatey"), ("x", "y"), ("x_coord", "y_coord")):
        if xs in cols and ys in cols:
            x, y = table[cols[xs]], table[cols[ys]]
            break
    else:
        numeric = table.select_dtypes("number")
        if numeric.shape[1] < 2:
            raise InputFileError(path, "needs x and y columns")
        x, y = numeric.iloc[:, 0], numeric.iloc[:, 1]
    return pd.DataFrame({"rlnCoordinateX": x.to_numpy(float), "rlnCoordinateY": y.to_numpy(float)})
