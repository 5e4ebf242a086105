"""A person's class selection (RELION's interactive Select job, ``relion.select.interactive``):
the particles of the chosen classes of a 2D job, written as RELION's Select job writes them
(``particles.star``, ``class_averages.star``, ``backup_selection.star``). The web monitor saves a
corrected selection through this, as a new job of the pipeline.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from tamis.errors import TamisError
from tamis.io.star import read_data_star, read_star, write_star

__all__ = ["write_class_selection"]


def write_class_selection(
    optimiser: str | Path, out_dir: str | Path, classes: Iterable[int]
) -> int:
    """Select the particles of ``classes`` (1-based numbers) of the 2D job whose
    ``run_itNNN_optimiser.star`` is ``optimiser``; returns the number of particles kept."""
    from tamis.rank.select import read_optimiser

    path = Path(optimiser)
    opt = read_optimiser(path)
    model_classes = read_star(Path(str(opt["rlnModelStarFile"])))["model_classes"]
    k = len(model_classes)
    chosen = sorted({int(c) for c in classes})
    bad = [c for c in chosen if not 1 <= c <= k]
    if bad:
        raise TamisError(f"{path}: the job has classes 1-{k}; no class {bad[0]}")
    data = read_data_star(str(opt["rlnExperimentalDataStarFile"]), "particles")
    table = data.table
    keep = table["rlnClassNumber"].astype(int).isin(chosen)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_star({"optics": data.optics, "particles": table[keep]}, out / "particles.star")
    flags = pd.DataFrame({"rlnSelected": [int(c + 1 in chosen) for c in range(k)]})
    write_star({"": flags}, out / "backup_selection.star")
    cols = ["rlnReferenceImage", "rlnClassDistribution", "rlnAccuracyRotations",
            "rlnAccuracyTranslationsAngst", "rlnEstimatedResolution"]  # fmt: skip
    picked = model_classes.iloc[[c - 1 for c in chosen]]
    write_star({"": picked[[c for c in cols if c in picked.columns]].reset_index(drop=True)},
               out / "class_averages.star")  # fmt: skip
    return int(keep.sum())
