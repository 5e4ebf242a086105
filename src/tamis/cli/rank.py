"""``tamis rank``: automatic 2D class selection (``relion_class_ranker``)."""

from __future__ import annotations

from pathlib import Path

import typer

from tamis.cli._common import console, user_errors

app = typer.Typer(no_args_is_help=True, help=__doc__, invoke_without_command=True)


@app.callback()
@user_errors
def select(
    ctx: typer.Context,
    opt: Path = typer.Option(None, "--opt", help="run_itNNN_optimiser.star of a 2D job."),
    o: Path = typer.Option(None, "--o", help="Output job directory, e.g. Select/job012/."),
    auto_select: bool = typer.Option(True, "--auto_select/--no_auto_select", help="Select."),
    min_score: float = typer.Option(
        None, "--min_score", help="Lowest score selected (default: the model's recommended)."
    ),
    max_score: float = typer.Option(999.0, "--max_score", help="Highest score selected."),
    min_parts: int = typer.Option(-1, "--select_min_nr_particles", help="Top up to N particles."),
    min_classes: int = typer.Option(-1, "--select_min_nr_classes", help="Top up to N classes."),
    quantile: float = typer.Option(
        None, "--quantile", help="Keep the best fraction of classes instead of a score threshold."
    ),
    model: Path = typer.Option(None, "--model", help="Ranker weights (safetensors state dict)."),
    fn_root: str = typer.Option("rank", "--fn_root", help="Prefix of rank_*.star."),
    particle_screen: bool = typer.Option(
        True,
        "--particle_screen/--no_particle_screen",
        help="Check every selected particle against its class average (tamis); drop bad fits.",
    ),
    screen_max_misfit: float = typer.Option(
        5.0, "--screen_max_misfit", help="Always drop misfits this many spreads above the core."
    ),
    screen_min_misfit: float = typer.Option(
        2.5,
        "--screen_min_misfit",
        help="Never drop misfits (or amplitudes) within this many spreads of the core.",
    ),
    screen_adaptive: bool = typer.Option(
        True,
        "--screen_adaptive/--screen_fixed",
        help="Place the screen's cuts per job where junk outnumbers particles (default), or "
        "use the fixed --screen_max_misfit / --screen_min_amplitude cuts.",
    ),
    screen_min_amplitude: float = typer.Option(
        0.6, "--screen_min_amplitude", help="Drop amplitudes below this x the class median."
    ),
    screen_min_plain_amplitude: float = typer.Option(
        0.35,
        "--screen_min_plain_amplitude",
        help="Also drop particles whose plain (unwhitened) low-resolution amplitude is below "
        "this x the class median (0: off): empty boxes that whitening lets pass (denoised or "
        "8-bit images).",
    ),
    screen_local_neighbours: int = typer.Option(
        10,
        "--screen_local_neighbours",
        help="Judge each particle's misfit against this many nearest boxes on its micrograph "
        "(carbon film, thick ice around it); 0: against pure noise only.",
    ),
    screen_class_shift: float = typer.Option(
        3.0,
        "--screen_class_shift",
        help="A chosen class whose own particles misfit more than the selection's core (a mixed "
        "or blurred class) moves its misfit cut up by as much, at most this many spreads; 0: "
        "one cut for all classes (with --screen_min_misfit 3: the defaults before 2026-12-07).",
    ),
    device: str = typer.Option(
        "auto", "--device", help="Particle screen: auto (CUDA when present), cpu, cuda:N."
    ),
) -> None:
    """Score the classes of a 2D job with RELION's ranker network and features, select, and
    write RELION's Select-job files (``tamis rank --opt ... --o ...``); ``tamis rank train``
    trains a ranker."""
    if ctx.invoked_subcommand is not None:
        return
    from tamis.errors import TamisError
    from tamis.rank.screen import ScreenOptions
    from tamis.rank.select import RankOptions, rank_classes

    if opt is None or o is None:
        raise TamisError("--opt and --o are required")

    options = RankOptions(
        min_score=min_score if auto_select else 1e9,
        max_score=max_score,
        select_min_nr_particles=min_parts if auto_select else -1,
        select_min_nr_classes=min_classes if auto_select else -1,
        quantile=quantile if auto_select else None,
        model=str(model) if model else None,
        fn_root=fn_root,
        screen=ScreenOptions(
            max_misfit=screen_max_misfit,
            min_amplitude=screen_min_amplitude,
            min_plain_amplitude=screen_min_plain_amplitude,
            adaptive=screen_adaptive,
            min_misfit=screen_min_misfit,
            local_neighbours=screen_local_neighbours,
            class_shift=screen_class_shift,
            device=device,
        )
        if particle_screen
        else None,
    )
    rank_classes(opt, o, options, log=lambda s: console.print(s, highlight=False))


@app.command("train")
@user_errors
def train(
    opt: list[Path] = typer.Option(..., "--opt", help="Optimiser files of labelled 2D jobs."),
    select: list[Path] = typer.Option(
        None, "--select", help="backup_selection.star per job (RELION colours or 0/1)."
    ),
    truth: list[Path] = typer.Option(
        None, "--truth", help="ground_truth.csv per job (simulated data) instead of --select."
    ),
    o: Path = typer.Option(..., "--o", help="Output model path (…/model: .safetensors, .json)."),
    epochs: int = typer.Option(60, "--epochs", help="Training epochs."),
    init: Path = typer.Option(None, "--init", help="Fine-tune from these weights."),
    lr: float = typer.Option(5e-5, "--lr", help="Adam learning rate."),
) -> None:
    """Train (or fine-tune) the ranker on 2D jobs labelled by a person or by ground truth."""
    from tamis.errors import TamisError
    from tamis.rank.select import image_scale_of, load_ranker
    from tamis.rank.train import (
        Examples,
        RankTrainOptions,
        job_examples,
        selection_tiers,
        tiers_from_truth,
        train_ranker,
    )

    labels = select or truth
    if not labels or len(labels) != len(opt):
        raise TamisError("give one --select (or --truth) per --opt")
    # fine-tuning keeps the intensity unit the initial weights were trained in
    scale = image_scale_of(load_ranker(init)[1]) if init else "job"
    parts = []
    for j, (op, lab) in enumerate(zip(opt, labels, strict=True)):
        tiers = selection_tiers(lab) if select else tiers_from_truth(op, lab)
        parts.append(job_examples(op, tiers, j, image_scale=scale))
    path = train_ranker(
        Examples.concat(parts),
        o,
        RankTrainOptions(epochs=epochs, init=str(init) if init else None, lr=lr, image_scale=scale),
        log=lambda s: console.print(s, highlight=False),
    )
    console.print(f"model: {path}", highlight=False)
