"""``tamis simulate``: particle stacks and micrographs with ground truth.

Examples::

    tamis simulate particles --o sim/ --n 2000 --box 64 --angpix 2.8 --snr 0.05 \\
        --structure builtin:8zpm --structure builtin:8zpm@R --junk 0.15
    tamis simulate micrographs --o mics/ --n 10 --size 2048 --angpix 1.5 --per_mic 120
    tamis simulate movies --o movies/ --n 2 --size 4096 --frames 40 --dose_per_frame 1.0
"""

from __future__ import annotations

from pathlib import Path

import typer

from tamis.cli._common import console, user_errors
from tamis.simulate.common import Optics
from tamis.simulate.junk import JUNK_KINDS
from tamis.simulate.micrographs import MicrographSimulation, simulate_micrographs
from tamis.simulate.particles import ParticleSimulation, simulate_particles

app = typer.Typer(
    help="Simulate particles, micrographs or movies with ground truth.", no_args_is_help=True
)

STRUCTURE_HELP = (
    "Structure spec, repeatable for heterogeneity: a PDB/mmCIF model, an MRC map, or "
    "builtin:8zpm; append @CHAINS to select chains (builtin:8zpm@R)."
)


def _optics(voltage: float, cs: float, q0: float, dmin: float, dmax: float, astig: float) -> Optics:
    return Optics(
        voltage=voltage,
        spherical_aberration=cs,
        amplitude_contrast=q0,
        defocus_min=dmin,
        defocus_max=dmax,
        astigmatism_max=astig,
    )


@app.command("particles")
@user_errors
def particles(
    o: Path = typer.Option(..., "--o", help="Output directory."),
    n: int = typer.Option(2000, "--n", help="Number of particle images (junk included)."),
    box: int = typer.Option(64, "--box", help="Box size in pixels (even)."),
    angpix: float = typer.Option(2.8, "--angpix", help="Pixel size in A."),
    snr: float = typer.Option(0.05, "--snr", help="Signal variance / noise variance."),
    structure: list[str] = typer.Option(["builtin:8zpm"], "--structure", help=STRUCTURE_HELP),
    weight: list[float] = typer.Option(None, "--weight", help="Relative abundance per structure."),
    junk: float = typer.Option(0.0, "--junk", help="Fraction of images that are junk."),
    junk_kinds: str = typer.Option(
        ",".join(JUNK_KINDS), "--junk_kinds", help="Comma-separated junk kinds."
    ),
    shift_sigma: float = typer.Option(1.5, "--shift_sigma", help="Std of true shifts (px)."),
    per_mic: int = typer.Option(100, "--per_mic", help="Particles per simulated micrograph."),
    voltage: float = typer.Option(300.0, "--voltage", help="kV."),
    cs: float = typer.Option(2.7, "--cs", help="Spherical aberration (mm)."),
    q0: float = typer.Option(0.1, "--q0", help="Amplitude contrast."),
    defocus_min: float = typer.Option(8000.0, "--defocus_min", help="A."),
    defocus_max: float = typer.Option(25000.0, "--defocus_max", help="A."),
    astigmatism: float = typer.Option(600.0, "--astigmatism", help="Largest |dU - dV| (A)."),
    float16: bool = typer.Option(False, "--float16", help="Write MRC mode 12 stacks."),
    seed: int = typer.Option(0, "--random_seed", help="Random seed."),
    device: str = typer.Option("cpu", "--device", help="torch device (cpu, cuda, cuda:1...)."),
) -> None:
    """Particle stacks + RELION 3.1 particles.star + ground truth."""
    config = ParticleSimulation(
        structures=structure,
        structure_weights=weight or None,
        n_particles=n,
        box_size=box,
        pixel_size=angpix,
        snr=snr,
        junk_fraction=junk,
        junk_kinds=tuple(k.strip() for k in junk_kinds.split(",") if k.strip()),
        shift_sigma_px=shift_sigma,
        particles_per_micrograph=per_mic,
        optics=_optics(voltage, cs, q0, defocus_min, defocus_max, astigmatism),
        float16=float16,
        seed=seed,
    )
    result = simulate_particles(config, o, device=device, show_progress=True)
    console.print(
        f"wrote {result.n_particles} particles: {result.star}, truth: {result.ground_truth}"
        f" (noise std {result.noise_std:.3g})",
        highlight=False,
    )


