"""``tamis pick``: RELION's LoG picker, template matching and a trainable deep picker, writing
RELION's per-micrograph coordinate files, ``autopick.star`` and PNG overlays."""

from __future__ import annotations

from pathlib import Path

import typer

from tamis.cli._common import console, user_errors

app = typer.Typer(no_args_is_help=True, help=__doc__)

_I = typer.Option(..., "--i", help="micrographs.star, or micrograph files (MRC/TIFF/PNG/JPEG).")
_ODIR = typer.Option(..., "--odir", help="Output job directory, e.g. AutoPick/job004.")
_ANGPIX = typer.Option(None, "--angpix", help="Pixel size (A) of TIFF/PNG/JPEG micrographs.")
_EXPECTED = typer.Option(None, "--expected", help="Keep the best N picks per micrograph.")
_OVERLAYS = typer.Option(3, "--overlays", help="PNG overlays of the first N micrographs.")
_EDGE = typer.Option(0.0, "--edge", help="Drop picks closer than this (A) to a side.")


def _run(ms, odir: Path, pick, job) -> None:
    """Run a picker over the micrographs into ``odir``, reporting on the console."""
    from tamis.pick.jobs import run_picker

    run_picker(
        ms, odir, pick, job, log=lambda s: console.print(s, highlight=False), show_progress=True
    )


@app.command("log")
@user_errors
def log(
    i: list[Path] = _I,
    odir: Path = _ODIR,
    angpix: float = _ANGPIX,
    diam_min: float = typer.Option(..., "--LoG_diam_min", help="Smallest particle diameter (A)."),
    diam_max: float = typer.Option(..., "--LoG_diam_max", help="Largest particle diameter (A)."),
    adjust: float = typer.Option(
        0.0, "--LoG_adjust_threshold", help="Threshold in sd above the mean: + fewer, - more."
    ),
    upper: float = typer.Option(99999.0, "--LoG_upper_threshold", help="Upper threshold (sd)."),
    invert: bool = typer.Option(False, "--Log_invert", help="Particles are white."),
    neighbour: float = typer.Option(100.0, "--LoG_neighbour", help="Exclusion, % of diameters."),
    lowpass: float = typer.Option(20.0, "--lowpass", help="Working resolution (A)."),
    expected: int = _EXPECTED,
    overlays: int = _OVERLAYS,
    edge: float = _EDGE,
) -> None:
    """Laplacian-of-Gaussian blob picking with RELION's options."""
    from tamis.pick.jobs import PickJob, micrograph_inputs
    from tamis.pick.log import LogOptions, pick_log

    opts = LogOptions(diam_min, diam_max, adjust, upper, invert, neighbour / 100.0, lowpass)
    opts.check()
    ms = micrograph_inputs(i, angpix)
    _run(
        ms,
        odir,
        lambda mic, _k: pick_log(mic, opts),
        PickJob(diameter=diam_max, expected=expected, overlays=overlays, edge=edge),
    )


@app.command("template")
@user_errors
def template(
    i: list[Path] = _I,
    odir: Path = _ODIR,
    ref: Path = typer.Option(..., "--ref", help="Templates: an MRC stack (class averages...)."),
    angpix_ref: float = typer.Option(None, "--angpix_ref", help="Template pixel size (A)."),
    diameter: float = typer.Option(..., "--particle_diameter", help="Mask diameter (A)."),
    angpix: float = _ANGPIX,
    threshold: float = typer.Option(0.25, "--threshold", help="Minimum normalised correlation."),
    min_distance: float = typer.Option(
        None, "--min_distance", help="Minimum distance between picks (A); default the diameter."
    ),
    psi_step: float = typer.Option(10.0, "--ang", help="In-plane angular step (degrees)."),
    lowpass: float = typer.Option(20.0, "--lowpass", help="Working resolution (A)."),
    invert: bool = typer.Option(False, "--invert", help="Particles are white in the micrographs."),
    no_ctf: bool = typer.Option(False, "--no_ctf", help="Do not apply the micrographs' CTF."),
    expected: int = _EXPECTED,
    overlays: int = _OVERLAYS,
    edge: float = _EDGE,
) -> None:
    """Template matching: normalised cross-correlation with rotated, CTF-filtered templates."""
    import torch

    from tamis.errors import InputFileError
    from tamis.io.mrc import read_mrc
    from tamis.pick.jobs import PickJob, micrograph_inputs
    from tamis.pick.template import TemplateOptions, pick_template

    if not ref.is_file():
        raise InputFileError(ref, "templates not found")
    stack, apix = read_mrc(ref)
    if stack.ndim == 2:
        stack = stack[None]
    tp = angpix_ref or apix
    if not tp or tp <= 0:
        raise InputFileError(ref, "has no pixel size: give --angpix_ref")
    opts = TemplateOptions(
        diameter=diameter,
        min_distance=min_distance,
        threshold=threshold,
        psi_step=psi_step,
        lowpass=lowpass,
        invert=invert,
        use_ctf=not no_ctf,
    )
    ms = micrograph_inputs(i, angpix)
    templates = torch.from_numpy(stack.astype("float32"))
    _run(
        ms,
        odir,
        lambda mic, k: pick_template(mic, templates, tp, opts, ctf=ms.ctf(k), max_picks=expected),
        PickJob(diameter=diameter, expected=expected, overlays=overlays, edge=edge),
    )


