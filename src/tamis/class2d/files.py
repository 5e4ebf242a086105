"""``run_itNNN_*`` files with RELION's names, tables and labels, and reading them back to continue.

Every file is written atomically; the optimiser file, which ``--continue`` starts from, is written
last, so an iteration counts as finished only when all its files exist.
"""

from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from tamis import __version__
from tamis.class2d.sampling import Sampling
from tamis.class2d.state import Class2DOptions, ModelState
from tamis.errors import InputFileError
from tamis.io.mrc import read_mrc, write_mrc
from tamis.io.star import read_star, require_columns, write_star

__all__ = [
    "IterationFiles",
    "write_iteration",
    "read_continue",
    "ContinueState",
    "continued_options",
    "RUNTIME_OPTIONS",
]

#: Options that are never read back on --continue: how to run, not what to compute. As in
#: RELION, --center_classes is re-parsed too (off unless given again).
RUNTIME_OPTIONS = frozenset(
    {
        "iter",
        "device",
        "j",
        "pool",
        "batch_size",
        "max_memory",
        "mstep_bf16",
        "preread_images",
        "pipeline_control",
        "center_classes",
    }
)


@dataclass
class IterationFiles:
    """File names of one iteration for output root ``root`` (e.g. ``Class2D/job010/run``)."""

    root: str
    iteration: int

    def path(self, what: str, ext: str = "star") -> Path:
        return Path(f"{self.root}_it{self.iteration:03d}_{what}.{ext}")

    @property
    def classes(self) -> Path:
        return self.path("classes", "mrcs")

    def class_map(self, k: int) -> Path:
        """The map of class ``k`` (1-based) of a 3D run, ``run_itNNN_class00k.mrc``."""
        return self.path(f"class{k:03d}", "mrc")

    @property
    def model(self) -> Path:
        return self.path("model")

    @property
    def data(self) -> Path:
        return self.path("data")

    @property
    def optimiser(self) -> Path:
        return self.path("optimiser")

    @property
    def sampling(self) -> Path:
        return self.path("sampling")


#: Labels RELION 5 writes in every optimiser file that have no meaning for tamis's jobs;
#: written with RELION's defaults (those its ``MlOptimiser::read`` takes when they are
#: missing, or the same in effect) so that readers expecting them find them.
_RELION_FIXED = {
    "rlnSgdInitialResolution": 35.0,
    "rlnSgdFinalResolution": 15.0,
    "rlnSgdInitialSubsetSize": 100,
    "rlnSgdFinalSubsetSize": 500,
    "rlnSgdSigma2FudgeInitial": 8.0,
    "rlnSgdSigma2FudgeHalflife": -1,
    "rlnSgdSkipAnneal": 0,
    "rlnSgdStepsize": 0.5,
    "rlnAutoLocalSearchesHealpixOrder": 4,
    "rlnNumberOfIterWithoutResolutionGain": 0,
    "rlnBestResolutionThusFar": 0.0,
    "rlnNumberOfIterWithoutChangingAssignments": 0,
    "rlnSmallestChangesOrientations": 999.0,
    "rlnSmallestChangesOffsets": 999.0,
    "rlnSmallestChangesClasses": 9999999,
    "rlnLocalSymmetryFile": "None",
    "rlnIgnoreHelicalSymmetry": 0,
    "rlnFourierMask": "None",
    "rlnHelicalTwistInitial": 0.0,
    "rlnHelicalRiseInitial": 0.0,
    "rlnHelicalCentralProportion": 0.3,
    "rlnNrHelicalNStart": 1,
    "rlnHelicalMaskTubeInnerDiameter": -1.0,
    "rlnHelicalMaskTubeOuterDiameter": -1.0,
    "rlnHelicalSymmetryLocalRefinement": 0,
    "rlnHelicalSigmaDistance": -1.0,
    "rlnHelicalKeepTiltPriorFixed": 0,
    "rlnHasHighFscAtResolLimit": 0,
    "rlnHasLargeSizeIncreaseIterationsAgo": 0,
    "rlnTomoTomogramsFile": "",
    "rlnTomoTrajectoriesFile": "",
    "rlnDoBlush": 0,
    "rlnBlushNoSpectralTrailing": 0,
    "rlnGradSubsetOrder": 0,
    "rlnGradSuspendFinerSamplingIter": -1,
    "rlnGradSuspendLocalSamplingIter": -1,
    "rlnSgdMinimumResolution": 20.0,
    "rlnOffsetRangeX": -1.0,
    "rlnOffsetRangeY": -1.0,
    "rlnOffsetRangeZ": -1.0,
}


