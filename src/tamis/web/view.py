"""What the monitor shows, read from a project's files only (so RELION projects work too): the
pipeline's jobs, the schemes, the micrographs with their CTF and picks, the 2D jobs' classes with
the ranker's scores, and the newest map. Paths in STAR files are relative to the project root and
are resolved against it here, never against the server's working directory.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from tamis.errors import TamisError
from tamis.io.star import read_star
from tamis.pipeline.project import Project

__all__ = [
    "PathOutsideProject",
    "check_project",
    "inside",
    "job_dir",
    "jobs",
    "schemes",
    "tail",
    "micrographs",
    "picks_of",
    "class2d_jobs",
    "class2d_classes",
    "newest_map",
    "cached_star",
    "ctf_of",
    "ctf_threshold",
]


class PathOutsideProject(TamisError):
    """A requested path that is not a file inside the project."""


def check_project(root: str | Path) -> Path:
    """The project directory, resolved; a clear error when it is not a RELION/tamis project."""
    p = Path(root).expanduser().resolve()
    if not p.is_dir():
        raise TamisError(f"{root}: no such directory")
    if not (p / "default_pipeline.star").is_file() and not (p / "Schemes").is_dir():
        raise TamisError(
            f"{root}: not a RELION/tamis project (no default_pipeline.star or Schemes/)"
        )
    return p


def inside(root: Path, relative: str) -> Path:
    """``root / relative`` when that names an existing file inside ``root`` (after resolving
    links and ``..``); :class:`PathOutsideProject` otherwise."""
    if not relative or "\x00" in relative or Path(relative).is_absolute():
        raise PathOutsideProject(f"{relative!r}: not a path inside the project")
    p = (root / relative).resolve()
    if not p.is_relative_to(root) or not p.is_file():
        raise PathOutsideProject(f"{relative!r}: not a file inside the project")
    return p


_CACHE: dict[tuple, object] = {}
_CACHE_MAX = 50_000


def job_dir(root: Path, name: str) -> Path:
    """``root / name`` when that is a directory inside the project; :class:`PathOutsideProject`
    otherwise."""
    d = root / name
    if not d.is_dir() or not d.resolve().is_relative_to(root):
        raise PathOutsideProject(f"{name!r}: no such job")
    return d


def _cached(path: Path, reader):
    """``reader(path)``, remembered until the file changes (mtime, size): a live page re-reads
    only what is new, even with thousands of coordinate files."""
    st = path.stat()
    key = (str(path), reader.__name__, st.st_mtime_ns, st.st_size)
    if key not in _CACHE:
        if len(_CACHE) >= _CACHE_MAX:
            _CACHE.clear()
        _CACHE[key] = reader(path)
    return _CACHE[key]


def cached_star(path: Path) -> dict:
    """A STAR file's blocks, re-read only when it changed."""
    return _cached(path, read_star)


def _age(path: Path) -> float:
    """Seconds since the newest of a job directory's log files changed."""
    times = [f.stat().st_mtime for f in (path / "run.out", path / "run.err", path / "note.txt")
             if f.exists()]  # fmt: skip
    return time.time() - max(times) if times else float("nan")


def jobs(root: Path) -> list[dict]:
    """Every job of ``default_pipeline.star``, newest first: name, type, status, alias, inputs,
    outputs and the age of its logs (s)."""
    pipe = Project(root).read()
    out = [
        {
            "name": p.name,
            "type": p.type_label,
            "status": p.status,
            "alias": "" if p.alias == "None" else p.alias,
            "inputs": list(p.inputs),
            "outputs": list(p.outputs),
            "age_s": _age(root / p.name),
        }
        for p in pipe.processes
    ]
    return out[::-1]


def schemes(root: Path) -> list[dict]:
    """Per scheme: running or not, outcome, current node and its last jobs."""
    from tamis.schemes import it

    return it.status(root, last=4)


