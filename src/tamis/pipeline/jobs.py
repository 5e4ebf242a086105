"""The job-type registry: RELION process labels -> tamis functions, with RELION's job-option
names and GUI defaults, and :func:`run_job`, which runs one job directory the way RELION's
programs run under the pipeliner (exit markers, ``RELION_OUTPUT_NODES.star``, run.out/run.err).

Registered: ``relion.external`` (any program, RELION's calling convention), ``relion.import`` (micrographs or movies from a file pattern), ``relion.motioncorr``
(RELION's own motion correction), ``relion.ctffind``
(tamis's CTF estimation stands in for CTFFIND-4), ``relion.select`` / ``relion.select.onvalue``
(selection on a metadata value), ``relion.autopick.log``, ``relion.autopick.topaz.pick`` (tamis's deep picker stands
in for Topaz), ``relion.extract``, ``relion.class2d`` (EM or VDAM as ``do_grad``/``do_em``),
``relion.select.class2dauto`` (the class ranker), ``relion.select.interactive`` (a person's
class choice, written in ``tamis_selected_classes`` by the web monitor), ``relion.initialmodel`` (the de novo 3D
model), ``relion.refine3d`` (gold-standard auto-refine), ``relion.maskcreate`` and
``relion.postprocess``. A label is matched after dropping trailing
``.xxx`` tokens until a registered one fits, as RELION resolves process types.
"""

from __future__ import annotations

import contextlib
import functools
import os
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tamis.errors import TamisError, is_out_of_memory, out_of_memory_error
from tamis.pipeline.job import (
    EXIT_MARKERS,
    JobStar,
    checked_job_dir,
    clear_markers,
    write_output_nodes,
)

__all__ = [
    "JobType",
    "REGISTRY",
    "job_type",
    "run_job",
    "executor",
    "job_command",
    "RANKED",
    "PER_MICROGRAPH",
]

Nodes = list[tuple[str, str]]


@dataclass
class JobType:
    label: str
    dirname: str
    run: Callable[[JobStar, Path], Nodes | None]  # None: the job wrote its output nodes
    defaults: dict[str, str] = field(default_factory=dict)


def _f(job: JobStar, key: str, default: float) -> float:
    v = job.options.get(key, "")
    return float(v) if v not in ("", None) else default


def _workers(job: JobStar):
    """Where a per-micrograph job's micrographs go: this process, or dask workers (``nr_mpi`` of
    them with ``nr_threads`` threads each, see :func:`executor`) on ``tamis_dask_cluster``:
    ``local`` (default; ``TAMIS_DASK_SCHEDULER`` when set), ``slurm`` (dask-jobqueue, queue
    ``queuename``, ``tamis_dask_memory`` and ``tamis_dask_walltime`` per worker) or a running
    scheduler's address."""
    from tamis.workers import Workers

    kind, n = executor(job)
    if kind != "dask":
        return Workers()
    o = job.options
    default = os.environ.get(DASK_SCHEDULER_ENV) or "local"
    return Workers(
        n=n,
        threads=max(1, int(_f(job, "nr_threads", 1))),
        cluster=(o.get("tamis_dask_cluster") or default).strip(),
        queue=o.get("queuename") or None,
        memory=o.get("tamis_dask_memory") or "8GB",
        walltime=o.get("tamis_dask_walltime") or "04:00:00",
    )


def _run_import(job: JobStar, out: Path) -> Nodes:
    from tamis.prep.importer import ImportOptions, import_micrographs

    if job.get_bool("do_other") and not job.get_bool("do_raw", True):
        raise TamisError("only the import of raw movies or micrographs (do_raw Yes) is in tamis")
    opts = ImportOptions(
        angpix=_f(job, "angpix", -1),
        voltage=_f(job, "kV", 300),
        spherical_aberration=_f(job, "Cs", 2.7),
        amplitude_contrast=_f(job, "Q0", 0.1),
        optics_group_name=job.options.get("optics_group_name") or "opticsGroup1",
        is_multiframe=job.get_bool("is_multiframe", True),
        mtf=job.options.get("fn_mtf", ""),
    )
    star = import_micrographs(job.options.get("fn_in_raw", ""), out, opts)
    if opts.is_multiframe:
        return [(str(star), "MicrographMovieGroupMetadata.star.relion")]
    return [(str(star), "MicrographGroupMetadata.star.relion")]


def _run_ctffind(job: JobStar, out: Path) -> Nodes:
    from tamis.prep.ctffind import CtfFindOptions, run_ctffind

    if job.get_bool("do_phaseshift"):
        raise TamisError("do_phaseshift: phase-plate CTF estimation is not in tamis")
    opts = CtfFindOptions(
        box=int(_f(job, "box", 512)),
        min_resolution=_f(job, "resmin", 30),
        max_resolution=_f(job, "resmax", 5),
        defocus_min=_f(job, "dfmin", 5000),
        defocus_max=_f(job, "dfmax", 50000),
        defocus_step=_f(job, "dfstep", 500),
        astigmatism_max=max(2000.0, 5 * _f(job, "dast", 100)),  # search range
    )
    star = run_ctffind(
        job.options["input_star_mics"],
        out,
        opts,
        only_do_unfinished=job.is_continue,
        use_noDW=job.get_bool("use_noDW"),
        use_given_ps=job.get_bool("use_given_ps"),
        log=_job_log,
        workers=_workers(job),
    )
    return [(str(star), "MicrographGroupMetadata.star.relion.ctf")]


