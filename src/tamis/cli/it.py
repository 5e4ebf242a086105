"""``tamis it``: set up and start the on-the-fly pipeline (relion_it.py's role), and
``tamis it status``."""

from __future__ import annotations

from pathlib import Path

import typer

from tamis.cli._common import console, user_errors

app = typer.Typer(
    help=__doc__, invoke_without_command=True, no_args_is_help=False, add_completion=False
)


@app.callback()
@user_errors
def it(
    ctx: typer.Context,
    options: list[Path] = typer.Option(
        None, "--options", help="relion_it options file (a Python dict literal); repeatable."
    ),
    set_: list[str] = typer.Option(
        None, "--set", help="KEY=VALUE, e.g. proc__class2d__nr_classes=50; repeatable."
    ),
    mics: str = typer.Option(
        None, "--mics", help="Micrographs to import (glob, project-relative)."
    ),
    movies: str = typer.Option(
        None, "--movies", help="Movies to import (glob, project-relative): motion correction first."
    ),
    angpix: float = typer.Option(
        None, "--angpix", help="Pixel size (A) of what is imported (movies or micrographs)."
    ),
    session: Path = typer.Option(
        None,
        "--session",
        help="An EPU session folder or a SerialEM movie folder: parameters "
        "from its metadata (MDCatch's role), recorded in session.json.",
    ),
    profile: Path = typer.Option(
        None, "--profile", help="JSON profile: Cs per microscope ID, gain/defects per detector."
    ),
    gain: str = typer.Option(None, "--gain", help="Gain reference for the movies."),
    dose: float = typer.Option(None, "--dose_per_frame", help="Movies: e/A^2 per frame."),
    bin_factor: float = typer.Option(
        None, "--bin_factor", help="Movies: motion-correction binning."
    ),
    kv: float = typer.Option(None, "--kV", help="Acceleration voltage (kV)."),
    cs: float = typer.Option(None, "--Cs", help="Spherical aberration (mm)."),
    q0: float = typer.Option(None, "--Q0", help="Amplitude contrast."),
    diameter: float = typer.Option(None, "--diameter", help="Longest particle diameter (A)."),
    picker: str = typer.Option("log", "--picker", help="log or deep (tamis's trained picker)."),
    nr_classes: int = typer.Option(None, "--nr_classes", help="2D classes."),
    iterations: int = typer.Option(None, "--iter", help="VDAM mini-batches (nr_iter_grad)."),
    threads: int = typer.Option(None, "--j", help="Threads for 2D classification."),
    nr_mpi: int = typer.Option(
        None,
        "--nr_mpi",
        help="RELION's MPI processes: torchrun ranks for 2D and 3D, dask workers for motion "
        "correction, CTF, picking and extraction (docs/scale-out.md).",
    ),
    ctf_maxres: float = typer.Option(
        None, "--ctf_maxres", help="Keep micrographs whose CTF fit reaches this resolution (A)."
    ),
    wait_sec: float = typer.Option(None, "--wait_sec", help="Seconds between passes."),
    nr_mics: int = typer.Option(
        None, "--nr_mics_to_process", help="Stop after this many micrographs (0: keep waiting)."
    ),
    only_save: bool = typer.Option(False, "--only_save", help="Set up, do not start."),
    project: Path = typer.Option(Path("."), "--project", help="Project directory."),
) -> None:
    """Copy the prep/proc schemes into the project, apply the options, start both in the
    background. Then follow them with 'tamis it status'."""
    if ctx.invoked_subcommand is not None:
        return
    from tamis.errors import TamisError
    from tamis.schemes import it as lib

    opts: dict = dict(lib.SCRIPT_OPTIONS)
    for f in options or []:
        opts.update(lib.read_options_file(f))
    if sum(bool(x) for x in (mics, movies, session)) > 1:
        raise TamisError("give one of --mics, --movies, --session")
    session_record = None
    if session is not None:
        import os

        from tamis.prep.session import read_session, session_base, session_options

        acq = read_session(session, profile=profile)
        for w in acq.warnings:
            console.print(f"warning: {w}", highlight=False)
        found = session_options(acq, angpix=angpix, voltage=kv, cs=cs, dose_per_frame=dose)
        link = project / "Movies"  # RELION imports project-relative paths: link the session
        base = session_base(Path(os.path.abspath(acq.metadata_file)), acq.software)
        if link.is_symlink() or link.exists():
            if link.resolve() != base.resolve():
                raise TamisError(f"{link} exists and is not a link to {base}: move it away")
        else:
            project.mkdir(parents=True, exist_ok=True)
            link.symlink_to(base.resolve())
        opts.update(found)
        session_record = (acq, project / "session.json")
        angpix = kv = cs = dose = None  # applied through the session's options
    imp = "importmovies" if movies or "prep__importmovies__fn_in_raw" in opts else "importmics"
    if diameter is not None:
        mic_angpix = angpix or float(opts.get(f"prep__{imp}__angpix", 0))
        if imp == "importmovies":
            mic_angpix *= float(bin_factor or opts.get("prep__motioncorr__bin_factor", 1))
        opts.update(lib.derived_options(mic_angpix, diameter, picker=picker,
                                        auto_boxsize=bool(opts.get("do_auto_boxsize", True))))  # fmt: skip
    simple = {
        "prep__importmics__fn_in_raw": mics, "prep__importmovies__fn_in_raw": movies,
        f"prep__{imp}__angpix": angpix, f"prep__{imp}__kV": kv, f"prep__{imp}__Cs": cs,
        f"prep__{imp}__Q0": q0, "prep__motioncorr__fn_gain_ref": gain,
        "prep__motioncorr__dose_per_frame": dose, "prep__motioncorr__bin_factor": bin_factor,
        "proc__class2d__nr_classes": nr_classes, "proc__class2d__nr_iter_grad": iterations,
        "proc__class2d__nr_threads": threads, "proc__select_mics__select_maxval": ctf_maxres,
        "prep__wait_sec": wait_sec, "proc__wait_sec": wait_sec,
        "prep__nr_mics_to_process": nr_mics, "proc__nr_mics_to_process": nr_mics,
    }  # fmt: skip
    if nr_mpi is not None:
        for job in ("prep__motioncorr", "prep__ctffind", "proc__autopick", "proc__extract",
                    "proc__class2d", "proc__inimodel3d", "proc__refine3d"):  # fmt: skip
            simple[f"{job}__nr_mpi"] = nr_mpi
    opts.update({k: v for k, v in simple.items() if v is not None})
    for item in set_ or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise TamisError(f"--set {item!r}: expected KEY=VALUE")
        opts[key.strip()] = lib._literal(value.strip())
    lib.install_schemes(project)
    opts = lib.complete_options(opts, project)
    if session_record is not None:
        from tamis.prep.session import write_record

        acq, record = session_record
        write_record(acq, {k: v for k, v in opts.items() if k.startswith("prep__")}, record)
        console.print(
            f"{acq.software} session: {len(acq.movies)} movies, "
            + ", ".join(f"{k} {getattr(acq, k)} ({src})" for k, src in acq.sources.items()
                        if k in ("pixel_size", "voltage", "spherical_aberration", "total_dose",
                                 "n_frames", "mode"))
            + f"; recorded in {record}",
            highlight=False,
        )  # fmt: skip
    lib.apply_options(project, opts)
    saved = lib.save_options(project, opts)
    console.print(f"options saved to {saved}", highlight=False)
    if only_save:
        return
    todo = [s for s, flag in (("prep", "do_prep"), ("proc", "do_proc")) if opts.get(flag, True)]
    pids = lib.launch(project, todo)
    for name, pid in pids.items():
        console.print(
            f"scheme {name} running (pid {pid}); log Schemes/{name}/run.out", highlight=False
        )
    console.print("follow with: tamis it status", highlight=False)


@app.command("status")
@user_errors
def it_status(
    project: Path = typer.Option(Path("."), "--project", help="Project directory."),
) -> None:
    """Each scheme: running or not, its current node and its last jobs."""
    from tamis.schemes.it import status

    rows = status(project)
    if not rows:
        console.print(f"no schemes in {project}/Schemes", highlight=False)
    for r in rows:
        state = "running" if r["running"] else (r["outcome"] or "stopped").lower()
        console.print(
            f"[bold]{r['scheme']}[/]: {state}, current node {r['current_node']}", highlight=False
        )
        for name, node, st in r["jobs"]:
            console.print(f"  {name} ({node}): {st}", highlight=False)
