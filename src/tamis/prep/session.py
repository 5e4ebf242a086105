"""Session metadata -> processing parameters (MDCatch's role): read what the microscope software
wrote about a session, derive the motion-correction and import parameters, say where each value
came from, and refuse to start when a value is missing or two sources disagree.

Sources, in order (a later one fills what an earlier one lacks; a typed flag overrides all):

1. EPU (``Images-Disc*/GridSquare_*/Data/FoilHole_*_Data_*.xml``, one per exposure; the oldest
   is read, and the newest checked against it): pixel size (``SpatialScale/pixelSize/x``, m ->
   Å, divided by ``SuperResolutionFactor`` as MDCatch does), voltage, exposure time, total dose
   (``CustomData`` ``Dose``, e/m² -> e/Å²), fractions (``FractionationSettings`` or
   ``DoseFractions``), mode (counting, super-resolution, EER), detector, instrument ID, applied
   defocus; for EER the frame rate and the gain file name.
2. SerialEM (``*.mdoc`` beside the movies): ``PixelSpacing`` (the saved
   frames'), ``Voltage``, ``FrameDosesAndNumber`` (else ``ExposureDose`` / ``NumSubFrames``),
   ``Binning`` (0.5: super-resolution), ``GainReference``, ``DefectFile``, ``TargetDefocus``.
3. The movies' own headers: frame count and size (MRC, TIFF pages, EER frames), MRC voxel size,
   TIFF resolution tags.
4. A profile file (JSON) for what the metadata do not hold: per instrument ID the spherical
   aberration, per detector name the gain file, its rotation/flip and a defect file.

Derived (MDCatch's rules, its known slips fixed): dose per frame = total dose / frames; EER
grouping = the integer >= 1 that brings the dose per fraction nearest ``eer_target_dose``
(1 e/Å²), and the dose per fraction is then the true grouping x dose per raw frame (MDCatch
writes 1.0); motion-correction binning 2 for super-resolution movies (back to the counting
pixel), else 1.
"""

from __future__ import annotations

import glob
import json
import math
import os
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tamis.errors import InputFileError, TamisError

__all__ = [
    "Acquisition",
    "parse_epu_xml",
    "parse_mdoc",
    "read_mdoc",
    "read_session",
    "session_options",
    "session_base",
    "write_record",
]

_NS = {
    "so": "http://schemas.datacontract.org/2004/07/Fei.SharedObjects",
    "a": "http://schemas.microsoft.com/2003/10/Serialization/Arrays",
    "dr": "http://schemas.datacontract.org/2004/07/System.Drawing",
}
EPU_XML = "Images-Disc*/GridSquare_*/Data/FoilHole_*_Data_*.xml"
GAIN_PATTERNS = ("*_gain.tiff", "*_gain.mrc", "*-gain-ref.MRC", "*.gain")
MOVIE_PATTERNS = ("*_fractions.tiff", "*_Fractions.tiff", "*_fractions.tif", "*_EER.eer",
                  "*.eer", "*_fractions.mrc", "*_Fractions.mrc")  # fmt: skip


@dataclass
class Acquisition:
    """What a session's metadata say (units: Å, kV, mm, e/Å², s). ``sources`` names where each
    value came from; ``flags`` the option that sets each value by hand."""

    software: str = ""
    metadata_file: str = ""
    movies: list[str] = field(default_factory=list)
    pixel_size: float | None = None  # of the movie frames as saved
    voltage: float | None = None
    spherical_aberration: float | None = None
    total_dose: float | None = None
    n_frames: int | None = None  # fractions as saved (EER: raw frames)
    exposure_time: float | None = None
    mode: str = ""  # Counting, Super-resolution, Linear, EER
    detector: str = ""
    instrument_id: str = ""
    defocus_um: float | None = None
    eer_frame_rate: float | None = None
    gain: str = ""
    gain_rot: int = 0
    gain_flip: int = 0
    defect_file: str = ""
    frame_size: tuple[int, int] | None = None  # (ny, nx) of the movie frames
    sources: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def set(self, name: str, value: Any, source: str) -> None:
        """Fill ``name`` from ``source`` unless it is set already."""
        if value in (None, "", 0) or getattr(self, name) not in (None, "", 0):
            return
        setattr(self, name, value)
        self.sources[name] = source


def _f(text: str | None) -> float | None:
    try:
        return float(text) if text not in (None, "") else None
    except ValueError:
        return None