@app.command("micrographs")
@user_errors
def micrographs(
    o: Path = typer.Option(..., "--o", help="Output directory."),
    n: int = typer.Option(4, "--n", help="Number of micrographs."),
    size: int = typer.Option(1024, "--size", help="Micrograph width and height in pixels."),
    height: int = typer.Option(0, "--height", help="Height in pixels if not square."),
    angpix: float = typer.Option(1.5, "--angpix", help="Pixel size in A."),
    per_mic: int = typer.Option(80, "--per_mic", help="Particles per micrograph (at most)."),
    snr: float = typer.Option(0.1, "--snr", help="Per-particle signal variance / noise variance."),
    structure: list[str] = typer.Option(["builtin:8zpm"], "--structure", help=STRUCTURE_HELP),
    weight: list[float] = typer.Option(None, "--weight", help="Relative abundance per structure."),
    min_distance: float = typer.Option(
        0.0, "--min_distance", help="Minimum centre distance in A (0: particle diameter)."
    ),
    ice_gradient: float = typer.Option(
        0.3, "--ice_gradient", help="Relative ice-gradient strength."
    ),
    ice: float = typer.Option(0.5, "--ice", help="Mean ice crystals per micrograph."),
    aggregates: float = typer.Option(0.0, "--aggregates", help="Mean aggregates per micrograph."),
    carbon: float = typer.Option(
        0.0, "--carbon", help="Fraction of micrographs with a carbon edge."
    ),
    ice_scattering: float = typer.Option(
        0.0,
        "--ice_scattering",
        help="Fraction of the noise that is CTF-modulated ice scattering (Thon rings).",
    ),
    voltage: float = typer.Option(300.0, "--voltage", help="kV."),
    cs: float = typer.Option(2.7, "--cs", help="Spherical aberration (mm)."),
    q0: float = typer.Option(0.1, "--q0", help="Amplitude contrast."),
    defocus_min: float = typer.Option(8000.0, "--defocus_min", help="A."),
    defocus_max: float = typer.Option(25000.0, "--defocus_max", help="A."),
    astigmatism: float = typer.Option(600.0, "--astigmatism", help="Largest |dU - dV| (A)."),
    seed: int = typer.Option(0, "--random_seed", help="Random seed."),
    device: str = typer.Option("cpu", "--device", help="torch device (cpu, cuda, cuda:1...)."),
) -> None:
    """Micrographs + micrographs.star with CTF + ground-truth coordinate files."""
    config = MicrographSimulation(
        structures=structure,
        structure_weights=weight or None,
        n_micrographs=n,
        height_px=height or size,
        width_px=size,
        pixel_size=angpix,
        particles_per_micrograph=per_mic,
        snr=snr,
        min_distance=min_distance or None,
        ice_gradient=ice_gradient,
        ice_per_micrograph=ice,
        aggregates_per_micrograph=aggregates,
        carbon_fraction=carbon,
        ice_scattering=ice_scattering,
        optics=_optics(voltage, cs, q0, defocus_min, defocus_max, astigmatism),
        seed=seed,
    )
    result = simulate_micrographs(config, o, device=device, show_progress=True)
    console.print(
        f"wrote {n} micrographs with {result.n_particles} particles: {result.star}, "
        f"truth: {result.coordinates}",
        highlight=False,
    )


@app.command("movies")
@user_errors
def movies(
    o: Path = typer.Option(..., "--o", help="Output directory."),
    n: int = typer.Option(2, "--n", help="Number of movies."),
    size: int = typer.Option(1024, "--size", help="Frame width and height in pixels."),
    frames: int = typer.Option(40, "--frames", help="Frames per movie."),
    dose_per_frame: float = typer.Option(1.0, "--dose_per_frame", help="e/A^2 per frame."),
    angpix: float = typer.Option(1.0, "--angpix", help="Pixel size in A."),
    per_mic: int = typer.Option(30, "--per_mic", help="Particles per movie."),
    structure: list[str] = typer.Option(["builtin:8zpm"], "--structure", help=STRUCTURE_HELP),
    drift: float = typer.Option(20.0, "--drift", help="Length of the global track (px)."),
    local: float = typer.Option(2.0, "--local", help="Largest local displacement (px)."),
    gain_spread: float = typer.Option(0.1, "--gain_spread", help="Detector sensitivity spread."),
    file_format: str = typer.Option("tiff", "--format", help="tiff (LZW, uint8) or mrc (uint16)."),
    seed: int = typer.Option(0, "--random_seed", help="Random seed."),
    device: str = typer.Option("cpu", "--device", help="torch device (cpu, cuda, cuda:1...)."),
) -> None:
    """Movies with known global and local motion, Poisson counts, damage, gain and hot pixels;
    movies.star, gain.mrc and the true motion as RELION metadata files."""
    from tamis.simulate.movies import MovieSimulation, simulate_movies

    config = MovieSimulation(
        n_movies=n, height_px=size, width_px=size, n_frames=frames,
        dose_per_frame=dose_per_frame, pixel_size=angpix, particles_per_movie=per_mic,
        structures=tuple(structure), drift_px=drift, local_px=local, gain_spread=gain_spread,
        file_format=file_format, seed=seed,
    )  # fmt: skip
    star = simulate_movies(config, o, device=device, show_progress=True)
    console.print(f"wrote {n} movies: {star}, gain {o / 'gain.mrc'}, truth {o / 'truth'}",
                  highlight=False)  # fmt: skip