def _yes(x: bool) -> int:
    return 1 if x else 0


def _orientation_tables(state: ModelState, sampling) -> dict[str, pd.DataFrame]:
    """RELION's ``model_pdf_orient_class_N`` tables of a 3D model.star (MlModel reads one per
    class, ``rlnOrientationDistribution`` per direction of the current sampling, and takes
    their length as its number of directions): the E-step's learned prior ``pdf_direction``
    per class and direction; a state with one value per class (before the run's first E-step)
    spreads each class's total evenly."""
    n_dir = int(sampling.nr_directions)
    priors = state.pdf_direction.cpu().numpy().astype(np.float64)
    if priors.shape[1] != n_dir:
        priors = np.repeat(priors.sum(1, keepdims=True) / n_dir, n_dir, axis=1)
    return {
        f"model_pdf_orient_class_{c + 1}": pd.DataFrame({"rlnOrientationDistribution": priors[c]})
        for c in range(len(priors))
    }


def write_iteration(
    files: IterationFiles,
    *,
    state: ModelState,
    options: Class2DOptions,
    sampling: Sampling,
    optics: pd.DataFrame,
    particles: pd.DataFrame | None,
    groups: pd.DataFrame,
    pixel_size: float,
    current_size: int,
    diameter: float,
    seed: int,
    changes: tuple[float, float, float] = (0.0, 0.0, 0.0),
    tau2_fudge: float | None = None,
    extra_optimiser: dict | None = None,
    extra_classes: dict | None = None,
    class_priors: bool = False,
    model_only: bool = False,
    fsc: np.ndarray | None = None,
    extra_general: dict | None = None,
    extra_blocks: dict | None = None,
) -> None:
    """Write classes.mrcs (3D: one ``classNNN.mrc`` per class), model.star, data.star,
    sampling.star (not at it000), optimiser.star.

    ``tau2_fudge`` is this iteration's T (VDAM schedules it; default ``options.tau2_fudge``);
    ``extra_optimiser``/``extra_classes`` add or replace optimiser labels and model_classes
    columns (VDAM's); ``class_priors`` adds the E-step class priors to the optimiser file.
    Auto-refine: ``model_only`` writes the maps and model.star alone (the second half),
    ``fsc`` is the gold-standard FSC per shell, ``extra_general`` adds or replaces
    model_general labels and ``extra_blocks`` are written after the optimiser's own block.
    """
    k, n = state.n_classes, state.box
    ref_dim = state.refs.ndim - 1
    if ref_dim == 3:
        names = [str(files.class_map(c + 1)) for c in range(k)]
        for c in range(k):
            write_mrc(names[c], state.refs[c].cpu().numpy(), pixel_size, stack=False)
    else:
        write_mrc(files.classes, state.refs.cpu().numpy(), pixel_size)
        names = [f"{c + 1:08d}@{files.classes}" for c in range(k)]
    nsh = n // 2 + 1
    shells = np.arange(nsh)
    res = shells / (n * pixel_size)
    with np.errstate(divide="ignore"):
        ang = np.where(shells > 0, 1.0 / np.maximum(res, 1e-30), 999.0)
    current_res_angst = n * pixel_size / max(state.maxres, 1)
    general = {
        "rlnReferenceDimensionality": ref_dim,
        "rlnDataDimensionality": 2,
        "rlnOriginalImageSize": n,
        "rlnCurrentResolution": current_res_angst,
        "rlnCurrentImageSize": current_size,
        "rlnPaddingFactor": float(options.pad),
        "rlnIsHelix": 0,
        "rlnFourierSpaceInterpolator": 1,
        "rlnMinRadiusNnInterpolation": 10,
        "rlnPixelSize": pixel_size,
        "rlnNrClasses": k,
        "rlnNrBodies": 1,
        "rlnNrGroups": len(groups),
        "rlnNrOpticsGroups": len(optics),
        "rlnTau2FudgeFactor": options.tau2_fudge if tau2_fudge is None else tau2_fudge,
        "rlnNormCorrectionAverage": state.avg_norm,
        "rlnSigmaOffsetsAngst": float(np.sqrt(state.sigma2_offset)),
        "rlnOrientationalPriorMode": 0,
        "rlnSigmaPriorRotAngle": 0.0,
        "rlnSigmaPriorTiltAngle": 0.0,
        "rlnSigmaPriorPsiAngle": 0.0,
        "rlnLogLikelihood": state.loglik,
        "rlnAveragePmax": state.avg_pmax,
        **(extra_general or {}),
    }
    dvp = state.data_vs_prior.cpu().numpy()
    est_res = []
    for c in range(k):
        below = np.flatnonzero(dvp[c] < 1)
        maxres = int(below[0]) - 1 if len(below) else nsh - 1
        est_res.append(999.0 if maxres <= 0 else n * pixel_size / maxres)
    coverage = state.fourier_coverage.cpu().numpy()
    acc_rot = state.acc_rot.cpu().numpy() if state.acc_rot.numel() == k else np.full(k, 999.0)
    acc_tr = state.acc_trans.cpu().numpy() if state.acc_trans.numel() == k else np.full(k, 999.0)
    classes = pd.DataFrame(
        {
            "rlnReferenceImage": names,
            "rlnClassDistribution": state.pdf_class.cpu().numpy(),
            "rlnAccuracyRotations": acc_rot,
            "rlnAccuracyTranslationsAngst": acc_tr,
            "rlnEstimatedResolution": est_res,
            "rlnOverallFourierCompleteness": [
                float(coverage[c, : max(state.maxres, 1) + 1].mean()) for c in range(k)
            ],
            "rlnClassPriorOffsetX": state.prior_offset[:, 0].cpu().numpy(),
            "rlnClassPriorOffsetY": state.prior_offset[:, 1].cpu().numpy(),
            **(extra_classes or {}),
        }
    )
    blocks: dict[str, object] = {"model_general": general, "model_classes": classes}
    for c in range(k):
        blocks[f"model_class_{c + 1}"] = pd.DataFrame(
            {
                "rlnSpectralIndex": shells,
                "rlnResolution": res,
                "rlnAngstromResolution": ang,
                "rlnSsnrMap": dvp[c],
                "rlnGoldStandardFsc": np.zeros(nsh) if fsc is None else np.asarray(fsc)[:nsh],
                "rlnFourierCompleteness": coverage[c],
                "rlnReferenceSigma2": state.sigma2_class[c].cpu().numpy(),
                "rlnReferenceTau2": state.tau2[c].cpu().numpy(),
                "rlnSpectralOrientabilityContribution": np.zeros(nsh),
            }
        )
    blocks["model_groups"] = pd.DataFrame(
        {
            "rlnGroupNumber": np.arange(1, len(groups) + 1),
            "rlnGroupName": groups["name"].astype(str).to_numpy(),
            "rlnGroupNrParticles": groups["count"].to_numpy(),
            "rlnGroupScaleCorrection": state.scale.cpu().numpy(),
        }
    )
    sig = state.sigma2.cpu().numpy()
    for o in range(len(optics)):
        keep = sig[o] > 0
        blocks[f"model_optics_group_{o + 1}"] = pd.DataFrame(
            {
                "rlnSpectralIndex": shells[keep],
                "rlnResolution": res[keep],
                "rlnSigma2Noise": sig[o][keep],
            }
        )
    if ref_dim == 3:
        blocks.update(_orientation_tables(state, sampling))
    write_star(blocks, files.model)
    if model_only:
        return
    if callable(particles):  # ranks write their shares of the rows together
        particles(files.data, optics)
    else:
        write_star({"optics": optics, "particles": particles}, files.data)
    if files.iteration != 0:
        three_d = {}
        if ref_dim == 3:
            three_d = {
                "rlnHealpixOrder": sampling.healpix_order,
                "rlnSymmetryGroup": sampling.sym,
                "rlnTiltAngleLimit": -91.0,  # RELION's label (EMDL_SAMPLING_LIMIT_TILT)
            }
        write_star(
            {
                "sampling_general": {
                    "rlnIs3DSampling": _yes(ref_dim == 3),
                    "rlnIs3DTranslationalSampling": 0,
                    **three_d,
                    "rlnPsiStep": sampling.psi_step,
                    "rlnOffsetRange": sampling.offset_range * pixel_size,
                    "rlnOffsetStep": sampling.offset_step * pixel_size,
                    "rlnHelicalOffsetStep": -1.0,
                    "rlnSamplingPerturbInstance": sampling.perturbation,
                    "rlnSamplingPerturbFactor": sampling.perturb_factor,
                    "rlnHealpixOrderOriginal": sampling.healpix_order if ref_dim == 3 else -1,
                    "rlnPsiStepOriginal": sampling.psi_step,
                    "rlnOffsetRangeOriginal": sampling.offset_range * pixel_size,
                    "rlnOffsetStepOriginal": sampling.offset_step * pixel_size,
                }
            },
            files.sampling,
        )
    o = options
    finite_rot = acc_rot[acc_rot < 999]
    finite_tr = acc_tr[acc_tr < 999]
    optimiser = {
        "rlnOutputRootName": files.root,
        "rlnModelStarFile": str(files.model),
        "rlnExperimentalDataStarFile": str(files.data),
        "rlnOrientSamplingStarFile": str(files.sampling),
        "rlnCurrentIteration": files.iteration,
        "rlnNumberOfIterations": o.iter,
        "rlnDoSplitRandomHalves": 0,
        "rlnJoinHalvesUntilThisResolution": -1.0,
        "rlnAdaptiveOversampleOrder": o.oversampling,
        "rlnAdaptiveOversampleFraction": o.adaptive_fraction,
        "rlnRandomSeed": seed,
        "rlnParticleDiameter": diameter,
        "rlnWidthMaskEdge": int(o.maskedge),
        "rlnDoZeroMask": _yes(o.zero_mask),
        "rlnDoSolventFlattening": _yes(o.flatten_solvent),
        "rlnDoSolventFscCorrection": 0,
        "rlnSolventMaskName": "None",
        "rlnSolventMask2Name": "None",
        "rlnBodyStarFile": "None",
        "rlnTauSpectrumName": "None",
        "rlnMaximumCoarseImageSize": -1,
        "rlnHighresLimitExpectation": o.strict_highres_exp,
        "rlnLowresLimitExpectation": -1.0,
        "rlnIncrementImageSize": o.incr_size,
        "rlnDoMapEstimation": 1,
        "rlnDoFastSubsetOptimisation": 0,
        "rlnDoExternalReconstruct": 0,
        "rlnDoGradientRefine": 0,
        "rlnDoStochasticGradientDescent": 0,
        "rlnDoStochasticEM": 0,
        # RELION 5 writes the gradient labels in EM files too (VDAM's own values replace them)
        "rlnGradEmIters": 0,
        "rlnGradHasConverged": 0,
        "rlnGradCurrentStepsize": 0.0,
        "rlnSgdInitialIterationsFraction": o.grad_ini_frac,
        "rlnSgdFinalIterationsFraction": o.grad_fin_frac,
        "rlnSgdClassInactivityThreshold": 0.0,
        "rlnSgdStepsizeScheme": "",
        "rlnTau2FudgeScheme": "",
        "rlnDoAutoSampling": 0,
        "rlnSgdMuFactor": 0.0,
        "rlnSgdSubsetSize": -1,
        "rlnSgdWriteEverySubset": 1,
        "rlnMaximumSignificantPoses": o.max_significants,
        "rlnDoAutoRefine": 0,
        "rlnDoSkipAlign": 0,
        "rlnDoSkipRotate": 0,
        "rlnOverallAccuracyRotations": float(finite_rot.min()) if len(finite_rot) else 999.0,
        "rlnOverallAccuracyTranslationsAngst": float(finite_tr.min()) if len(finite_tr) else 999.0,
        "rlnChangesOptimalOrientations": changes[0],
        "rlnChangesOptimalOffsets": changes[1],
        "rlnChangesOptimalClasses": changes[2],
        "rlnDoHelicalRefine": 0,
        "rlnHasConverged": 0,
        "rlnDoCorrectNorm": _yes(o.norm),
        "rlnDoCorrectScale": _yes(o.scale),
        "rlnDoCorrectCtf": _yes(o.ctf),
        "rlnDoCenterClasses": _yes(o.center_classes),
        "rlnDoIgnoreCtfUntilFirstPeak": _yes(o.ctf_intact_first_peak),
        "rlnCtfDataArePhaseFlipped": _yes(o.ctf_phase_flipped),
        "rlnDoOnlyFlipCtfPhases": _yes(o.only_flip_phases),
        "rlnRefsAreCtfCorrected": 1,
        "rlnFixSigmaNoiseEstimates": 0,
        "rlnFixSigmaOffsetEstimates": _yes(o.fix_sigma_offset),
        "rlnMaxNumberOfPooledParticles": o.pool * o.j,
        "rlnTau2FudgeArg": o.tau2_fudge,
        **_RELION_FIXED,
        **(extra_optimiser or {}),
    }
    command = " ".join(shlex.quote(a) for a in sys.argv)
    opt_blocks: dict[str, object] = {"optimiser_general": optimiser}
    if class_priors:
        # The E-step's class priors (RELION's pdf_direction summed over the directions): in 2D
        # equal to rlnClassDistribution except after VDAM class substitutions, kept so that
        # --continue resumes exactly (3D continues from model.star's per-direction tables).
        # RELION reads only data_optimiser_general from this file.
        opt_blocks["tamis_class_priors"] = pd.DataFrame(
            {"rlnClassDistribution": state.pdf_direction.sum(1).cpu().numpy()}
        )
    if o.relion_offset_prior:
        # tamis's own options that change results, when not the default (RELION reads only
        # data_optimiser_general; a default run's file has RELION's blocks only)
        opt_blocks["tamis_options"] = {"tamisOffsetPrior": o.offset_prior}
    opt_blocks.update(extra_blocks or {})
    write_star(
        opt_blocks,
        files.optimiser,
        comment=f"tamis optimiser; version {__version__}\n# {command}",
    )


