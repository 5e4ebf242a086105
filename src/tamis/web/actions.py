"""What a person can change from the monitor, each through the same code as the command line:
start, abort or reset a scheme (``tamis schemer``), and save a corrected class selection as a new
Select job of the pipeline (RELION's interactive ``relion.select.interactive``). Every action is
appended to ``tamis_web.log`` in the project.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from pathlib import Path

from tamis.errors import TamisError
from tamis.pipeline.project import Project

__all__ = ["scheme_action", "save_selection", "log_action"]

ACTION_LOG = "tamis_web.log"


def log_action(root: Path, who: str, what: str) -> None:
    with open(root / ACTION_LOG, "a") as f:
        f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')}\t{who}\t{what}\n")


def scheme_action(root: Path, name: str, action: str) -> str:
    """``start`` (from its current node, as ``tamis schemer --run`` in the background),
    ``abort`` or ``reset`` scheme ``name``; returns what was done."""
    from tamis.schemes import it
    from tamis.schemes.edit import edit_scheme
    from tamis.schemes.run import request_abort

    known = {s["scheme"]: s for s in it.status(root, last=0)}
    if name not in known:
        raise TamisError(f"no scheme {name!r} in {root / 'Schemes'}")
    running = known[name]["running"]
    if action == "start":
        if running:
            raise TamisError(f"scheme {name} is running already")
        pid = it.launch(root, [name], reset=False)[name]
        return f"scheme {name} started (pid {pid})"
    if action == "abort":
        if not running:
            raise TamisError(f"scheme {name} is not running")
        request_abort(root, name)
        return f"abort requested for scheme {name}"
    if action == "reset":
        if running:
            raise TamisError(f"scheme {name} is running: abort it first")
        with edit_scheme(root, name) as s:
            s.reset()
        return f"scheme {name} reset"
    raise TamisError(f"unknown scheme action {action!r} (start, abort, reset)")


def save_selection(root: Path, optimiser: str, classes: Iterable[int], timeout: float = 300) -> str:
    """A new ``Select/jobNNN/`` (``relion.select.interactive``) keeping the particles of
    ``classes`` of the 2D job whose ``run_itNNN_optimiser.star`` is ``optimiser`` (relative to
    the project), run through the pipeliner; returns the job's name."""
    chosen = sorted({int(c) for c in classes})
    if not chosen:
        raise TamisError("no classes chosen: select at least one class")
    if not (root / optimiser).is_file():
        raise TamisError(f"{optimiser}: no such file in the project")
    project = Project(root)
    proc = project.schedule(
        "relion.select.interactive",
        {"fn_model": optimiser, "tamis_selected_classes": " ".join(map(str, chosen))},
    )
    child = project.run(proc.name, background=True)
    if child is not None:
        child.wait(timeout=timeout)
    status = project.check().get(proc.name)
    if status != "Succeeded":
        err = (root / proc.name / "run.err").read_text().strip().splitlines()
        raise TamisError(f"{proc.name}: {status}: {err[-1] if err else 'no message'}")
    return proc.name