def _gui_number(value: str, name: str) -> int:
    """RELION's GUI radio strings ("90 degrees (1)", "Flip upside down (1)") or a plain number."""
    text = (value or "0").strip()
    if text.endswith(")") and "(" in text:
        text = text[text.rindex("(") + 1 : -1]
    try:
        return int(float(text))
    except ValueError:
        raise TamisError(f"{name} {value!r}: expected a number or RELION's GUI choice") from None


def _run_motioncorr(job: JobStar, out: Path) -> Nodes:
    from tamis.pipeline.job import ABORT_NOW
    from tamis.prep.motioncorr import MotionCorrOptions, parse_other_args, run_motioncorr

    if not job.get_bool("do_own_motioncor", True):
        _job_log("do_own_motioncor No: tamis runs its own implementation of the same model")
    dose = _f(job, "dose_per_frame", 1)
    opts = MotionCorrOptions(
        first_frame_sum=int(_f(job, "first_frame_sum", 1)),
        last_frame_sum=int(_f(job, "last_frame_sum", -1)),
        bfactor=_f(job, "bfactor", 150),
        patch_x=int(_f(job, "patch_x", 1)),
        patch_y=int(_f(job, "patch_y", 1)),
        group_frames=int(_f(job, "group_frames", 1)),
        bin_factor=_f(job, "bin_factor", 1),
        dose_per_frame=dose,
        preexposure=_f(job, "pre_exposure", 0),
        dose_weighting=job.get_bool("do_dose_weighting", True),
        save_noDW=job.get_bool("do_save_noDW"),
        grouping_for_ps=(
            max(1, round(_f(job, "group_for_ps", 4) / dose))
            if job.get_bool("do_save_ps") and dose > 0
            else -1
        ),
        float16=job.get_bool("do_float16"),
        gain=job.options.get("fn_gain_ref", ""),
        gain_rot=_gui_number(job.options.get("gain_rot", "0"), "gain_rot"),
        gain_flip=_gui_number(job.options.get("gain_flip", "0"), "gain_flip"),
        defect_file=job.options.get("fn_defect", ""),
        eer_grouping=int(_f(job, "eer_grouping", 32)),
    )
    if job.get_bool("do_save_ps") and dose <= 0:
        raise TamisError("do_save_ps: give dose_per_frame (e/A² per frame) to group the spectra")
    extra = parse_other_args(job.options.get("other_args", ""), opts)
    star = run_motioncorr(
        job.options.get("input_star_mics", ""),
        out,
        opts,
        only_do_unfinished=job.is_continue,
        do_at_most=extra.get("do_at_most", -1),
        log=_job_log,
        is_aborted=lambda: (out / ABORT_NOW).exists(),
        workers=_workers(job),
    )
    return [
        (str(star), "MicrographGroupMetadata.star.relion.motioncorr"),
        (str(out / "logfile.pdf"), "LogFile.pdf.relion.motioncorr"),
    ]


def _run_select_values(job: JobStar, out: Path) -> Nodes:
    import pandas as pd

    from tamis.io.star import read_star, write_star

    if not job.get_bool("do_select_values"):
        raise TamisError("only selection on a metadata value (do_select_values Yes) is in tamis")
    o = job.options
    source = o.get("fn_mic") or o.get("fn_data")
    if not source:
        raise TamisError("fn_mic or fn_data: give the STAR file to select from")
    blocks = read_star(source)
    name = "micrographs" if o.get("fn_mic") else "particles"
    if name not in blocks or not isinstance(blocks[name], pd.DataFrame):
        raise TamisError(f"{source}: has no data_{name} table")
    table = blocks[name]
    label = o.get("select_label", "rlnCtfMaxResolution").lstrip("_")
    if label not in table.columns:
        raise TamisError(f"{source}: has no column {label} to select on")
    v = table[label].astype(float)
    lo, hi = _f(job, "select_minval", -9999), _f(job, "select_maxval", 9999)
    keep = (v >= lo) & (v <= hi)
    if (~keep).any():  # say which were dropped and why
        first = "rlnMicrographName" if "rlnMicrographName" in table else table.columns[0]
        dropped = ", ".join(
            f"{n} ({x:g})" for n, x in zip(table.loc[~keep, first][:5], v[~keep][:5], strict=True)
        )
        _job_log(
            f"kept {int(keep.sum())} of {len(table)} {name}: {label} outside [{lo:g}, {hi:g}] "
            f"for {int((~keep).sum())}: {dropped}{' ...' if (~keep).sum() > 5 else ''}"
        )
    blocks[name] = table[keep].reset_index(drop=True)
    target = out / f"{name}.star"
    write_star(blocks, target)
    if name == "micrographs":
        return [(str(target), "MicrographGroupMetadata.star.relion")]
    return [(str(target), "ParticleGroupMetadata.star.relion")]


