"""Particle extraction (``relion_preprocess --extract``): micrographs + coordinates -> stacks and
``particles.star``.

Per particle, as RELION: the box is centred on pixel ``(int(x), int(y))``; pixels beyond the
micrograph take the value of the nearest pixel inside; then Fourier rescaling (``--rescale``),
normalisation (``--norm``: a plane fitted to the background -- pixels farther than ``--bg_radius``
from the centre -- is subtracted, then the background has mean 0 and standard deviation 1) and
contrast inversion (``--invert_contrast``). Stacks go to ``<out>/<micrograph path without its
JobType/jobNNN/>.mrcs``; ``particles.star`` carries the micrograph's optics group (with
``rlnImagePixelSize``, ``rlnImageSize``) and CTF. Re-extraction from a particles STAR file with
``recenter`` moves each coordinate by its rounded ``rlnOriginX/YAngst`` and keeps the rest as
origin, like RELION.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from tamis.errors import InputFileError, TamisError
from tamis.fourier import rescale_images
from tamis.io.coords import pipeline_relative, read_coordinate_file, read_coordinate_list
from tamis.io.images import read_micrograph
from tamis.io.micrographs import MicrographSet
from tamis.io.mrc import write_mrc
from tamis.io.paths import checked
from tamis.io.star import format_image_names, read_data_star, read_star, write_star
from tamis.workers import Workers, map_items

__all__ = [
    "ExtractOptions",
    "extract_particles",
    "coordinates_by_micrograph",
    "normalise_particles",
    "window_particles",
]

_CTF_LABELS = (
    "rlnDefocusU",
    "rlnDefocusV",
    "rlnDefocusAngle",
    "rlnCtfBfactor",
    "rlnCtfScalefactor",
    "rlnPhaseShift",
    "rlnCtfMaxResolution",
    "rlnCtfFigureOfMerit",
)


@dataclass
class ExtractOptions:
    extract_size: int  # box in micrograph pixels (even)
    rescale: int | None = None  # box after Fourier rescaling (even)
    norm: bool = True
    bg_radius: float | None = None  # pixels of the output box; default 75% of half the box
    invert_contrast: bool = True
    float16: bool = False
    minimum_pick_fom: float | None = None
    recenter: bool = False
    #: Continue a job: micrographs extracted before (stack and ``*_extract.star`` present) are
    #: taken as they are (RELION's ``--only_do_unfinished``).
    only_do_unfinished: bool = False

    def check(self) -> None:
        if self.extract_size < 8 or self.extract_size % 2:
            raise TamisError(f"--extract_size {self.extract_size}: must be even and at least 8")
        if self.rescale is not None and (self.rescale < 8 or self.rescale % 2):
            raise TamisError(f"--rescale {self.rescale}: must be even and at least 8")

    @property
    def box(self) -> int:
        return self.rescale or self.extract_size

    @property
    def background_radius(self) -> float:
        return self.bg_radius if self.bg_radius and self.bg_radius > 0 else 0.75 * self.box / 2


def window_particles(image: torch.Tensor, x: np.ndarray, y: np.ndarray, size: int) -> torch.Tensor:
    """Boxes ``(n, size, size)`` centred (pixel ``size // 2``) on ``(int(x), int(y))``; pixels
    outside the micrograph take the nearest edge value (RELION's extraction)."""
    h, w = image.shape
    off = torch.arange(size) - size // 2
    xi = torch.as_tensor(np.trunc(x).astype(np.int64))[:, None] + off[None]
    yi = torch.as_tensor(np.trunc(y).astype(np.int64))[:, None] + off[None]
    xi, yi = xi.clamp(0, w - 1), yi.clamp(0, h - 1)
    return image[yi[:, :, None], xi[:, None, :]]


def normalise_particles(images: torch.Tensor, bg_radius: float, ramp: bool = True) -> torch.Tensor:
    """RELION's ``normalise``: pixels with ``i² + j² > bg_radius²`` (centre ``n // 2``) are the
    background; with ``ramp`` a least-squares plane through them is subtracted first; then
    ``(image - mean_bg) / std_bg`` (population standard deviation)."""
    n = images.shape[-1]
    img = images.to(torch.float64)
    c = torch.arange(n, dtype=torch.float64) - n // 2
    yy, xx = torch.meshgrid(c, c, indexing="ij")
    r2 = float(int(bg_radius)) ** 2
    bg = (yy * yy + xx * xx) > r2
    if int(bg.sum()) < 5:
        raise TamisError(f"--bg_radius {bg_radius}: no background left in a box of {n}")
    if ramp:
        a = torch.stack([xx[bg], yy[bg], torch.ones_like(xx[bg])], 1)  # (P, 3)
        coef = torch.linalg.lstsq(a, img[:, bg].T).solution  # (3, B)
        plane = coef[0][:, None, None] * xx + coef[1][:, None, None] * yy + coef[2][:, None, None]
        img = img - plane
    v = img[:, bg]
    mean = v.mean(1)
    std = v.std(1, unbiased=False).clamp(min=1e-10)
    return (img - mean[:, None, None]) / std[:, None, None]


def _stack_name(micrograph: str, out_dir: Path) -> Path:
    rel = pipeline_relative(micrograph)
    return out_dir / rel.parent / f"{rel.stem}.mrcs"


def coordinates_by_micrograph(
    coords: str | Path | Mapping[str, pd.DataFrame], micrographs: MicrographSet
) -> dict[str, pd.DataFrame]:
    """micrograph name -> coordinate table, from an autopick.star-style list, a particles STAR
    file (re-extraction), a directory of per-micrograph STAR/.box/CSV files named after the
    micrographs, or a ready mapping."""
    if isinstance(coords, Mapping):
        return {str(k): v for k, v in coords.items()}
    path = Path(coords)
    if path.is_dir():
        # per-micrograph files (STAR, EMAN .box, CSV) named after the micrograph
        files = sorted(
            f
            for f in path.rglob("*")
            if f.suffix.lower() in (".star", ".box", ".csv", ".txt", ".tsv")
        )
        out = {}
        for name in micrographs.names:
            stem = Path(name).stem
            match = [f for f in files if f.stem == stem or f.stem.startswith(stem + "_")]
            if match:
                out[name] = read_coordinate_file(match[0])
        if not out:
            raise InputFileError(path, "holds no coordinate file named after any micrograph")
        return out
    if not path.is_file():
        raise InputFileError(path, "coordinates not found")
    from tamis.io.star import read_star

    blocks = read_star(path)
    if "coordinate_files" in blocks:
        out = {}
        for mic, cfile in read_coordinate_list(path).items():
            cpath = Path(cfile)
            if not cpath.is_absolute():
                for base in (Path.cwd(), path.parent, micrographs.root):
                    if (base / cpath).is_file():
                        cpath = base / cpath
                        break
            if not cpath.is_file():
                raise InputFileError(cfile, f"coordinate file named in {path} not found")
            out[mic] = read_coordinate_file(checked(cpath, path))
        return out
    data = read_data_star(path, "particles")
    table = data.table
    for label in ("rlnMicrographName", "rlnCoordinateX", "rlnCoordinateY"):
        if label not in table.columns:
            raise InputFileError(path, f"lacks {label} (need coordinates or a particles file)")
    if "rlnOpticsGroup" in table.columns and len(data.optics):
        pix = dict(
            zip(
                data.optics["rlnOpticsGroup"].astype(int),
                data.optics.get("rlnImagePixelSize", pd.Series([np.nan] * len(data.optics))),
                strict=True,
            )
        )
        table = table.assign(_particle_pixel=table["rlnOpticsGroup"].astype(int).map(pix))
    return {
        str(m): t.reset_index(drop=True) for m, t in table.groupby("rlnMicrographName", sort=False)
    }


@dataclass
class _Task:
    """One micrograph's extraction, as sent to a worker."""

    slot: int
    mic_name: str
    table: pd.DataFrame
    path: Path
    pixel: float | None
    micrograph: pd.Series  # its row of the micrographs STAR file (optics group, CTF)
    stack: Path
    done: Path


def _extract_one(task: _Task, *, options: ExtractOptions, box: int) -> tuple[pd.DataFrame, float]:
    """Extract one micrograph's particles: its stack and ``*_extract.star`` written (each
    atomically, the STAR file last); returns its particle rows and the micrograph's pixel size."""
    table = task.table.copy()
    if options.minimum_pick_fom is not None and "rlnAutopickFigureOfMerit" in table:
        table = table[table["rlnAutopickFigureOfMerit"] >= options.minimum_pick_fom]
    if not len(table):
        empty = pd.DataFrame({"rlnImageName": []})
        write_star({"particles": empty}, task.done)
        return empty, task.pixel or 0.0
    mic = read_micrograph(task.path, task.pixel)
    p = mic.pixel_size
    x = table["rlnCoordinateX"].to_numpy(float)
    y = table["rlnCoordinateY"].to_numpy(float)
    if options.recenter and "rlnOriginXAngst" in table:
        ox = table["rlnOriginXAngst"].to_numpy(float) / p
        oy = table["rlnOriginYAngst"].to_numpy(float) / p
        rx, ry = (
            np.sign(ox) * np.floor(np.abs(ox) + 0.5),
            np.sign(oy) * np.floor(np.abs(oy) + 0.5),
        )
        x, y = x - rx, y - ry
        table["rlnCoordinateX"], table["rlnCoordinateY"] = x, y
        table["rlnOriginXAngst"] = (ox - rx) * p
        table["rlnOriginYAngst"] = (oy - ry) * p
    h, w = mic.shape
    outside = (x < -options.extract_size / 2) | (x >= w + options.extract_size / 2)
    outside |= (y < -options.extract_size / 2) | (y >= h + options.extract_size / 2)
    if outside.any():
        raise InputFileError(
            task.mic_name, f"{int(outside.sum())} coordinates lie outside the micrograph"
        )
    parts = window_particles(mic.image, x, y, options.extract_size).to(torch.float64)
    if options.rescale and options.rescale != options.extract_size:
        parts = rescale_images(parts, options.rescale)
    if options.norm:
        parts = normalise_particles(parts, options.background_radius)
    if options.invert_contrast:
        parts = -parts
    task.stack.parent.mkdir(parents=True, exist_ok=True)
    out_pixel = p * options.extract_size / box
    write_mrc(task.stack, parts.to(torch.float32).numpy(), out_pixel, float16=options.float16)
    keep = [c for c in table.columns if not c.startswith("_")]
    for label in ("rlnImageName", "rlnMicrographName", "rlnOpticsGroup", *_CTF_LABELS):
        if label in keep:
            keep.remove(label)
    out = table[keep].reset_index(drop=True)
    out.insert(0, "rlnMicrographName", task.mic_name)
    out.insert(0, "rlnImageName", format_image_names(range(len(out)), task.stack))
    mrow = task.micrograph
    for label in _CTF_LABELS:
        if label in mrow.index:
            out[label] = mrow[label]
    out["rlnOpticsGroup"] = int(mrow["rlnOpticsGroup"]) if "rlnOpticsGroup" in mrow.index else 1
    write_star({"particles": out}, task.done)
    return out, p


def extract_particles(
    micrographs: str | Path | MicrographSet,
    coordinates: str | Path | Mapping[str, pd.DataFrame],
    out_dir: str | Path,
    options: ExtractOptions,
    *,
    log=print,
    show_progress: bool = False,
    workers: Workers = Workers(),
) -> Path:
    """Extract every picked particle; returns the written ``<out_dir>/particles.star``.
    ``workers``: micrographs in this process (default) or on dask workers."""
    options.check()
    ms = (
        micrographs
        if isinstance(micrographs, MicrographSet)
        else MicrographSet.from_star(micrographs)
    )
    out_dir = Path(out_dir)
    coords = coordinates_by_micrograph(coordinates, ms)
    index = {name: i for i, name in enumerate(ms.names)}
    rows: list[pd.DataFrame] = []
    optics_used: set[int] = set()
    box = options.box
    n_done = 0
    n_before = 0
    # per micrograph: (rows of an earlier run) or a task for the workers
    slots: list[pd.DataFrame | None] = []
    tasks: list[_Task] = []
    for mic_name, table in coords.items():
        if mic_name not in index:
            raise InputFileError(
                mic_name, "micrograph of these coordinates is not in the micrographs STAR file"
            )
        i = index[mic_name]
        stack = _stack_name(mic_name, out_dir)
        done = stack.with_name(f"{stack.stem}_extract.star")
        if options.only_do_unfinished and stack.is_file() and done.is_file():
            previous = read_star(done)["particles"]
            slots.append(previous)
            n_before += len(previous)
            continue
        slots.append(None)
        tasks.append(
            _Task(len(slots) - 1, mic_name, table, ms.path(i), ms.pixel_size(i),
                  ms.micrographs.iloc[i], stack, done)
        )  # fmt: skip
    pixels = []
    work = functools.partial(_extract_one, options=options, box=box)
    for k, (out, pixel) in map_items(
        work, tasks, workers, label="extracting", show_progress=show_progress, log=log
    ):
        slots[tasks[k].slot] = out
        pixels.append(pixel)
        n_done += len(out)
    for table in slots:
        if table is not None and len(table):
            rows.append(table)
            optics_used.update(table["rlnOpticsGroup"].astype(int).tolist())
    if not rows:
        raise TamisError(
            "no particles to extract (no coordinates, or all below --minimum_pick_fom)"
        )
    particles = pd.concat(rows, ignore_index=True)
    optics = (
        ms.optics.copy()
        if ms.optics is not None and len(ms.optics)
        else pd.DataFrame({"rlnOpticsGroupName": ["opticsGroup1"], "rlnOpticsGroup": [1]})
    )
    if "rlnOpticsGroup" in optics:
        optics = optics[optics["rlnOpticsGroup"].astype(int).isin(optics_used)].reset_index(
            drop=True
        )
    mic_pixel = ms.pixel_size(0) or (pixels[-1] if pixels else None)
    if "rlnMicrographOriginalPixelSize" not in optics:
        optics["rlnMicrographOriginalPixelSize"] = mic_pixel
    optics["rlnImagePixelSize"] = mic_pixel * options.extract_size / box
    optics["rlnImageSize"] = box
    optics["rlnImageDimensionality"] = 2
    optics["rlnCtfDataAreCtfPremultiplied"] = 0
    star = out_dir / "particles.star"
    write_star({"optics": optics, "particles": particles}, star)
    before = f" (and {n_before} extracted before)" if n_before else ""
    log(f"extracted {n_done} particles{before} into {star}")
    return star