def _i(text: str | None) -> int | None:
    v = _f(text)
    return int(v) if v is not None and math.isfinite(v) and abs(v) < 2**31 else None


def _key_values(elem: ET.Element | None) -> dict[str, ET.Element]:
    out: dict[str, ET.Element] = {}
    if elem is None:
        return out
    for kv in elem.findall("a:KeyValueOfstringanyType", _NS):
        key = kv.find("a:Key", _NS)
        value = kv.find("a:Value", _NS)
        if key is not None and key.text and value is not None:
            out[key.text] = value
    return out


def parse_epu_xml(path: str | Path) -> dict[str, Any]:
    """The values MDCatch reads from one EPU exposure XML (see the module docstring), with
    full precision; absent values are left out."""
    p = Path(path)
    try:
        root = ET.parse(p).getroot()
    except (ET.ParseError, OSError) as exc:
        raise InputFileError(p, f"not a readable EPU XML file: {exc}") from None
    if not root.tag.endswith("MicroscopeImage"):
        raise InputFileError(p, "not an EPU exposure file (root is not MicroscopeImage)")
    out: dict[str, Any] = {}
    cam = root.find("so:microscopeData/so:acquisition/so:camera", _NS)
    specific = _key_values(cam.find("so:CameraSpecificInput", _NS) if cam is not None else None)
    custom = _key_values(root.find("so:CustomData", _NS))
    sr = 1
    if "SuperResolutionFactor" in specific:
        sr = _i(specific["SuperResolutionFactor"].text) or 1
        if sr not in (1, 2):
            raise InputFileError(p, f"SuperResolutionFactor {sr}: expected 1 or 2")
    px = _f(root.findtext("so:SpatialScale/so:pixelSize/so:x/so:numericValue", None, _NS))
    if px:
        out["pixel_size"] = px * 1e10 / sr
    kv = _f(root.findtext("so:microscopeData/so:gun/so:AccelerationVoltage", None, _NS))
    if kv:
        out["voltage"] = kv / 1000.0
    if cam is not None:
        out["exposure_time"] = _f(cam.findtext("so:ExposureTime", None, _NS))
        out["detector"] = cam.findtext("so:Name", "", _NS) or ""
        out["binning"] = _f(cam.findtext("so:Binning/dr:x", None, _NS))
    counting = specific.get("ElectronCountingEnabled")
    if counting is not None and (counting.text or "").lower() == "true":
        out["mode"] = "Super-resolution" if sr == 2 else "Counting"
    elif counting is not None:
        out["mode"] = "Linear"
    frac = specific.get("FractionationSettings")
    if frac is not None:
        n = frac.find("{*}NumberOffractions")
        if n is not None and n.text:
            out["n_frames"] = _i(n.text)
        fractions = frac.find("{*}DoseFractions")
        if fractions is not None:
            out["n_frames"] = len(list(fractions))
    dose = custom.get("Dose")
    if dose is not None and _f(dose.text):
        out["total_dose"] = _f(dose.text) * 1e-20  # e/m² -> e/Å²
    defocus = custom.get("AppliedDefocus")
    if defocus is not None and _f(defocus.text) is not None:
        out["defocus_um"] = _f(defocus.text) * 1e6
    name = custom.get("DetectorCommercialName")
    if name is not None and name.text:
        out["detector"] = name.text
    for key, value in custom.items():  # Falcon EER: Detectors[...].EerGainReference, FrameRate
        if key.endswith("EerGainReference") and value.text:
            out["mode"] = "EER"
            out["gain"] = Path(value.text.replace("\\", "/")).name
        elif key.endswith("].FrameRate") and _f(value.text):
            out["eer_frame_rate"] = _f(value.text)
    out["instrument_id"] = (
        root.findtext("so:microscopeData/so:instrument/so:InstrumentID", "", _NS) or ""
    )
    for key in ("pixel_size", "voltage", "total_dose", "exposure_time"):
        v = out.get(key)
        if v is not None and not (math.isfinite(v) and v > 0):
            raise InputFileError(p, f"{key} {v}: not a positive finite number")
    return {k: v for k, v in out.items() if v not in (None, "")}


