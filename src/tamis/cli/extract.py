"""``tamis extract``: particle extraction (``relion_preprocess --extract``)."""

from __future__ import annotations

from pathlib import Path

import typer

from tamis.cli._common import (
    console,
    dask_cluster_option,
    dask_workers_option,
    user_errors,
    workers_of,
)


@user_errors
def extract(
    mic: Path = typer.Option(..., "--i", help="micrographs.star (with CTF)."),
    coord: Path = typer.Option(
        None, "--coord_list", help="autopick.star: micrograph -> coordinate file."
    ),
    reextract: Path = typer.Option(
        None, "--reextract_data_star", help="particles.star to re-extract (with --recenter)."
    ),
    odir: Path = typer.Option(..., "--part_dir", help="Output directory, e.g. Extract/job005."),
    extract_size: int = typer.Option(..., "--extract_size", help="Box in micrograph pixels."),
    rescale: int = typer.Option(None, "--scale", help="Rescale the box to this size (Fourier)."),
    norm: bool = typer.Option(False, "--norm", help="RELION normalisation (background 0, 1)."),
    bg_radius: float = typer.Option(
        -1, "--bg_radius", help="Background radius (px of the output box); -1: 75% of half box."
    ),
    invert: bool = typer.Option(False, "--invert_contrast", help="Make particles white."),
    float16: bool = typer.Option(False, "--float16", help="Write 16-bit stacks."),
    minimum_fom: float = typer.Option(
        None, "--minimum_pick_fom", help="Skip picks with a lower rlnAutopickFigureOfMerit."
    ),
    recenter: bool = typer.Option(False, "--recenter", help="Recentre on rlnOriginX/YAngst."),
    dask_workers: int = dask_workers_option(),
    dask_cluster: str = dask_cluster_option(),
) -> None:
    """Extract particles into per-micrograph stacks and particles.star (RELION's options)."""
    from tamis.errors import TamisError
    from tamis.extract import ExtractOptions, extract_particles

    if (coord is None) == (reextract is None):
        raise TamisError("give one of --coord_list or --reextract_data_star")
    options = ExtractOptions(
        extract_size=extract_size,
        rescale=rescale,
        norm=norm,
        bg_radius=bg_radius if bg_radius > 0 else None,
        invert_contrast=invert,
        float16=float16,
        minimum_pick_fom=minimum_fom,
        recenter=recenter,
    )
    extract_particles(
        mic,
        coord or reextract,
        odir,
        options,
        log=lambda s: console.print(s, highlight=False),
        show_progress=True,
        workers=workers_of(dask_workers, dask_cluster),
    )
