"""``tamis star``: look inside STAR files.

Example::

    tamis star info Class2D/job010/run_it025_data.star
    tamis star check Extract/job005/particles.star
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import typer
from rich.table import Table

from tamis.cli._common import console, user_errors
from tamis.io.particles import ParticleSet
from tamis.io.star import read_star

app = typer.Typer(help="Look inside STAR files.", no_args_is_help=True)


@app.command("info")
@user_errors
def info(
    file: Path = typer.Argument(..., help="A STAR file."),
    columns: bool = typer.Option(True, "--columns/--no-columns", help="List each block's labels."),
) -> None:
    """Blocks, rows, columns and optics groups of a STAR file."""
    blocks = read_star(file)
    table = Table(title=str(file), show_lines=False)
    table.add_column("block")
    table.add_column("kind")
    table.add_column("rows", justify="right")
    table.add_column("columns", justify="right")
    for name, block in blocks.items():
        is_loop = isinstance(block, pd.DataFrame)
        rows = str(len(block)) if is_loop else "-"
        table.add_row(
            f"data_{name}",
            "loop" if is_loop else "list",
            rows,
            str(len(block.columns) if is_loop else len(block)),
        )
    console.print(table)
    optics = blocks.get("optics")
    if isinstance(optics, pd.DataFrame) and len(optics):
        og = Table(title="optics groups")
        headers = {
            "rlnOpticsGroup": "group",
            "rlnOpticsGroupName": "name",
            "rlnImagePixelSize": "pixel (A)",
            "rlnMicrographPixelSize": "pixel (A)",
            "rlnImageSize": "box",
            "rlnVoltage": "kV",
            "rlnSphericalAberration": "Cs",
            "rlnAmplitudeContrast": "Q0",
        }
        show = [c for c in headers if c in optics]
        for c in show:
            og.add_column(headers[c])
        data_block = next(
            (
                b
                for k, b in blocks.items()
                if k != "optics" and isinstance(b, pd.DataFrame) and "rlnOpticsGroup" in b
            ),
            None,
        )
        if data_block is not None:
            og.add_column("members", justify="right")
        for _, row in optics.iterrows():
            cells = [str(row[c]) for c in show]
            if data_block is not None:
                cells.append(
                    str(int((data_block["rlnOpticsGroup"] == row["rlnOpticsGroup"]).sum()))
                )
            og.add_row(*cells)
        console.print(og)
    if columns:
        for name, block in blocks.items():
            labels = list(block.columns) if isinstance(block, pd.DataFrame) else list(block)
            console.print(f"[bold]data_{name}[/]: " + " ".join(labels), highlight=False)


@app.command("check")
@user_errors
def check(
    file: Path = typer.Argument(..., help="A particles STAR file or cryoSPARC .cs file."),
    project_dir: Path = typer.Option(
        None, "--project_dir", help="Where relative image paths start (default: found)."
    ),
) -> None:
    """Check a particle set: columns, optics groups, and that every image can be read."""
    ps = ParticleSet.from_file(file, project_dir=project_dir)
    n_stacks = len({name.split("@", 1)[-1] for name in ps.particles["rlnImageName"]})
    console.print(
        f"{file}: {len(ps)} particles in {n_stacks} stack(s), {len(ps.optics)} optics group(s), "
        f"box {ps.box_size} px, images found under {ps.root}",
        highlight=False,
    )