@dataclass
class ContinueState:
    """What ``--continue`` reads back."""

    iteration: int
    root: str
    seed: int
    optimiser: dict
    model_general: dict
    classes: pd.DataFrame
    class_tables: list[pd.DataFrame]
    groups: pd.DataFrame
    sigma2: dict[int, pd.DataFrame]
    refs: torch.Tensor
    data_path: Path
    sampling: dict
    class_priors: np.ndarray | None = None
    direction_priors: np.ndarray | None = None  # (K, D): model.star's pdf_orient tables (3D)
    tamis_blocks: dict = field(default_factory=dict)  # the optimiser file's tamis_* blocks


def read_continue(
    optimiser_path: str | Path, model_label: str = "rlnModelStarFile"
) -> ContinueState:
    """Read ``run_itNNN_optimiser.star`` and the model/data/sampling files it names
    (``model_label``: ``rlnModelStarFile2`` for the second half of a gold-standard run)."""
    path = Path(optimiser_path)
    blocks = read_star(path)
    opt = blocks.get("optimiser_general")
    if not isinstance(opt, dict):
        raise InputFileError(path, "has no data_optimiser_general block (not an optimiser file)")
    for label in (model_label, "rlnExperimentalDataStarFile", "rlnCurrentIteration"):
        if label not in opt:
            raise InputFileError(path, f"lacks {label}")
    model_path = Path(str(opt[model_label]))
    model = read_star(model_path)
    general = model.get("model_general")
    classes = model.get("model_classes")
    if not isinstance(general, dict) or not isinstance(classes, pd.DataFrame):
        raise InputFileError(model_path, "lacks data_model_general or data_model_classes")
    require_columns(
        classes, ["rlnReferenceImage", "rlnClassDistribution"], model_path, "model_classes"
    )
    k = len(classes)
    first = str(classes["rlnReferenceImage"].iloc[0])
    if int(general.get("rlnReferenceDimensionality", 2)) == 3 and "@" not in first:
        maps = []
        for name in classes["rlnReferenceImage"].astype(str):
            if not Path(name).is_file():
                raise InputFileError(model_path, f"class map {name} not found")
            maps.append(read_mrc(name)[0])
        refs = np.stack(maps)
    else:
        stack = first.split("@", 1)[-1]
        refs, _ = read_mrc(stack)
        if refs.ndim == 2:
            refs = refs[None]
        if refs.shape[0] < k:
            raise InputFileError(
                stack, f"holds {refs.shape[0]} images but the model has {k} classes"
            )
    sigma2 = {
        int(name.rsplit("_", 1)[1]): table
        for name, table in model.items()
        if name.startswith("model_optics_group_") and isinstance(table, pd.DataFrame)
    }
    priors = blocks.get("tamis_class_priors")
    class_priors = None
    if isinstance(priors, pd.DataFrame) and len(priors) == k:
        class_priors = priors["rlnClassDistribution"].to_numpy(dtype=np.float64)
    direction_priors = _direction_tables(model, k)
    sampling_path = Path(str(opt.get("rlnOrientSamplingStarFile", "")))
    sampling = {}
    if sampling_path.is_file():
        sampling = read_star(sampling_path).get("sampling_general") or {}
    return ContinueState(
        iteration=int(opt["rlnCurrentIteration"]),
        root=str(opt.get("rlnOutputRootName", "")),
        seed=int(opt.get("rlnRandomSeed", 0)),
        optimiser=opt,
        model_general=general,
        classes=classes,
        class_tables=[model[f"model_class_{c + 1}"] for c in range(k)],
        groups=model.get("model_groups", pd.DataFrame()),
        sigma2=sigma2,
        refs=torch.from_numpy(np.ascontiguousarray(refs[:k])),
        data_path=Path(str(opt["rlnExperimentalDataStarFile"])),
        sampling=sampling,
        class_priors=class_priors,
        direction_priors=direction_priors,
        tamis_blocks={k: v for k, v in blocks.items() if k.startswith("tamis_")},
    )