def _job_log(line: str) -> None:
    """A job's progress lines, to its run.out (the job process's stdout), as RELION writes them."""
    print(line, flush=True)


_EXTERNAL_INPUTS = (("in_mov", "--in_movies"), ("in_mic", "--in_mics"), ("in_part", "--in_parts"),
                    ("in_coords", "--in_coords"), ("in_3dref", "--in_3dref"),
                    ("in_mask", "--in_mask"))  # fmt: skip


def _die_with_parent(parent: int) -> None:  # pragma: no cover - in the child, before exec
    """Linux: the External program gets SIGKILL when the job process dies (killed, out of
    memory), instead of running on, orphaned, beside the job's next run."""
    import ctypes
    import signal
    import sys

    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before prctl: do not start
        os._exit(1)


def _run_external(job: JobStar, out: Path) -> Nodes | None:
    """RELION's External job: ``fn_exe --in_xxx ... --o <job dir> --<label> <value> ... --j N``;
    the program declares its outputs in ``RELION_OUTPUT_NODES.star`` itself. An abort request
    (``RELION_JOB_ABORT_NOW``) stops it."""
    import shlex
    import subprocess
    import time

    from tamis.pipeline.job import ABORT_NOW

    o = job.options
    if not o.get("fn_exe"):
        raise TamisError("fn_exe: give the program to run")
    cmd = shlex.split(o["fn_exe"])
    for key, flag in _EXTERNAL_INPUTS:
        if o.get(key):
            cmd += [flag, o[key]]
    cmd += ["--o", str(out).rstrip("/") + "/"]
    for i in range(1, 11):
        label = o.get(f"param{i}_label", "")
        if label:
            cmd += [f"--{label}", o.get(f"param{i}_value", "")]
    cmd += ["--j", str(int(_f(job, "nr_threads", 1)))]
    with open(out / "run.out", "a") as so, open(out / "run.err", "a") as se:
        try:
            proc = subprocess.Popen(
                cmd,
                stdout=so,
                stderr=se,
                preexec_fn=functools.partial(_die_with_parent, os.getpid()),
            )
        except OSError as exc:
            raise TamisError(f"fn_exe {o['fn_exe']!r}: cannot run ({exc.strerror})") from None
        while proc.poll() is None:
            if (out / ABORT_NOW).exists():
                proc.terminate()
                proc.wait(10)
                raise TamisError("RELION_JOB_ABORT_NOW: aborted on request")
            time.sleep(0.2)
    if proc.returncode != 0:
        raise TamisError(f"{o['fn_exe']} exited with status {proc.returncode}")
    return None  # outputs: the program's own RELION_OUTPUT_NODES.star


def _run_log(job: JobStar, out: Path) -> Nodes:
    from tamis.pick.jobs import PickJob, micrograph_inputs, run_picker
    from tamis.pick.log import LogOptions, pick_log

    o = job.options
    opts = LogOptions(
        _f(job, "log_diam_min", 200), _f(job, "log_diam_max", 250), _f(job, "log_adjust_thr", 0),
        _f(job, "log_upper_thr", 999), job.get_bool("log_invert"), 1.0, _f(job, "log_maxres", 20),
    )  # fmt: skip
    angpix = _f(job, "angpix", -1)
    ms = micrograph_inputs([o["fn_input_autopick"]], angpix if angpix > 0 else None)
    run_picker(
        ms,
        out,
        lambda m, _k: pick_log(m, opts),
        PickJob(
            diameter=opts.diameter_max,
            edge=_f(job, "tamis_edge", 0),
            only_do_unfinished=job.is_continue,
        ),  # fmt: skip
        log=_job_log,
        workers=_workers(job),
    )
    return [(str(out / "autopick.star"), "MicrographCoordsGroup.star.relion.autopick")]


def _run_deep(job: JobStar, out: Path) -> Nodes:
    from tamis.pick.deep.predict import DeepPicker, load_model
    from tamis.pick.jobs import PickJob, micrograph_inputs, run_picker

    o = job.options
    diameter = _f(job, "topaz_particle_diameter", -1)
    if diameter <= 0:
        raise TamisError("topaz_particle_diameter: give the particle diameter (A)")
    model, meta = load_model(o.get("topaz_model") or None)
    picker = DeepPicker.from_model(model, meta, diameter)
    n = int(_f(job, "topaz_nr_particles", -1))
    ms = micrograph_inputs([o["fn_input_autopick"]])
    run_picker(
        ms,
        out,
        lambda m, _k: picker.pick(m),
        PickJob(
            diameter=diameter,
            expected=n if n > 0 else None,
            edge=_f(job, "tamis_edge", 0),
            only_do_unfinished=job.is_continue,
        ),  # fmt: skip
        log=_job_log,
        workers=_workers(job),
    )
    return [(str(out / "autopick.star"), "MicrographCoordsGroup.star.relion.autopick")]


