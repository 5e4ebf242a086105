"""Ranking the classes of a 2D job and selecting particles (``relion_class_ranker
--auto_select``), with RELION's output files plus a probability per class and a PNG gallery.

Selection as RELION: every scored class with ``min_score <= score <= max_score``; then, while the
estimated particle count (class fraction x N) is below ``select_min_nr_particles`` or fewer than
``select_min_nr_classes`` classes are selected, the best remaining classes are added. ``quantile``
(tamis) instead keeps the top fraction of the scored classes, for data on another score scale.
Classes with 10 or fewer estimated particles are not scored (score -999), as in RELION.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from tamis.class2d.em import choose_device
from tamis.errors import InputFileError, TamisError
from tamis.io.mrc import read_mrc
from tamis.io.particles import ParticleSet
from tamis.io.records import read_model_record
from tamis.io.star import DataStar, atomic_path, read_data_star, read_star, write_star
from tamis.pictures import to_uint8
from tamis.rank.features import (
    IMAGE_SCALES,
    class_features,
    cnn_image,
    feature_vector,
    job_intensity_scale,
    network_features,
)
from tamis.rank.network import ClassRankerNet, RankerEnsemble
from tamis.rank.screen import (
    ScreenOptions,
    local_statistics,
    noise_spectra,
    particle_fit,
    screen_particles,
)

__all__ = [
    "RankOptions",
    "RankResult",
    "rank_classes",
    "select_classes",
    "select_screened_classes",
    "passing_shares",
    "selection_scores",
    "CLEAN_SHARE_GOOD",
    "load_ranker",
    "image_scale_of",
    "job_particle_fit",
    "read_optimiser",
    "write_selection",
    "SHIPPED_RANKER",
]

SHIPPED_RANKER = Path(__file__).resolve().parents[1] / "data" / "ranker_general.safetensors"


@dataclass
class RankOptions:
    #: None: the model's recommended threshold (where its calibrated P(good) is 0.5), else 0.5
    min_score: float | None = None
    max_score: float = 999.0
    select_min_nr_particles: int = -1
    select_min_nr_classes: int = -1
    quantile: float | None = None
    model: str | None = None  # safetensors state dict; default the shipped one
    fn_root: str = "rank"
    gallery: bool = True
    #: the particle screen after the class selection (:mod:`tamis.rank.screen`); None: classes only
    screen: ScreenOptions | None = field(default_factory=ScreenOptions)


@dataclass
class RankResult:
    scores: np.ndarray  # per class, -999 when not scored
    probability: np.ndarray  # per class, calibrated P(good); nan when not scored
    selected: list[int] = field(default_factory=list)  # 1-based class numbers
    n_particles: int = 0
    particles: Path | None = None
    n_in_classes: int = 0  # particles of the selected classes, before the particle screen
    #: per class, the score it was selected by (``selection_scores``; the ranker's score
    #: without the particle screen) and its share of particles passing the screen (nan: none)
    selection: np.ndarray | None = None
    screen_passed: np.ndarray | None = None


def load_ranker(
    path: str | Path | None = None,
) -> tuple[ClassRankerNet | RankerEnsemble, dict]:
    """The network with weights from a safetensors state dict (RELION's key layout, or
    ``members.<i>.``-prefixed for an ensemble) and its JSON record (calibration, provenance).
    Only tensors are read."""
    from safetensors.torch import load_file

    path = Path(path) if path is not None else SHIPPED_RANKER
    if not path.is_file():
        raise InputFileError(path, "class-ranker weights not found (give --model)")
    try:
        state = {k: v.float() for k, v in load_file(str(path)).items()}  # float16 when shipped
    except Exception as exc:
        raise InputFileError(
            path, f"not a safetensors state dict ({' '.join(str(exc).split())})"
        ) from None
    n_members = len({k.split(".")[1] for k in state if k.startswith("members.")})
    net: ClassRankerNet | RankerEnsemble = (
        RankerEnsemble([ClassRankerNet() for _ in range(n_members)])
        if n_members
        else ClassRankerNet()
    )
    try:
        net.load_state_dict(state)
    except RuntimeError as exc:
        raise InputFileError(
            path, f"weights do not fit RELION's class-ranker network ({' '.join(str(exc).split())})"
        ) from None
    net.eval()
    meta = read_model_record(path.with_suffix(".json"))
    cal = meta.get("calibration")
    if cal is not None:
        ok = isinstance(cal, dict) and all(
            isinstance(cal.get(k, 0.0), (int, float)) and not isinstance(cal.get(k), bool)
            for k in ("a", "b")
        )
        if not ok:
            raise InputFileError(path.with_suffix(".json"), "calibration must hold numbers a and b")
    if image_scale_of(meta) not in IMAGE_SCALES:
        raise InputFileError(
            path.with_suffix(".json"), f"image_scale must be one of {', '.join(IMAGE_SCALES)}"
        )
    return net, meta


def image_scale_of(meta: dict) -> str:
    """The unit a model's record says its class images enter in (``features.IMAGE_SCALES``);
    RELION's records name none: its absolute units."""
    return meta.get("image_scale", "absolute")


