"""``tamis refine``: 3D refinement with ``relion_refine``'s options: the de novo initial model
(``--denovo_3dref --grad``, RELION-4's InitialModel job) and gold-standard auto-refine
(``--auto_refine --split_random_halves --ref map.mrc``, the Refine3D job).

RELION's InitialModel job runs::

    relion_refine --o InitialModel/job012/run --iter 200 --grad --denovo_3dref \\
        --i particles.star --ctf --K 3 --sym C1 --flatten_solvent --zero_mask \\
        --dont_combine_weights_via_disc --pool 30 --pad 1 --particle_diameter 200 \\
        --oversampling 1 --healpix_order 1 --offset_range 6 --offset_step 2 --auto_sampling \\
        --tau2_fudge 4 --j 12

and then ``relion_align_symmetry --select_largest_class`` into ``initial_model.mrc``; the same
options work here (the disc and pool options are accepted and have no effect), and
``--initial_model_sym`` names the group to align and apply afterwards (RELION's "Run in C1 and
apply symmetry later").

RELION's Refine3D job (proc scheme) runs::

    relion_refine_mpi --o Refine3D/job015/run --auto_refine --split_random_halves \\
        --i particles.star --ref initial_model.mrc --trust_ref_size --ini_high 40 --pad 2 --ctf \\
        --particle_diameter 200 --flatten_solvent --zero_mask --oversampling 1 --healpix_order 2 \\
        --auto_local_healpix_order 4 --offset_range 5 --offset_step 2 --sym C1 \\
        --low_resol_join_halves 40 --norm --scale --j 8

and the same command works here (``--iter`` caps the iterations: RELION's ``--auto_iter_max``).
"""

from __future__ import annotations

from pathlib import Path

import typer

from tamis import distributed
from tamis.cli._common import (
    console,
    fix_sigma_offset_option,
    offset_option,
    offset_prior_option,
    user_errors,
)