def _run_autopick(job: JobStar, out: Path) -> Nodes:
    """RELION's autopick job: the options choose the picker (``do_topaz`` -> tamis's deep picker,
    else ``do_log`` -> LoG), whatever the label says, as RELION relabels the job from them."""
    if job.get_bool("do_topaz"):
        return _run_deep(job, out)
    if job.get_bool("do_log"):
        return _run_log(job, out)
    raise TamisError(
        "autopick: set do_log or do_topaz (template picking runs as 'tamis pick template')"
    )


def _run_extract(job: JobStar, out: Path) -> Nodes:
    from tamis.extract import ExtractOptions, extract_particles

    o = job.options
    size = int(_f(job, "extract_size", 128))
    rescale = int(_f(job, "rescale", size)) if job.get_bool("do_rescale") else None
    bg = _f(job, "bg_diameter", -1)
    opts = ExtractOptions(
        extract_size=size,
        rescale=rescale,
        norm=job.get_bool("do_norm", True),
        bg_radius=bg / 2 if bg > 0 else None,
        invert_contrast=job.get_bool("do_invert", True),
        float16=job.get_bool("do_float16", True),
        minimum_pick_fom=_f(job, "minimum_pick_fom", 0)
        if job.get_bool("do_fom_threshold")
        else None,
        recenter=job.get_bool("do_recenter"),
        only_do_unfinished=job.is_continue,
    )
    coords = o["fndata_reextract"] if job.get_bool("do_reextract") else o["coords_suffix"]
    star = extract_particles(o["star_mics"], coords, out, opts, log=_job_log, workers=_workers(job))
    return [(str(star), "ParticleGroupMetadata.star.relion")]


def _refine_other_args(text: str, what: str = "2D classification") -> dict[str, object]:
    """RELION's ``other_args`` of a ``relion_refine`` job (2D classification, initial model,
    auto-refine): ``--random_seed N`` (RELION seeds from the clock otherwise) and tamis's
    ``--offset_prior angst|relion`` are applied; RELION's performance flags, which do not change
    results (``--pool``, ``--dont_combine_weights_via_disc``, ``--preread_images``,
    ``--scratch_dir``, ``--gpu``, ``--j``), are accepted and ignored; anything else is an
    error, not silently dropped."""
    import shlex

    words = shlex.split(text or "")
    out: dict[str, object] = {}
    with_value = {"--pool", "--scratch_dir", "--j", "--gpu"}
    switches = {
        "--dont_combine_weights_via_disc",
        "--preread_images",
        "--gpu",
        "--no_parallel_disc_io",
    }
    i = 0
    while i < len(words):
        w = words[i]
        if w == "--random_seed" and i + 1 < len(words):
            try:
                seed = int(words[i + 1])
            except ValueError:
                raise TamisError(
                    f"other_args: --random_seed {words[i + 1]!r} is not an integer"
                ) from None
            out["random_seed"] = seed if seed >= 0 else None  # RELION: -1 is the clock
            i += 2
        elif w == "--offset_prior" and i + 1 < len(words):  # tamis's own (README)
            out["offset_prior"] = words[i + 1]
            i += 2
        elif w in with_value and i + 1 < len(words) and not words[i + 1].startswith("--"):
            i += 2
        elif w in switches:
            i += 1
        else:
            raise TamisError(f"other_args: {w!r} is not supported by tamis's {what}")
    return out


def _run_class2d(job: JobStar, out: Path) -> Nodes:
    from tamis.class2d import Class2DOptions, run_class2d

    grad = job.get_bool("do_grad", True) and not job.get_bool("do_em")
    common = dict(
        K=int(_f(job, "nr_classes", 1)),
        tau2_fudge=_f(job, "tau_fudge", 2),
        particle_diameter=_f(job, "particle_diameter", 200),
        zero_mask=job.get_bool("do_zero_mask", True),
        ctf=job.get_bool("do_ctf_correction", True),
        ctf_intact_first_peak=job.get_bool("ctf_intact_first_peak"),
        strict_highres_exp=_f(job, "highres_limit", -1),
        center_classes=job.get_bool("do_center", True),
        psi_step=2 * _f(job, "psi_sampling", 6),
        offset_range=_f(job, "offset_range", 5),
        offset_step=2 * _f(job, "offset_step", 1),
        j=int(_f(job, "nr_threads", 1)),
        pipeline_control=out,
    )
    common.update(_refine_other_args(job.options.get("other_args", "")))
    if grad:
        options = Class2DOptions.gui_vdam(iter=int(_f(job, "nr_iter_grad", 200)), **common)
    else:
        options = Class2DOptions.gui_em(iter=int(_f(job, "nr_iter_em", 25)), **common)
    if job.is_continue and job.options.get("fn_cont"):
        result = run_class2d(
            None,
            str(out / "run"),
            options,
            continue_from=job.options["fn_cont"],
            log=_job_log,
        )
    else:
        result = run_class2d(job.options["fn_img"], str(out / "run"), options, log=_job_log)
    return [
        (str(result.optimiser), "OptimiserData.star.relion.class2d"),
        (str(result.data), "ParticleGroupMetadata.star.relion.class2d"),
    ]


