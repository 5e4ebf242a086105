"""A RELION project directory: schedule jobs into ``default_pipeline.star``, run them (in this
process or as a local background process), and record their outcome as RELION's pipeliner does.

The pipeline file is edited under a lock directory ``.relion_lock/`` holding
``lock_default_pipeline.star``; the lock records host, pid and time, and a lock whose process is
gone is taken over with a warning (RELION's lock is a bare file that a crash leaves behind).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tamis.errors import TamisError
from tamis.pipeline.job import (
    EXIT_MARKERS,
    JobStar,
    checked_job_dir,
    clear_markers,
    exit_status,
    read_output_nodes,
    touch_node_marker,
)
from tamis.pipeline.jobs import executor, job_command, job_type, run_job
from tamis.pipeline.star import Node, Pipeline, Process

__all__ = ["Project", "process_alive", "job_process_alive", "JOB_PROCESS"]

#: In a job directory run by the local background runner: host and pid of its process.
JOB_PROCESS = ".tamis_job_process.json"


def job_process_alive(job_dir: str | Path) -> bool:
    """Whether the local process recorded for this job directory still runs."""
    path = Path(job_dir) / JOB_PROCESS
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return process_alive(str(info.get("host", "")), int(info.get("pid", -1)))


def process_alive(host: str, pid: int) -> bool:
    """Whether ``pid`` still runs (only decidable on this host; other hosts count as alive)."""
    if host != socket.gethostname():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (exited, not reaped: e.g. no init reaping in a container) is gone
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _remove_lock(path: Path) -> None:
    if path.exists():
        for entry in path.iterdir():
            entry.unlink(missing_ok=True)
        path.rmdir()


@contextmanager
def lock_dir(path: Path, *, retries: int = 20, wait: float = 3.0) -> Iterator[None]:
    """A crash-safe lock: ``mkdir path`` plus ``path/owner.json`` (host, pid, time). A lock whose
    owner process is gone is removed with a warning."""
    owner = path / "owner.json"
    for _ in range(retries):
        try:
            path.mkdir(parents=True)
            owner.write_text(
                json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "time": time.time()})
            )
            break
        except FileExistsError:
            try:
                info = json.loads(owner.read_text())
            except (OSError, ValueError):
                info = None
            if info is None or not process_alive(info.get("host", ""), int(info.get("pid", -1))):
                warnings.warn(
                    f"{path}: taking over a lock left by a process that is gone ({info})",
                    stacklevel=2,
                )
                _remove_lock(path)
                continue
            time.sleep(wait)
    else:
        raise TamisError(f"{path}: locked by another process; remove it if that process is gone")
    try:
        yield
    finally:
        _remove_lock(path)


class Project:
    """``root`` holds ``default_pipeline.star`` and the job directories."""

    def __init__(self, root: str | Path = ".", name: str = "default") -> None:
        self.root = Path(root)
        self.pipeline_file = self.root / f"{name}_pipeline.star"
        self.lock_path = self.root / ".relion_lock" / f"lock_{name}_pipeline.star"

    @contextmanager
    def edit(self) -> Iterator[Pipeline]:
        """Read the pipeline under the lock, yield it, write it back."""
        with lock_dir(self.lock_path):
            pipe = Pipeline.read(self.pipeline_file) if self.pipeline_file.exists() else Pipeline()
            yield pipe
            pipe.write(self.pipeline_file)

    def read(self) -> Pipeline:
        return Pipeline.read(self.pipeline_file) if self.pipeline_file.exists() else Pipeline()

    def schedule(self, type_label: str, options: dict[str, str], *, alias: str = "None") -> Process:
        """Create ``<Type>/jobNNN/`` with its ``job.star`` and add it as Scheduled. Options naming
        existing pipeline nodes (or files) become its input edges."""
        jt = job_type(type_label)
        with self.edit() as pipe:
            inputs = {}
            for value in options.values():
                for token in str(value).split():
                    if token in pipe.nodes:
                        inputs[token] = pipe.nodes[token].type_label
            proc = pipe.add_process(jt.dirname, type_label, inputs=inputs, alias=alias)
        d = checked_job_dir(self.root, proc.name)
        d.mkdir(parents=True, exist_ok=True)
        JobStar(type_label, options={**jt.defaults, **options}).write(d)
        return proc

    def run(
        self, name: str, *, background: bool = False, is_continue: bool = False
    ) -> str | subprocess.Popen | None:
        """Run a scheduled (or, with ``is_continue``, an earlier) job: status Running, then the job
        in this process (returns its final status), in a background process (returns it), or,
        when its options say ``do_queue Yes``, submitted to the queue (returns None);
        :meth:`check` records the outcome of the last two."""
        d = checked_job_dir(self.root, name)
        job = JobStar.read(d)
        job.is_continue = is_continue
        job.write(d)
        clear_markers(d)
        with self.edit() as pipe:
            proc = pipe.process(name)
            if proc is None:
                raise TamisError(f"{self.pipeline_file}: no job {name}")
            proc.status = "Running"
        with open(d / "note.txt", "a") as note:
            note.write(
                f"++++ Executing new job on {time.ctime()}\n++++ tamis job run {name}\n++++\n"
            )
        if job.get_bool("do_queue"):
            from tamis.pipeline.queue import submit

            reply = submit(job, name, self.root)
            with open(d / "note.txt", "a") as note:
                note.write(f"++++ submitted: {reply}\n")
            return None
        kind, n = executor(job)
        if background or kind == "torchrun":
            out = open(d / "run.out", "a")  # noqa: SIM115 - handed to the child process
            child = subprocess.Popen(
                job_command(job, name),
                cwd=self.root,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
            (d / JOB_PROCESS).write_text(
                json.dumps({"host": socket.gethostname(), "pid": child.pid, "time": time.time()})
            )
            if background:
                return child
            child.wait()  # the ranks of a torchrun job, in the foreground
            out.close()
            if exit_status(d) is None:  # the ranks died without a marker
                (d / EXIT_MARKERS["Failed"]).touch()
            return self.check()[name]
        cwd = Path.cwd()
        os.chdir(self.root)
        try:  # the job's progress lines go to its run.out, as in a background run
            with open(d / "run.out", "a") as out, contextlib.redirect_stdout(out):
                run_job(name)
        finally:
            os.chdir(cwd)
        return self.check()[name]

    def check(self) -> dict[str, str]:
        """RELION's ``checkProcessCompletion``: every Running job with an exit marker gets its
        status; on success its declared outputs become nodes (and ``.Nodes`` markers)."""
        statuses = {}
        with self.edit() as pipe:
            for proc in pipe.processes:
                if proc.status == "Running":
                    done = exit_status(self.root / proc.name)
                    if done is not None:
                        proc.status = done
                        if done == "Succeeded":
                            for node, label, depth in read_output_nodes(self.root / proc.name):
                                pipe.nodes[node] = Node(node, label, depth)
                                if node not in proc.outputs:
                                    proc.outputs.append(node)
                                touch_node_marker(self.root, node, label, depth)
                statuses[proc.name] = proc.status
        return statuses
