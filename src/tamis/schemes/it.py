"""``tamis it``: relion_it.py's role. Options (files and/or keyword values) become scheme
variables and job options of the shipped ``prep`` and ``proc`` schemes, which are copied into
``Schemes/`` and run in the background; :func:`status` reports each scheme.

Option keys as relion_it.py: ``SCHEME__VARIABLE`` sets a scheme variable (value and reset value),
``SCHEME__JOB__OPTION`` a job option (True/False -> Yes/No); keys without ``__`` are script
options (``do_prep``, ``do_proc``, ``do_auto_boxsize``). Options files hold one Python dict
literal (relion_it.py's format, read with ``ast.literal_eval``, never executed); later files
and keyword values override earlier ones. The options in force are saved as
``relion_it_options.py``.

Derived values, as relion_it.py's GUI: mask diameter 1.1 x the particle diameter; box
ceil(1.5 x diameter / angpix) made even; the down-sampled box the first of RELION's list with
angpix x box / small < 3.75 A (never larger than the box); LoG diameters ``circularity`` x
diameter to the diameter; the deep picker's diameter the particle diameter. tamis's own: no
picks within half a box of a micrograph side (``proc__autopick__tamis_edge``, Å).
"""

from __future__ import annotations

import ast
import json
import math
import os
import pprint
import shutil
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tamis.errors import InputFileError, TamisError
from tamis.pipeline.job import EXIT_MARKERS, JobStar
from tamis.pipeline.project import Project, process_alive
from tamis.schemes.edit import edit_scheme, scheme_lock
from tamis.schemes.scheme import Scheme

__all__ = [
    "SHIPPED_SCHEMES",
    "derived_options",
    "read_options_file",
    "apply_options",
    "install_schemes",
    "launch",
    "status",
    "SCRIPT_OPTIONS",
]

SHIPPED_SCHEMES = Path(__file__).resolve().parents[1] / "data" / "schemes"
SCRIPT_OPTIONS = {"do_prep": True, "do_proc": True, "do_auto_boxsize": True}
SMALL_BOXES = (48, 64, 96, 128, 160, 192, 256, 288, 300, 320, 360, 384, 400, 420, 450, 480, 512,
               640, 768, 896, 1024)  # fmt: skip


def derived_options(
    angpix: float,
    diameter: float,
    *,
    circularity: float = 150 / 180,
    picker: str = "log",
    auto_boxsize: bool = True,
) -> dict[str, Any]:
    """The job options relion_it.py's GUI derives from the pixel size and particle diameter."""
    if angpix <= 0 or diameter <= 0:
        raise TamisError("give a positive pixel size (--angpix) and particle diameter (--diameter)")
    if picker not in ("log", "deep"):
        raise TamisError(f"--picker {picker!r}: log or deep")
    out: dict[str, Any] = {
        "prep__importmics__angpix": angpix,
        "proc__class2d__particle_diameter": round(1.1 * diameter, 1),
        "proc__inimodel3d__particle_diameter": round(1.1 * diameter, 1),
        "proc__refine3d__particle_diameter": round(1.1 * diameter, 1),
        "proc__autopick__log_diam_max": diameter,
        "proc__autopick__log_diam_min": round(circularity * diameter, 1),
        "proc__autopick__topaz_particle_diameter": diameter,
        "proc__do_log": picker == "log",
    }
    if auto_boxsize:
        box = math.ceil(1.5 * diameter / angpix)
        box += box % 2
        small = next((s for s in SMALL_BOXES if angpix * box / s < 3.75), box)
        small = min(small, box)
        out.update(
            {
                "proc__extract__extract_size": box,
                "proc__extract__do_rescale": small < box,
                "proc__extract__rescale": small,
                # no picks within half a box of a side: their boxes would cross the border
                "proc__autopick__tamis_edge": round(box * angpix / 2, 1),
            }
        )
    return out


def read_options_file(path: str | Path) -> dict[str, Any]:
    """A relion_it options file: one dict literal (``{...}``), optionally assigned to a name."""
    path = Path(path)
    if not path.is_file():
        raise InputFileError(path, "options file not found")
    text = path.read_text()
    start = text.find("{")
    try:
        value = ast.literal_eval(text[start:].strip()) if start >= 0 else None
    except (ValueError, SyntaxError) as exc:
        raise InputFileError(
            path, f"is not a Python dict literal ({exc.__class__.__name__})"
        ) from None
    if not isinstance(value, dict):
        raise InputFileError(path, "is not a Python dict literal")
    return {str(k): _literal(v) for k, v in value.items()}