def _run_inimodel(job: JobStar, out: Path) -> Nodes:
    """RELION's InitialModel job: VDAM in C1 (or in the group with do_run_C1 No), the largest
    class aligned to ``sym_name`` into ``initial_model.mrc``."""
    from tamis.refine.initial_model import InitialModelOptions, run_initial_model

    sym = job.options.get("sym_name", "C1") or "C1"
    in_c1 = job.get_bool("do_run_C1", True)
    options = InitialModelOptions(
        K=int(_f(job, "nr_classes", 1)),
        iter=int(_f(job, "nr_iter", 200)),
        tau2_fudge=_f(job, "tau_fudge", 4),
        sym="C1" if in_c1 else sym,
        particle_diameter=_f(job, "particle_diameter", 200),
        zero_mask=job.get_bool("do_zero_mask", True),
        flatten_solvent=job.get_bool("do_solvent", True),
        ctf=job.get_bool("do_ctf_correction", True),
        ctf_intact_first_peak=job.get_bool("ctf_intact_first_peak"),
        j=int(_f(job, "nr_threads", 1)),
        pipeline_control=out,
        **_refine_other_args(job.options.get("other_args", ""), "initial model"),
    )
    cont = job.options.get("fn_cont") if job.is_continue else None
    result = run_initial_model(
        None if cont else job.options["fn_img"],
        str(out / "run"),
        options,
        initial_model_sym=sym if in_c1 else None,
        continue_from=cont or None,
        log=_job_log,
    )
    nodes: Nodes = [(str(result.initial_model), "DensityMap.mrc.relion.initialmodel")]
    if options.K > 1:
        it = result.run.iteration
        nodes += [
            (f"{out}/run_it{it:03d}_class{k + 1:03d}.mrc", "DensityMap.mrc.relion.initialmodel")
            for k in range(options.K)
        ]
    nodes.append((str(result.run.optimiser), "OptimiserData.star.relion.initialmodel"))
    return nodes


#: RELION's GUI angular samplings (the oversampled step) in menu order: entry i is HEALPix order
#: i - 1 after one oversampling (``JobOption::getHealPixOrder``).
_GUI_SAMPLINGS = ("30", "15", "7.5", "3.7", "1.8", "0.9", "0.5", "0.2", "0.1")


def _healpix_order(job: JobStar, key: str, default: str) -> int:
    """The coarse HEALPix order for a GUI sampling such as ``7.5 degrees`` (one oversampling)."""
    text = (job.options.get(key) or default).split()[0]
    if text not in _GUI_SAMPLINGS:
        raise TamisError(f"{key} {text!r}: choose one of {', '.join(_GUI_SAMPLINGS)} degrees")
    return _GUI_SAMPLINGS.index(text)  # menu index (1-based) - 1 oversampling


def _run_refine3d(job: JobStar, out: Path) -> Nodes:
    """RELION's Refine3D job (``relion_refine --auto_refine --split_random_halves``): the final
    map, the unfiltered half maps and the refined particles."""
    from tamis.refine.auto_refine import AutoRefineOptions, run_auto_refine

    mask = job.options.get("fn_mask") or ""
    options = AutoRefineOptions(
        ref=job.options.get("fn_ref", ""),
        trust_ref_size=job.get_bool("trust_ref_size", True),
        # a reference not on the absolute grey scale: cross-correlation in iteration 1
        firstiter_cc=not job.get_bool("ref_correct_greyscale", True),
        ini_high=_f(job, "ini_high", 60),
        sym=job.options.get("sym_name", "C1") or "C1",
        particle_diameter=_f(job, "particle_diameter", 200),
        zero_mask=job.get_bool("do_zero_mask", True),
        ctf=job.get_bool("do_ctf_correction", True),
        ctf_intact_first_peak=job.get_bool("ctf_intact_first_peak"),
        pad=1 if job.get_bool("do_pad1") else 2,
        healpix_order=_healpix_order(job, "sampling", "7.5 degrees"),
        auto_local_healpix_order=_healpix_order(job, "auto_local_sampling", "1.8 degrees"),
        offset_range=_f(job, "offset_range", 5),
        offset_step=2 * _f(job, "offset_step", 1),  # the GUI's step is the oversampled one
        solvent_mask=mask,
        solvent_correct_fsc=bool(mask) and job.get_bool("do_solvent_fsc"),
        auto_ignore_angles=job.get_bool("auto_faster"),
        auto_resol_angles=job.get_bool("auto_faster"),
        iter=int(_f(job, "tamis_iter_max", 999)),
        j=int(_f(job, "nr_threads", 1)),
        pipeline_control=out,
        **_refine_other_args(job.options.get("other_args", ""), "auto-refine"),
    )
    cont = job.options.get("fn_cont") if job.is_continue else None
    result = run_auto_refine(
        None if cont else job.options["fn_img"],
        str(out / "run"),
        options,
        continue_from=cont or None,
        log=_job_log,
    )
    return [
        (str(result.data), "ParticleGroupMetadata.star.relion.refine3d"),
        (str(result.optimiser), "OptimiserData.star.relion.refine3d"),
        (str(result.half_maps[0]), "DensityMap.mrc.relion.halfmap.refine3d"),
        (str(result.map), "DensityMap.mrc.relion.refine3d"),
    ]


