"""Cluster submission as RELION's "Submit to queue" (``do_queue``): ``run_submit.script`` in the job
directory from the template ``qsubscript`` with RELION's ``XXX...XXX`` placeholders replaced,
submitted with the ``qsub`` command (``sbatch`` for SLURM).

Placeholders (``RelionJob::saveJobSubmissionScript``): ``XXXmpinodesXXX`` (nr_mpi),
``XXXthreadsXXX`` (nr_threads), ``XXXcoresXXX`` (mpi x threads), ``XXXdedicatedXXX``
(min_dedicated), ``XXXnodesXXX`` (ceil(cores / dedicated)), ``XXXnameXXX`` (the job directory,
``Class2D/job012/``), ``XXXerrfileXXX``/``XXXoutfileXXX`` (its run.err/run.out),
``XXXqueueXXX`` (queuename), ``XXXextra1XXX``... (``qsub_extra1``...; as many as
``RELION_QSUB_EXTRA_COUNT``, default 2) and ``XXXcommandXXX`` (the command that runs the job:
``python -m tamis.pipeline.execute <job dir>``, from the project directory). The queue learns
nothing else: the job's outcome is its exit marker, as for local jobs.
"""

from __future__ import annotations

import math
import os
import shlex
import subprocess
import sys
from pathlib import Path

from tamis.errors import TamisError
from tamis.pipeline.job import JobStar

__all__ = ["submission_script", "submit", "queue_command"]


def _int(job: JobStar, key: str, default: int) -> int:
    v = job.options.get(key, "")
    try:
        return int(float(v)) if v not in ("", None) else default
    except ValueError:
        raise TamisError(f"{key} {v!r}: not a number") from None


def submission_script(job: JobStar, name: str, project: str | Path) -> str:
    """The text of ``run_submit.script`` for job directory ``name`` (``Class2D/job012/``)."""
    template = job.options.get("qsubscript", "")
    path = Path(template)
    if not path.is_absolute():
        path = Path(project) / path
    if not template or not path.is_file():
        raise TamisError(f"qsubscript {template!r}: submission script template not found")
    name = name.rstrip("/") + "/"
    nmpi = _int(job, "nr_mpi", 1)
    nthr = _int(job, "nr_threads", 1)
    ndedi = _int(job, "min_dedicated", 1)
    if ndedi < 1:
        raise TamisError(f"min_dedicated {ndedi}: must be at least 1")
    cores = nmpi * nthr
    replace = {
        "XXXmpinodesXXX": str(nmpi),
        "XXXthreadsXXX": str(nthr),
        "XXXcoresXXX": str(cores),
        "XXXdedicatedXXX": str(ndedi),
        "XXXnodesXXX": str(math.ceil(cores / ndedi)),
        "XXXnameXXX": name,
        "XXXerrfileXXX": f"{name}run.err",
        "XXXoutfileXXX": f"{name}run.out",
        "XXXqueueXXX": job.options.get("queuename", ""),
    }
    for i in range(1, int(os.environ.get("RELION_QSUB_EXTRA_COUNT", "2")) + 1):
        if f"qsub_extra{i}" in job.options:
            replace[f"XXXextra{i}XXX"] = job.options[f"qsub_extra{i}"]
    command = f"cd {shlex.quote(str(Path(project).resolve()))} && " + queue_command(job, name)
    lines = []
    for line in path.read_text().splitlines():
        for key, value in replace.items():
            line = line.replace(key, value)
        lines.append(line.replace("XXXcommandXXX", command))
    return "\n".join(lines) + "\n\n"


def queue_command(job: JobStar, name: str) -> str:
    """The shell command a submission script runs for job directory ``name``.

    One process, or for a job with ``torchrun`` ranks (``nr_mpi`` of them) one ``torchrun``
    agent per node, as in PyTorch's multi-node recipe: the template starts it on each node
    (``srun --ntasks-per-node=1 bash -c "XXXcommandXXX"``) and sets ``TAMIS_RDZV_ENDPOINT`` to
    the first node's ``host:port``; the ranks are spread evenly over ``SLURM_NNODES`` (1 outside
    SLURM) and meet through torch's c10d rendezvous, named by ``SLURM_JOB_ID``."""
    from tamis.pipeline.jobs import executor

    kind, n = executor(job)
    python = shlex.quote(sys.executable)
    if kind != "torchrun":
        return f"{python} -m tamis.pipeline.execute {shlex.quote(name)}"
    return (
        f"{python} -m torch.distributed.run --nnodes=${{SLURM_NNODES:-1}} "
        f"--nproc-per-node=$(( {n} / ${{SLURM_NNODES:-1}} )) --rdzv-backend=c10d "
        f"--rdzv-endpoint=${{TAMIS_RDZV_ENDPOINT:-localhost:29500}} "
        f"--rdzv-id=${{SLURM_JOB_ID:-tamis}} -m tamis.pipeline.execute {shlex.quote(name)}"
    )


def submit(job: JobStar, name: str, project: str | Path) -> str:
    """Write ``<job dir>/run_submit.script`` and submit it with the ``qsub`` command; returns what
    the command printed (SLURM: ``Submitted batch job N``)."""
    project = Path(project)
    script = project / name / "run_submit.script"
    script.write_text(submission_script(job, name, project))
    qsub = job.options.get("qsub", "sbatch") or "sbatch"
    try:
        done = subprocess.run(
            [*shlex.split(qsub), str(script.relative_to(project))],
            cwd=project,
            capture_output=True,
            text=True,
            timeout=120,
        )
    except FileNotFoundError:
        raise TamisError(f"qsub {qsub!r}: command not found") from None
    if done.returncode != 0:
        raise TamisError(f"{qsub} {script}: failed ({done.stderr.strip() or done.returncode})")
    return done.stdout.strip()