def recommended_min_score(meta: dict) -> float:
    """The score at which the model's calibrated probability of a good class is 0.5 (fitted on
    its validation jobs); RELION's 0.5 for a model without a fitted calibration."""
    cal = meta.get("calibration") or {}
    if cal.get("fitted") and cal.get("a", 0) > 0:
        return float(-cal["b"] / cal["a"])
    return 0.5


def _probability(scores: np.ndarray, meta: dict) -> np.ndarray:
    cal = meta.get("calibration") or {"a": 8.0, "b": -4.0}  # logistic around 0.5 by default
    return 1.0 / (1.0 + np.exp(-(cal["a"] * scores + cal["b"])))


def read_optimiser(optimiser: str | Path) -> dict:
    """A 2D job's ``run_itNNN_optimiser.star`` options (``optimiser_general``); a clear error
    when the file is missing or is something else."""
    path = Path(optimiser)
    if not path.is_file():
        raise InputFileError(path, "optimiser file not found")
    opt = read_star(path).get("optimiser_general")
    if not isinstance(opt, dict) or "rlnModelStarFile" not in opt:
        raise InputFileError(path, "is not a run_itNNN_optimiser.star (no optimiser_general)")
    return opt


def job_inputs(optimiser: str | Path) -> dict:
    """Everything the ranker reads from a 2D job: options, model classes and images, data."""
    path = Path(optimiser)
    opt = read_optimiser(path)
    if not int(opt.get("rlnDoCorrectCtf", 0)):
        raise InputFileError(path, "the 2D job did not correct CTFs; the class ranker needs --ctf")
    model_path = Path(str(opt["rlnModelStarFile"]))
    model = read_star(model_path)
    general, classes = model.get("model_general"), model.get("model_classes")
    if not isinstance(general, dict) or not isinstance(classes, pd.DataFrame):
        raise InputFileError(model_path, "lacks data_model_general or data_model_classes")
    stack = str(classes["rlnReferenceImage"].iloc[0]).split("@", 1)[-1]
    images, _ = read_mrc(stack)
    images = images.reshape(-1, images.shape[-2], images.shape[-1])
    data = read_data_star(str(opt["rlnExperimentalDataStarFile"]), "particles")
    return {"optimiser": opt, "general": general, "classes": classes, "model": model,
            "images": images, "data": data, "optimiser_path": path}  # fmt: skip


def _resolution(model: dict, c: int, pixel: float) -> float:
    """RELION's findResolution: the shell before rlnSsnrMap first drops below 1."""
    table = model.get(f"model_class_{c + 1}")
    if not isinstance(table, pd.DataFrame):
        return 2 * pixel
    ssnr = table["rlnSsnrMap"].to_numpy(float)
    ang = table["rlnAngstromResolution"].to_numpy(float)
    for i in range(1, len(ssnr)):
        if ssnr[i] < 1:
            return float(ang[i - 1])
    return 2 * pixel