def _labels_for(ms, coords: Path | None, particles: Path | None):
    """Per micrograph of ``ms``: labelled centres (n, 2) from an autopick.star / coordinate files
    or a particles.star (selected particles)."""
    import numpy as np

    from tamis.errors import TamisError
    from tamis.extract import coordinates_by_micrograph

    if (coords is None) == (particles is None):
        raise TamisError("give one of --coords (autopick.star) or --particles (particles.star)")
    table = coordinates_by_micrograph(coords or particles, ms)
    out = []
    for name in ms.names:
        t = table.get(name)
        xy = (
            np.zeros((0, 2))
            if t is None
            else t[["rlnCoordinateX", "rlnCoordinateY"]].to_numpy(float)
        )
        out.append(xy)
    return out


@app.command("train")
@user_errors
def train(
    i: list[Path] = _I,
    odir: Path = _ODIR,
    diameter: float = typer.Option(..., "--particle_diameter", help="Particle diameter (A)."),
    coords: Path = typer.Option(
        None,
        "--coords",
        help="Labelled picks: autopick.star, or a directory of per-micrograph STAR/.box/CSV files.",
    ),
    particles: Path = typer.Option(None, "--particles", help="particles.star of kept particles."),
    angpix: float = _ANGPIX,
    lowpass: float = typer.Option(None, "--lowpass", help="Extra low-pass (A) before the network."),
    lr_initial: float = typer.Option(2e-3, "--lr_initial", help="Initial learning rate."),
    lr_final: float = typer.Option(2e-4, "--lr_final", help="Final learning rate."),
    batch: int = typer.Option(16, "--minibatch", help="Patches per minibatch."),
    epochs: int = typer.Option(20, "--epochs", help="Training epochs."),
    steps: int = typer.Option(40, "--steps_per_epoch", help="Minibatches per epoch."),
    pos_weight: float = typer.Option(
        None, "--class_weight", help="Weight of particle pixels (default sqrt(neg/pos))."
    ),
    pu: bool = typer.Option(False, "--pu", help="Positive-unlabelled loss (incomplete labels)."),
    expected: float = typer.Option(
        None, "--expected_particles", help="Particles per micrograph (PU prior)."
    ),
    no_norm: bool = typer.Option(False, "--no_normalize", help="Do not normalise micrographs."),
    threads: int = typer.Option(0, "--j", help="CPU threads (0: torch default)."),
    init: Path = typer.Option(None, "--init", help="Fine-tune from this model (safetensors)."),
    seed: int = typer.Option(0, "--random_seed", help="Seed."),
    threshold: float = typer.Option(
        None,
        "--threshold",
        help="The model's recommended score threshold (default: of 24 from 0.05 to 0.99, the "
        "one whose validation picks have the best F1 against their labels).",
    ),
) -> None:
    """Train the deep picker on labelled micrographs; writes model.safetensors and history."""
    from tamis.pick.deep.train import TrainOptions, train_picker
    from tamis.pick.jobs import micrograph_inputs
    from tamis.pick.micrograph import read_micrograph

    ms = micrograph_inputs(i, angpix)
    labels = _labels_for(ms, coords, particles)
    keep = [k for k in range(len(ms)) if len(labels[k])]
    mics = [read_micrograph(ms.path(k), ms.pixel_size(k)) for k in keep]
    opts = TrainOptions(
        diameter=diameter,
        lowpass=lowpass,
        lr_initial=lr_initial,
        lr_final=lr_final,
        batch_size=batch,
        epochs=epochs,
        steps_per_epoch=steps,
        positive_weight=pos_weight,
        loss="pu" if pu else "bce",
        expected_particles=expected,
        normalize=not no_norm,
        threads=threads,
        seed=seed,
        threshold=threshold,
        init=str(init) if init else None,
    )
    result = train_picker(
        mics, [labels[k] for k in keep], odir, opts, log=lambda s: console.print(s, highlight=False)
    )
    console.print(
        f"model: {result.model}; history: {odir}/history.csv, history.png", highlight=False
    )


@app.command("predict")
@user_errors
def predict(
    i: list[Path] = _I,
    odir: Path = _ODIR,
    diameter: float = typer.Option(..., "--particle_diameter", help="Particle diameter (A)."),
    model: Path = typer.Option(None, "--model", help="Trained model (default: the shipped one)."),
    angpix: float = _ANGPIX,
    threshold: float = typer.Option(
        None,
        "--threshold",
        help="Score threshold (0-1); default: the model's recommended one (shipped model 0.98).",
    ),
    expected: int = _EXPECTED,
    overlays: int = _OVERLAYS,
    edge: float = _EDGE,
) -> None:
    """Pick with a trained deep picker (or the shipped general model)."""
    from tamis.pick.deep.predict import DeepPicker, load_model
    from tamis.pick.jobs import PickJob, micrograph_inputs

    net, meta = load_model(model)
    picker = DeepPicker.from_model(net, meta, diameter, threshold)
    ms = micrograph_inputs(i, angpix)
    _run(
        ms,
        odir,
        lambda mic, _k: picker.pick(mic),
        PickJob(diameter=diameter, expected=expected, overlays=overlays, edge=edge),
    )
