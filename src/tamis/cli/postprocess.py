"""``tamis postprocess`` and ``tamis mask_create``: ``relion_postprocess`` and
``relion_mask_create`` with their options.

RELION's PostProcess job runs::

    relion_postprocess --mask MaskCreate/job020/mask.mrc \\
        --i Refine3D/job019/run_half1_class001_unfil.mrc --o PostProcess/job021/postprocess \\
        --angpix 1.06 --auto_bfac --autob_lowres 10

(the second half map's name swaps ``half1`` for ``half2``), and MaskCreate::

    relion_mask_create --i Refine3D/job019/run_class001.mrc --o MaskCreate/job020/mask.mrc \\
        --lowpass 15 --ini_threshold 0.02 --extend_inimask 3 --width_soft_edge 3
"""

from __future__ import annotations

from pathlib import Path

import typer

from tamis.cli._common import console, user_errors


@user_errors
def postprocess(
    i: Path = typer.Option(
        ..., "--i", help="The first unfiltered half map (its name has 'half1')."
    ),
    o: str = typer.Option("postprocess", "--o", help="Output root (root.mrc, root.star, ...)."),
    mask: Path = typer.Option(None, "--mask", help="Soft solvent mask, values in [0, 1]."),
    angpix: float = typer.Option(-1.0, "--angpix", help="Pixel size (A); default: the header's."),
    auto_bfac: bool = typer.Option(False, "--auto_bfac", help="Fit the B-factor (Guinier)."),
    autob_lowres: float = typer.Option(10.0, "--autob_lowres", help="Fit from this res. (A)."),
    autob_highres: float = typer.Option(
        0.0, "--autob_highres", help="Fit up to this res. (A); 0: the last weighted shell."
    ),
    adhoc_bfac: float = typer.Option(0.0, "--adhoc_bfac", help="B-factor to apply (A^2)."),
    skip_fsc_weighting: bool = typer.Option(False, "--skip_fsc_weighting"),
    low_pass: float = typer.Option(
        0.0, "--low_pass", help="Low-pass (A); negative: the 0.143 resolution."
    ),
    randomize_at_fsc: float = typer.Option(0.8, "--randomize_at_fsc"),
    randomize_at_A: float = typer.Option(-1.0, "--randomize_at_A"),
    force_mask: bool = typer.Option(False, "--force_mask"),
    random_seed: int = typer.Option(0, "--random_seed"),
) -> None:
    """Gold-standard resolution (masked, phase-randomisation corrected FSC), B-factor sharpening
    and FSC plot from two half maps."""
    from tamis.refine.postprocess import PostprocessOptions, run_postprocess

    opts = PostprocessOptions(
        auto_bfac=auto_bfac,
        autob_lowres=autob_lowres,
        autob_highres=autob_highres,
        adhoc_bfac=adhoc_bfac,
        randomize_at_fsc=randomize_at_fsc,
        randomize_at_A=randomize_at_A,
        low_pass=low_pass,
        skip_fsc_weighting=skip_fsc_weighting,
        force_mask=force_mask,
        random_seed=random_seed,
    )
    res = run_postprocess(i, o, mask=mask, angpix=angpix if angpix > 0 else None, options=opts)
    for w in res.warnings:
        console.print(f"warning: {w}", highlight=False)
    extra = f", phases randomised beyond {res.randomize_from:.1f} A" if mask else ""
    console.print(
        f"final resolution {res.resolution:.2f} A (FSC 0.143{extra}); B-factor "
        f"{res.bfactor:.0f} A^2; wrote {o}.mrc, {o}.star, {o}_fsc.png",
        highlight=False,
    )


@user_errors
def mask_create(
    i: Path = typer.Option(..., "--i", help="Input map."),
    o: Path = typer.Option(Path("mask.mrc"), "--o", help="Output mask."),
    lowpass: float = typer.Option(0.0, "--lowpass", help="Low-pass the map first (A); 0: none."),
    ini_threshold: float = typer.Option(0.01, "--ini_threshold", help="Binarisation threshold."),
    extend_inimask: float = typer.Option(
        0.0, "--extend_inimask", help="Extend (px; negative shrinks) the binary mask."
    ),
    width_soft_edge: float = typer.Option(0.0, "--width_soft_edge", help="Soft edge (px)."),
    invert: bool = typer.Option(False, "--invert", help="Invert the final mask."),
    angpix: float = typer.Option(-1.0, "--angpix", help="Pixel size (A); default: the header's."),
) -> None:
    """A soft mask from a map: low-pass, threshold, extend, soft edge (the program's defaults;
    RELION's GUI sets --lowpass 15 --ini_threshold 0.02 --extend_inimask 3 --width_soft_edge 3)."""
    from tamis.refine.automask import MaskOptions, create_mask_file

    opts = MaskOptions(
        lowpass=lowpass,
        ini_threshold=ini_threshold,
        extend_inimask=extend_inimask,
        width_soft_edge=width_soft_edge,
        invert=invert,
    )
    _, frac = create_mask_file(i, o, opts, angpix=angpix if angpix > 0 else None)
    console.print(f"wrote {o}: {100 * frac:.1f}% of the box inside (> 0.5)", highlight=False)
