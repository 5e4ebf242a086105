"""The readers the fuzzer feeds, each with its valid seed files."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tests.faults.fuzz import mrc_bytes

DATA = Path(__file__).resolve().parents[1] / "data"
SCHEMES = Path(__file__).resolve().parents[2] / "src" / "tamis" / "data" / "schemes"

PARTICLES_31 = b"""
# version 30001

data_optics

loop_
_rlnOpticsGroupName #1
_rlnOpticsGroup #2
_rlnMicrographOriginalPixelSize #3
_rlnVoltage #4
_rlnSphericalAberration #5
_rlnAmplitudeContrast #6
_rlnImagePixelSize #7
_rlnImageSize #8
_rlnImageDimensionality #9
opticsGroup1 1 1.0 300.0 2.7 0.1 4.0 64 2


# version 30001

data_particles

loop_
_rlnCoordinateX #1
_rlnCoordinateY #2
_rlnImageName #3
_rlnMicrographName #4
_rlnOpticsGroup #5
_rlnDefocusU #6
_rlnDefocusV #7
_rlnDefocusAngle #8
_rlnAnglePsi #9
_rlnOriginXAngst #10
_rlnOriginYAngst #11
_rlnClassNumber #12
_rlnGroupNumber #13
_rlnRandomSubset #14
  512.0  300.0 000001@Extract/job005/mic1.mrcs MotionCorr/mic1.mrc 1 15000.0 14500.0 30.0  12.0  1.5 -2.0 1 1 1
  100.0  800.0 000002@Extract/job005/mic1.mrcs MotionCorr/mic1.mrc 1 15000.0 14500.0 30.0 182.0  0.0  0.0 2 1 2
  640.5  210.0 000001@Extract/job005/mic2.mrcs MotionCorr/mic2.mrc 1 21000.0 20800.0 -5.0  90.0 -4.0  4.0 1 2 1

"""

PARTICLES_30 = b"""
data_

loop_
_rlnImageName #1
_rlnMicrographName #2
_rlnVoltage #3
_rlnDefocusU #4
_rlnDefocusV #5
_rlnDefocusAngle #6
_rlnSphericalAberration #7
_rlnAmplitudeContrast #8
_rlnMagnification #9
_rlnDetectorPixelSize #10
_rlnOriginX #11
_rlnOriginY #12
000001@Particles/mic1.mrcs mic1.mrc 300 15000 14500 30 2.7 0.1 10000 14.0 1.0 -2.0
000002@Particles/mic1.mrcs mic1.mrc 300 15000 14500 30 2.7 0.1 10000 14.0 0.0 0.5

"""

MICROGRAPHS = b"""
# version 30001

data_optics

loop_
_rlnOpticsGroupName #1
_rlnOpticsGroup #2
_rlnMicrographOriginalPixelSize #3
_rlnVoltage #4
_rlnSphericalAberration #5
_rlnAmplitudeContrast #6
_rlnMicrographPixelSize #7
opticsGroup1 1 1.0 300.0 2.7 0.1 1.0

# version 30001

data_micrographs

loop_
_rlnMicrographName #1
_rlnOpticsGroup #2
_rlnCtfImage #3
_rlnDefocusU #4
_rlnDefocusV #5
_rlnCtfAstigmatism #6
_rlnDefocusAngle #7
_rlnCtfFigureOfMerit #8
_rlnCtfMaxResolution #9
MotionCorr/job002/mic1.mrc 1 CtfFind/job003/mic1.ctf:mrc 15000 14500 500 30 0.2 4.5
MotionCorr/job002/mic2.mrc 1 CtfFind/job003/mic2.ctf:mrc 21000 20800 200 -5 0.15 5.1

"""

COORDINATES = b"""
# version 30001

data_

loop_
_rlnCoordinateX #1
_rlnCoordinateY #2
_rlnClassNumber #3
_rlnAutopickFigureOfMerit #4
_rlnAnglePsi #5
  512.000000   300.000000            0     1.523000   -999.00000
  100.000000   800.000000            0     0.871000   -999.00000

"""

JOB_STAR = b"""
# version 30001

data_job

_rlnJobTypeLabel             relion.class2d
_rlnJobIsContinue                       0
_rlnJobIsTomo                           0


# version 30001

data_joboptions_values