def _run_select_interactive(job: JobStar, out: Path) -> Nodes:
    """RELION's interactive class selection, with the choice written in the job's options
    (``tamis_selected_classes``: class numbers) by whoever chose (the web monitor)."""
    from tamis.rank.manual import write_class_selection

    classes = [
        int(c) for c in job.options.get("tamis_selected_classes", "").replace(",", " ").split()
    ]
    if not classes:
        raise TamisError("no classes chosen (tamis_selected_classes is empty)")
    n = write_class_selection(job.options["fn_model"], out, classes)
    _job_log(f"selected classes {' '.join(map(str, classes))}: {n} particles")
    return [(str(out / "particles.star"), "ParticleGroupMetadata.star.relion"),
            (str(out / "class_averages.star"), "Image2DGroupMetadata.star.relion.classaverages")]  # fmt: skip


def _run_rank(job: JobStar, out: Path) -> Nodes:
    from tamis.rank.screen import ScreenOptions
    from tamis.rank.select import RankOptions, rank_classes

    if not job.get_bool("do_class_ranker"):
        raise TamisError("only automatic 2D class selection (do_class_ranker Yes) is implemented")
    threshold = _f(job, "rank_threshold", -1)  # -1 (tamis): the model's recommended threshold
    opts = RankOptions(
        min_score=threshold if threshold >= 0 else None,
        select_min_nr_particles=int(_f(job, "select_nr_parts", -1)),
        select_min_nr_classes=int(_f(job, "select_nr_classes", -1)),
        model=job.options.get("tamis_ranker_model") or None,
        screen=ScreenOptions() if job.get_bool("tamis_particle_screen", True) else None,
    )
    rank_classes(job.options["fn_model"], out, opts, log=_job_log)
    return [
        (str(out / "particles.star"), "ParticleGroupMetadata.star.relion"),
        (str(out / "class_averages.star"), "Image2DGroupMetadata.star.relion.classaverages"),
        (str(out / "rank_optimiser.star"), "OptimiserData.star.relion.select"),
    ]


def _run_maskcreate(job: JobStar, out: Path) -> Nodes:
    """RELION's MaskCreate job (``relion_mask_create``): ``mask.mrc``."""
    from tamis.refine.automask import MaskOptions, create_mask_file

    opts = MaskOptions(
        lowpass=_f(job, "lowpass_filter", 15),
        ini_threshold=_f(job, "inimask_threshold", 0.02),
        extend_inimask=_f(job, "extend_inimask", 3),
        width_soft_edge=_f(job, "width_mask_edge", 3),
    )
    angpix = _f(job, "angpix", -1)
    create_mask_file(
        job.options["fn_in"], out / "mask.mrc", opts, angpix=angpix if angpix > 0 else None
    )
    return [(str(out / "mask.mrc"), "Mask3D.mrc.relion")]


def _run_postprocess(job: JobStar, out: Path) -> Nodes:
    """RELION's PostProcess job (``relion_postprocess``): sharpened maps, FSC and Guinier
    tables in ``postprocess.star``, the FSC plot as ``postprocess_fsc.png``."""
    from tamis.refine.postprocess import PostprocessOptions, run_postprocess

    skip = job.get_bool("do_skip_fsc_weighting")
    opts = PostprocessOptions(
        auto_bfac=job.get_bool("do_auto_bfac", True),
        autob_lowres=_f(job, "autob_lowres", 10),
        adhoc_bfac=_f(job, "adhoc_bfac", -1000) if job.get_bool("do_adhoc_bfac") else 0.0,
        skip_fsc_weighting=skip,
        low_pass=_f(job, "low_pass", 5) if skip else 0.0,
    )
    angpix = _f(job, "angpix", -1)
    mask = job.options.get("fn_mask") or None
    run_postprocess(
        job.options["fn_in"],
        out / "postprocess",
        mask=mask,
        angpix=angpix if angpix > 0 else None,
        options=opts,
    )
    nodes: Nodes = [(str(out / "postprocess.mrc"), "DensityMap.mrc.relion.postprocess")]
    if mask:
        nodes.append(
            (str(out / "postprocess_masked.mrc"), "DensityMap.mrc.relion.postprocess.masked")
        )
    nodes.append((str(out / "postprocess.star"), "ProcessData.star.relion.postprocess"))
    return nodes