def read_mdoc(path: str | Path) -> tuple[dict[str, str], list[dict[str, str]]]:
    """A SerialEM ``.mdoc`` as text: the header's ``key = value`` pairs and one dict per section
    (``[ZValue = n]``, ``[FrameSet = n]``, ``[MontSection = n]`` ...), values as written. Title
    lines (``[T = ...]`` or a bare ``T = ...``) are skipped. (Written here rather than through
    ``mdocfile``, which is not in the package indexes this project installs from, and whose
    DataFrame view drops a frame set's ``PixelSpacing`` when the header has one.)"""
    p = Path(path)
    try:
        text = p.read_bytes().decode("utf-8", errors="strict")
    except UnicodeDecodeError:
        raise InputFileError(p, "not a SerialEM .mdoc file (not UTF-8 text)") from None
    except OSError as exc:
        raise InputFileError(p, f"cannot read ({exc.strerror})") from None
    header: dict[str, str] = {}
    sections: list[dict[str, str]] = []
    current = header
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line:
            continue
        if line.startswith("[") and line.endswith("]"):
            key = line[1:-1].split("=", 1)[0].strip()
            if key != "T":
                current = {"__section__": line[1:-1].strip()}
                sections.append(current)
            continue
        key, sep, value = line.partition("=")
        if not sep or not key.strip():
            raise InputFileError(p, f"line {n}: expected 'key = value', got {raw[:60]!r}")
        if key.strip() != "T":
            current[key.strip()] = value.strip()
    if not header and not sections:
        raise InputFileError(p, "not a SerialEM .mdoc file (no 'key = value' line)")
    return header, sections


def parse_mdoc(path: str | Path) -> dict[str, Any]:
    """The values of a SerialEM ``.mdoc`` (its first section, the header for what the section
    lacks) that set processing parameters; absent values are left out."""
    p = Path(path)
    header, sections = read_mdoc(p)
    if not sections:
        raise InputFileError(p, "no frame set or section in the .mdoc file")
    sec = sections[0]

    def get(name: str) -> str | None:
        return sec.get(name, header.get(name))

    out: dict[str, Any] = {}
    out["pixel_size"] = _f(get("PixelSpacing"))
    out["voltage"] = _f(get("Voltage"))
    out["exposure_time"] = _f(get("ExposureTime"))
    binning = _f(get("Binning"))
    out["mode"] = "Super-resolution" if binning == 0.5 else "Counting"
    fd = get("FrameDosesAndNumber")
    if fd:
        vals = [_f(v) for v in fd.split()]
        if len(vals) % 2 or any(v is None or not math.isfinite(v) for v in vals):
            raise InputFileError(p, f"FrameDosesAndNumber {fd!r}: expected dose/count pairs")
        doses, counts = vals[0::2], vals[1::2]
        if sum(counts) > 0:
            out["n_frames"] = _i(str(sum(counts)))
            if any(doses):
                out["total_dose"] = sum(d * c for d, c in zip(doses, counts, strict=True))
    if "n_frames" not in out:
        out["n_frames"] = _i(get("NumSubFrames"))
    exposure = _f(get("ExposureDose"))
    if "total_dose" not in out and exposure:
        out["total_dose"] = exposure
    out["gain"] = get("GainReference") or ""
    out["defect_file"] = get("DefectFile") or ""
    target = _f(get("TargetDefocus"))
    if target is not None:
        out["defocus_um"] = target
    for key in ("pixel_size", "voltage", "total_dose", "exposure_time"):
        v = out.get(key)
        if v is not None and not (math.isfinite(v) and v > 0):
            raise InputFileError(p, f"{key} {v}: not a positive finite number")
    return {k: v for k, v in out.items() if v not in (None, "")}


def _movie_header(path: Path, eer_grouping: int = 1) -> dict[str, Any]:
    from tamis.io.movies import open_movie

    with open_movie(path, eer_grouping=eer_grouping) as m:
        out: dict[str, Any] = {"n_frames": m.n_frames, "frame_size": m.shape}
        if m.pixel_size > 0:
            out["pixel_size"] = m.pixel_size
        if m.kind == "eer":
            out["mode"] = "EER"
    return out


