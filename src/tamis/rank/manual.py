"""A person's class selection (RELION's interactive Select job, ``relion.select.interactive``):
the particles of the chosen classes of a 2D job, written as RELION's Select job writes them
(``particles.star``, ``class_averages.star``, ``backup_selection.star``). The web monitor saves a
corrected selection through this, as a new job of the pipeline.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tamis.errors import TamisError
from tamis.io.star import read_data_star, read_star
from tamis.rank.select import read_optimiser, write_selection

__all__ = ["write_class_selection"]


def write_class_selection(
    optimiser: str | Path, out_dir: str | Path, classes: Iterable[int]
) -> int:
    """Select the particles of ``classes`` (1-based numbers) of the 2D job whose
    ``run_itNNN_optimiser.star`` is ``optimiser``; returns the number of particles kept."""
    path = Path(optimiser)
    opt = read_optimiser(path)
    model_classes = read_star(Path(str(opt["rlnModelStarFile"])))["model_classes"]
    k = len(model_classes)
    chosen = sorted({int(c) for c in classes})
    bad = [c for c in chosen if not 1 <= c <= k]
    if bad:
        raise TamisError(f"{path}: the job has classes 1-{k}; no class {bad[0]}")
    data = read_data_star(str(opt["rlnExperimentalDataStarFile"]), "particles")
    keep = data.table["rlnClassNumber"].astype(int).isin(chosen).to_numpy()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_selection(out, data, model_classes, [c - 1 for c in chosen], keep)
    return int(keep.sum())
