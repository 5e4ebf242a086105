"""``tamis align_symmetry``: find a point group's axes in a map and rotate it into RELION's frame
(``relion_align_symmetry``'s options)."""

from __future__ import annotations

from pathlib import Path

import typer

from tamis.cli._common import console, user_errors


@user_errors
def align_symmetry(
    i: Path = typer.Option(..., "--i", help="A map, or a _model.star with a selection flag."),
    o: Path = typer.Option(Path("aligned.mrc"), "--o", help="The aligned map."),
    sym: str = typer.Option(..., "--sym", help="Point group (Cn, Dn, T, O, I, I1-I4)."),
    select_largest_class: bool = typer.Option(
        False, "--select_largest_class", help="From a model.star: the largest class."
    ),
    select_highest_resol: bool = typer.Option(
        False, "--select_highest_resol", help="From a model.star: the best-resolved class."
    ),
    box_size: int = typer.Option(64, "--box_size", help="Working box (even): sets the resolution."),
    nr_uniform: int = typer.Option(400, "--nr_uniform", help="Random candidate orientations."),
    local_step: float = typer.Option(
        2.0, "--local_search_step", help="Step (deg) of the 5x5x5 local grid."
    ),
    keep_centre: bool = typer.Option(False, "--keep_centre", help="Do not re-centre the map."),
    only_rot: bool = typer.Option(False, "--only_rot", help="Search the first Euler angle only."),
    apply_sym: bool = typer.Option(False, "--apply_sym", help="Symmetrise the aligned map."),
    angpix: float = typer.Option(-1, "--angpix", help="Pixel size (A); default: the header's."),
    seed: int = typer.Option(0, "--random_seed", help="Seed of the candidate orientations."),
) -> None:
    """Align a map's symmetry axes with RELION's standard frame for the group and write it."""
    from tamis.errors import TamisError
    from tamis.refine.align_symmetry import align_symmetry_file

    if select_largest_class and select_highest_resol:
        raise TamisError("give at most one of --select_largest_class and --select_highest_resol")
    select = (
        "largest" if select_largest_class else "highest_resol" if select_highest_resol else None
    )
    res = align_symmetry_file(
        i,
        o,
        sym,
        select=select,
        angpix=angpix if angpix > 0 else None,
        nr_uniform=nr_uniform,
        box_size=box_size,
        local_search_step=local_step,
        keep_centre=keep_centre,
        only_rot=only_rot,
        apply_sym=apply_sym,
        seed=seed,
    )
    rot, tilt, psi = res.angles
    console.print(
        f"{sym}: rot {rot:.1f}, tilt {tilt:.1f}, psi {psi:.1f} deg; unsymmetric power "
        f"{100 * res.score:.1f}% (best of {len(res.candidates)} candidates); wrote {o}",
        highlight=False,
    )
