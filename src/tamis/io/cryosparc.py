"""Import cryoSPARC particle ``.cs`` files (numpy structured arrays) as a :class:`ParticleSet`.

Field mapping (checked against the conventions of pyem's ``csparc2star`` and cryoDRGN):

==============================  =============================================================
cryoSPARC field                 RELION label
==============================  =============================================================
``blob/path`` (leading ``>``    stack of ``rlnImageName`` (bytes decoded, ``>`` of exported
stripped), ``blob/idx`` (0-b.)  files stripped), index ``idx + 1``
``blob/psize_A``, ``blob/shape`` ``rlnImagePixelSize``, ``rlnImageSize`` (optics)
``ctf/df1_A``, ``ctf/df2_A``    ``rlnDefocusU``, ``rlnDefocusV`` (Å)
``ctf/df_angle_rad``            ``rlnDefocusAngle`` (degrees; no sign change)
``ctf/phase_shift_rad``         ``rlnPhaseShift`` (degrees)
``ctf/bfactor``, ``ctf/scale``  ``rlnCtfBfactor``, ``rlnCtfScalefactor``
``ctf/accel_kv``, ``cs_mm``,    ``rlnVoltage``, ``rlnSphericalAberration``,
``amp_contrast``                ``rlnAmplitudeContrast`` (optics)
``ctf/exp_group_id``            ``rlnOpticsGroup`` (+1)
``alignments2D/shift`` (px)     ``rlnOriginXAngst``/``YAngst`` = shift x ``alignments2D/psize_A``
                                (component 0 is x; same sign as RELION's origin)
``alignments2D/pose`` (rad)     ``rlnAnglePsi`` (degrees)
``alignments2D/class``          ``rlnClassNumber`` (+1)
``location/micrograph_path``    ``rlnMicrographName``
``location/center_x/y_frac``    ``rlnCoordinateX/Y`` = frac x micrograph width/height (pixels,
                                array order; ``flip_y=True`` mirrors y as pyem's default does)
==============================  =============================================================
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from tamis.errors import InputFileError

__all__ = ["read_cryosparc", "cryosparc_to_tables"]


def read_cryosparc(
    path: str | Path, *, project_dir: str | Path | None = None, flip_y: bool = False
):
    """Read a cryoSPARC particles ``.cs`` file as a :class:`~tamis.io.particles.ParticleSet`.

    ``project_dir`` is the cryoSPARC project directory that ``blob/path`` is relative to; by
    default the ``.cs`` file's directory's parent (``P1/J12/particles.cs`` -> ``P1``), or the
    file's own directory when the stacks are found there.
    """
    from tamis.io.particles import ParticleSet

    path = Path(path)
    optics, particles = cryosparc_to_tables(_load(path), path, flip_y=flip_y)
    if project_dir is None:
        project_dir = path.resolve().parent.parent
        if len(particles):
            first = particles["rlnImageName"].iloc[0].split("@", 1)[1]
            for cand in (path.resolve().parent.parent, path.resolve().parent, Path.cwd()):
                if (cand / first).exists():
                    project_dir = cand
                    break
    ps = ParticleSet(optics, particles, root=project_dir, source=path)
    ps.validate()
    return ps


def cryosparc_to_tables(
    cs: np.ndarray, path: str | Path = "<cs>", *, flip_y: bool = False
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Convert a ``.cs`` structured array to RELION (optics, particles) tables."""
    names = set(cs.dtype.names or ())
    required = ["blob/path", "blob/idx", "blob/psize_A", "blob/shape"]
    missing = [f for f in required if f not in names]
    if missing:
        raise InputFileError(
            path, f"cryoSPARC file lacks field(s) {', '.join(missing)} (is it a particles .cs?)"
        )
    n = len(cs)
    stacks = np.array([_text(p).lstrip(">") for p in cs["blob/path"]], dtype=object)
    idx = cs["blob/idx"].astype(np.int64)
    parts: dict[str, object] = {
        "rlnImageName": [f"{i + 1:06d}@{s}" for i, s in zip(idx, stacks, strict=True)],
    }
    if "location/micrograph_path" in names:
        parts["rlnMicrographName"] = [_text(p).lstrip(">") for p in cs["location/micrograph_path"]]
    if {"location/center_x_frac", "location/micrograph_shape"} <= names:
        shape = cs["location/micrograph_shape"].astype(np.float64)
        yfrac = cs["location/center_y_frac"].astype(np.float64)
        if flip_y:
            yfrac = 1.0 - yfrac
        parts["rlnCoordinateX"] = cs["location/center_x_frac"].astype(np.float64) * shape[:, 1]
        parts["rlnCoordinateY"] = yfrac * shape[:, 0]
    ctf_map = {
        "ctf/df1_A": ("rlnDefocusU", 1.0),
        "ctf/df2_A": ("rlnDefocusV", 1.0),
        "ctf/df_angle_rad": ("rlnDefocusAngle", 180.0 / np.pi),
        "ctf/phase_shift_rad": ("rlnPhaseShift", 180.0 / np.pi),
        "ctf/bfactor": ("rlnCtfBfactor", 1.0),
        "ctf/scale": ("rlnCtfScalefactor", 1.0),
    }
    for field, (label, factor) in ctf_map.items():
        if field in names:
            parts[label] = cs[field].astype(np.float64) * factor
    if "alignments2D/shift" in names:
        psize = (
            cs["alignments2D/psize_A"].astype(np.float64)
            if "alignments2D/psize_A" in names
            else cs["blob/psize_A"].astype(np.float64)
        )
        shift = cs["alignments2D/shift"].astype(np.float64)
        parts["rlnOriginXAngst"] = shift[:, 0] * psize
        parts["rlnOriginYAngst"] = shift[:, 1] * psize
    if "alignments2D/pose" in names:
        parts["rlnAnglePsi"] = np.rad2deg(cs["alignments2D/pose"].astype(np.float64))
    if "alignments2D/class" in names:
        parts["rlnClassNumber"] = cs["alignments2D/class"].astype(np.int64) + 1
    particles = pd.DataFrame(parts, index=pd.RangeIndex(n))

    optics_cols = {
        "rlnVoltage": ("ctf/accel_kv", 300.0),
        "rlnSphericalAberration": ("ctf/cs_mm", 2.7),
        "rlnAmplitudeContrast": ("ctf/amp_contrast", 0.1),
    }
    per = pd.DataFrame(
        {
            label: cs[field].astype(np.float64) if field in names else np.full(n, default)
            for label, (field, default) in optics_cols.items()
        }
    )
    per["rlnImagePixelSize"] = cs["blob/psize_A"].astype(np.float64)
    per["rlnImageSize"] = cs["blob/shape"][:, 0].astype(np.int64)
    if "ctf/exp_group_id" in names:
        group = cs["ctf/exp_group_id"].astype(np.int64)
        codes, uniques = pd.factorize(pd.Series(group), sort=True)
    else:
        codes, uniques = pd.factorize(pd.MultiIndex.from_frame(per.round(6)), sort=True)
    particles["rlnOpticsGroup"] = codes + 1
    first = per.groupby(codes, sort=True).first().reset_index(drop=True)
    optics = pd.DataFrame(
        {
            "rlnOpticsGroupName": [f"opticsGroup{i + 1}" for i in range(len(uniques))],
            "rlnOpticsGroup": np.arange(1, len(uniques) + 1),
        }
    )
    optics = pd.concat([optics, first], axis=1)
    optics["rlnImageDimensionality"] = 2
    optics["rlnCtfDataAreCtfPremultiplied"] = 0
    return optics, particles


def _load(path: Path) -> np.ndarray:
    if not path.is_file():
        raise InputFileError(path, "file not found")
    try:
        cs = np.load(path, allow_pickle=False)
    except Exception as exc:
        raise InputFileError(path, f"not a cryoSPARC .cs file ({exc})") from None
    if not isinstance(cs, np.ndarray) or cs.dtype.names is None:
        raise InputFileError(path, "not a cryoSPARC .cs file (no named fields)")
    return cs


def _text(value: bytes | str) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)
