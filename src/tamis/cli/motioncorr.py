"""``tamis motioncorr``: motion correction of movies (``relion_run_motioncorr --use_own``, the
same option names).

Example::

    tamis motioncorr --i Import/job001/movies.star --o MotionCorr/job002/ \\
        --gainref gain.mrc --patch_x 5 --patch_y 5 --dose_weighting --dose_per_frame 1.0 \\
        --grouping_for_ps 4 --float16 --save_noDW
"""

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
def motioncorr(
    i: Path = typer.Option(..., "--i", help="movies.star (RELION's movie import)."),
    o: Path = typer.Option(Path("MotionCorr"), "--o", help="Output directory."),
    first_frame_sum: int = typer.Option(1, "--first_frame_sum", help="First frame used (1-based)."),
    last_frame_sum: int = typer.Option(-1, "--last_frame_sum", help="Last frame used; <= 0: all."),
    bfactor: float = typer.Option(150.0, "--bfactor", help="B-factor for alignment (pixel^2)."),
    patch_x: int = typer.Option(1, "--patch_x", help="Patches in x (local alignment if > 2)."),
    patch_y: int = typer.Option(1, "--patch_y", help="Patches in y (local alignment if > 2)."),
    group_frames: int = typer.Option(1, "--group_frames", help="Frames per group for patches."),
    bin_factor: float = typer.Option(
        1.0, "--bin_factor", help="Fourier binning (may be non-integer)."
    ),
    dose_weighting: bool = typer.Option(
        False, "--dose_weighting", help="Write the dose-weighted sum."
    ),
    dose_per_frame: float = typer.Option(
        1.0, "--dose_per_frame", help="e/A^2 per frame (EER: per fraction)."
    ),
    preexposure: float = typer.Option(0.0, "--preexposure", help="e/A^2 before the first frame."),
    save_noDW: bool = typer.Option(
        False, "--save_noDW", help="Also write the sum without dose weighting."
    ),
    grouping_for_ps: int = typer.Option(
        -1, "--grouping_for_ps", help="Frames per power-spectrum group; -1: no _PS.mrc."
    ),
    ps_size: int = typer.Option(512, "--ps_size", help="Power spectrum size."),
    float16: bool = typer.Option(
        False, "--float16", help="Write MRC mode 12 (needs --grouping_for_ps)."
    ),
    gainref: str = typer.Option(
        "", "--gainref", help="Gain reference (MRC/TIFF; EER: .gain or MRC)."
    ),
    gain_rot: int = typer.Option(
        0, "--gain_rot", help="Rotate the gain 0-3 x 90 deg clockwise (as MotionCor2 -RotGain)."
    ),
    gain_flip: int = typer.Option(
        0, "--gain_flip", help="Flip the gain: 1 upside down, 2 left to right."
    ),
    defect_file: str = typer.Option(
        "", "--defect_file", help="MotionCor2 defect list (x y w h) or a defect map."
    ),
    skip_defect: bool = typer.Option(False, "--skip_defect", help="No hot-pixel or defect repair."),
    eer_grouping: int = typer.Option(40, "--eer_grouping", help="EER raw frames per fraction."),
    eer_upsampling: int = typer.Option(1, "--eer_upsampling", help="EER grid: 1 (4K) or 2 (8K)."),
    max_iter: int = typer.Option(5, "--max_iter", help="Alignment iterations."),
    no_early_binning: bool = typer.Option(False, "--no_early_binning", help="Bin the sums only."),
    only_do_unfinished: bool = typer.Option(
        False, "--only_do_unfinished", help="Skip movies already done."
    ),
    do_at_most: int = typer.Option(
        -1, "--do_at_most", help="Process at most this many new movies."
    ),
    device: str = typer.Option("cpu", "--device", help="torch device (cpu, cuda, cuda:1...)."),
    dask_workers: int = dask_workers_option(),
    dask_cluster: str = dask_cluster_option(),
) -> None:
    """Align movie frames (global, then patches fitted by MotionCor2's polynomial model), sum with
    dose weighting; RELION's output files."""
    from tamis.prep.motioncorr import MotionCorrOptions, run_motioncorr

    opts = MotionCorrOptions(
        first_frame_sum=first_frame_sum, last_frame_sum=last_frame_sum, bfactor=bfactor,
        patch_x=patch_x, patch_y=patch_y, group_frames=group_frames, bin_factor=bin_factor,
        dose_per_frame=dose_per_frame, preexposure=preexposure, dose_weighting=dose_weighting,
        save_noDW=save_noDW, grouping_for_ps=grouping_for_ps, ps_size=ps_size, float16=float16,
        gain=gainref, gain_rot=gain_rot, gain_flip=gain_flip, defect_file=defect_file,
        skip_defect=skip_defect, eer_grouping=eer_grouping, eer_upsampling=eer_upsampling,
        max_iter=max_iter, early_binning=not no_early_binning, device=device,
    )  # fmt: skip
    run_motioncorr(
        i, o, opts, only_do_unfinished=only_do_unfinished, do_at_most=do_at_most,
        log=lambda s: console.print(s, highlight=False), show_progress=True,
        workers=workers_of(dask_workers, dask_cluster),
    )  # fmt: skip