def job_class_features(
    job: dict, image_scale: str = "absolute"
) -> tuple[list, list[np.ndarray], list[int]]:
    """RELION's features and CNN image of every class of a job (``job_inputs``) with more than
    10 estimated particles; returns (features, images, 0-based class numbers). ``image_scale``
    ``job`` scales the job's class images to its own intensity unit first
    (``features.job_intensity_scale``; ``absolute``, RELION's way, leaves them)."""
    if image_scale not in IMAGE_SCALES:
        raise TamisError(f"image_scale must be one of {', '.join(IMAGE_SCALES)}")
    opt, general, classes, images = job["optimiser"], job["general"], job["classes"], job["images"]
    pixel = float(general["rlnPixelSize"])
    diameter = float(opt.get("rlnParticleDiameter", images.shape[-1] * pixel))
    n_total = len(job["data"].table)
    k = len(classes)

    def column(label: str, default: float) -> pd.Series:
        return classes.get(label, pd.Series([default] * k))

    fractions = classes["rlnClassDistribution"].to_numpy(float)
    scored = [c for c in range(k) if fractions[c] * n_total > 10]

    def image_index(c: int) -> int:
        name = str(classes["rlnReferenceImage"].iloc[c])
        return int(name.split("@", 1)[0]) if "@" in name else c + 1

    scale = 1.0
    if image_scale == "job" and scored:
        scale = job_intensity_scale(
            images[[image_index(c) - 1 for c in scored]], fractions[scored], pixel, diameter
        )
    feats, imgs, kept = [], [], []
    for c in scored:
        frac = float(fractions[c])
        index = image_index(c)
        res = float(column("rlnEstimatedResolution", 0.0).iloc[c])
        if not 0 < res < 999:
            res = _resolution(job["model"], c, pixel)
        acc_rot = float(column("rlnAccuracyRotations", 999.0).iloc[c])
        acc_tr = float(column("rlnAccuracyTranslationsAngst", 999.0).iloc[c])
        if acc_rot > 99 or acc_tr > 99:  # RELION recomputes them; without particles: its defaults
            acc_rot, acc_tr = 5.0, 8.0 * pixel
        img = images[index - 1].astype(np.float64) * scale
        feats.append(
            class_features(
                img,
                pixel_size=pixel,
                diameter=diameter,
                class_index=index,
                fraction=frac,
                n_total=n_total,
                resolution=res,
                acc_rot=acc_rot,
                acc_trans=acc_tr,
            )  # fmt: skip
        )
        imgs.append(cnn_image(img, pixel, diameter))
        kept.append(c)
    return feats, imgs, kept


