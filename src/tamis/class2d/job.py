"""A 2D classification job around the E/M engine: pick the run class (EM or VDAM), join
torchrun's ranks, keep RELION's pipeliner markers, iterate and log, write the files.

:func:`run_class2d` is ``relion_refine`` for 2D; :func:`ranked_job` and
:func:`pipeline_control` also serve the 3D jobs (initial model, auto-refine). Kept apart from
:mod:`tamis.class2d.em` so that the engine and its VDAM subclass
(:mod:`tamis.class2d.vdam`) do not import each other.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from pathlib import Path

from tamis import distributed
from tamis._malloc import keep_freed_memory
from tamis.class2d.em import Class2DResult, Class2DRun, JobAborted, choose_device
from tamis.class2d.files import IterationFiles, continued_options, read_continue
from tamis.class2d.state import Class2DOptions
from tamis.class2d.vdam import VdamRun
from tamis.errors import TamisError
from tamis.io.mrc import write_mrc
from tamis.io.particles import ParticleSet

__all__ = ["pipeline_control", "ranked_job", "run_class2d"]


@contextlib.contextmanager
def pipeline_control(directory: str | Path | None):
    """RELION's pipeliner markers around a job run in ``directory`` (None: not under the
    pipeliner): stale exit markers removed first; yields the check for
    ``RELION_JOB_ABORT_NOW``; ``RELION_JOB_EXIT_SUCCESS`` after a normal end, ``_ABORTED`` after
    an abort (raised again as one error line) and ``_FAILURE`` after any other exception."""
    control = Path(directory) if directory else None
    if control is not None:
        control.mkdir(parents=True, exist_ok=True)
        for marker in ("SUCCESS", "FAILURE", "ABORTED"):
            (control / f"RELION_JOB_EXIT_{marker}").unlink(missing_ok=True)

    def mark(marker: str) -> None:
        if control is not None:
            (control / f"RELION_JOB_EXIT_{marker}").touch()

    try:
        yield lambda: control is not None and (control / "RELION_JOB_ABORT_NOW").exists()
    except JobAborted:
        mark("ABORTED")
        raise TamisError("aborted (RELION_JOB_ABORT_NOW)") from None
    except BaseException:
        mark("FAILURE")
        raise
    mark("SUCCESS")


def _run_class(options: Class2DOptions) -> type[Class2DRun]:
    """The run class of ``options``' algorithm: VDAM with ``--grad``, else EM."""
    return VdamRun if options.grad else Class2DRun


def run_class2d(
    particles_path: str | Path | None,
    output_root: str,
    options: Class2DOptions,
    *,
    continue_from: str | Path | None = None,
    changed: frozenset[str] | set[str] = frozenset(),
    log: Callable[[str], None] = print,
    show_progress: bool = False,
    run_type: type[Class2DRun] | None = None,
) -> Class2DResult:
    """Run 2D classification (``relion_refine`` for 2D: EM, or VDAM with ``options.grad``) and
    write RELION's files.

    ``particles_path`` is a particles STAR or cryoSPARC ``.cs`` file (ignored with
    ``continue_from``, which reads the data.star named in the optimiser file). On continue the
    optimiser file's options are used, except runtime options (iterations, device, threads...)
    and the fields named in ``changed``, which come from ``options``. ``run_type`` replaces the
    run class (the 3D initial model drives its :class:`Class2DRun` subclass through here).
    """
    with ranked_job(options, log, show_progress) as (ranks, abort_requested, log, show_progress):
        return _iterate(
            particles_path, output_root, options, continue_from, changed, log, show_progress,
            run_type, ranks, abort_requested,
        )  # fmt: skip


