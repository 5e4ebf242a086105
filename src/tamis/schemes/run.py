"""Running a scheme (``relion_schemer --run``): walk the graph from the current node, execute
operators, create or continue pipeline jobs from the templates in ``Schemes/NAME/JOB/job.star``
(``$$variable`` and job-name substitution), run them and wait for their exit markers.

The scheme's state (current node, variables, jobs) is written after every step, so a killed
schemer restarts where it stopped. The scheme lock ``.relion_lock_scheme_NAME/`` records host, pid
and time and is taken over when its process is gone. ``Schemes/NAME/RELION_JOB_ABORT_NOW`` stops
the scheme; it is passed on to the running job, which stops within seconds.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from tamis.errors import TamisError
from tamis.pipeline.job import ABORT_NOW, EXIT_MARKERS, JobStar, exit_status
from tamis.pipeline.project import Project, job_process_alive, lock_dir
from tamis.schemes.operators import Clock, perform, substitute_job_names
from tamis.schemes.scheme import UNDEFINED, Scheme

__all__ = ["SchemeRunner", "prepare_job", "request_abort", "scheme_dir"]


def scheme_dir(project: str | Path, name: str) -> Path:
    return Path(project) / "Schemes" / name


def _float_text(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else f"{v:g}"


def prepare_job(
    scheme: Scheme, node: str, project: Path, other: Callable[[str], Scheme | None]
) -> JobStar:
    """The job template with ``$$variable`` replaced (booleans only into Yes/No options) and
    ``Schemes/NAME/JOB/`` paths replaced by the jobs' current names."""
    template = JobStar.read(scheme_dir(project, scheme.short_name) / node)
    options = {}
    for key, value in template.options.items():
        words = []
        for word in str(value).split(" "):
            if word.startswith("$$"):
                var = word[2:]
                if var in scheme.bools:
                    if value.strip() != word:
                        raise TamisError(f"{node}/{key}: boolean $${var} must be the whole option")
                    word = "Yes" if scheme.bools[var][0] else "No"
                elif var in scheme.floats:
                    word = _float_text(scheme.floats[var][0])
                elif var in scheme.strings:
                    word = scheme.strings[var][0]
                else:
                    raise TamisError(f"{node}/{key}: unknown scheme variable $${var}")
            words.append(word)
        options[key] = substitute_job_names(" ".join(words), scheme, other)
    return JobStar(template.type_label, False, template.is_tomo, options)