def rank_classes(
    optimiser: str | Path,
    out_dir: str | Path,
    options: RankOptions,
    *,
    log: Callable[[str], None] = print,
) -> RankResult:
    """Score every class of a 2D job, select, and write RELION's Select-job files."""
    job = job_inputs(optimiser)
    opt, classes, images, data = job["optimiser"], job["classes"], job["images"], job["data"]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n_total = len(data.table)
    k = len(classes)
    net, meta = load_ranker(options.model)
    feats, imgs, kept = job_class_features(job, image_scale_of(meta))
    scores = np.full(k, -999.0)
    prob = np.full(k, np.nan)
    if options.screen is not None:
        choose_device(options.screen.device)  # a bad device fails now, not after the ranking
    if options.min_score is None:
        options = replace(options, min_score=recommended_min_score(meta))
        log(f"threshold: the model's recommended score {options.min_score:.3f}")
    if kept:
        with torch.no_grad():
            s = net(
                torch.from_numpy(np.stack(imgs))[:, None],
                torch.from_numpy(network_features(feature_vector(feats))),
            )
        s = s[:, 0].numpy().astype(np.float64)
        scores[kept] = s
        prob[kept] = _probability(s, meta)
    n_est = {c: float(classes["rlnClassDistribution"].iloc[c]) * n_total for c in kept}
    chosen, n_above = select_classes(scores, kept, n_est, options)
    table = data.table
    in_class = table["rlnClassNumber"].astype(int).to_numpy()
    clean = np.full(k, np.nan)  # share of each class's particles that pass the screen
    selection = scores.copy()
    passed = np.ones(len(table), dtype=bool)
    fit = None
    first_rows = np.isin(in_class, [c + 1 for c in chosen])
    if options.screen is not None and first_rows.any():
        passed, fit = _screen(job, first_rows, options.screen, log)
    if fit is not None:
        first = set(chosen)
        chosen, n_above, clean, selection = select_screened_classes(
            scores, kept, n_est, in_class, passed, options
        )
        if set(chosen) != first:
            dropped = sorted(c + 1 for c in first - set(chosen))
            added = sorted(c + 1 for c in set(chosen) - first)
            log(f"particle screen: classes {dropped or 'none'} dropped, {added or 'none'} added "
                f"(score x min(1, passing share / {CLEAN_SHARE_GOOD}))")  # fmt: skip
    numbers = [c + 1 for c in chosen]
    # ---- files -------------------------------------------------------------------------------
    root = out / options.fn_root
    in_chosen = np.isin(in_class, numbers)
    n_in_classes = int(in_chosen.sum())
    keep_rows = in_chosen & passed
    if fit is not None:
        _write_screen_report(out / "particle_screen.csv", table, fit, passed, keep_rows)
    write_selection(out, data, classes, chosen, keep_rows, scores)
    write_star({"optics": data.optics, "particles": table}, Path(f"{root}_data.star"))
    model_cols = [*_CLASS_AVERAGE_COLUMNS, "rlnOverallFourierCompleteness",
                  "rlnClassPriorOffsetX", "rlnClassPriorOffsetY"]  # fmt: skip
    mc = classes[[c for c in model_cols if c in classes.columns]].copy()
    mc.insert(1, "rlnClassScore", scores)
    write_star({"model_classes": mc}, Path(f"{root}_model.star"))
    ropt = dict(opt)
    ropt["rlnModelStarFile"] = f"{root}_model.star"
    ropt["rlnExperimentalDataStarFile"] = f"{root}_data.star"
    write_star({"optimiser_general": ropt}, Path(f"{root}_optimiser.star"))
    probs = pd.DataFrame({"rlnClassNumber": np.arange(1, k + 1), "rlnClassScore": scores,
                          "tamisProbabilityGood": prob, "tamisScreenPassed": clean,
                          "tamisSelectionScore": selection,
                          "rlnSelected": [int(c in chosen) for c in range(k)]})  # fmt: skip
    with atomic_path(out / "class_scores.csv") as tmp:
        probs.to_csv(tmp, index=False)
    if options.gallery:
        write_gallery(out / "gallery.png", images, selection, chosen)
    screened = "" if options.screen is None else f" ({n_in_classes} before the particle screen)"
    log(
        f"scored {len(kept)} of {k} classes; selected {len(chosen)} classes "
        f"({n_above} by score) with {int(keep_rows.sum())} particles{screened}: "
        f"{out / 'particles.star'}"
    )
    return RankResult(
        scores, prob, numbers, int(keep_rows.sum()), out / "particles.star", n_in_classes,
        selection, clean,
    )  # fmt: skip


#: the share of clean particles that makes a class good (the ranker's training labels: tier 2)
CLEAN_SHARE_GOOD = 0.75


def passing_shares(classes_of: np.ndarray, passed: np.ndarray, k: int) -> np.ndarray:
    """Each of ``k`` classes' share of particles that pass the screen, from the particles'
    1-based class numbers ``classes_of`` and verdicts ``passed`` (nan: a class without
    particles; numbers outside 1..k are not counted)."""
    ok = (classes_of >= 1) & (classes_of <= k)
    c = classes_of[ok].astype(np.int64) - 1
    counts = np.bincount(c, minlength=k).astype(float)
    good = np.bincount(c, weights=np.asarray(passed, float)[ok], minlength=k)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, good / counts, np.nan)