def read_session(directory: str | Path, *, profile: str | Path | None = None) -> Acquisition:
    """Gather an EPU or SerialEM session's metadata (see the module docstring)."""
    d = Path(directory)
    if not d.is_dir():
        raise InputFileError(d, "session folder not found")
    acq = Acquisition()
    xmls = sorted(glob.glob(str(d / EPU_XML)))
    mdocs = sorted(glob.glob(str(d / "*.mdoc")))
    if xmls:
        acq.software, acq.metadata_file = "EPU", xmls[0]
        first = parse_epu_xml(xmls[0])
        for k, v in first.items():
            if hasattr(acq, k):
                acq.set(k, v, f"EPU {Path(xmls[0]).name}")
        if len(xmls) > 1:
            last = parse_epu_xml(xmls[-1])
            for k in ("pixel_size", "voltage", "n_frames"):
                a, b = first.get(k), last.get(k)
                if a is not None and b is not None and not math.isclose(a, b, rel_tol=1e-3):
                    raise TamisError(
                        f"{k} differs within the session: {a} in {Path(xmls[0]).name}, {b} in "
                        f"{Path(xmls[-1]).name} (several settings in one session: process "
                        "them as separate sessions)"
                    )
        movie_dirs = sorted({str(Path(x).parent) for x in xmls})
    elif mdocs:
        acq.software, acq.metadata_file = "SerialEM", mdocs[0]
        for k, v in parse_mdoc(mdocs[0]).items():
            if hasattr(acq, k):
                acq.set(k, v, f"SerialEM {Path(mdocs[0]).name}")
        movie_dirs = [str(d)]
    else:
        raise InputFileError(d, f"no EPU exposure XML ({EPU_XML}) and no SerialEM .mdoc file found")
    movies: list[str] = []
    for md in movie_dirs:
        for pat in MOVIE_PATTERNS:
            movies += glob.glob(str(Path(md) / pat))
    if acq.software == "SerialEM" and not movies:
        movies = [m[: -len(".mdoc")] for m in mdocs if Path(m[: -len(".mdoc")]).is_file()]
    acq.movies = sorted(set(movies))
    if not acq.gain:  # a gain reference beside the movies (MDCatch's K2/K3 names, EPU's .gain)
        for md in movie_dirs:
            found = sorted(f for pat in GAIN_PATTERNS for f in glob.glob(str(Path(md) / pat)))
            if found:
                acq.set("gain", found[0], "found beside the movies")
                break
    if acq.movies:
        head = _movie_header(Path(acq.movies[0]))
        src = f"header of {Path(acq.movies[0]).name}"
        n_head = head.pop("n_frames")
        if acq.n_frames and acq.mode != "EER" and n_head != acq.n_frames:
            raise TamisError(
                f"frames: {acq.n_frames} in {Path(acq.metadata_file).name} but {n_head} in "
                f"{Path(acq.movies[0]).name}; give --dose_per_frame to decide"
            )
        acq.set("n_frames", n_head, src)
        px = head.pop("pixel_size", None)
        if px and acq.pixel_size and not math.isclose(px, acq.pixel_size, rel_tol=0.01):
            acq.warnings.append(
                f"pixel size {acq.pixel_size:.4f} A from {acq.sources['pixel_size']} but "
                f"{px:.4f} A in the movie header; the metadata's is used (--angpix to choose)"
            )
        acq.set("pixel_size", px, src)
        for k, v in head.items():
            acq.set(k, v, src)
    if profile is not None:
        _apply_profile(acq, Path(profile), d)
    for name in ("gain", "defect_file"):  # names in the metadata are relative to the movies
        value = getattr(acq, name)
        if value and not Path(value).is_absolute():
            for base in [Path(acq.movies[0]).parent if acq.movies else d, d]:
                if (base / value).is_file():
                    setattr(acq, name, str(base / value))
                    break
            else:
                acq.warnings.append(f"{name} {value} ({acq.sources.get(name)}) not found")
                setattr(acq, name, "")
    return acq


def _apply_profile(acq: Acquisition, path: Path, session: Path) -> None:
    try:
        prof = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InputFileError(path, f"not a readable JSON profile: {exc}") from None
    scope = prof.get("microscopes", {}).get(acq.instrument_id) or prof.get("microscope", {})
    src = f"profile {path.name}"
    if scope:
        acq.set("spherical_aberration", _f(str(scope.get("cs", ""))), src)
    det = prof.get("detectors", {}).get(acq.detector) or prof.get("detector", {})
    if det:
        for key in ("gain", "defect_file"):
            acq.set(key, det.get(key, ""), src)
        for key in ("gain_rot", "gain_flip"):
            if key in det:
                setattr(acq, key, int(det[key]))
                acq.sources[key] = src