def _direction_tables(model: dict, k: int) -> np.ndarray | None:
    """A 3D model.star's ``model_pdf_orient_class_N`` tables as ``(K, D)``, or ``None`` when any
    is missing or they differ in length."""
    rows = []
    for c in range(k):
        table = model.get(f"model_pdf_orient_class_{c + 1}")
        if not isinstance(table, pd.DataFrame) or "rlnOrientationDistribution" not in table:
            return None
        rows.append(table["rlnOrientationDistribution"].to_numpy(dtype=np.float64))
    if len({len(r) for r in rows}) != 1:
        return None
    return np.stack(rows)


def continued_options(
    cont: ContinueState, given: Class2DOptions, changed: frozenset[str] | set[str]
) -> Class2DOptions:
    """Options for ``--continue``: what the optimiser/sampling files say, except the runtime
    options and those the user ``changed`` (RELION lets T, the mask diameter, the sampling, the
    E-step limit, --norm/--scale, solvent flattening, the solvent mask, --pad and
    --auto_local_healpix_order change on continue)."""
    opt, smp = cont.optimiser, cont.sampling
    pixel = float(cont.model_general.get("rlnPixelSize", 1.0)) or 1.0

    def flag(label: str, default: bool) -> bool:
        return bool(int(opt.get(label, int(default))))

    grad = flag("rlnDoGradientRefine", False)
    tau2 = opt.get("rlnTau2FudgeArg", cont.model_general.get("rlnTau2FudgeFactor"))

    def text(label: str, default: str) -> str:
        v = str(opt.get(label, default))
        return "" if v == "None" else v

    vdam = {}
    if grad:
        vdam = dict(
            grad_ini_frac=float(opt.get("rlnSgdInitialIterationsFraction", given.grad_ini_frac)),
            grad_fin_frac=float(opt.get("rlnSgdFinalIterationsFraction", given.grad_fin_frac)),
            grad_ini_subset=int(opt.get("rlnSgdInitialSubsetSize", given.grad_ini_subset)),
            grad_fin_subset=int(opt.get("rlnSgdFinalSubsetSize", given.grad_fin_subset)),
            grad_stepsize=float(opt.get("rlnSgdStepsize", given.grad_stepsize)),
            grad_stepsize_scheme=text("rlnSgdStepsizeScheme", given.grad_stepsize_scheme),
            tau2_fudge_scheme=text("rlnTau2FudgeScheme", given.tau2_fudge_scheme),
            grad_write_iter=int(opt.get("rlnSgdWriteEverySubset", given.grad_write_iter)),
            class_inactivity_threshold=float(
                opt.get("rlnSgdClassInactivityThreshold", given.class_inactivity_threshold)
            ),
            mu=float(opt.get("rlnSgdMuFactor", given.mu)),
        )
    from_file = dict(
        K=len(cont.classes),
        grad=grad,
        **vdam,
        tau2_fudge=float(tau2) if tau2 is not None else given.tau2_fudge,
        particle_diameter=float(opt.get("rlnParticleDiameter", -1)) or None,
        zero_mask=flag("rlnDoZeroMask", given.zero_mask),
        ctf=flag("rlnDoCorrectCtf", given.ctf),
        ctf_intact_first_peak=flag("rlnDoIgnoreCtfUntilFirstPeak", given.ctf_intact_first_peak),
        ctf_phase_flipped=flag("rlnCtfDataArePhaseFlipped", given.ctf_phase_flipped),
        only_flip_phases=flag("rlnDoOnlyFlipCtfPhases", given.only_flip_phases),
        strict_highres_exp=float(opt.get("rlnHighresLimitExpectation", given.strict_highres_exp)),
        flatten_solvent=flag("rlnDoSolventFlattening", given.flatten_solvent),
        norm=flag("rlnDoCorrectNorm", given.norm),
        scale=flag("rlnDoCorrectScale", given.scale),
        oversampling=int(opt.get("rlnAdaptiveOversampleOrder", given.oversampling)),
        adaptive_fraction=float(opt.get("rlnAdaptiveOversampleFraction", given.adaptive_fraction)),
        max_significants=int(opt.get("rlnMaximumSignificantPoses", given.max_significants)),
        incr_size=int(opt.get("rlnIncrementImageSize", given.incr_size)),
        maskedge=float(opt.get("rlnWidthMaskEdge", given.maskedge)),
        fix_sigma_offset=flag("rlnFixSigmaOffsetEstimates", given.fix_sigma_offset),
        random_seed=int(opt.get("rlnRandomSeed", 0)),
        psi_step=float(smp.get("rlnPsiStep", given.psi_step)),
        offset_range=float(smp.get("rlnOffsetRange", given.offset_range * pixel)) / pixel,
        offset_step=float(smp.get("rlnOffsetStep", given.offset_step * pixel)) / pixel,
    )
    # as RELION reads them back: the padding from the model, and options only some runs have
    # (3D, auto-refine): the point group from the sampling file, the rest from the optimiser
    has = {f.name for f in fields(given)}
    read_back = {
        "pad": (cont.model_general, "rlnPaddingFactor", lambda v: int(float(v))),
        "sym": (smp, "rlnSymmetryGroup", str),
        "auto_local_healpix_order": (opt, "rlnAutoLocalSearchesHealpixOrder", int),
        "low_resol_join_halves": (opt, "rlnJoinHalvesUntilThisResolution", float),
        "solvent_mask": (opt, "rlnSolventMaskName", lambda v: "" if str(v) == "None" else str(v)),
        "solvent_correct_fsc": (opt, "rlnDoSolventFscCorrection", lambda v: bool(int(v))),
    }
    tamis_options = cont.tamis_blocks.get("tamis_options")
    if isinstance(tamis_options, dict):  # tamis's own options (absent from RELION's files)
        read_back["offset_prior"] = (tamis_options, "tamisOffsetPrior", str)
    for name, (table, label, convert) in read_back.items():
        if name in has and label in table:
            from_file[name] = convert(table[label])
    keep = set(changed) | RUNTIME_OPTIONS
    return replace(
        given, **{k: v for k, v in from_file.items() if k not in keep or k in ("K", "grad")}
    )