def _literal(v: Any) -> Any:
    return {"True": True, "False": False}.get(v, v) if isinstance(v, str) else v


def _text(v: Any) -> str:
    if isinstance(v, bool):
        return "Yes" if v else "No"
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)


def install_schemes(project: str | Path, names: Iterable[str] = ("prep", "proc")) -> list[Path]:
    """Copy the shipped schemes into ``<project>/Schemes/`` unless they are there already."""
    out = []
    for name in names:
        src, dst = SHIPPED_SCHEMES / name, Path(project) / "Schemes" / name
        if not src.is_dir():
            raise TamisError(f"no shipped scheme {name!r} (have prep, proc)")
        if not dst.exists():
            shutil.copytree(src, dst)
        out.append(dst)
    return out


def apply_options(project: str | Path, options: dict[str, Any]) -> None:
    """Scheme variables (value and reset value) and job options from ``options``; unknown keys
    are an error naming the key."""
    project = Path(project)
    by_scheme: dict[str, dict[str, Any]] = {}
    for key, value in options.items():
        if "__" not in key:
            if key not in SCRIPT_OPTIONS:
                raise TamisError(
                    f"option {key!r}: unknown (script options: {sorted(SCRIPT_OPTIONS)})"
                )
            continue
        scheme = key.split("__", 1)[0]
        by_scheme.setdefault(scheme, {})[key] = value
    for scheme, opts in by_scheme.items():
        d = project / "Schemes" / scheme
        if not (d / "scheme.star").is_file():
            raise TamisError(
                f"option {next(iter(opts))!r}: no scheme {scheme!r} in {project}/Schemes"
            )
        with edit_scheme(project, scheme) as s:
            for key, value in opts.items():
                parts = key.split("__")
                if len(parts) == 2:
                    var = parts[1]
                    if var not in s.floats and var not in s.bools and var not in s.strings:
                        raise TamisError(f"option {key!r}: scheme {scheme} has no variable {var!r}")
                    s.set_variable(var, _text(value) if not isinstance(value, bool) else str(value),
                                   _text(value) if not isinstance(value, bool) else str(value))  # fmt: skip
                elif len(parts) == 3:
                    job, opt = parts[1], parts[2]
                    if job not in s.jobs:
                        raise TamisError(f"option {key!r}: scheme {scheme} has no job {job!r}")
                    template = JobStar.read(d / job)
                    template.options[opt] = _text(value)
                    template.write(d / job)
                else:
                    raise TamisError(
                        f"option {key!r}: expected SCHEME__VARIABLE or SCHEME__JOB__OPTION"
                    )


def save_options(project: str | Path, options: dict[str, Any]) -> Path:
    path = Path(project) / "relion_it_options.py"
    path.write_text("# tamis it: the options in force (relion_it.py's format)\n"
                    + pprint.pformat(options, sort_dicts=True) + "\n")  # fmt: skip
    return path


#: GNU OpenMP's spin count (``GOMP_SPINCOUNT``) in the schemers and their jobs. libgomp lets a
#: thread waiting at a barrier spin 300,000 times before it sleeps; when prep and proc share the
#: cores, the spinning threads burn the time that the threads they wait for need (two jobs side
#: by side 2-7x slower than one after the other). A job alone is ~7% faster with the default, so
#: plain commands keep it (BENCHMARKS.md, "Several jobs on the same cores").
SCHEME_SPINCOUNT = "1000"


def scheme_environment() -> dict[str, str]:
    """The environment a schemer starts with: this one, with :data:`SCHEME_SPINCOUNT` unless
    the user set ``GOMP_SPINCOUNT``."""
    env = dict(os.environ)
    env.setdefault("GOMP_SPINCOUNT", SCHEME_SPINCOUNT)
    return env