def select_screened_classes(
    scores: np.ndarray,
    kept: list[int],
    n_est: dict[int, float],
    classes_of: np.ndarray,
    passed: np.ndarray,
    options: RankOptions,
) -> tuple[list[int], int, np.ndarray, np.ndarray]:
    """RELION's selection (:func:`select_classes`) again, after the particle screen: on
    :func:`selection_scores`, with top-ups (``select_min_nr_particles``) counting the particles
    that will be kept. Returns the chosen classes, how many passed by score, each class's
    passing share and the selection scores."""
    clean = passing_shares(classes_of, passed, len(scores))
    selection = selection_scores(scores, clean)
    n_pass = {c: n * (clean[c] if np.isfinite(clean[c]) else 1.0) for c, n in n_est.items()}
    chosen, n_above = select_classes(selection, kept, n_pass, options)
    return chosen, n_above, clean, selection


def selection_scores(scores: np.ndarray, clean: np.ndarray) -> np.ndarray:
    """The score a class is selected by when the particle screen runs: the ranker's score times
    ``min(1, clean / CLEAN_SHARE_GOOD)``, where ``clean`` is the share of the class's particles
    that pass the screen (nan for a class without particles: the score stands). A class whose
    particles mostly fail the screen (carbon edges, ice, whatever the network took for a
    particle) falls with that share; a class at least as clean as a good one keeps its score.
    (A negative score moves down by the same fraction of its size.) Unscored classes (-999)
    stay unscored."""
    factor = np.where(np.isfinite(clean), np.minimum(1.0, clean / CLEAN_SHARE_GOOD), 1.0)
    # scores are not bounded below 0: the penalty moves a negative score down as well
    return np.where(scores > -998, scores - np.abs(scores) * (1.0 - factor), scores)


_CLASS_AVERAGE_COLUMNS = ("rlnReferenceImage", "rlnClassDistribution", "rlnAccuracyRotations",
                          "rlnAccuracyTranslationsAngst", "rlnEstimatedResolution")  # fmt: skip


def write_selection(
    out: Path,
    data: DataStar,
    classes: pd.DataFrame,
    chosen: list[int],
    keep_rows: np.ndarray | pd.Series,
    scores: np.ndarray | None = None,
) -> None:
    """RELION's Select-job files in ``out``: ``particles.star`` (the rows ``keep_rows`` of the
    2D job's particle ``data``), ``backup_selection.star`` (a flag per class) and
    ``class_averages.star`` (the ``chosen`` 0-based classes, with their predicted ``scores``
    when ranked)."""
    write_star({"optics": data.optics, "particles": data.table[keep_rows]}, out / "particles.star")
    k = len(classes)
    flags = pd.DataFrame({"rlnSelected": [int(c in chosen) for c in range(k)]})
    write_star({"": flags}, out / "backup_selection.star")
    ca = classes.iloc[chosen][[c for c in _CLASS_AVERAGE_COLUMNS if c in classes.columns]].copy()
    if scores is not None:
        ca.insert(1, "rlnPredictedClassScore", np.asarray(scores)[chosen])
    write_star({"": ca.reset_index(drop=True)}, out / "class_averages.star")


def job_particle_fit(
    job: dict, rows: np.ndarray | None, options: ScreenOptions
) -> tuple[ParticleSet, pd.DataFrame]:
    """The particle screen's statistics (:func:`tamis.rank.screen.particle_fit`) for the
    particles ``rows`` (0-based; None: all) of a 2D job (``job_inputs``), with the job's CTF
    options, mask diameter and noise spectra."""
    opt = job["optimiser"]
    try:
        particles = ParticleSet.from_star(Path(str(opt["rlnExperimentalDataStarFile"])))
    except InputFileError as exc:
        raise InputFileError(
            exc.path, f"{exc.problem} (the particle screen reads the particle images; "
            "--no_particle_screen selects by class only)"
        ) from None  # fmt: skip
    flags = {
        "intact_first_peak": bool(int(opt.get("rlnDoIgnoreCtfUntilFirstPeak", 0))),
        "phase_flipped": bool(int(opt.get("rlnCtfDataArePhaseFlipped", 0))),
        "only_flip_phases": bool(int(opt.get("rlnDoOnlyFlipCtfPhases", 0))),
    }
    diameter = float(opt.get("rlnParticleDiameter", 0) or 0)
    pixel = float(np.median(particles.pixel_sizes))  # optics groups share the box
    diameter_px = diameter / pixel if diameter > 0 else None
    search = _realign_search(job, pixel) if options.realign else None
    fit = particle_fit(
        particles, job["images"], noise_spectra(job["model"], opt["rlnModelStarFile"]), rows,
        lowres=options.lowres, diameter_px=diameter_px, ctf_flags=flags,
        batch_size=options.batch_size, device=choose_device(options.device), realign=search,
    )  # fmt: skip
    around = local_statistics(
        fit, particles.particles, options.local_neighbours, options.min_particles
    )
    for column, values in (around or {}).items():  # misfit_local, amplitude(_plain)_level
        fit[column] = values
    return particles, fit


