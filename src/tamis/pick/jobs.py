"""Picking jobs: run a picker over a set of micrographs and write RELION's outputs.

Per micrograph ``<out>/<micrograph path after its jobNNN/>_autopick.star`` (``rlnCoordinateX/Y``,
``rlnClassNumber``, ``rlnAutopickFigureOfMerit``, ``rlnAnglePsi``), the list ``<out>/autopick.star``
and PNG overlays of the first micrographs in ``<out>/overlays/``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from tamis.errors import InputFileError, TamisError
from tamis.io.coords import coordinate_file_name, write_coordinate_list, write_coordinates
from tamis.io.micrographs import MicrographSet
from tamis.pick.micrograph import IMAGE_SUFFIXES, Micrograph, read_micrograph
from tamis.pick.overlay import write_overlay
from tamis.pick.peaks import Picks
from tamis.workers import Workers, map_items

__all__ = ["PickJob", "micrograph_inputs", "run_picker"]


@dataclass
class PickJob:
    diameter: float  # Å: overlay circles
    expected: int | None = None  # keep the best N picks per micrograph
    threshold: float | None = None  # keep picks with FOM >= threshold
    overlays: int = 3  # PNG overlays of the first N micrographs
    edge: float = 0.0  # Å: drop picks closer than this to a micrograph side
    #: Continue a job: micrographs with a coordinate file already are not picked again
    #: (RELION's ``--only_do_unfinished``); autopick.star still lists every micrograph.
    only_do_unfinished: bool = False


def micrograph_inputs(inputs: Sequence[str | Path], angpix: float | None = None) -> MicrographSet:
    """A micrographs STAR file, or micrograph files (MRC, TIFF, PNG, JPEG; ``angpix`` needed for
    the latter and overriding MRC headers), as a :class:`MicrographSet`."""
    paths = [Path(p) for p in inputs]
    if not paths:
        raise TamisError("no micrographs given")
    if len(paths) == 1 and paths[0].suffix == ".star":
        if not paths[0].is_file():
            raise InputFileError(paths[0], "not found")
        ms = MicrographSet.from_star(paths[0])
        if angpix:
            ms.optics = ms.optics.assign(rlnMicrographPixelSize=angpix)
        return ms
    pixel = angpix
    for p in paths:
        if not p.is_file():
            raise InputFileError(p, "micrograph not found")
        if p.suffix.lower() in IMAGE_SUFFIXES and not angpix:
            raise InputFileError(p, "is not an MRC file: give its pixel size (--angpix)")
    if pixel is None:
        pixel = read_micrograph(paths[0]).pixel_size
    optics = pd.DataFrame(
        {
            "rlnOpticsGroupName": ["opticsGroup1"],
            "rlnOpticsGroup": [1],
            "rlnMicrographPixelSize": [pixel],
        }
    )
    table = pd.DataFrame({"rlnMicrographName": [str(p) for p in paths], "rlnOpticsGroup": 1})
    return MicrographSet(optics, table, Path.cwd())


def _pick_one(task, *, picker, job: PickJob, out_dir: Path) -> int:
    """Pick one micrograph ``(index, path, pixel size, coordinate file)``: its coordinate file
    (and overlay) written; returns the number of picks."""
    i, path, pixel, target = task
    mic = read_micrograph(path, pixel)
    picks = picker(mic, i)
    if job.edge > 0:
        e = job.edge / mic.pixel_size
        h, w = mic.shape
        keep = (picks.x >= e) & (picks.x < w - e) & (picks.y >= e) & (picks.y < h - e)
        picks = Picks(
            picks.x[keep],
            picks.y[keep],
            picks.fom[keep],
            None if picks.diameter is None else picks.diameter[keep],
        )
    if job.threshold is not None:
        picks = picks.above(job.threshold)
    if job.expected is not None:
        picks = picks.top(job.expected)
    write_coordinates(target, picks.x, picks.y, fom=picks.fom)
    if i < job.overlays:
        write_overlay(
            out_dir / "overlays" / f"{target.stem}.png",
            mic.image,
            picks.x,
            picks.y,
            job.diameter / mic.pixel_size,
        )
    return len(picks)


def run_picker(
    micrographs: MicrographSet,
    out_dir: str | Path,
    picker: Callable[[Micrograph, int], Picks],
    job: PickJob,
    *,
    log: Callable[[str], None] = print,
    show_progress: bool = False,
    workers: Workers = Workers(),
) -> Path:
    """Run ``picker(micrograph, index)`` on every micrograph (in this process, or on dask
    ``workers``: the picker travels to them once); returns ``<out_dir>/autopick.star``."""
    out_dir = Path(out_dir)
    files: dict[str, Path] = {}
    total = 0
    done_before = 0
    tasks = []
    for i, name in enumerate(micrographs.names):
        target = coordinate_file_name(name, out_dir)
        files[name] = target
        if job.only_do_unfinished and target.is_file():
            done_before += 1
            continue
        tasks.append((i, micrographs.path(i), micrographs.pixel_size(i), target))
    work = functools.partial(_pick_one, picker=picker, job=job, out_dir=out_dir)
    for _, n_picks in map_items(
        work, tasks, workers, label="picking", show_progress=show_progress, log=log
    ):
        total += n_picks
    listing = out_dir / "autopick.star"
    write_coordinate_list(listing, files)
    n_new = len(files) - done_before
    before = f" ({done_before} picked before)" if done_before else ""
    log(
        f"picked {total} particles in {n_new} micrographs ({total / max(n_new, 1):.0f} per "
        f"micrograph){before}: {listing}"
    )
    return listing


def picks_per_micrograph(listing: str | Path) -> dict[str, np.ndarray]:
    """micrograph -> (n, 2) picked coordinates, from an ``autopick.star``."""
    from tamis.io.coords import read_coordinate_list, read_coordinates

    out = {}
    for mic, f in read_coordinate_list(listing).items():
        t = read_coordinates(f)
        out[mic] = t[["rlnCoordinateX", "rlnCoordinateY"]].to_numpy(float)
    return out