class SchemeRunner:
    def __init__(
        self,
        project: str | Path,
        name: str,
        *,
        log: Callable[[str], None] = print,
        poll: float = 1.0,
        background: bool = True,
        clock: Clock | None = None,
    ) -> None:
        self.project = Project(project)
        self.root = Path(project)
        self.name = name
        self.dir = scheme_dir(project, name)
        self.file = self.dir / "scheme.star"
        self.log = log
        self.poll = poll
        self.background = background
        self.clock = clock or Clock()
        self.clock.abort = self.aborted

    def aborted(self) -> bool:
        return (self.dir / ABORT_NOW).exists()

    def _other(self, name: str) -> Scheme | None:
        path = scheme_dir(self.root, name) / "scheme.star"
        return Scheme.read(path) if path.is_file() else None

    def _finish(self, status: str) -> str:
        for marker in EXIT_MARKERS.values():
            (self.dir / marker).unlink(missing_ok=True)
        (self.dir / EXIT_MARKERS[status]).touch()
        return status

    def run(self) -> str:
        """Run until the scheme ends, a job fails or an abort is requested; returns
        ``Succeeded``, ``Failed`` or ``Aborted``."""
        (self.dir / ABORT_NOW).unlink(missing_ok=True)
        for marker in EXIT_MARKERS.values():
            (self.dir / marker).unlink(missing_ok=True)
        with lock_dir(self.root / f".relion_lock_scheme_{self.name}", retries=2, wait=1.0):
            s = Scheme.read(self.file)
            if s.current_node == UNDEFINED:
                s.current_node = s.edges[0].input if s.edges else UNDEFINED
            node = s.current_node
            while node != UNDEFINED:
                if self.aborted():
                    s.write(self.file)
                    return self._finish("Aborted")
                if node in s.operators:
                    self.log(f"operator {node} ({s.operators[node].type})")
                    if not perform(s, node, project=self.root, clock=self.clock, other=self._other):
                        s.write(self.file)
                        self.log(f"scheme {self.name} stopped by {node}")
                        return self._finish("Succeeded")
                elif node in s.jobs:
                    status = self._run_job(s, node)
                    if status != "Succeeded":
                        s.write(self.file)
                        return self._finish("Aborted" if status == "Aborted" else "Failed")
                else:
                    raise TamisError(f"{self.file}: node {node!r} is neither a job nor an operator")
                node = s.next_node(node)
                s.current_node = node
                s.write(self.file)
            self.log(f"scheme {self.name} finished")
            return self._finish("Succeeded")

    def _resume(self, s: Scheme, node: str) -> str | None:
        """After a crash of the schemer: a job this node started that is still Running in the
        pipeline is waited for if its process lives (or it has finished meanwhile); one whose
        process is gone is marked Failed, and the node runs again by its mode."""
        state = s.jobs[node]
        if not state.has_started or state.current_name == node:
            return None
        proc = self.project.read().process(state.current_name)
        if proc is None or proc.status != "Running":
            return None
        job_dir = self.root / state.current_name
        if exit_status(job_dir) is not None or job_process_alive(job_dir):
            self.log(f"job {node} -> {state.current_name}: still running, waiting for it")
            return self._wait(job_dir, None, state.current_name)
        (job_dir / EXIT_MARKERS["Failed"]).touch()
        self.project.check()
        self.log(f"job {node} -> {state.current_name}: its process is gone; marked Failed")
        return None

    def _run_job(self, s: Scheme, node: str) -> str:
        resumed = self._resume(s, node)
        if resumed is not None:
            return resumed
        state = s.jobs[node]
        job = prepare_job(s, node, self.root, self._other)
        if state.mode == "new" or not state.has_started:
            proc = self.project.schedule(job.type_label, job.options)
            state.current_name = proc.name
            is_continue = False
        else:
            if self.project.read().process(state.current_name) is None:
                raise TamisError(f"{node}: job {state.current_name} is not in the pipeline")
            JobStar(job.type_label, True, job.is_tomo, job.options).write(
                self.root / state.current_name
            )
            is_continue = True
        state.has_started = True
        s.write(self.file)
        self.log(f"job {node} -> {state.current_name}{' (continue)' if is_continue else ''}")
        if not self.background and not job.get_bool("do_queue"):
            return self.project.run(state.current_name, is_continue=is_continue)
        child = self.project.run(state.current_name, background=True, is_continue=is_continue)
        return self._wait(self.root / state.current_name, child, state.current_name)

    def _wait(self, job_dir: Path, child, name: str) -> str:
        """Poll for the job's exit marker, passing an abort request on to it."""
        while True:
            if self.aborted():
                (job_dir / ABORT_NOW).touch()
            if child is not None and child.poll() is not None and exit_status(job_dir) is None:
                (job_dir / EXIT_MARKERS["Failed"]).touch()  # the child died without a marker
            if exit_status(job_dir) is not None:
                return self.project.check()[name]
            time.sleep(self.poll)


def request_abort(project: str | Path, name: str) -> None:
    """relion_schemer --abort: ask scheme ``name`` and its current job to stop (the runner and
    the job see ``RELION_JOB_ABORT_NOW`` and stop at their next check)."""
    from tamis.schemes.scheme import Scheme

    project = Path(project)
    d = scheme_dir(project, name)
    s = Scheme.read(d / "scheme.star")
    node = s.jobs.get(s.current_node)
    if node is not None and node.current_name != s.current_node:
        (project / node.current_name).mkdir(parents=True, exist_ok=True)
        (project / node.current_name / ABORT_NOW).touch()
    (d / ABORT_NOW).touch()
