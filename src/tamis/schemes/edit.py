"""Editing a scheme as ``relion_schemer`` does (``--add``, ``--copy``, ``--set_*``), plus
``set_job_option``, which also restarts the edited job and everything downstream of it.

Every edit reads and writes ``scheme.star`` under the scheme lock (so it fails while a schemer
runs the scheme, as in RELION) and keeps the previous file as ``scheme.star.bck``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from tamis.errors import TamisError
from tamis.pipeline.job import JobStar
from tamis.pipeline.project import lock_dir
from tamis.schemes.operators import OPERATOR_TYPES
from tamis.schemes.scheme import UNDEFINED, Edge, Operator, Scheme, SchemeJob, _bool

__all__ = [
    "edit_scheme",
    "add_variable",
    "add_operator",
    "add_job",
    "add_edge",
    "add_fork",
    "copy_scheme",
    "set_job_option",
    "downstream",
]


def scheme_lock(project: str | Path, name: str) -> Path:
    return Path(project) / f".relion_lock_scheme_{name}"


@contextmanager
def edit_scheme(project: str | Path, name: str, *, create: bool = False) -> Iterator[Scheme]:
    """Read ``Schemes/NAME/scheme.star`` under the scheme lock, yield it, write it back (with a
    ``.bck`` of the old file). ``create`` starts an empty scheme when there is none."""
    d = Path(project) / "Schemes" / name
    path = d / "scheme.star"
    with lock_dir(scheme_lock(project, name), retries=3, wait=1.0):
        if path.is_file():
            s = Scheme.read(path)
        elif create:
            s = Scheme(f"Schemes/{name}/")
        else:
            raise TamisError(f"{path}: no such scheme")
        yield s
        d.mkdir(parents=True, exist_ok=True)
        if path.exists():
            path.with_suffix(".star.bck").write_bytes(path.read_bytes())
        s.write(path)


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def add_variable(s: Scheme, name: str, value: str, original: str | None = None) -> str:
    """RELION's ``--add variable``: the type is inferred from the value (a number -> float,
    True/False -> bool, else string); returns the type."""
    reset = value if original is None else original
    if _number(value) is not None:
        s.floats[name] = (float(value), float(reset))
        return "float"
    if value in ("True", "False", "true", "false"):
        s.bools[name] = (_bool(value), _bool(reset))
        return "bool"
    s.strings[name] = (value, reset)
    return "string"


def add_operator(
    s: Scheme, name: str, type_: str, input1: str, input2: str = UNDEFINED, output: str = UNDEFINED
) -> None:
    if type_ not in OPERATOR_TYPES:
        raise TamisError(f"--type {type_!r}: unknown operator (have {', '.join(OPERATOR_TYPES)})")
    s.operators[name] = Operator(type_, output or UNDEFINED, input1 or UNDEFINED,
                                 input2 or UNDEFINED)  # fmt: skip


def add_job(
    s: Scheme, project: str | Path, source: str, mode: str = "continue", name: str | None = None
) -> str:
    """RELION's ``--add job --i X --mode M``: the job read from ``X`` (a job.star file, or a job
    directory) becomes node ``name`` (default ``X`` with spaces as ``_`` and no trailing ``/``)
    with its template in ``Schemes/NAME/<node>/job.star``; returns the node name."""
    from tamis.pipeline.jobs import job_type

    if mode not in ("new", "continue"):
        raise TamisError(f"--mode {mode!r}: new or continue")
    src = Path(source)
    job = JobStar.read(src if src.suffix == ".star" else src / "job.star")
    job_type(job.type_label)  # a type tamis can run
    node = name or source.replace(" ", "_").rstrip("/")
    d = Path(project) / s.name.rstrip("/") / node
    d.mkdir(parents=True, exist_ok=True)
    JobStar(job.type_label, False, job.is_tomo, job.options).write(d)
    s.jobs[node] = SchemeJob(node, mode, False)
    return node


def _check_unique_input(s: Scheme, node: str) -> None:
    if any(e.input == node for e in s.edges):
        raise TamisError(f"{node} already has an outgoing edge (one per node)")


def _check_node(s: Scheme, node: str) -> None:
    if node not in s.jobs and node not in s.operators:
        raise TamisError(f"{node!r} is neither a job nor an operator of {s.name}")


def add_edge(s: Scheme, source: str, target: str) -> None:
    _check_node(s, source)
    _check_node(s, target)
    _check_unique_input(s, source)
    s.edges.append(Edge(source, target))


def add_fork(s: Scheme, source: str, boolean: str, if_true: str, if_false: str) -> None:
    for n in (source, if_true, if_false):
        _check_node(s, n)
    if boolean not in s.bools:
        raise TamisError(f"--bool {boolean!r}: no boolean variable of that name")
    _check_unique_input(s, source)
    s.edges.append(Edge(source, if_false, True, if_true, boolean))


def copy_scheme(project: str | Path, name: str, new: str) -> Path:
    """RELION's ``--copy``: ``Schemes/NAME`` -> ``Schemes/NEW`` with ``Schemes/NAME/`` rewritten to
    ``Schemes/NEW/`` in string variables and job options; jobs not started, state reset. (RELION
    leaves a stale lock on the source scheme; tamis does not.)"""
    root = Path(project) / "Schemes"
    src, dst = root / name, root / new
    if not (src / "scheme.star").is_file():
        raise TamisError(f"{src}/scheme.star: no such scheme")
    if dst.exists():
        raise TamisError(f"{dst}: exists already")
    with lock_dir(scheme_lock(project, name), retries=3, wait=1.0):
        s = Scheme.read(src / "scheme.star")
    old_prefix, new_prefix = f"Schemes/{name}/", f"Schemes/{new}/"
    s.name = new_prefix
    s.strings = {k: (v.replace(old_prefix, new_prefix), r.replace(old_prefix, new_prefix))
                 for k, (v, r) in s.strings.items()}  # fmt: skip
    s.reset()
    dst.mkdir(parents=True)
    for node in s.jobs:
        job = JobStar.read(src / node)
        job.options = {k: v.replace(old_prefix, new_prefix) for k, v in job.options.items()}
        (dst / node).mkdir()
        job.write(dst / node)
    s.write(dst / "scheme.star")
    return dst


def downstream(s: Scheme, node: str) -> set[str]:
    """``node`` and every node reachable from it along edges and both fork branches."""
    todo, seen = [node], set()
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        for e in s.edges:
            if e.input == n:
                todo.append(e.output)
                if e.is_fork:
                    todo.append(e.output_if_true)
    return seen


def set_job_option(
    s: Scheme, project: str | Path, job: str, key: str, value: str,
    *, log: Callable[[str], None] | None = None,
) -> None:  # fmt: skip
    """Edit one option of a job template (True/False -> Yes/No, as relion_pipeliner --editJob);
    the job and every job downstream of it start afresh (``has_started`` False) and the scheme
    restarts at the edited job."""
    if job not in s.jobs:
        raise TamisError(f"{s.name}: no job {job!r}")
    d = Path(project) / s.name.rstrip("/") / job
    template = JobStar.read(d)
    value = {"True": "Yes", "true": "Yes", "False": "No", "false": "No"}.get(value, value)
    template.options[key] = value
    template.write(d)
    for n in downstream(s, job):
        if n in s.jobs:
            s.jobs[n].has_started = False
    s.current_node = job
    if log:
        log(f"{job}: {key} = {value}; it and the jobs downstream of it run afresh")