def _realign_search(job: dict, pixel: float) -> tuple[float, float]:
    """The particle screen's re-alignment search from the 2D job's own sampling: its fine psi
    step (``rlnPsiStep`` / 2^oversampling) and its offset range in pixels (RELION's GUI
    defaults, 6 degrees and 5 pixels, when the sampling file is missing)."""
    path = Path(str(job["optimiser_path"]))
    sampling = path.with_name(path.name.replace("_optimiser.star", "_sampling.star"))
    over = int(job["optimiser"].get("rlnAdaptiveOversampleOrder", 1) or 0)
    step, radius = 6.0, 5.0
    if sampling.is_file():
        general = read_star(sampling).get("sampling_general")
        if isinstance(general, dict) and "rlnPsiStep" in general:
            step = float(general["rlnPsiStep"]) / 2**over
            radius = float(general.get("rlnOffsetRange", radius * pixel)) / pixel
    return max(step, 0.5), max(radius, 1.0)


def _screen(
    job: dict, cuts_from: np.ndarray, options: ScreenOptions, log: Callable[[str], None]
) -> tuple[np.ndarray, pd.DataFrame | None]:
    """The particle screen over every particle of the job, with its cuts set by the particles
    ``cuts_from`` (the classes the ranker chose): returns the particles that pass (over the
    whole data table) and the screen's statistics (``particle_fit``, one row per particle with a
    class of the job; None, and every particle passing, when too few particles were chosen to
    set cuts)."""
    table = job["data"].table
    cls = table["rlnClassNumber"].astype(int).to_numpy()
    n_from = int(cuts_from.sum())
    if n_from < options.min_particles:
        log(f"particle screen: {n_from} particles in the chosen classes, fewer than "
            f"{options.min_particles}; all kept")  # fmt: skip
        return np.ones(len(table), dtype=bool), None
    # particles without a class of this job cannot be compared with one: they do not pass
    rows = np.flatnonzero((cls >= 1) & (cls <= len(job["classes"])))
    passed = np.zeros(len(table), dtype=bool)
    _, fit = job_particle_fit(job, rows, options)
    passed[rows] = screen_particles(fit, options, cuts_from=cuts_from[rows])
    cuts = fit.attrs.get("cuts", {})
    rule = (
        f"amplitude >= {cuts.get('amplitude', math.nan):.2f} x class median, misfit <= "
        f"{cuts.get('misfit', math.nan):.2f} (core {cuts.get('centre', math.nan):.2f} + "
        f"{cuts.get('spreads', math.nan):.1f} x {cuts.get('spread', math.nan):.2f}"
        + (
            f"; raised by up to {cuts['class_raise']:.1f} spreads for classes whose own core "
            "is higher"
            if cuts.get("class_raise")
            else ""
        )
        + "), "
        + (
            f"plain amplitude >= {options.min_plain_amplitude:.2f} x class median, "
            if options.min_plain_amplitude > 0
            else ""
        )
        + f"{'adaptive' if options.adaptive else 'fixed'} cuts"
    )
    log(f"particle screen: {int(passed[cuts_from].sum())} of {n_from} particles of the chosen "
        f"classes pass ({rule}); {int(passed.sum())} of {len(passed)} in all classes")  # fmt: skip
    return passed, fit


