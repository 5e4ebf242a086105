"""Reading a simulation's ground truth back beside the STAR files that jobs write."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

__all__ = ["image_key", "truth_for"]


def image_key(name: str) -> str:
    """``N@any/dir/stack.mrcs`` -> ``N@stack.mrcs``: the same image whatever directory a job's
    STAR file names it from (outputs resolve names from the current directory)."""
    index, _, stack = name.partition("@")
    return f"{int(index)}@{Path(stack).name}"


def truth_for(particles: pd.DataFrame, truth: pd.DataFrame | str | Path) -> pd.DataFrame:
    """Rows of ``ground_truth.csv`` in the order of a particle table's ``rlnImageName``."""
    if not isinstance(truth, pd.DataFrame):
        truth = pd.read_csv(truth)
    keyed = truth.set_index(truth["image_name"].map(image_key))
    return keyed.loc[particles["rlnImageName"].map(image_key)].reset_index(drop=True)
