"""Motion-correction metadata per movie: RELION's ``Micrograph`` STAR file (blocks
``general``, ``global_shift``, ``local_motion_model``, ``hot_pixels``, ``local_shift``), read
and written; shifts in unbinned pixels of the movie, -9999 for frames not used."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from tamis.errors import InputFileError
from tamis.io.star import read_star, require_columns, write_star

__all__ = ["MovieMotion", "write_motion_star", "read_motion_star", "NOT_OBSERVED"]

NOT_OBSERVED = -9999.0


@dataclass
class MovieMotion:
    """What motion correction found for one movie (shifts in unbinned pixels of the movie)."""

    n_frames: int  # frames (EER: fractions) in the movie
    shape: tuple[int, int]  # (ny, nx) of the frames as read
    first: int  # 0-based first frame used
    global_shifts: np.ndarray  # (n_frames, 2); NaN for frames not used
    local_coeffs: np.ndarray | None  # (2, 18) or None
    local_obs: pd.DataFrame = field(default_factory=pd.DataFrame)  # frame, x, y, shift x, y
    hot_pixels: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.int64))  # (x, y)
    converged: bool = True
    fit_rmsd: tuple[float, float] = (0.0, 0.0)
    n_patches_kept: int = 0
    seconds: float = 0.0
    stages: dict[str, float] = field(default_factory=dict)  # seconds per step
    ps_pixel_size: float = 0.0  # header pixel size of the power spectrum written, if any


def write_motion_star(
    path: Path,
    motion: MovieMotion,
    *,
    movie: str,
    pixel_size: float,
    voltage: float,
    dose_per_frame: float,
    pre_exposure: float = 0.0,
    binning: float = 1.0,
    gain_name: str = "",
    defect_file: str = "",
    eer: tuple[int, int] | None = None,
) -> None:
    """RELION's per-movie metadata STAR (``Micrograph::write``), shifts in unbinned pixels;
    ``eer`` is ``(upsampling, grouping)`` for EER movies."""
    general: dict[str, object] = {
        "rlnImageSizeX": motion.shape[1],
        "rlnImageSizeY": motion.shape[0],
        "rlnImageSizeZ": motion.n_frames,
        "rlnMicrographMovieName": movie,
    }
    if gain_name:
        general["rlnMicrographGainName"] = gain_name
    if defect_file:
        general["rlnMicrographDefectFile"] = defect_file
    general.update(
        {
            "rlnMicrographBinning": binning,
            "rlnMicrographOriginalPixelSize": pixel_size,
            "rlnMicrographDoseRate": dose_per_frame,
            "rlnMicrographPreExposure": pre_exposure,
            "rlnVoltage": voltage,
            "rlnMicrographStartFrame": motion.first + 1,
        }
    )
    if eer is not None:
        general["rlnEERUpsampling"] = eer[0]
        general["rlnEERGrouping"] = eer[1]
    general["rlnMotionModelVersion"] = 1 if motion.local_coeffs is not None else 0
    s = np.where(np.isfinite(motion.global_shifts), motion.global_shifts, NOT_OBSERVED)
    blocks: dict[str, object] = {
        "general": general,
        "global_shift": pd.DataFrame(
            {
                "rlnMicrographFrameNumber": np.arange(1, motion.n_frames + 1),
                "rlnMicrographShiftX": s[:, 0],
                "rlnMicrographShiftY": s[:, 1],
            }
        ),
    }
    if motion.local_coeffs is not None:
        blocks["local_motion_model"] = pd.DataFrame(
            {
                "rlnMotionModelCoeffsIdx": np.arange(36),
                "rlnMotionModelCoeff": motion.local_coeffs.reshape(-1),
            }
        )
    blocks["hot_pixels"] = pd.DataFrame(
        {
            "rlnCoordinateX": motion.hot_pixels[:, 0].astype(float),
            "rlnCoordinateY": motion.hot_pixels[:, 1].astype(float),
        }
    )
    if len(motion.local_obs) and "frame" in motion.local_obs:
        ob = motion.local_obs
        blocks["local_shift"] = pd.DataFrame(
            {
                "rlnMicrographFrameNumber": ob["frame"].astype(int),
                "rlnCoordinateX": ob["x"],
                "rlnCoordinateY": ob["y"],
                "rlnMicrographShiftX": ob["sx"],
                "rlnMicrographShiftY": ob["sy"],
            }
        )
    write_star(
        blocks,  # type: ignore[arg-type]
        path,
        comment="Written by tamis: local motion model coefficients in unbinned pixels "
        "(RELION 5.0.1 writes them in binned pixels under early binning, 3dem/relion#771)",
    )


def read_motion_star(path: str | Path) -> MovieMotion:
    """Read a per-movie metadata STAR (RELION's or tamis's) back; anything missing or not a
    number is one :class:`InputFileError` naming the file and the value."""
    blocks = read_star(path)
    g = blocks.get("general")
    gs = blocks.get("global_shift")
    if not isinstance(g, dict) or not isinstance(gs, pd.DataFrame):
        raise InputFileError(
            path, "not a motion-correction metadata file (no data_general key/value list and "
            "data_global_shift loop)"
        )  # fmt: skip
    require_columns(gs, ("rlnMicrographShiftX", "rlnMicrographShiftY"), path, "global_shift")

    def number(value: object, what: str, kind: type = float) -> float:
        try:
            out = kind(float(value))  # type: ignore[arg-type]
        except (TypeError, ValueError, OverflowError):
            raise InputFileError(path, f"{what} {value!r} is not a number") from None
        return out

    for key in ("rlnImageSizeX", "rlnImageSizeY", "rlnImageSizeZ"):
        if key not in g:
            raise InputFileError(path, f"data_general lacks {key}")
    n = number(g["rlnImageSizeZ"], "rlnImageSizeZ", int)
    try:
        s = gs[["rlnMicrographShiftX", "rlnMicrographShiftY"]].to_numpy(float)
    except (TypeError, ValueError):
        raise InputFileError(path, "data_global_shift holds shifts that are not numbers") from None
    if len(s) != n:
        raise InputFileError(path, f"data_global_shift has {len(s)} rows for {n} frames")
    s[s == NOT_OBSERVED] = np.nan
    coeffs = None
    model = blocks.get("local_motion_model")
    if number(g.get("rlnMotionModelVersion", 0), "rlnMotionModelVersion", int) == 1:
        if not isinstance(model, pd.DataFrame):
            raise InputFileError(path, "rlnMotionModelVersion 1 without data_local_motion_model")
        require_columns(model, ("rlnMotionModelCoeffsIdx", "rlnMotionModelCoeff"), path,
                        "local_motion_model")  # fmt: skip
        try:
            c = model.sort_values("rlnMotionModelCoeffsIdx")["rlnMotionModelCoeff"]
            coeffs = c.to_numpy(float)
        except (TypeError, ValueError):
            raise InputFileError(path, "data_local_motion_model is not numeric") from None
        if coeffs.size != 36:
            raise InputFileError(path, f"{coeffs.size} local model coefficients, expected 36")
        coeffs = coeffs.reshape(2, 18)
    hp = blocks.get("hot_pixels")
    hot = np.zeros((0, 2), np.int64)
    if isinstance(hp, pd.DataFrame) and len(hp):
        require_columns(hp, ("rlnCoordinateX", "rlnCoordinateY"), path, "hot_pixels")
        try:
            hot = hp[["rlnCoordinateX", "rlnCoordinateY"]].to_numpy(float).astype(np.int64)
        except (TypeError, ValueError):
            raise InputFileError(path, "data_hot_pixels is not numeric") from None
    return MovieMotion(
        n_frames=n,
        shape=(
            number(g["rlnImageSizeY"], "rlnImageSizeY", int),
            number(g["rlnImageSizeX"], "rlnImageSizeX", int),
        ),
        first=number(g.get("rlnMicrographStartFrame", 1), "rlnMicrographStartFrame", int) - 1,
        global_shifts=s,
        local_coeffs=coeffs,
        hot_pixels=hot,
    )