def tail(path: Path, lines: int = 40, max_bytes: int = 64_000) -> str:
    """The last ``lines`` lines of a text file ('' when absent)."""
    if not path.is_file():
        return ""
    with open(path, "rb") as f:
        f.seek(max(0, path.stat().st_size - max_bytes))
        text = f.read().decode("utf-8", "replace")
    return "\n".join(text.splitlines()[-lines:])


def _newest(root: Path, pattern: str) -> Path | None:
    found = sorted(root.glob(pattern), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def micrographs(root: Path) -> pd.DataFrame:
    """One row per micrograph of the newest CTF job, in acquisition (file) order: name, defocus
    (mean of U and V, Å), astigmatism (Å), CTF max resolution (Å), accumulated motion (pixels,
    as RELION writes it, when motion correction ran) and picks from the newest picking job (NaN
    when not picked)."""
    star = _newest(root, "CtfFind/job*/micrographs_ctf.star")
    if star is None:
        return pd.DataFrame(columns=["name", "defocus", "astigmatism", "max_resolution", "picks"])
    t = _cached(star, read_star)["micrographs"]
    out = pd.DataFrame({"name": t["rlnMicrographName"].astype(str)})
    out["defocus"] = (t["rlnDefocusU"].astype(float) + t["rlnDefocusV"].astype(float)) / 2
    out["astigmatism"] = (t["rlnDefocusU"].astype(float) - t["rlnDefocusV"].astype(float)).abs()
    out["max_resolution"] = t.get("rlnCtfMaxResolution", pd.Series(np.nan, index=t.index))
    if "rlnAccumMotionTotal" in t:
        out["motion"] = t["rlnAccumMotionTotal"].astype(float)
    counts = _pick_counts(root)
    out["picks"] = [counts.get(n, np.nan) for n in out["name"]]
    return out.reset_index(drop=True)


def motion_files(root: Path, micrograph: str) -> tuple[str | None, str | None]:
    """A motion-corrected micrograph's shift plot and log (``<root>_shifts.png``, ``<root>.log``
    beside it, as motion correction writes them), project-relative, or None."""
    p = Path(micrograph)
    if p.suffix.lower() != ".mrc":
        return None, None
    plot = p.with_name(p.stem + "_shifts.png")
    log = p.with_suffix(".log")
    try:
        plot_ok = inside(root, str(plot)).is_file()
        log_ok = inside(root, str(log)).is_file()
    except PathOutsideProject:
        return None, None
    return (str(plot) if plot_ok else None), (str(log) if log_ok and plot_ok else None)


def ctf_of(root: Path, micrograph: str) -> dict | None:
    """The newest CTF job's fit of ``micrograph``: its amplitude-spectrum file (``rlnCtfImage``,
    when present) and the CTF parameters (defocus U/V/angle, voltage, Cs, Q0, pixel size)."""
    star = _newest(root, "CtfFind/job*/micrographs_ctf.star")
    if star is None:
        return None
    blocks = _cached(star, read_star)
    t = blocks["micrographs"]
    rows = t[t["rlnMicrographName"].astype(str) == micrograph]
    if not len(rows):
        return None
    r = rows.iloc[0]
    optics = blocks.get("optics")
    o = {}
    if isinstance(optics, pd.DataFrame) and len(optics):
        group = optics[optics["rlnOpticsGroup"].astype(int) == int(r.get("rlnOpticsGroup", 1))]
        o = (group if len(group) else optics).iloc[0].to_dict()
    image = str(r.get("rlnCtfImage", "")).split(":")[0]
    spectrum = root / image if image else None
    return {
        "spectrum": spectrum if spectrum is not None and spectrum.is_file() else None,
        "defocus_u": float(r["rlnDefocusU"]),
        "defocus_v": float(r["rlnDefocusV"]),
        "defocus_angle": float(r.get("rlnDefocusAngle", 0.0)),
        "voltage": float(o.get("rlnVoltage", 300.0)),
        "cs": float(o.get("rlnSphericalAberration", 2.7)),
        "q0": float(o.get("rlnAmplitudeContrast", 0.1)),
        "pixel_size": float(o.get("rlnMicrographPixelSize", 1.0)),
        "max_resolution": float(r.get("rlnCtfMaxResolution", float("nan"))),
    }


def _count_rows(path: Path) -> int:
    """Rows of a coordinate file's (single) loop, without parsing it: the lines that are not
    blank, comments, block or loop headers, or labels."""
    n = 0
    with open(path, "rb") as f:
        for line in f:
            s = line.strip()
            if s and not s.startswith((b"#", b"_", b"data_", b"loop_")):
                n += 1
    return n


def _pick_counts(root: Path) -> dict[str, int]:
    """Picks per micrograph of the newest picking job."""
    from tamis.io.coords import read_coordinate_list

    star = _newest(root, "AutoPick/job*/autopick.star")
    if star is None:
        return {}
    out = {}
    for mic, f in _cached(star, read_coordinate_list).items():
        path = Path(f) if Path(f).is_absolute() else root / f
        if path.is_file():
            out[mic] = _cached(path, _count_rows)
    return out


def picks_of(root: Path, micrograph: str) -> np.ndarray:
    """The newest picking job's (x, y) picks (px) on ``micrograph`` (empty when none)."""
    from tamis.io.coords import read_coordinate_list, read_coordinates

    star = _newest(root, "AutoPick/job*/autopick.star")
    f = _cached(star, read_coordinate_list).get(micrograph) if star is not None else None
    path = None if f is None else Path(f) if Path(f).is_absolute() else root / f
    if path is None or not path.is_file():
        return np.zeros((0, 2))
    return _cached(path, read_coordinates)[["rlnCoordinateX", "rlnCoordinateY"]].to_numpy(float)


def class2d_jobs(root: Path) -> list[str]:
    """Class2D jobs that wrote at least one iteration, newest first."""
    found = [d for d in sorted(root.glob("Class2D/job*")) if list(d.glob("run_it*_model.star"))]
    return [f"{d.relative_to(root)}/" for d in found][::-1]


@dataclass
class ClassTable:
    job: str  # "Class2D/job008/"
    iteration: int
    optimiser: str  # relative to the project
    stack: Path  # the class averages (absolute)
    classes: pd.DataFrame  # number, distribution, particles, resolution, score (the selection's),
    # network (the ranker's), p_good, passed (the screen's share), selected
    selection_job: str | None  # the newest Select job of this 2D job (its choice in 'selected')


def class2d_classes(root: Path, job: str) -> ClassTable:
    """The last iteration's classes of a 2D job with, when a Select job chose from it, its
    scores and selection."""
    d = job_dir(root, job)
    models = sorted(d.glob("run_it*_model.star"))
    if not models:
        raise TamisError(f"{job}: no iteration written yet")
    model = models[-1]
    it = int(model.name[6:9])
    classes = _cached(model, read_star)["model_classes"]
    n_parts = 0
    data = model.with_name(model.name.replace("_model.star", "_data.star"))
    if data.is_file():
        n_parts = len(_cached(data, read_star)["particles"])
    ref = str(classes["rlnReferenceImage"].iloc[0]).split("@", 1)[-1]
    k = len(classes)
    dist = classes["rlnClassDistribution"].astype(float).to_numpy()
    table = pd.DataFrame({
        "number": np.arange(1, k + 1),
        "distribution": dist,
        "particles": np.rint(dist * n_parts).astype(int),
        "resolution": classes.get("rlnEstimatedResolution", pd.Series([np.nan] * k)).astype(float),
        "score": np.nan, "network": np.nan, "p_good": np.nan, "passed": np.nan, "selected": 0,
    })  # fmt: skip
    optimiser = model.with_name(model.name.replace("_model.star", "_optimiser.star"))
    # the newest Select job of this 2D job gives the selection; the newest ranker job the scores
    chosen_from = [sel for sel in _select_jobs(root) if sel["fn_model"].startswith(job)]
    picked = [sel for sel in chosen_from if (sel["dir"] / "backup_selection.star").is_file()]
    sel_job = f"{picked[-1]['dir'].relative_to(root)}/" if picked else None
    if sel_job is not None:
        chosen = _cached(root / sel_job / "backup_selection.star", read_star)
        flags = next(iter(chosen.values()))["rlnSelected"].astype(int).to_numpy()
        if len(flags) == k:
            table["selected"] = flags
    ranked = [sel["dir"] / "class_scores.csv" for sel in chosen_from]
    ranked = [f for f in ranked if f.is_file()]
    if ranked:
        s = _cached(ranked[-1], pd.read_csv)
        if len(s) == k:
            # the score the selection used (the ranker's, times the screen's verdict on the
            # class's particles when the screen ran)
            used = s.get("tamisSelectionScore", s["rlnClassScore"])
            table["score"] = used.where(s["rlnClassScore"] > -998).to_numpy()
            table["network"] = s["rlnClassScore"].where(s["rlnClassScore"] > -998).to_numpy()
            nan = pd.Series(np.nan, index=s.index)
            table["p_good"] = s.get("tamisProbabilityGood", nan).to_numpy()
            table["passed"] = s.get("tamisScreenPassed", nan).to_numpy()
    return ClassTable(job, it, str(optimiser.relative_to(root)), root / ref, table, sel_job)


def _job_options(job_star: Path) -> dict:
    from tamis.pipeline.job import JobStar

    return JobStar.read(job_star.parent).options


def _select_jobs(root: Path) -> list[dict]:
    """Every Select job, oldest first: its directory and options (a job.star that cannot be
    read is skipped: the monitor shows what it can)."""
    out = []
    for d in sorted(root.glob("Select/job*"), key=lambda p: p.stat().st_mtime):
        js = d / "job.star"
        try:
            options = _cached(js, _job_options)
        except (OSError, TamisError, KeyError, ValueError):
            continue
        out.append({"dir": d, "fn_model": str(options.get("fn_model", "")), **options})
    return out


def ctf_threshold(root: Path) -> float | None:
    """The upper CTF-resolution value (Å) of the newest selection on rlnCtfMaxResolution."""
    for sel in reversed(_select_jobs(root)):
        if sel.get("select_label") == "rlnCtfMaxResolution":
            try:
                v = float(sel.get("select_maxval", "9999"))
            except ValueError:
                return None
            return v if v < 9999 else None
    return None


def newest_map(root: Path) -> dict | None:
    """The newest post-processed map (else refined map): its file, resolution and FSC curves."""
    post = _newest(root, "PostProcess/job*/postprocess.star")
    if post is not None:
        blocks = _cached(post, read_star)
        g, f = blocks["general"], blocks["fsc"]
        curves = {
            "corrected": f["rlnFourierShellCorrelationCorrected"].astype(float).to_numpy(),
            "unmasked": f["rlnFourierShellCorrelationUnmaskedMaps"].astype(float).to_numpy(),
        }
        return {
            "map": post.parent / "postprocess.mrc",
            "job": f"{post.parent.relative_to(root)}/",
            "resolution": float(g["rlnFinalResolution"]),
            "bfactor": float(g.get("rlnBfactorUsedForSharpening", 0.0)),
            "inverse_resolution": f["rlnResolution"].astype(float).to_numpy(),
            "curves": curves,
        }
    ref = _newest(root, "Refine3D/job*/run_model.star")
    if ref is None:
        return None
    model = _cached(ref, read_star)
    shells = model["model_class_1"] if "model_class_1" in model else None
    out = {
        "map": ref.with_name("run_class001.mrc"),
        "job": f"{ref.parent.relative_to(root)}/",
        "resolution": float(model["model_general"]["rlnCurrentResolution"]),
        "bfactor": 0.0,
        "inverse_resolution": np.zeros(0),
        "curves": {},
    }
    if isinstance(shells, pd.DataFrame) and "rlnGoldStandardFsc" in shells:
        out["inverse_resolution"] = shells["rlnResolution"].astype(float).to_numpy()
        out["curves"] = {"gold-standard": shells["rlnGoldStandardFsc"].astype(float).to_numpy()}
    return out