REGISTRY: dict[str, JobType] = {
    t.label: t
    for t in (
        JobType("relion.import", "Import", _run_import, {"do_raw": "Yes", "fn_in_raw": "Micrographs/*.mrc", "is_multiframe": "Yes", "optics_group_name": "opticsGroup1", "angpix": "1.4", "kV": "300", "Cs": "2.7", "Q0": "0.1", "do_other": "No"}),
        JobType("relion.motioncorr", "MotionCorr", _run_motioncorr, {"input_star_mics": "", "first_frame_sum": "1", "last_frame_sum": "-1", "dose_per_frame": "1", "pre_exposure": "0", "eer_grouping": "32", "do_float16": "Yes", "do_dose_weighting": "Yes", "do_save_noDW": "No", "do_save_ps": "Yes", "group_for_ps": "4", "bfactor": "150", "patch_x": "1", "patch_y": "1", "group_frames": "1", "bin_factor": "1", "fn_gain_ref": "", "gain_rot": "No rotation (0)", "gain_flip": "No flipping (0)", "fn_defect": "", "do_own_motioncor": "Yes", "other_args": ""}),
        JobType("relion.ctffind", "CtfFind", _run_ctffind, {"input_star_mics": "", "box": "512", "resmin": "30", "resmax": "5", "dfmin": "5000", "dfmax": "50000", "dfstep": "500", "do_phaseshift": "No"}),
        JobType("relion.select", "Select", _run_select_values, {"do_select_values": "No", "select_label": "rlnCtfMaxResolution", "select_minval": "-9999", "select_maxval": "9999"}),
        JobType("relion.select.onvalue", "Select", _run_select_values, {"do_select_values": "Yes", "select_label": "rlnCtfMaxResolution", "select_minval": "-9999", "select_maxval": "9999"}),
        JobType("relion.external", "External", _run_external, {"nr_threads": "1"}),
        JobType("relion.autopick.log", "AutoPick", _run_autopick, {"do_log": "Yes", "do_topaz": "No", "log_diam_min": "200", "log_diam_max": "250", "log_maxres": "20", "log_adjust_thr": "0", "log_upper_thr": "999"}),
        JobType("relion.autopick.topaz.pick", "AutoPick", _run_autopick, {"do_log": "No", "do_topaz": "Yes", "do_topaz_pick": "Yes", "topaz_particle_diameter": "-1", "topaz_nr_particles": "-1"}),
        JobType("relion.extract", "Extract", _run_extract, {"extract_size": "128", "do_invert": "Yes", "do_float16": "Yes", "do_norm": "Yes", "bg_diameter": "-1", "do_rescale": "No", "rescale": "128"}),
        JobType("relion.class2d", "Class2D", _run_class2d, {"nr_classes": "1", "tau_fudge": "2", "do_em": "No", "nr_iter_em": "25", "do_grad": "Yes", "nr_iter_grad": "200", "particle_diameter": "200", "do_zero_mask": "Yes", "highres_limit": "-1", "do_center": "Yes", "psi_sampling": "6", "offset_range": "5", "offset_step": "1", "do_ctf_correction": "Yes"}),
        JobType("relion.initialmodel", "InitialModel", _run_inimodel, {"nr_classes": "1", "nr_iter": "200", "tau_fudge": "4", "sym_name": "C1", "do_run_C1": "Yes", "particle_diameter": "200", "do_solvent": "Yes", "do_zero_mask": "Yes", "do_ctf_correction": "Yes"}),
        JobType("relion.refine3d", "Refine3D", _run_refine3d, {"fn_ref": "", "fn_mask": "", "ref_correct_greyscale": "Yes", "trust_ref_size": "Yes", "ini_high": "60", "sym_name": "C1", "particle_diameter": "200", "do_zero_mask": "Yes", "do_ctf_correction": "Yes", "sampling": "7.5 degrees", "auto_local_sampling": "1.8 degrees", "offset_range": "5", "offset_step": "1", "do_solvent_fsc": "No", "auto_faster": "No", "do_pad1": "No"}),
        JobType("relion.maskcreate", "MaskCreate", _run_maskcreate, {"lowpass_filter": "15", "angpix": "-1", "inimask_threshold": "0.02", "extend_inimask": "3", "width_mask_edge": "3"}),
        JobType("relion.postprocess", "PostProcess", _run_postprocess, {"angpix": "-1", "do_auto_bfac": "Yes", "autob_lowres": "10", "do_adhoc_bfac": "No", "adhoc_bfac": "-1000", "do_skip_fsc_weighting": "No", "low_pass": "5"}),
        JobType("relion.select.interactive", "Select", _run_select_interactive, {"fn_model": "", "tamis_selected_classes": ""}),
        JobType("relion.select.class2dauto", "Select", _run_rank, {"do_class_ranker": "Yes", "rank_threshold": "-1", "select_nr_parts": "-1", "select_nr_classes": "-1"}),
    )
}  # fmt: skip


def job_type(label: str) -> JobType:
    """The registered type for ``label``, dropping trailing ``.xxx`` tokens until one fits."""
    parts = label.split(".")
    while parts:
        key = ".".join(parts)
        if key in REGISTRY:
            return REGISTRY[key]
        parts.pop()
    raise TamisError(f"job type {label!r} is not available in tamis (have {sorted(REGISTRY)})")


