"""``tamis refine``: 3D refinement with ``relion_refine``'s options. For now the de novo initial
model (``--denovo_3dref --grad``, RELION-4's InitialModel job); gold-standard auto-refine
(``--auto_refine``) comes next.

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
"""

from __future__ import annotations

from pathlib import Path

import typer

from tamis.cli._common import console, user_errors


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
    iter: int = typer.Option(200, "--iter", help="Total number of VDAM mini-batches."),
    sym: str = typer.Option("C1", "--sym", help="Point group of the refinement."),
    initial_model_sym: str = typer.Option(
        "C1", "--initial_model_sym", help="Group to find, align and apply in initial_model.mrc."
    ),
    healpix_order: int = typer.Option(
        1, "--healpix_order", help="Coarse angular order (1: 30 deg)."
    ),
    oversampling: int = typer.Option(1, "--oversampling", help="Adaptive oversampling order."),
    offset_range: float = typer.Option(6.0, "--offset_range", help="Offset search range (px)."),
    offset_step: float = typer.Option(2.0, "--offset_step", help="Offset search step (px)."),
    tau2_fudge: float = typer.Option(4.0, "--tau2_fudge", help="Regularisation parameter T."),
    particle_diameter: float = typer.Option(
        -1.0, "--particle_diameter", help="Mask diameter in A (default (box - 5) x pixel)."
    ),
    ctf: bool = typer.Option(False, "--ctf", help="Do CTF correction."),
    ctf_intact_first_peak: bool = typer.Option(False, "--ctf_intact_first_peak"),
    flatten_solvent: bool = typer.Option(
        False, "--flatten_solvent", help="Spherical solvent mask."
    ),
    zero_mask: bool = typer.Option(False, "--zero_mask", help="Mask particles with zeros."),
    pad: int = typer.Option(1, "--pad", help="Padding of the Fourier grids (InitialModel: 1)."),
    grad_ini_frac: float = typer.Option(0.3, "--grad_ini_frac", help="VDAM: initial phase."),
    grad_fin_frac: float = typer.Option(0.2, "--grad_fin_frac", help="VDAM: final phase."),
    grad_write_iter: int = typer.Option(10, "--grad_write_iter", help="VDAM: write every N."),
    auto_sampling: bool = typer.Option(
        False,
        "--auto_sampling",
        help="Finer angular and translational sampling as the accuracy allows (the InitialModel job's).",
    ),
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
    pipeline_control: Path = typer.Option(
        None, "--pipeline_control", help="Job directory for RELION_JOB_EXIT_* markers."
    ),
) -> None:
    """3D refinement (relion_refine): the de novo initial model with --denovo_3dref --grad."""
    from tamis.errors import TamisError
    from tamis.refine.initial_model import InitialModelOptions, run_initial_model

    if not (denovo_3dref and grad) and cont is None:
        raise TamisError(
            "only the de novo initial model is available yet: give --denovo_3dref --grad"
        )
    if cont is None and not o:
        raise TamisError("--o is required")
    options = InitialModelOptions(
        K=K,
        iter=iter,
        sym=sym,
        healpix_order=healpix_order,
        auto_sampling=auto_sampling,
        oversampling=oversampling,
        offset_range=offset_range,
        offset_step=offset_step,
        tau2_fudge=tau2_fudge,
        particle_diameter=particle_diameter if particle_diameter > 0 else None,
        ctf=ctf,
        ctf_intact_first_peak=ctf_intact_first_peak,
        flatten_solvent=flatten_solvent,
        zero_mask=zero_mask,
        pad=pad,
        grad_ini_frac=grad_ini_frac,
        grad_fin_frac=grad_fin_frac,
        grad_write_iter=grad_write_iter,
        random_seed=random_seed if random_seed >= 0 else None,
        j=j,
        pool=pool,
        device=device,
        max_memory=max_memory,
        pipeline_control=pipeline_control,
    )
    names = {"tau2_fudge", "particle_diameter", "zero_mask", "flatten_solvent", "grad_write_iter"}
    changed = {
        n for n in names if getattr(ctx.get_parameter_source(n), "name", "") == "COMMANDLINE"
    }
    result = run_initial_model(
        i,
        o,
        options,
        initial_model_sym=initial_model_sym,
        continue_from=cont,
        changed=changed,
        log=lambda s: console.print(s, highlight=False),
        show_progress=True,
    )
    console.print(
        f"done: {result.initial_model} (class {result.chosen_class} of iteration "
        f"{result.run.iteration}, resolution {result.run.resolution:.1f} A)",
        highlight=False,
    )