def launch(project: str | Path, schemes: Iterable[str], *, reset: bool = True) -> dict[str, int]:
    """Reset and start ``tamis schemer --scheme S --run`` for each scheme as a background
    process (stdout/stderr appended to ``Schemes/S/run.out``/``run.err``; environment
    :func:`scheme_environment`); returns the pids."""
    project = Path(project)
    pids = {}
    env = scheme_environment()
    for name in schemes:
        d = project / "Schemes" / name
        if reset:
            with edit_scheme(project, name) as s:
                s.reset()
        with open(d / "run.out", "a") as out, open(d / "run.err", "a") as err:
            child = subprocess.Popen(
                [sys.executable, "-m", "tamis.cli.main", "schemer", "--scheme", name, "--run",
                 "--project", str(project.resolve())],
                stdout=out, stderr=err, stdin=subprocess.DEVNULL, start_new_session=True,
                env=env,
            )  # fmt: skip
        pids[name] = child.pid
    return pids


def status(project: str | Path, last: int = 3) -> list[dict[str, Any]]:
    """Per scheme in ``Schemes/``: whether a schemer runs it, its outcome marker, current node,
    and the last jobs it made with their pipeline status."""
    project = Path(project)
    pipe = Project(project).read() if (project / "default_pipeline.star").exists() else None
    out = []
    for path in sorted((project / "Schemes").glob("*/scheme.star")):
        name = path.parent.name
        s = Scheme.read(path)
        lock = scheme_lock(project, name) / "owner.json"
        running = False
        if lock.is_file():
            try:
                info = json.loads(lock.read_text())
                running = process_alive(str(info.get("host", "")), int(info.get("pid", -1)))
            except (OSError, ValueError):
                running = False
        outcome = next((st for st, m in EXIT_MARKERS.items() if (path.parent / m).exists()), None)
        jobs = []
        for node, job in s.jobs.items():
            if job.current_name == node or pipe is None:
                continue
            proc = pipe.process(job.current_name)
            jobs.append((job.current_name, node, proc.status if proc else "?"))
        jobs.sort(key=lambda j: j[0].split("job")[-1])
        out.append(
            {
                "scheme": name,
                "running": running,
                "outcome": outcome,
                "current_node": s.current_node,
                "jobs": jobs[-last:] if last else jobs,
            }
        )
    return out


def movies_or_micrographs(options: dict[str, Any]) -> dict[str, Any]:
    """The prep scheme starts from movies (RELION's: import, motion correction, CTF) unless
    ``prep__do_movies`` is False; when the options name only micrograph import, it is. The CTF
    job then reads the matching STAR file (``prep__ctf_input``) and, after motion correction,
    the sums without dose weighting (``use_noDW``)."""
    out = dict(options)
    movies = out.get("prep__do_movies")
    if movies is None:
        if any(k.startswith(("prep__importmovies__", "prep__motioncorr__")) for k in out):
            movies = True
        elif "prep__importmics__fn_in_raw" in out:
            movies = False
    if movies is None:
        return out
    movies = movies if isinstance(movies, bool) else str(movies).lower() in ("1", "true", "yes")
    out["prep__do_movies"] = movies
    out["prep__ctf_input"] = (
        "Schemes/prep/motioncorr/corrected_micrographs.star"
        if movies
        else "Schemes/prep/importmics/micrographs.star"
    )
    out.setdefault("prep__ctffind__use_noDW", movies)
    return out


def complete_options(options: dict[str, Any], project: str | Path) -> dict[str, Any]:
    """Options that follow from others: movies or micrographs (:func:`movies_or_micrographs`);
    the ranker pointed at the optimiser file 2D classification will write last
    (``run_itNNN_optimiser.star``) when its iteration count or algorithm changes."""
    options = movies_or_micrographs(options)
    keys = ("proc__class2d__nr_iter_grad", "proc__class2d__nr_iter_em", "proc__class2d__do_em",
            "proc__class2d__do_grad")  # fmt: skip
    if not any(k in options for k in keys):
        return options
    template = JobStar.read(Path(project) / "Schemes" / "proc" / "class2d").options
    merged = {**template, **{k.split("__")[-1]: _text(v) for k, v in options.items()
                             if k.startswith("proc__class2d__")}}  # fmt: skip
    em = merged.get("do_em", "No") == "Yes" or merged.get("do_grad", "Yes") != "Yes"
    n = int(float(merged.get("nr_iter_em" if em else "nr_iter_grad", "25" if em else "200")))
    out = dict(options)
    out["proc__select_parts__fn_model"] = f"Schemes/proc/class2d/run_it{n:03d}_optimiser.star"
    return out