#: Job types whose work is shared over ranks by particles (``torchrun``, one rank per GPU).
RANKED = frozenset({"relion.class2d", "relion.initialmodel", "relion.refine3d"})
#: Job types whose work goes micrograph by micrograph (dask workers).
PER_MICROGRAPH = frozenset(
    {
        "relion.motioncorr",
        "relion.ctffind",
        "relion.autopick.log",
        "relion.autopick.topaz.pick",
        "relion.extract",
    }
)
EXECUTORS = ("auto", "local", "torchrun", "dask")
#: A running dask scheduler (``tcp://host:8786``) for every per-micrograph job of a session.
DASK_SCHEDULER_ENV = "TAMIS_DASK_SCHEDULER"


def executor(job: JobStar) -> tuple[str, int]:
    """How a job runs: ``("local", 1)``, ``("torchrun", ranks)`` or ``("dask", workers)``.

    ``tamis_executor`` (job option) names it; ``auto`` (the default) follows RELION's
    ``nr_mpi``: more than one MPI process means that many ``torchrun`` ranks for the jobs that
    share particles (2D, initial model, auto-refine) and that many dask workers for the jobs that
    go micrograph by micrograph; other jobs run as one process. With ``TAMIS_DASK_SCHEDULER``
    set (a running dask scheduler's address, its workers started once for a session), the
    micrograph jobs go to it whatever ``nr_mpi`` says."""
    label = job_type(job.type_label).label
    name = (job.options.get("tamis_executor") or "auto").strip().lower()
    if name not in EXECUTORS:
        raise TamisError(f"tamis_executor {name!r}: expected one of {', '.join(EXECUTORS)}")
    n = int(_f(job, "nr_mpi", 1))
    if n < 1:
        raise TamisError(f"nr_mpi {n}: must be at least 1")
    if name == "auto":
        if label in PER_MICROGRAPH and os.environ.get(DASK_SCHEDULER_ENV):
            return "dask", n  # the session's dask workers, started once
        if n <= 1:
            return "local", 1
        name = "torchrun" if label in RANKED else "dask" if label in PER_MICROGRAPH else "local"
    if name == "torchrun" and label not in RANKED:
        raise TamisError(f"tamis_executor torchrun: {label} jobs do not run over ranks")
    if name == "dask" and label not in PER_MICROGRAPH:
        raise TamisError(f"tamis_executor dask: {label} jobs do not go micrograph by micrograph")
    return name, (1 if name == "local" else n)


def job_command(job: JobStar, name: str) -> list[str]:
    """The command that runs job directory ``name`` on this machine, from the project directory:
    one process, or ``torchrun --standalone`` with the job's ranks."""
    import sys

    kind, n = executor(job)
    if kind == "torchrun":
        from tamis import distributed

        return distributed.launch_command(n, "tamis.pipeline.execute", [name])
    return [sys.executable, "-m", "tamis.pipeline.execute", name]


def run_job(job_dir: str | Path) -> str:
    """Run the job in ``job_dir`` (its ``job.star``); returns the final status. Writes
    ``RELION_OUTPUT_NODES.star`` and ``RELION_JOB_EXIT_SUCCESS``/``FAILURE``/``ABORTED``; the
    traceback or error goes to ``run.err``. Under ``torchrun`` only rank 0 does so; the other
    ranks compute, add their errors to ``run.err`` and return their status."""
    from tamis import distributed

    # <project>/<Type>/jobNNN/, taken apart lexically; checked before anything is written there
    lexical = Path(os.path.abspath(job_dir))
    checked_job_dir(lexical.parent.parent, f"{lexical.parent.name}/{lexical.name}")
    d = Path(job_dir)  # as given: outputs are named relative to the project, as RELION does
    job = JobStar.read(d)
    main = distributed.is_main()
    if main:
        clear_markers(d)
    jt = job_type(job.type_label)
    merged = JobStar(job.type_label, job.is_continue, job.is_tomo, {**jt.defaults, **job.options})
    status = "Succeeded"
    from tamis.io.paths import confined_to

    allow = merged.get_bool("tamis_allow_outside")
    who = "" if main else f"rank {os.environ.get('RANK')}: "
    with open(d / "run.err", "a") as err, confined_to(lexical.parent.parent, allow):
        try:
            nodes = jt.run(merged, d)
            if nodes is not None and main:
                write_output_nodes(d, nodes)
        except TamisError as exc:
            status = "Aborted" if "ABORT_NOW" in str(exc) else "Failed"
            err.write(f"{who}error: {exc}\n")
        except Exception as exc:
            status = "Failed"
            if is_out_of_memory(exc):  # the machine's limit, not a bug: one line
                err.write(f"{who}error: {out_of_memory_error(exc)}\n")
            else:  # a bug: keep the traceback for the report
                err.write(who + traceback.format_exc())
    if not main:
        return status
    for marker in EXIT_MARKERS.values():
        with contextlib.suppress(FileNotFoundError):
            (d / marker).unlink()
    (d / EXIT_MARKERS[status]).touch()
    return status
