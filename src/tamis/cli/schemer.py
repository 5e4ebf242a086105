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
    copy: str = typer.Option(None, "--copy", help="Copy the scheme to Schemes/NEW."),
    add: str = typer.Option(
        None, "--add", help="variable|operator|job|edge|fork (with --name/--value/--type/--i...)."
    ),
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
    value: str = typer.Option(None, "--value", help="Value for --set_var/--add variable/..."),
    original_value: str = typer.Option(None, "--original_value", help="Also the reset value."),
    name: str = typer.Option(None, "--name", help="--add: variable, operator (or job) name."),
    type_: str = typer.Option(None, "--type", help="--add operator: its type (e.g. bool=gt)."),
    i: str = typer.Option(None, "--i", help="--add: input 1, job file/dir, or edge source."),
    i2: str = typer.Option(None, "--i2", help="--add operator: input 2."),
    o: str = typer.Option(None, "--o", help="--add: output variable / edge target / fork true."),
    o2: str = typer.Option(None, "--o2", help="--add fork: the node when the bool is false."),
    bool_: str = typer.Option(None, "--bool", help="--add fork: its boolean variable."),
    mode: str = typer.Option("continue", "--mode", help="--add job: new or continue."),
    project: Path = typer.Option(Path("."), "--project", help="Project directory."),
) -> None:
    """As relion_schemer: one action per call, in relion_schemer's priority order."""
    from tamis.errors import TamisError
    from tamis.schemes import edit
    from tamis.schemes.run import SchemeRunner, request_abort, scheme_dir
    from tamis.schemes.scheme import UNDEFINED

    def say(text: str) -> None:
        console.print(text, highlight=False)

    d = scheme_dir(project, scheme)
    if run:
        status = SchemeRunner(project, scheme, log=say).run()
        say(f"scheme {scheme}: {status}")
        if status != "Succeeded":
            raise typer.Exit(1)
        return
    if abort:
        request_abort(project, scheme)
        say(f"abort requested for scheme {scheme}")
        return
    if copy:
        say(f"copied to {edit.copy_scheme(project, scheme, copy)}")
        return
    if not any((add, reset, set_var, set_job_mode, set_has_started, set_current_node,
                set_job_option)):  # fmt: skip
        raise TamisError("nothing to do: give --run, --abort, --copy, --add, --reset or --set_*")
    with edit.edit_scheme(project, scheme, create=bool(add)) as s:
        if add:
            if add == "variable":
                if not name or value is None:
                    raise TamisError("--add variable needs --name and --value")
                kind = edit.add_variable(s, name, value, original_value)
                say(f"{kind} variable {name} = {value}")
            elif add == "operator":
                if not name or not type_ or not i:
                    raise TamisError("--add operator needs --name, --type and --i")
                edit.add_operator(s, name, type_, i, i2 or UNDEFINED, o or UNDEFINED)
            elif add == "job":
                if not i:
                    raise TamisError("--add job needs --i (a job.star or job directory)")
                say(f"job {edit.add_job(s, project, i, mode, name)}")
            elif add == "edge":
                if not i or not o:
                    raise TamisError("--add edge needs --i and --o")
                edit.add_edge(s, i, o)
            elif add == "fork":
                if not (i and bool_ and o and o2):
                    raise TamisError("--add fork needs --i, --bool, --o (if true), --o2 (if false)")
                edit.add_fork(s, i, bool_, o, o2)
            else:
                raise TamisError(f"--add {add!r}: variable, operator, job, edge or fork")
        elif reset:
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
                raise TamisError(f"{d}: no job {set_has_started!r}")
            s.jobs[set_has_started].has_started = str(value).lower() in ("true", "1", "yes")
        elif set_current_node:
            s.current_node = set_current_node
        elif set_job_option:
            if len(ctx.args) != 2:
                raise TamisError("--set_job_option JOB KEY VALUE")
            key, val = ctx.args
            edit.set_job_option(s, project, set_job_option, key, val, log=say)
    say(f"{d / 'scheme.star'} updated")
