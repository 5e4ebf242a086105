"""A particle set: the particle table, its optics groups, and lazily loaded images.

The rest of tamis never cares where pixels come from: a :class:`ParticleSet` turns a
particles STAR file (RELION 3.0 to 5) or a cryoSPARC ``.cs`` file into per-particle CTF
parameters and pixel sizes as tensors, and into batches of images on the chosen device.
Images are read from memory-mapped stacks batch by batch, with the next batch read by a
background thread while the current one is used; ``preread()`` loads everything at once
(RELION's ``--preread_images``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from tamis.ctf import CTFParams
from tamis.errors import InputFileError
from tamis.io.mrc import StackCache
from tamis.io.star import DataStar, parse_image_names, read_data_star, require_columns, write_star

__all__ = ["ParticleSet", "ParticleBatch"]


@dataclass
class ParticleBatch:
    """One batch of particles: their 0-based row indices in the set and their images."""

    indices: np.ndarray
    images: torch.Tensor


class ParticleSet:
    """Particles of one data set: metadata table, optics groups and image access.

    Parameters
    ----------
    optics
        RELION optics table (``rlnOpticsGroup`` 1..N, voltage, Cs, amplitude contrast,
        ``rlnImagePixelSize``, ``rlnImageSize``).
    particles
        Particle table with ``rlnImageName`` and ``rlnOpticsGroup``; the CTF columns are optional
        (missing defocus means no CTF information, i.e. defocus 0).
    root
        Directory against which relative stack paths in ``rlnImageName`` are resolved (RELION's
        project directory).
    source
        The file this set was read from, used in error messages.
    """

    def __init__(
        self,
        optics: pd.DataFrame,
        particles: pd.DataFrame,
        *,
        root: str | Path = ".",
        source: str | Path | None = None,
    ) -> None:
        self.source = Path(source) if source is not None else None
        where = self.source or Path("<particles>")
        require_columns(particles, ["rlnImageName"], where, "particles")
        require_columns(optics, ["rlnOpticsGroup"], where, "optics")
        self.optics = optics.reset_index(drop=True)
        self.particles = particles.reset_index(drop=True)
        self.root = Path(root)
        try:
            self._index, paths = parse_image_names(self.particles["rlnImageName"])
        except ValueError as exc:
            raise InputFileError(where, str(exc)) from None
        # Stack paths as integer codes, so batches group by file without string work.
        self._stack_code, self._stack_paths = pd.factorize(pd.Series(paths, dtype=object))
        self._cache = StackCache()
        self._preread: np.ndarray | None = None
        if "rlnOpticsGroup" in self.particles.columns:
            og = self.particles["rlnOpticsGroup"].to_numpy(dtype=np.int64)
        else:
            og = np.ones(len(self.particles), dtype=np.int64)
        row_of_group = {int(g): i for i, g in enumerate(self.optics["rlnOpticsGroup"])}
        try:
            self._optics_row = np.array([row_of_group[int(g)] for g in og], dtype=np.int64)
        except KeyError as exc:
            raise InputFileError(
                where, f"particles refer to optics group {exc} not in data_optics"
            ) from None

    # ---- construction -------------------------------------------------------------------

    @classmethod
    def from_star(
        cls, path: str | Path, *, project_dir: str | Path | None = None, validate: bool = True
    ) -> ParticleSet:
        """Read a particles STAR file (RELION 3.0 to 5).

        ``project_dir`` is where relative image paths start. By default the first of: the
        current directory, the STAR file's directory and its two parents, in which the first
        stack exists. With ``validate`` every stack header is checked: missing files and image
        indices past the end of a stack are reported now, not mid-job.
        """
        path = Path(path)
        data = read_data_star(path, "particles")
        if data.kind != "particles":
            raise InputFileError(path, f"expected particles, found data_{data.kind}")
        root = _find_root(path, data.table, project_dir)
        ps = cls(data.optics, data.table, root=root, source=path)
        ps._fill_image_size()
        if validate:
            ps.validate()
        return ps

    @classmethod
    def from_file(cls, path: str | Path, *, project_dir: str | Path | None = None) -> ParticleSet:
        """A STAR or cryoSPARC ``.cs`` file, by extension."""
        if Path(path).suffix == ".cs":
            from tamis.io.cryosparc import read_cryosparc

            return read_cryosparc(path, project_dir=project_dir)
        return cls.from_star(path, project_dir=project_dir)

    def to_star(self, path: str | Path) -> None:
        """Write the optics and particle tables as a RELION 3.1+ particles STAR file."""
        write_star({"optics": self.optics, "particles": self.particles}, path)

    def image_names_from(
        self, project_dir: str | Path | None = None, indices: np.ndarray | None = None
    ) -> pd.Series:
        """``rlnImageName`` values that resolve from ``project_dir`` (default: the current
        directory, RELION's project directory): relative where the stack lies below it,
        absolute otherwise; of the rows ``indices`` only, when given."""
        rows = np.arange(len(self.particles)) if indices is None else np.asarray(indices)
        base = Path(project_dir or Path.cwd()).resolve()
        if self.root.resolve() == base:
            return self.particles["rlnImageName"].iloc[rows]
        mapped = []
        for p in self._stack_paths:
            full = (self.root / p).resolve()
            try:
                mapped.append(str(full.relative_to(base)))
            except ValueError:
                mapped.append(str(full))
        stacks = np.asarray(mapped, dtype=object)[np.asarray(self._stack_code)[rows]]
        index = np.asarray(self._index)[rows]
        return pd.Series(
            [f"{i + 1:06d}@{s}" for i, s in zip(index, stacks, strict=True)],
            index=self.particles.index[rows],
        )

    def to_datastar(self) -> DataStar:
        return DataStar(self.optics, self.particles, "particles", {})

    # ---- metadata -----------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.particles)

    @property
    def optics_group_index(self) -> np.ndarray:
        """0-based optics-table row of every particle, ``(n,)`` int64."""
        return self._optics_row

    @property
    def box_size(self) -> int:
        """The image size in pixels (one for the whole set)."""
        sizes = self.optics["rlnImageSize"].astype(int).unique()
        if len(sizes) != 1:
            raise InputFileError(
                self.source or "<particles>", f"optics groups have different box sizes {sizes}"
            )
        return int(sizes[0])

    @property
    def pixel_sizes(self) -> np.ndarray:
        """Pixel size of every particle in Å, ``(n,)`` float64."""
        return self.optics["rlnImagePixelSize"].to_numpy(dtype=np.float64)[self._optics_row]

    @property
    def pixel_size(self) -> float:
        """The pixel size in Å (one for the whole set)."""
        values = np.unique(self.optics["rlnImagePixelSize"].to_numpy(dtype=np.float64))
        if len(values) != 1:
            raise InputFileError(
                self.source or "<particles>", f"optics groups have different pixel sizes {values}"
            )
        return float(values[0])

    def ctf_params(
        self,
        indices: Sequence[int] | np.ndarray | None = None,
        *,
        device: str | torch.device = "cpu",
    ) -> CTFParams:
        """CTF parameters of the particles at ``indices`` (all by default), as float64 tensors."""
        idx = np.arange(len(self)) if indices is None else np.asarray(indices, dtype=np.int64)
        rows = self.particles.iloc[idx] if indices is not None else self.particles
        orow = self._optics_row[idx]

        def per_particle(label: str, default: float) -> np.ndarray:
            if label in rows.columns:
                return rows[label].to_numpy(dtype=np.float64)
            if label in self.optics.columns:
                return self.optics[label].to_numpy(dtype=np.float64)[orow]
            return np.full(len(idx), default, dtype=np.float64)

        def per_group(label: str, default: float) -> np.ndarray:
            if label in self.optics.columns:
                return self.optics[label].to_numpy(dtype=np.float64)[orow]
            return np.full(len(idx), default, dtype=np.float64)

        du = per_particle("rlnDefocusU", 0.0)
        values = {
            "defocus_u": du,
            "defocus_v": per_particle("rlnDefocusV", np.nan),
            "defocus_angle": per_particle("rlnDefocusAngle", 0.0),
            "voltage": per_group("rlnVoltage", 300.0),
            "spherical_aberration": per_group("rlnSphericalAberration", 2.7),
            "amplitude_contrast": per_group("rlnAmplitudeContrast", 0.1),
            "phase_shift": per_particle("rlnPhaseShift", 0.0),
            "bfactor": per_particle("rlnCtfBfactor", 0.0),
            "scale": per_particle("rlnCtfScalefactor", 1.0),
            "pixel_size": per_group("rlnImagePixelSize", np.nan),
        }
        dv = values["defocus_v"]
        values["defocus_v"] = np.where(np.isnan(dv), du, dv)
        return CTFParams(
            **{
                k: torch.tensor(np.array(v), dtype=torch.float64, device=device)
                for k, v in values.items()
            }
        )

    # ---- images -------------------------------------------------------------------------

    def stack_path(self, code: int) -> Path:
        from tamis.io.paths import checked

        p = Path(self._stack_paths[code])
        return checked(p if p.is_absolute() else self.root / p, self.source)

    def validate(self) -> None:
        """Check that every stack exists, has the box size, and holds every index asked of it."""
        where = self.source or Path("<particles>")
        max_index = np.full(len(self._stack_paths), -1, dtype=np.int64)
        np.maximum.at(max_index, self._stack_code, self._index)
        box = self.box_size if "rlnImageSize" in self.optics.columns else None
        for code, top in enumerate(max_index):
            path = self.stack_path(code)
            if not path.exists():
                raise InputFileError(
                    path,
                    f"stack named in {where} (rlnImageName) not found (project dir {self.root})",
                )
            stack = self._cache.get(path)
            if top >= len(stack):
                raise InputFileError(
                    path,
                    f"image {top + 1} requested by {where} but the stack holds {len(stack)} image(s)",
                )
            if box is not None and stack.shape[1:] != (box, box):
                raise InputFileError(
                    path, f"images are {stack.shape[2]}x{stack.shape[1]} but rlnImageSize is {box}"
                )

    def load_images(
        self,
        indices: Sequence[int] | np.ndarray,
        *,
        device: str | torch.device = "cpu",
    ) -> torch.Tensor:
        """Images of the particles at ``indices`` as float32 ``(b, n, n)`` on ``device``."""
        return torch.from_numpy(self._read(np.asarray(indices, dtype=np.int64))).to(device)

    def batches(
        self,
        batch_size: int,
        *,
        indices: Sequence[int] | np.ndarray | None = None,
        device: str | torch.device = "cpu",
        prefetch: bool = True,
    ) -> Iterator[ParticleBatch]:
        """Iterate over particles in batches; the next batch is read while this one is used."""
        order = np.arange(len(self)) if indices is None else np.asarray(indices, dtype=np.int64)
        chunks = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
        if not chunks:
            return
        if not prefetch or self._preread is not None:
            for chunk in chunks:
                yield ParticleBatch(chunk, self.load_images(chunk, device=device))
            return
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="tamis-prefetch") as pool:
            future = pool.submit(self._read, chunks[0])
            for i, chunk in enumerate(chunks):
                data = future.result()
                if i + 1 < len(chunks):
                    future = pool.submit(self._read, chunks[i + 1])
                yield ParticleBatch(chunk, torch.from_numpy(data).to(device))

    def preread(self) -> None:
        """Read every image into memory now (RELION's ``--preread_images``)."""
        self._preread = None
        self._preread = self._read(np.arange(len(self)))

    def close(self) -> None:
        self._cache.close()

    def _read(self, idx: np.ndarray) -> np.ndarray:
        if self._preread is not None:
            return self._preread[idx]
        codes = self._stack_code[idx]
        box = self._peek_shape(codes[0]) if len(idx) else (0, 0)
        out = np.empty((len(idx), *box), dtype=np.float32)
        # Group the batch by stack; within a stack read in index order.
        order = np.lexsort((self._index[idx], codes))
        sorted_codes = codes[order]
        bounds = np.flatnonzero(np.diff(sorted_codes)) + 1
        for group in np.split(order, bounds):
            stack = self._cache.get(self.stack_path(int(codes[group[0]])))
            images = stack.read(self._index[idx[group]])
            if images.shape[1:] != box:
                raise InputFileError(
                    stack.path, f"images are {images.shape[1:]} but others are {box}"
                )
            out[group] = images
        return out

    def _peek_shape(self, code: int) -> tuple[int, int]:
        return self._cache.get(self.stack_path(int(code))).shape[1:]

    def _fill_image_size(self) -> None:
        """RELION 3.0 files have no rlnImageSize: take it from the first stack's header."""
        if "rlnImageSize" in self.optics.columns or not len(self):
            return
        path = self.stack_path(int(self._stack_code[0]))
        if path.exists():
            h, _ = self._cache.get(path).shape[1:]
            self.optics["rlnImageSize"] = h
        if "rlnImagePixelSize" not in self.optics.columns:
            raise InputFileError(self.source or path, "no pixel size for the particles")


def _find_root(star: Path, table: pd.DataFrame, project_dir: str | Path | None) -> Path:
    if project_dir is not None:
        return Path(project_dir)
    if not len(table):
        return Path.cwd()
    _, paths = parse_image_names(table["rlnImageName"].iloc[:1])
    first = Path(paths[0])
    if first.is_absolute():
        return Path("/")
    here = star.resolve().parent
    for cand in (Path.cwd(), here, here.parent, here.parent.parent):
        if (cand / first).exists():
            return cand
    return Path.cwd()
