"""``tamis schemer``: run and edit RELION schemes (``relion_schemer``)."""

from __future__ import annotations

from pathlib import Path

import typer

from tamis.cli._common import console, user_errors


@user_errors
def schemer(
    ctx: typer.Context,
    scheme: str = typer.Option(..., "--scheme", help="Scheme name (Schemes/NAME/)."),
    run: bool = typer.Option(False, "--run", help="Run the scheme from its current node."),
    abort: bool = typer.Option(False, "--abort", help="Abort the running scheme and its job."),
    reset: bool = typer.Option(False, "--reset", help="Reset variables, jobs and current node."),
    set_var: str = typer.Option(None, "--set_var", help="Variable to set (with --value)."),
    set_job_mode: str = typer.Option(None, "--set_job_mode", help="Job whose mode to set."),
    set_has_started: str = typer.Option(None, "--set_has_started", help="Job to mark."),
    set_current_node: str = typer.Option(None, "--set_current_node", help="Restart point."),
    set_job_option: str = typer.Option(
        None,
        "--set_job_option",
        help="JOB KEY VALUE: edit a job template; it and every job downstream of it run again.",
    ),
    value: str = typer.Option(None, "--value", help="Value for --set_var/--set_job_mode/..."),
    original_value: str = typer.Option(None, "--original_value", help="Also the reset value."),
    project: Path = typer.Option(Path("."), "--project", help="Project directory."),
) -> None:
    """As relion_schemer: one action per call."""
    from tamis.errors import TamisError
    from tamis.pipeline.job import ABORT_NOW, JobStar
    from tamis.schemes.run import SchemeRunner, scheme_dir
    from tamis.schemes.scheme import Scheme

    d = scheme_dir(project, scheme)
    path = d / "scheme.star"
    if run:
        status = SchemeRunner(
            project, scheme, log=lambda s: console.print(s, highlight=False)
        ).run()
        console.print(f"scheme {scheme}: {status}", highlight=False)
        return
    s = Scheme.read(path)
    if abort:
        node = s.jobs.get(s.current_node)
        if node is not None and node.current_name != s.current_node:
            (project / node.current_name).mkdir(parents=True, exist_ok=True)
            (project / node.current_name / ABORT_NOW).touch()
        (d / ABORT_NOW).touch()
        console.print(f"abort requested for scheme {scheme}", highlight=False)
        return
    if reset:
        s.reset()
    elif set_var:
        if value is None:
            raise TamisError("--set_var needs --value")
        s.set_variable(set_var, value, original_value)
    elif set_job_mode:
        if set_job_mode not in s.jobs or value not in ("new", "continue"):
            raise TamisError("--set_job_mode JOB --value new|continue")
        s.jobs[set_job_mode].mode = value
    elif set_has_started:
        if set_has_started not in s.jobs:
            raise TamisError(f"{path}: no job {set_has_started!r}")
        s.jobs[set_has_started].has_started = str(value).lower() in ("true", "1", "yes")
    elif set_current_node:
        s.current_node = set_current_node
    elif set_job_option:
        if len(ctx.args) != 2:
            raise TamisError("--set_job_option JOB KEY VALUE")
        job, (key, val) = set_job_option, ctx.args
        if job not in s.jobs:
            raise TamisError(f"{path}: no job {job!r}")
        template = JobStar.read(d / job)
        template.options[key] = val
        template.write(d / job)
        # the job and everything downstream of it start afresh
        todo, seen = [job], set()
        while todo:
            n = todo.pop()
            if n in seen:
                continue
            seen.add(n)
            if n in s.jobs:
                s.jobs[n].has_started = False
            todo += [e.output for e in s.edges if e.input == n]
            todo += [e.output_if_true for e in s.edges if e.input == n and e.is_fork]
        s.current_node = job
    else:
        raise TamisError("nothing to do: give --run, --abort, --reset or a --set_* option")
    if path.exists():
        path.with_suffix(".star.bck").write_bytes(path.read_bytes())
    s.write(path)
    console.print(f"{path} updated", highlight=False)
