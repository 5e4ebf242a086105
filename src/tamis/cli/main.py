"""``tamis``: the command-line entry point. Run ``tamis --help`` for the command groups."""

from __future__ import annotations

from pathlib import Path

import typer

from tamis import __version__
from tamis.cli import class2d, extract, pick, rank, schemer, simulate, star
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
app.command("extract", help=extract.__doc__)(extract.extract)


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
def demo(o: Path = typer.Option(Path("demo"), "--o", help="Output directory.")) -> None:
    """Run the built-in example: simulate a small data set and report what was made."""
    from tamis.demo import run_demo

    for line in run_demo(o, show_progress=True):
        console.print(line, highlight=False)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
