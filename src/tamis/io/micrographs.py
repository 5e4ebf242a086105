"""A micrographs STAR file (RELION 3.1+: ``data_optics`` + ``data_micrographs``) with the
micrograph paths resolved and the CTF of each micrograph."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from tamis.ctf import CTFParams
from tamis.errors import InputFileError
from tamis.io.star import read_data_star

__all__ = ["MicrographSet"]


@dataclass
class MicrographSet:
    optics: pd.DataFrame
    micrographs: pd.DataFrame
    root: Path
    source: Path | None = None

    @classmethod
    def from_star(cls, path: str | Path, *, project_dir: str | Path | None = None) -> MicrographSet:
        """Read ``path``; relative micrograph names start at ``project_dir`` or else the first of
        the current directory, the STAR file's directory and its two parents that holds them."""
        path = Path(path)
        data = read_data_star(path, "micrographs")
        table = data.table
        if "rlnMicrographName" not in table.columns:
            raise InputFileError(path, "has no rlnMicrographName column (not a micrographs file)")
        if project_dir is not None:
            root = Path(project_dir)
        else:
            root = Path.cwd()
            first = Path(str(table["rlnMicrographName"].iloc[0])) if len(table) else None
            if first is not None and not first.is_absolute():
                here = path.resolve().parent
                for cand in (Path.cwd(), here, here.parent, here.parent.parent):
                    if (cand / first).exists():
                        root = cand
                        break
        return cls(data.optics, table.reset_index(drop=True), root, path)

    def __len__(self) -> int:
        return len(self.micrographs)

    @property
    def names(self) -> list[str]:
        return self.micrographs["rlnMicrographName"].astype(str).tolist()

    def path(self, i: int) -> Path:
        from tamis.io.paths import checked

        p = Path(self.names[i])
        return checked(p if p.is_absolute() else self.root / p, self.source)

    def _optics_row(self, i: int) -> pd.Series | None:
        if self.optics is None or not len(self.optics):
            return None
        if "rlnOpticsGroup" in self.micrographs.columns and "rlnOpticsGroup" in self.optics:
            g = int(self.micrographs["rlnOpticsGroup"].iloc[i])
            rows = self.optics[self.optics["rlnOpticsGroup"].astype(int) == g]
            if len(rows):
                return rows.iloc[0]
        return self.optics.iloc[0]

    def pixel_size(self, i: int) -> float | None:
        row = self._optics_row(i)
        for label in ("rlnMicrographPixelSize", "rlnImagePixelSize"):
            if row is not None and label in row.index:
                return float(row[label])
        return None

    def optics_value(self, i: int, label: str, default: float) -> float:
        """``label`` of micrograph ``i``'s optics group, or ``default``."""
        row = self._optics_row(i)
        if row is not None and label in row.index and pd.notna(row[label]):
            return float(row[label])
        return default

    def has_ctf(self) -> bool:
        return "rlnDefocusU" in self.micrographs.columns

    def ctf(self, i: int) -> CTFParams | None:
        """CTF parameters of micrograph ``i`` (one row), or None without rlnDefocusU."""
        if not self.has_ctf():
            return None
        m = self.micrographs.iloc[i]
        o = self._optics_row(i)

        def get(series, label: str, default: float) -> float:
            if series is not None and label in series.index and pd.notna(series[label]):
                return float(series[label])
            return default

        du = get(m, "rlnDefocusU", 0.0)
        values = {
            "defocus_u": du,
            "defocus_v": get(m, "rlnDefocusV", du),
            "defocus_angle": get(m, "rlnDefocusAngle", 0.0),
            "voltage": get(o, "rlnVoltage", 300.0),
            "spherical_aberration": get(o, "rlnSphericalAberration", 2.7),
            "amplitude_contrast": get(o, "rlnAmplitudeContrast", 0.1),
            "phase_shift": get(m, "rlnPhaseShift", 0.0),
            "bfactor": get(m, "rlnCtfBfactor", 0.0),
            "scale": get(m, "rlnCtfScalefactor", 1.0),
            "pixel_size": self.pixel_size(i) or 1.0,
        }
        return CTFParams(
            **{k: torch.tensor(np.array([v]), dtype=torch.float64) for k, v in values.items()}
        )