loop_
_rlnJobOptionVariable #1
_rlnJobOptionValue #2
fn_img Select/job007/particles.star
nr_classes 50
do_em No
do_grad Yes
nr_iter_grad 200
particle_diameter 200
"""


@dataclass(frozen=True)
class Reader:
    name: str
    read: Callable[[Path], object]
    seeds: list[tuple[str, bytes]]
    binary: bool = False


def _star_seeds() -> list[tuple[str, bytes]]:
    names = [
        "default_pipeline.star", "one_loop.star", "postprocess.star", "rln3.1_data_style.star",
        "run_it025_optimiser_2D.star", "run_it025_sampling_3D.star",
    ]  # fmt: skip
    seeds = [(n, (DATA / "star" / n).read_bytes()) for n in names]
    return seeds + [("particles.star", PARTICLES_31), ("particles_30.star", PARTICLES_30)]


def _movie_mrc() -> bytes:
    import tempfile

    import mrcfile

    counts = np.random.default_rng(1).poisson(2.0, size=(4, 24, 20)).astype(np.uint16)
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "movie.mrcs"
        with mrcfile.new(p) as mrc:
            mrc.set_data(counts)
            mrc.set_image_stack()
        return p.read_bytes()


def _movie_tiff() -> bytes:
    import io

    import tifffile

    counts = np.random.default_rng(2).poisson(2.0, size=(3, 24, 20)).astype(np.uint8)
    buf = io.BytesIO()
    with tifffile.TiffWriter(buf) as tif:
        for f in counts:
            tif.write(f, compression="lzw", contiguous=False)
    return buf.getvalue()


def _movie_eer() -> bytes:
    import tempfile

    from tests.helpers import write_eer

    rng = np.random.default_rng(4)
    side, events = 16, []
    for _ in range(5):
        pos = np.sort(rng.choice(side * side, 20, replace=False))
        events.append((pos, rng.integers(0, 16, pos.size)))
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "movie.eer"
        write_eer(p, events, side)
        return p.read_bytes()


def _motion_star() -> bytes:
    import tempfile

    from tamis.io.motion_star import MovieMotion, write_motion_star

    shifts = np.cumsum(np.random.default_rng(3).normal(size=(6, 2)), 0)
    shifts[0] = 0
    shifts[5] = np.nan
    motion = MovieMotion(n_frames=6, shape=(24, 20), first=0, global_shifts=shifts,
                         local_coeffs=np.arange(36.0).reshape(2, 18) * 1e-3,
                         hot_pixels=np.array([[3, 4]]))  # fmt: skip
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "movie.star"
        write_motion_star(p, motion, movie="Movies/movie.tif", pixel_size=1.0, voltage=300.0,
                          dose_per_frame=1.0)  # fmt: skip
        return p.read_bytes()


def readers() -> list[Reader]:
    from tamis.io.coords import read_coordinate_file
    from tamis.io.mrc import open_stack, read_mrc
    from tamis.io.star import read_data_star, read_star
    from tamis.pipeline.job import JobStar
    from tamis.schemes.scheme import Scheme

    rng = np.random.default_rng(0)
    image = rng.normal(size=(32, 32)).astype(np.float32)
    stack = rng.normal(size=(5, 16, 16)).astype(np.float32)
    volume = rng.normal(size=(12, 12, 12)).astype(np.float32)

    def read_stack(path: Path) -> None:
        s = open_stack(path)
        n = len(s)
        s.read([0, n - 1] if n else [])

    from tamis.pick.deep.predict import load_model
    from tamis.rank.select import load_ranker, recommended_min_score

    data = Path(__file__).resolve().parents[2] / "src" / "tamis" / "data"

    def read_ranker_record(path: Path) -> None:
        weights = path.with_suffix(".safetensors")
        if not weights.exists():
            weights.write_bytes((data / "ranker_general.safetensors").read_bytes())
        _, meta = load_ranker(weights)
        recommended_min_score(meta)

    def read_picker(path: Path) -> None:
        path.with_suffix(".json").unlink(missing_ok=True)
        load_model(path)

    from tamis.io.motion_star import read_motion_star
    from tamis.io.movies import open_movie, read_gain
    from tamis.prep.session import parse_epu_xml, parse_mdoc

    def read_movie(path: Path) -> None:
        with open_movie(path) as m:
            m.read(0, m.n_frames)

    def read_eer(path: Path) -> None:  # 4K and 8K rendering, fractions of 2 raw frames
        for up in (1, 2):
            with open_movie(path, eer_grouping=2, eer_upsampling=up) as m:
                m.read(0, m.n_frames)

    metadata = DATA / "metadata"
    return [
        Reader(
            "epu_xml",
            parse_epu_xml,
            [("exposure.xml", (metadata / "epu_k3_exposure.xml").read_bytes())],
        ),
        Reader(
            "mdoc",
            parse_mdoc,
            [
                (f"{n}.mdoc", (metadata / f"{n}.mdoc").read_bytes())
                for n in ("serialem_frame_set_single", "serialem_de_no_dose")
            ],
        ),  # fmt: skip
        Reader("movie_mrc", read_movie, [("movie.mrcs", _movie_mrc())], binary=True),
        Reader("movie_tiff", read_movie, [("movie.tif", _movie_tiff())], binary=True),
        Reader("movie_eer", read_eer, [("movie.eer", _movie_eer())], binary=True),
        Reader("gain", read_gain, [("gain.mrc", mrc_bytes(image + 2.0))], binary=True),
        Reader("motion_star", read_motion_star, [("movie.star", _motion_star())]),
        Reader("star", read_star, _star_seeds()),
        Reader(
            "ranker_record",
            read_ranker_record,
            [("ranker.json", (data / "ranker_general.json").read_bytes())],
        ),
        Reader(
            "picker_weights",
            read_picker,
            [("picker.safetensors", (data / "picker_general.safetensors").read_bytes())],
            binary=True,
        ),
        Reader(
            "data_star",
            read_data_star,
            [
                ("particles.star", PARTICLES_31),
                ("particles_30.star", PARTICLES_30),
                ("micrographs.star", MICROGRAPHS),
            ],
        ),  # fmt: skip
        Reader("coordinates", read_coordinate_file, [("mic1_autopick.star", COORDINATES)]),
        Reader("job_star", JobStar.read, [("job.star", JOB_STAR)]),
        Reader(
            "scheme_star",
            Scheme.read,
            [("scheme.star", (SCHEMES / s / "scheme.star").read_bytes()) for s in ("prep", "proc")],
        ),
        Reader(
            "mrc",
            read_mrc,
            [("image.mrc", mrc_bytes(image)), ("volume.mrc", mrc_bytes(volume))],
            binary=True,
        ),
        Reader(
            "mrc_stack", read_stack, [("stack.mrcs", mrc_bytes(stack, stack=True))], binary=True
        ),
    ]
