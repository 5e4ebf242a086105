"""``tamis``: the command-line entry point. Run ``tamis --help`` for the command groups."""

from __future__ import annotations

from pathlib import Path

import typer

from tamis import __version__
from tamis.cli import (
    align_symmetry,
    class2d,
    extract,
    it,
    motioncorr,
    pick,
    postprocess,
    rank,
    refine,
    schemer,
    simulate,
    star,
    web,
)
from tamis.cli._common import console, user_errors

app = typer.Typer(
    name="tamis",
    help="Cryo-EM particle picking, 2D classification and class selection; RELION-compatible.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(simulate.app, name="simulate")
app.add_typer(star.app, name="star")
app.command("class2d", help=class2d.__doc__)(class2d.class2d)
app.add_typer(pick.app, name="pick")
app.add_typer(rank.app, name="rank")
app.command(
    "schemer",
    help=schemer.__doc__,
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
)(schemer.schemer)
app.command("motioncorr", help=motioncorr.__doc__)(motioncorr.motioncorr)
app.command("extract", help=extract.__doc__)(extract.extract)
app.add_typer(it.app, name="it")
app.command("align_symmetry", help=align_symmetry.__doc__)(align_symmetry.align_symmetry)
app.command("refine", help=refine.__doc__)(refine.refine)
app.command("postprocess", help=postprocess.__doc__)(postprocess.postprocess)
app.command("mask_create", help=postprocess.__doc__)(postprocess.mask_create)
app.command("web", help=web.__doc__)(web.web)


def _version(value: bool) -> None:
    if value:
        console.print(f"tamis {__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Cryo-EM particle picking, 2D classification and class selection; RELION-compatible."""


@app.command("demo")
@user_errors
def demo(
    o: Path = typer.Option(Path("demo"), "--o", help="Project directory to create."),
    n: int = typer.Option(16, "--n", help="Movies (micrographs) to simulate."),
    size: int = typer.Option(1024, "--size", help="Frame side (px)."),
    iterations: int = typer.Option(40, "--iter", help="VDAM mini-batches."),
    nr_classes: int = typer.Option(12, "--K", help="2D classes."),
    picker: str = typer.Option("deep", "--picker", help="deep or log."),
    micrographs: bool = typer.Option(
        False, "--micrographs", help="Start from motion-corrected micrographs, not movies."
    ),
) -> None:
    """The built-in example: simulated movies in an EPU session through the automated pipeline
    (import, motion correction, CTF, pick, extract, 2D, rank, select, 3D) as a RELION project,
    with an HTML summary."""
    from tamis.demo import DemoOptions, run_demo

    run_demo(
        o,
        DemoOptions(n_micrographs=n, size_px=size, iterations=iterations, nr_classes=nr_classes,
                    picker=picker, movies=not micrographs),
        log=lambda line: console.print(line, highlight=False),
    )  # fmt: skip


def main() -> None:
    app()


if __name__ == "__main__":
    main()