def session_options(
    acq: Acquisition,
    *,
    angpix: float | None = None,
    voltage: float | None = None,
    cs: float | None = None,
    dose_per_frame: float | None = None,
    eer_target_dose: float = 1.0,
    movies_link: str = "Movies",
) -> dict[str, Any]:
    """The ``tamis it`` options for this session (prep: import movies, motion correction), or
    one :class:`TamisError` naming the first value missing, where it was looked for and the
    flag that supplies it. ``movies_link`` is the project-relative link to the session folder
    the import pattern goes through (RELION imports project-relative paths only)."""
    looked = f"{acq.software} metadata ({Path(acq.metadata_file).name}), the movie headers" + (
        ", the profile" if any(s.startswith("profile") for s in acq.sources.values()) else ""
    )
    px = angpix or acq.pixel_size
    kv = voltage or acq.voltage
    c = cs or acq.spherical_aberration
    if not acq.movies:
        raise TamisError(
            f"movies: none found beside {Path(acq.metadata_file).name} "
            f"(looked for {', '.join(MOVIE_PATTERNS)})"
        )
    for value, name, flag in ((px, "pixel size", "--angpix"), (kv, "voltage", "--kV"),
                              (c, "spherical aberration", "--Cs (or a --profile with the "
                               f"microscope {acq.instrument_id or '?'})")):  # fmt: skip
        if not value:
            raise TamisError(f"{name}: not in the {looked}; give {flag}")
    opts: dict[str, Any] = {}
    eer = acq.mode == "EER"
    if dose_per_frame:
        per = dose_per_frame
        if eer:
            raise TamisError("--dose_per_frame with EER: give the dose per raw frame through "
                             "the metadata, or --set prep__motioncorr__eer_grouping and dose")  # fmt: skip
    else:
        if not acq.total_dose or not acq.n_frames:
            what = "total dose" if not acq.total_dose else "number of frames"
            raise TamisError(f"dose per frame: the {what} is not in the {looked}; give "
                             "--dose_per_frame (e/A^2 per frame)")  # fmt: skip
        per = acq.total_dose / acq.n_frames
    if eer:
        grouping = max(1, round(eer_target_dose / per))
        opts["prep__motioncorr__eer_grouping"] = grouping
        per = per * grouping  # the true dose per fraction
    base = session_base(Path(os.path.abspath(acq.metadata_file)), acq.software)
    pattern = _pattern([Path(os.path.abspath(m)) for m in acq.movies], base)
    opts.update(
        {
            "prep__do_movies": True,
            "prep__importmovies__fn_in_raw": f"{movies_link}/{pattern}",
            "prep__importmovies__angpix": px,
            "prep__importmovies__kV": kv,
            "prep__importmovies__Cs": c,
            "prep__motioncorr__dose_per_frame": round(per, 6),
            "prep__motioncorr__bin_factor": 2 if acq.mode == "Super-resolution" else 1,
            "prep__motioncorr__gain_rot": acq.gain_rot,
            "prep__motioncorr__gain_flip": acq.gain_flip,
        }
    )
    for key, value in (("fn_gain_ref", acq.gain), ("fn_defect", acq.defect_file)):
        if value:  # through the project's link when the file is in the session
            full = Path(os.path.abspath(value))
            inside = base in full.parents
            opts[f"prep__motioncorr__{key}"] = (
                f"{movies_link}/{full.relative_to(base)}" if inside else value
            )
    return opts


def session_base(metadata_file: Path, software: str) -> Path:
    """The session folder: above ``Images-Disc*`` for EPU, the .mdoc's folder for SerialEM."""
    if software == "EPU":
        for parent in metadata_file.parents:
            if parent.name.startswith("Images-Disc"):
                return parent.parent
    return metadata_file.parent


def _pattern(movies: list[Path], base: Path) -> str:
    """A glob relative to ``base`` matching the movies: EPU's tree as wildcards, the suffix of
    the first movie's name."""
    rel = movies[0].relative_to(base)
    parts = list(rel.parts)
    suffix = next((p[1:] for p in MOVIE_PATTERNS if rel.name.endswith(p[1:])), rel.suffix)
    wild = []
    for p in parts[:-1]:
        if p.startswith("Images-Disc"):
            wild.append("Images-Disc*")
        elif p.startswith("GridSquare_"):
            wild.append("GridSquare_*")
        else:
            wild.append(p)
    return "/".join([*wild, f"*{suffix}"])


def write_record(acq: Acquisition, options: dict[str, Any], path: str | Path) -> Path:
    """The gathered record, readable: every value with its source, the warnings, and the
    options it set (JSON, written atomically)."""
    from tamis.io.star import atomic_path

    data = asdict(acq)
    data["movies"] = {"count": len(acq.movies), "first": acq.movies[:3]}
    data["options"] = options
    p = Path(path)
    with atomic_path(p) as tmp:
        tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
    return p