@user_errors
def refine(
    ctx: typer.Context,
    i: Path = typer.Option(None, "--i", help="Particles STAR file (or cryoSPARC .cs)."),
    o: str = typer.Option("", "--o", help="Output root, e.g. InitialModel/job012/run."),
    denovo_3dref: bool = typer.Option(
        False, "--denovo_3dref", help="Make the 3D references from the particles (no --ref)."
    ),
    grad: bool = typer.Option(False, "--grad", help="VDAM gradient algorithm (RELION-4)."),
    K: int = typer.Option(1, "--K", help="Number of classes (InitialModel job: 3)."),
    iter: int = typer.Option(
        None, "--iter", help="VDAM mini-batches (200), or auto-refine's iteration cap (999)."
    ),
    sym: str = typer.Option("C1", "--sym", help="Point group of the refinement."),
    initial_model_sym: str = typer.Option(
        "C1", "--initial_model_sym", help="Group to find, align and apply in initial_model.mrc."
    ),
    healpix_order: int = typer.Option(
        None,
        "--healpix_order",
        help="Coarse angular order (InitialModel 1: 15 deg fine; Refine3D 2).",
    ),
    oversampling: int = typer.Option(1, "--oversampling", help="Adaptive oversampling order."),
    offset_range: float = typer.Option(
        None, "--offset_range", help="Offset search range (px; InitialModel 6, Refine3D 5)."
    ),
    offset_step: float = typer.Option(2.0, "--offset_step", help="Offset search step (px)."),
    tau2_fudge: float = typer.Option(
        None, "--tau2_fudge", help="Regularisation parameter T (InitialModel 4, Refine3D 1)."
    ),
    particle_diameter: float = typer.Option(
        -1.0, "--particle_diameter", help="Mask diameter in A (default (box - 5) x pixel)."
    ),
    ctf: bool = typer.Option(False, "--ctf", help="Do CTF correction."),
    ctf_intact_first_peak: bool = typer.Option(False, "--ctf_intact_first_peak"),
    flatten_solvent: bool = typer.Option(
        False, "--flatten_solvent", help="Spherical solvent mask."
    ),
    zero_mask: bool = typer.Option(False, "--zero_mask", help="Mask particles with zeros."),
    pad: int = typer.Option(
        None, "--pad", help="Padding of the Fourier grids (InitialModel 1, Refine3D 2)."
    ),
    grad_ini_frac: float = typer.Option(0.3, "--grad_ini_frac", help="VDAM: initial phase."),
    grad_fin_frac: float = typer.Option(0.2, "--grad_fin_frac", help="VDAM: final phase."),
    grad_write_iter: int = typer.Option(10, "--grad_write_iter", help="VDAM: write every N."),
    auto_sampling: bool = typer.Option(
        False,
        "--auto_sampling",
        help="Finer angular and translational sampling as the accuracy allows (the InitialModel job's).",
    ),
    auto_refine: bool = typer.Option(
        False, "--auto_refine", help="Gold-standard 3D auto-refine (the Refine3D job)."
    ),
    split_random_halves: bool = typer.Option(
        False, "--split_random_halves", help="Refine two random halves independently."
    ),
    ref: Path = typer.Option(None, "--ref", help="Auto-refine: the starting map (MRC)."),
    ref_angpix: float = typer.Option(-1.0, "--ref_angpix", help="Pixel size of --ref (A)."),
    trust_ref_size: bool = typer.Option(
        True,
        "--trust_ref_size/--no_trust_ref_size",
        help="Rescale a reference of another box or pixel size (else an error).",
    ),  # fmt: skip
    ini_high: float = typer.Option(-1.0, "--ini_high", help="Low-pass the reference to (A)."),
    firstiter_cc: bool = typer.Option(
        False,
        "--firstiter_cc",
        help="Iteration 1 by cross-correlation (a reference not on the grey scale of the data).",
    ),
    auto_local_healpix_order: int = typer.Option(
        4, "--auto_local_healpix_order", help="Local searches from this HEALPix order on."
    ),
    low_resol_join_halves: float = typer.Option(
        40.0, "--low_resol_join_halves", help="Average the halves below this resolution (A)."
    ),
    solvent_mask: Path = typer.Option(None, "--solvent_mask", help="Mask applied each iteration."),
    solvent_correct_fsc: bool = typer.Option(
        False, "--solvent_correct_fsc", help="Mask-corrected FSC (needs --solvent_mask)."
    ),
    auto_ignore_angles: bool = typer.Option(False, "--auto_ignore_angles"),
    auto_resol_angles: bool = typer.Option(False, "--auto_resol_angles"),
    norm: bool = typer.Option(False, "--norm", help="Norm correction (Refine3D: on)."),
    scale: bool = typer.Option(False, "--scale", help="Intensity-scale correction."),
    cont: Path = typer.Option(
        None, "--continue", help="Continue from run_itNNN_optimiser.star (--iter is the total)."
    ),
    random_seed: int = typer.Option(-1, "--random_seed", help="Seed (default: the time)."),
    j: int = typer.Option(1, "--j", help="Threads."),
    pool: int = typer.Option(1, "--pool", help="Accepted (RELION's particles per thread pool)."),
    dont_combine_weights_via_disc: bool = typer.Option(
        False, "--dont_combine_weights_via_disc", help="Accepted (no effect)."
    ),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    max_memory: float = typer.Option(None, "--max_memory", help="GB the batches may use."),
    offset_prior: str = offset_prior_option("centred on a zero offset"),
    offset: float = offset_option(),
    fix_sigma_offset: bool = fix_sigma_offset_option(),
    pipeline_control: Path = typer.Option(
        None, "--pipeline_control", help="Job directory for RELION_JOB_EXIT_* markers."
    ),
) -> None:
    """3D refinement (relion_refine): the de novo initial model (--denovo_3dref --grad) or
    gold-standard auto-refine (--auto_refine --split_random_halves --ref map.mrc)."""
    from tamis.errors import TamisError

    if cont is None and not o:
        raise TamisError("--o is required")
    given = {
        name: value
        for name, value in (
            ("iter", iter),
            ("healpix_order", healpix_order),
            ("offset_range", offset_range),
            ("tau2_fudge", tau2_fudge),
            ("pad", pad),
        )
        if value is not None
    }
    common = dict(
        K=K,
        sym=sym,
        oversampling=oversampling,
        offset_step=offset_step,
        particle_diameter=particle_diameter if particle_diameter > 0 else None,
        ctf=ctf,
        ctf_intact_first_peak=ctf_intact_first_peak,
        flatten_solvent=flatten_solvent,
        zero_mask=zero_mask,
        random_seed=random_seed if random_seed >= 0 else None,
        j=j,
        pool=pool,
        device=device,
        max_memory=max_memory,
        offset_prior=offset_prior,
        offset=offset,
        fix_sigma_offset=fix_sigma_offset,
        pipeline_control=pipeline_control,
        **given,
    )
    names = {
        "tau2_fudge", "particle_diameter", "zero_mask", "flatten_solvent", "grad_write_iter",
        "iter", "norm", "scale", "solvent_mask", "solvent_correct_fsc", "pad",
        "auto_local_healpix_order", "offset_prior", "fix_sigma_offset",
    }  # fmt: skip
    changed = {
        n for n in names if getattr(ctx.get_parameter_source(n), "name", "") == "COMMANDLINE"
    }
    log = lambda s: console.print(s, highlight=False)  # noqa: E731
    if auto_refine or (cont is not None and _is_auto_refine(cont)):
        from tamis.refine.auto_refine import AutoRefineOptions, run_auto_refine

        if not split_random_halves and cont is None:
            raise TamisError("--auto_refine needs --split_random_halves (gold-standard halves)")
        if denovo_3dref or grad:
            raise TamisError(
                "--auto_refine refines a given --ref; --denovo_3dref/--grad are the initial model's"
            )
        options = AutoRefineOptions(
            ref=str(ref) if ref is not None else "",
            ref_angpix=ref_angpix,
            trust_ref_size=trust_ref_size,
            ini_high=ini_high,
            firstiter_cc=firstiter_cc,
            auto_local_healpix_order=auto_local_healpix_order,
            low_resol_join_halves=low_resol_join_halves,
            solvent_mask=str(solvent_mask) if solvent_mask is not None else "",
            solvent_correct_fsc=solvent_correct_fsc,
            auto_ignore_angles=auto_ignore_angles,
            auto_resol_angles=auto_resol_angles,
            norm=norm,
            scale=scale,
            **common,
        )
        result = run_auto_refine(
            i, o, options, continue_from=cont, changed=changed, log=log, show_progress=True
        )
        if distributed.is_main():
            console.print(
                f"done: {result.map} and the half maps {result.half_maps[0].name}, "
                f"{result.half_maps[1].name} (iteration {result.iteration}, resolution "
                f"{result.resolution:.2f} A{'' if result.converged else ', not converged'})",
                highlight=False,
            )
        return
    from tamis.refine.initial_model import InitialModelOptions, run_initial_model

    if not (denovo_3dref and grad) and cont is None:
        raise TamisError(
            "give --denovo_3dref --grad (initial model) or --auto_refine --split_random_halves"
        )
    options = InitialModelOptions(
        auto_sampling=auto_sampling,
        grad_ini_frac=grad_ini_frac,
        grad_fin_frac=grad_fin_frac,
        grad_write_iter=grad_write_iter,
        **common,
    )
    result = run_initial_model(
        i,
        o,
        options,
        initial_model_sym=initial_model_sym,
        continue_from=cont,
        changed=changed,
        log=log,
        show_progress=True,
    )
    if distributed.is_main():
        console.print(
            f"done: {result.initial_model} (class {result.chosen_class} of iteration "
            f"{result.run.iteration}, resolution {result.run.resolution:.1f} A)",
            highlight=False,
        )


def _is_auto_refine(optimiser: Path) -> bool:
    """Whether a continued optimiser file is an auto-refine's."""
    from tamis.io.star import read_star

    opt = read_star(optimiser).get("optimiser_general") or {}
    return bool(int(opt.get("rlnDoAutoRefine", 0)))