@contextlib.contextmanager
def ranked_job(options, log: Callable[[str], None], show_progress: bool):
    """A run of the E/M engine, alone or as one of torchrun's ranks: joins the process group
    (:func:`tamis.distributed.session`), sets up the pipeliner's markers on rank 0
    (:func:`pipeline_control`) and silences the other ranks. Yields ``(ranks, abort check, log,
    show_progress)``. The process keeps the memory it frees for the next batch
    (:func:`tamis._malloc.keep_freed_memory`: the 3D engine's batches allocate large
    temporaries, and fresh pages cost more than its arithmetic on a VM)."""
    keep_freed_memory()
    with contextlib.ExitStack() as stack:
        ranks = stack.enter_context(distributed.session(choose_device(options.device)))
        main = ranks.rank == 0
        # rank 0 alone writes files, exit markers and the log
        abort_requested = stack.enter_context(
            pipeline_control(options.pipeline_control if main else None)
        )
        if not main:
            log, show_progress = _silent, False
        yield ranks, abort_requested, log, show_progress


def _silent(text: str) -> None:
    pass


def _iterate(
    particles_path, output_root, options, continue_from, changed, log, show_progress, run_type,
    ranks: distributed.Ranks, abort_requested: Callable[[], bool],
) -> Class2DResult:  # fmt: skip
    """:func:`run_class2d`'s body, inside :func:`ranked_job`."""
    main = ranks.rank == 0
    parallel = ranks.size > 1
    if continue_from is not None:
        cont_opt = read_continue(continue_from)
        data_path = cont_opt.data_path
        root = output_root or cont_opt.root
        ps = ParticleSet.from_file(data_path)
        options = continued_options(cont_opt, options, changed)
        cls = run_type or _run_class(options)
        run = cls(ps, options, root, log=log, show_progress=show_progress)
        run.load_continue(continue_from)
        start = run.state.iteration + 1
    else:
        if particles_path is None:
            raise TamisError("--i is required (or --continue)")
        ps = ParticleSet.from_file(particles_path)
        run = (run_type or _run_class(options))(
            ps, options, output_root, log=log, show_progress=show_progress
        )
        run.seed = distributed.broadcast_object(run.seed)  # a seed from the clock: rank 0's
        run.initialise()
        distributed.broadcast_tensors(run.state)
        run.current_size = run.sizes()[0]
        run.write(0)  # every rank: rank 0 writes, the others format their rows
        start = 1
    Path(run.root).parent.mkdir(parents=True, exist_ok=True)
    files = IterationFiles(run.root, start - 1)
    evaluated = 0
    for it in range(start, options.iter + 1):
        t0 = time.perf_counter()
        # under torchrun one check for all ranks at the start of each iteration (a rank that
        # stopped alone would leave the others waiting for its sums)
        if parallel and distributed.any_flag(main and abort_requested()):
            raise JobAborted
        changes = run.iterate(it, abort=None if parallel else abort_requested)
        batch = getattr(run, "subset", run.n)
        evaluated += batch
        unmasked = run.post_process(it)
        distributed.broadcast_tensors(run.state)
        if not options.grad and main:  # RELION writes unmasked classes for EM only
            write_mrc(Path(f"{run.root}_unmasked_classes.mrcs"), unmasked.cpu().numpy(), run.pixel)
        if run.writes(it):
            files = run.write(it, changes)
        st = run.state
        frac = st.pdf_class.cpu().numpy()
        nonempty = int((frac >= 0.005).sum())
        grad = ""
        if options.grad:
            grad = f"{batch} particles, step {run.schedule.step_size(it):.2f}, T {run.tau2_fudge_at(it):.2f}, "
        log(
            f"iteration {it:3d}: {grad}resolution {run.box * run.pixel / max(st.maxres, 1):6.1f} A, "
            f"size {run.current_size}, {nonempty}/{len(frac)} classes with >= 0.5%, largest "
            f"{frac.max():.1%}, class changes {changes[2]:.1%}, pmax {st.avg_pmax:.2f}, "
            f"{batch / (time.perf_counter() - t0):,.0f} particles/s"
        )
    st = run.state
    return Class2DResult(
        optimiser=files.optimiser,
        model=files.model,
        data=files.data,
        classes=files.classes if run.space.ndim == 2 else files.class_map(1),
        iteration=st.iteration,
        resolution=run.box * run.pixel / max(st.maxres, 1),
        class_fractions=st.pdf_class.cpu().numpy(),
        particles_evaluated=evaluated,
    )