def _write_screen_report(
    path: Path, table: pd.DataFrame, fit: pd.DataFrame, passed: np.ndarray, kept: np.ndarray
) -> None:
    """``particle_screen.csv``: every particle of the job, its amplitude, misfit, whether it
    passes the screen and whether it is in ``particles.star`` (amplitude and misfit empty for a
    particle whose class the job does not have)."""
    fit = fit.reindex(range(len(table)))

    def column(name: str) -> np.ndarray:  # a statistic the fit may lack (no coordinates)
        return fit[name].to_numpy() if name in fit.columns else np.full(len(fit), np.nan)

    report = pd.DataFrame({
        "rlnImageName": table["rlnImageName"].to_numpy(),
        "rlnClassNumber": table["rlnClassNumber"].to_numpy(),
        "tamisAmplitude": fit["amplitude"].to_numpy(), "tamisMisfit": fit["misfit"].to_numpy(),
        "tamisAmplitudeLow": fit["amplitude_low"].to_numpy(),
        "tamisMisfitLocal": column("misfit_local"),
        "tamisAmplitudeLevel": column("amplitude_level"),
        "tamisAmplitudePlain": fit["amplitude_plain"].to_numpy(),
        "tamisAmplitudePlainLevel": column("amplitude_plain_level"),
        "tamisPassed": passed.astype(int), "tamisKept": kept.astype(int),
    })  # fmt: skip
    if "psi" in fit.columns:  # the re-aligned pose the statistics were measured in
        report["tamisAnglePsi"] = fit["psi"].to_numpy()
        report["tamisShiftX"] = fit["shift_x"].to_numpy()
        report["tamisShiftY"] = fit["shift_y"].to_numpy()
    with atomic_path(path) as tmp:
        report.to_csv(tmp, index=False)


def select_classes(
    scores: np.ndarray, kept: list[int], n_est: dict[int, float], options: RankOptions
) -> tuple[list[int], int]:
    """RELION's selection (``performRanking``) over the scored classes ``kept`` (0-based):
    returns the chosen classes (threshold-passing ones first, then top-ups by score) and how many
    passed the threshold (or the quantile)."""
    order = [kept[i] for i in np.argsort(-scores[kept], kind="stable")]
    if options.quantile is not None:
        if not 0 < options.quantile <= 1:
            raise TamisError(f"--quantile {options.quantile}: must be in (0, 1]")
        chosen = sorted(order[: max(1, math.ceil(options.quantile * len(order)))] if order else [])
        return chosen, len(chosen)
    selected = [c for c in kept if options.min_score <= scores[c] <= options.max_score]
    parts = sum(n_est[c] for c in selected)
    topped: list[int] = []
    for c in order:
        if c in selected:
            continue
        if parts < options.select_min_nr_particles:
            topped.append(c)
            parts += n_est[c]
        elif len(selected) + len(topped) < options.select_min_nr_classes:
            topped.append(c)
        else:
            break
    return selected + topped, len(selected)


def write_gallery(path: Path, images: np.ndarray, scores: np.ndarray, chosen: list[int]) -> None:
    """Class averages sorted by score (best first), selected ones framed in green."""
    from PIL import Image, ImageDraw

    order = np.argsort(-scores, kind="stable")
    tile = 96
    cols = min(10, len(order))
    rows = math.ceil(len(order) / cols)
    canvas = Image.new("RGB", (cols * tile, rows * (tile + 14)), "black")
    draw = ImageDraw.Draw(canvas)
    for pos, c in enumerate(order):
        im = Image.fromarray(to_uint8(images[c])).resize((tile - 6, tile - 6))
        x, y = (pos % cols) * tile, (pos // cols) * (tile + 14)
        canvas.paste(im, (x + 3, y + 3))
        if c in chosen:
            draw.rectangle([x + 1, y + 1, x + tile - 2, y + tile - 2], outline=(0, 220, 0), width=3)
        label = f"{c + 1}: {scores[c]:.2f}" if scores[c] > -999 else f"{c + 1}: -"
        draw.text((x + 3, y + tile), label, fill="white")
    with atomic_path(path) as tmp:
        canvas.save(tmp, format="PNG")
