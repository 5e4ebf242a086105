"""``tamis class2d``: RELION's 2D classification (regularised-likelihood EM, or VDAM with --grad).

Options keep ``relion_refine``'s names. How RELION's GUI ("2D classification" job) maps onto them:

- In-plane angular sampling X deg in the GUI -> ``--psi_step 2X --oversampling 1`` (GUI 6 -> 12).
- Offset search step X px in the GUI -> ``--offset_step 2X`` (GUI 1 -> 2); range is passed as is.
- Limit resolution E-step to R A -> ``--strict_highres_exp R``.
- Mask individual particles with zeros -> ``--zero_mask``; Ignore CTFs until first peak ->
  ``--ctf_intact_first_peak``; Do CTF-correction -> ``--ctf``; Center class averages ->
  ``--center_classes``; Regularisation parameter T -> ``--tau2_fudge``; Mask diameter ->
  ``--particle_diameter``. The GUI also always passes ``--flatten_solvent --norm --scale``.

The GUI's default algorithm is VDAM: it adds ``--grad --class_inactivity_threshold 0.1
--grad_write_iter 10 --iter 200`` to the options below (and leaves out ``--iter 25``).

Example (the GUI's EM command with its defaults)::

    tamis class2d --i Extract/job005/particles.star --o Class2D/job006/run --K 50 --iter 25 \\
        --ctf --tau2_fudge 2 --particle_diameter 200 --flatten_solvent --zero_mask \\
        --center_classes --oversampling 1 --psi_step 12 --offset_range 5 --offset_step 2 \\
        --norm --scale --j 4
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
def class2d(
    ctx: typer.Context,
    i: Path = typer.Option(None, "--i", help="Particles STAR file (or cryoSPARC .cs)."),
    o: str = typer.Option("", "--o", help="Output root, e.g. Class2D/job010/run."),
    K: int = typer.Option(1, "--K", help="Number of classes."),
    iter: int = typer.Option(
        -1, "--iter", help="Total number of iterations (default 25 for EM, 200 for VDAM)."
    ),
    grad: bool = typer.Option(False, "--grad", help="VDAM gradient algorithm (RELION-4)."),
    class_inactivity_threshold: float = typer.Option(
        0.0,
        "--class_inactivity_threshold",
        help="VDAM: replace classes below this fraction of 1/K (GUI 0.1; 0 = never).",
    ),
    grad_write_iter: int = typer.Option(10, "--grad_write_iter", help="VDAM: write every N."),
    grad_ini_frac: float = typer.Option(0.3, "--grad_ini_frac", help="VDAM: initial phase."),
    grad_fin_frac: float = typer.Option(0.2, "--grad_fin_frac", help="VDAM: final phase."),
    grad_ini_subset: int = typer.Option(
        -1, "--grad_ini_subset", help="VDAM: initial mini-batch (-1: max(min(0.5% N, 10k), 200))."
    ),
    grad_fin_subset: int = typer.Option(
        -1, "--grad_fin_subset", help="VDAM: final mini-batch (-1: max(min(5% N, 100k), 1000))."
    ),
    grad_stepsize: float = typer.Option(-1.0, "--grad_stepsize", help="VDAM: step (-1: 0.3)."),
    grad_stepsize_scheme: str = typer.Option(
        "", "--grad_stepsize_scheme", help="VDAM: plain or <inflate>-step (default 3-step)."
    ),
    tau2_fudge_scheme: str = typer.Option(
        "", "--tau2_fudge_scheme", help="VDAM: plain or <deflate>-step (default T-step)."
    ),
    mu: float = typer.Option(0.9, "--mu", help="VDAM: momentum of the other parameters."),
    maxsig: int = typer.Option(
        -1, "--maxsig", help="Most significant coarse samples per particle (VDAM default 5K)."
    ),
    cont: Path = typer.Option(
        None, "--continue", help="Continue from run_itNNN_optimiser.star (--iter is the total)."
    ),
    ctf: bool = typer.Option(False, "--ctf", help="Do CTF correction."),
    ctf_intact_first_peak: bool = typer.Option(False, "--ctf_intact_first_peak"),
    ctf_phase_flipped: bool = typer.Option(False, "--ctf_phase_flipped"),
    only_flip_phases: bool = typer.Option(False, "--only_flip_phases"),
    tau2_fudge: float = typer.Option(
        -1.0, "--tau2_fudge", help="Regularisation parameter T (default 1 for EM, 4 for VDAM)."
    ),
    particle_diameter: float = typer.Option(
        -1.0, "--particle_diameter", help="Mask diameter in A (default (box - 5) x pixel)."
    ),
    zero_mask: bool = typer.Option(False, "--zero_mask", help="Mask particles with the mean."),
    strict_highres_exp: float = typer.Option(
        -1.0, "--strict_highres_exp", help="E-step limit (A)."
    ),
    flatten_solvent: bool = typer.Option(False, "--flatten_solvent"),
    center_classes: bool = typer.Option(False, "--center_classes"),
    norm: bool = typer.Option(False, "--norm", help="Correct per-particle normalisation."),
    scale: bool = typer.Option(False, "--scale", help="Correct per-group intensity scale."),
    random_seed: int = typer.Option(-1, "--random_seed", help="Seed (default: time)."),
    psi_step: float = typer.Option(10.0, "--psi_step", help="Coarse in-plane step (degrees)."),
    offset_range: float = typer.Option(6.0, "--offset_range", help="Offset search range (px)."),
    offset_step: float = typer.Option(2.0, "--offset_step", help="Coarse offset step (px)."),
    oversampling: int = typer.Option(1, "--oversampling", help="Adaptive oversampling order."),
    pool: int = typer.Option(1, "--pool", help="Particles per batch per thread (RELION's pool)."),
    preread_images: bool = typer.Option(False, "--preread_images", help="Read all images first."),
    j: int = typer.Option(1, "--j", help="CPU threads."),
    device: str = typer.Option("auto", "--device", help="auto (CUDA when present), cpu, cuda:N."),
    gpu: str = typer.Option(None, "--gpu", help="RELION-style: use the GPU (ids: first is used)."),
    batch_size: int = typer.Option(0, "--batch_size", help="Particles per batch (0: from memory)."),
    max_memory: float = typer.Option(
        None,
        "--max_memory",
        help="Working memory for the batches in GB (default: 1 on the CPU, where the process "
        "then peaks near 1 GB for 64-px particles; half the free memory of a GPU). Raise it on a "
        "machine with memory to spare, lower it to leave room for other jobs.",
    ),
    mstep_bf16: bool = typer.Option(
        False,
        "--mstep_bf16",
        help="tamis: the M-step's sums over translations as bfloat16 GEMMs (~4x the float32 "
        "rate on CPUs with AVX512-BF16 and on GPUs; each batch's partial sums keep 8 "
        "significant bits). Off by default.",
    ),
    offset_prior: str = offset_prior_option("RELION 5's class centres"),
    offset: float = offset_option(),
    fix_sigma_offset: bool = fix_sigma_offset_option(),
    pipeline_control: Path = typer.Option(None, "--pipeline_control", help="Job directory."),
) -> None:
    """RELION's 2D classification (EM, or VDAM with --grad); writes run_itNNN_{classes.mrcs,model,
    data,optimiser,sampling}.star (VDAM: every --grad_write_iter iterations, plus moments)."""
    from tamis.class2d import Class2DOptions, run_class2d

    if gpu is not None:
        ids = [g for g in gpu.replace(",", ":").split(":") if g.strip()]
        device = f"cuda:{ids[0]}" if ids else "cuda"
    options = Class2DOptions(
        K=K,
        iter=iter if iter > 0 else (200 if grad else 25),
        grad=grad,
        class_inactivity_threshold=class_inactivity_threshold,
        grad_write_iter=grad_write_iter,
        grad_ini_frac=grad_ini_frac,
        grad_fin_frac=grad_fin_frac,
        grad_ini_subset=grad_ini_subset,
        grad_fin_subset=grad_fin_subset,
        grad_stepsize=grad_stepsize,
        grad_stepsize_scheme=grad_stepsize_scheme,
        tau2_fudge_scheme=tau2_fudge_scheme,
        mu=mu,
        max_significants=maxsig,
        tau2_fudge=tau2_fudge,
        particle_diameter=particle_diameter if particle_diameter > 0 else None,
        zero_mask=zero_mask,
        ctf=ctf,
        ctf_intact_first_peak=ctf_intact_first_peak,
        ctf_phase_flipped=ctf_phase_flipped,
        only_flip_phases=only_flip_phases,
        strict_highres_exp=strict_highres_exp,
        flatten_solvent=flatten_solvent,
        center_classes=center_classes,
        norm=norm,
        scale=scale,
        psi_step=psi_step,
        offset_range=offset_range,
        offset_step=offset_step,
        oversampling=oversampling,
        random_seed=random_seed if random_seed >= 0 else None,
        pool=pool,
        preread_images=preread_images,
        j=j,
        device=device,
        batch_size=batch_size or None,
        max_memory=max_memory,
        mstep_bf16=mstep_bf16,
        offset_prior=offset_prior,
        offset=offset,
        fix_sigma_offset=fix_sigma_offset,
        pipeline_control=pipeline_control,
    )
    if cont is None and not o:
        from tamis.errors import TamisError

        raise TamisError("--o is required")
    # On --continue, options typed on the command line override those in the optimiser file.
    names = {
        "tau2_fudge",
        "particle_diameter",
        "zero_mask",
        "strict_highres_exp",
        "flatten_solvent",
        "norm",
        "scale",
        "psi_step",
        "offset_range",
        "offset_step",
        "oversampling",
        "class_inactivity_threshold",
        "grad_write_iter",
        "mu",
        "maxsig",
        "offset_prior",
        "fix_sigma_offset",
    }
    changed = {
        ("max_significants" if n == "maxsig" else n)
        for n in names
        if getattr(ctx.get_parameter_source(n), "name", "") == "COMMANDLINE"
    }
    result = run_class2d(
        i,
        o,
        options,
        continue_from=cont,
        changed=changed,
        log=lambda s: console.print(s, highlight=False),
        show_progress=True,
    )
    if distributed.is_main():
        console.print(
            f"done: {result.optimiser} (iteration {result.iteration}, resolution {result.resolution:.1f} A)",
            highlight=False,
        )
