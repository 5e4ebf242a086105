"""Pieces shared by the particle and micrograph simulators: optics, CTF draws, structures."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from tamis import __version__
from tamis.ctf import compute_ctf
from tamis.errors import TamisError
from tamis.geometry import euler_to_matrix, random_euler_angles
from tamis.io.mrc import write_mrc
from tamis.io.star import atomic_path
from tamis.simulate.project import Projector
from tamis.simulate.structure import Structure, load_structure, structure_diameter

__all__ = ["Optics", "StructureSet", "draw_defocus", "optics_table", "write_json"]


@dataclass
class Optics:
    """Microscope and CTF distribution (RELION units: kV, mm, Å, degrees)."""

    voltage: float = 300.0
    spherical_aberration: float = 2.7
    amplitude_contrast: float = 0.1
    defocus_min: float = 8000.0
    defocus_max: float = 25000.0
    astigmatism_max: float = 600.0
    #: Per-particle defocus scatter within a micrograph (ice thickness), standard deviation in Å.
    defocus_jitter: float = 40.0


def draw_defocus(
    n: int, optics: Optics, generator: torch.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Defocus U, V (Å) and angle (degrees) for ``n`` micrographs: mean uniform in
    [min, max], astigmatism uniform in [0, max], angle uniform. U >= V as CTFFIND writes."""
    u = torch.rand((n, 3), generator=generator, dtype=torch.float64).numpy()
    mean = optics.defocus_min + (optics.defocus_max - optics.defocus_min) * u[:, 0]
    astig = optics.astigmatism_max * u[:, 1]
    angle = 180.0 * u[:, 2] - 90.0
    return mean + astig / 2, mean - astig / 2, angle


def optics_table(optics: Optics, pixel_size: float, *, box_size: int | None) -> pd.DataFrame:
    """A one-group RELION optics table, for particles (``box_size`` given) or micrographs."""
    row: dict[str, object] = {
        "rlnOpticsGroupName": "opticsGroup1",
        "rlnOpticsGroup": 1,
        "rlnMicrographOriginalPixelSize": pixel_size,
        "rlnVoltage": optics.voltage,
        "rlnSphericalAberration": optics.spherical_aberration,
        "rlnAmplitudeContrast": optics.amplitude_contrast,
    }
    if box_size is None:
        row["rlnMicrographPixelSize"] = pixel_size
    else:
        row.update(
            rlnImagePixelSize=pixel_size,
            rlnImageSize=box_size,
            rlnImageDimensionality=2,
            rlnCtfDataAreCtfPremultiplied=0,
        )
    return pd.DataFrame([row])


class StructureSet:
    """Several structures at one pixel size and box, with their projectors and mixing weights."""

    def __init__(
        self,
        specs: list[str],
        *,
        box_size: int,
        pixel_size: float,
        weights: list[float] | None = None,
        bfactor: float = 50.0,
        device: str | torch.device = "cpu",
    ) -> None:
        if not specs:
            raise TamisError("no structure given")
        if weights is not None and len(weights) != len(specs):
            raise TamisError(f"{len(weights)} structure weights for {len(specs)} structures")
        self.structures: list[Structure] = [
            load_structure(s, box_size=box_size, pixel_size=pixel_size, bfactor=bfactor)
            for s in specs
        ]
        self.diameters = [structure_diameter(s, bfactor=bfactor) for s in specs]
        for spec, d in zip(specs, self.diameters, strict=True):
            if d > box_size * pixel_size:
                raise TamisError(
                    f"{spec}: diameter {d:.0f} A does not fit in a box of {box_size} px x "
                    f"{pixel_size} A; use a larger box or pixel size"
                )
        self.projectors = [Projector(st.volume.to(device)) for st in self.structures]
        w = np.asarray(weights if weights is not None else [1.0] * len(specs), dtype=np.float64)
        self.weights = w / w.sum()
        self.box_size = box_size
        self.pixel_size = pixel_size

    def __len__(self) -> int:
        return len(self.structures)

    def draw(self, n: int, generator: torch.Generator) -> np.ndarray:
        """Structure index of ``n`` particles, by weight."""
        return torch.multinomial(
            torch.as_tensor(self.weights), n, replacement=True, generator=generator
        ).numpy()

    def slices(self, which: np.ndarray, angles: torch.Tensor) -> torch.Tensor:
        """Fourier slices ``(b, n, n // 2 + 1)`` of structure ``which[i]`` at Euler ``angles[i]``."""
        n = self.box_size
        device = self.projectors[0].device
        out = torch.zeros((len(which), n, n // 2 + 1), dtype=torch.complex64, device=device)
        rot = euler_to_matrix(angles[:, 0], angles[:, 1], angles[:, 2])
        for s, proj in enumerate(self.projectors):
            sel = np.flatnonzero(which == s)
            if len(sel):
                out[torch.as_tensor(sel, device=device)] = proj.slices(rot[sel])
        return out

    def signal_level(
        self, optics: Optics, generator: torch.Generator, *, n: int = 128
    ) -> tuple[float, float]:
        """(variance of CTF-modulated projections, mean projection peak) over random views.

        The variance is taken over the whole box and averaged over views, structures and the
        defocus range; it defines the SNR. The peak sets the scale of junk.
        """
        which = self.draw(n, generator)
        angles = random_euler_angles(n, generator)
        spectra = self.slices(which, angles)
        du, dv, ang = draw_defocus(n, optics, generator)
        nb = self.box_size
        ctf = compute_ctf(
            (nb, nb),
            pixel_size=self.pixel_size,
            defocus_u=torch.as_tensor(du),
            defocus_v=torch.as_tensor(dv),
            defocus_angle=torch.as_tensor(ang),
            voltage=optics.voltage,
            spherical_aberration=optics.spherical_aberration,
            amplitude_contrast=optics.amplitude_contrast,
            device=spectra.device,
        )
        from tamis.fourier import irfft2_centered

        clean = irfft2_centered(spectra, (nb, nb))
        modulated = irfft2_centered(spectra * ctf, (nb, nb))
        var = float(modulated.var(dim=(-2, -1)).mean())
        peak = float(clean.amax(dim=(-2, -1)).mean())
        if not math.isfinite(var) or var <= 0:
            raise TamisError("structures give no signal at this box and pixel size")
        return var, peak

    def write_volumes(self, directory: Path) -> list[str]:
        """Write each structure's density as ``structure_NN.mrc``; return the file names."""
        names = []
        for i, st in enumerate(self.structures, start=1):
            name = f"structure_{i:02d}.mrc"
            write_mrc(directory / name, st.volume.cpu().numpy(), self.pixel_size, stack=False)
            names.append(name)
        return names


def write_json(path: Path, payload: dict) -> None:
    """Write a JSON record atomically (dataclasses expanded), stamped with the tamis version."""

    def default(obj: object) -> object:
        if is_dataclass(obj):
            return asdict(obj)  # type: ignore[arg-type]
        if isinstance(obj, (np.generic,)):
            return obj.item()
        if isinstance(obj, Path):
            return str(obj)
        raise TypeError(type(obj))

    with atomic_path(path) as tmp:
        tmp.write_text(
            json.dumps({"tamis_version": __version__, **payload}, indent=2, default=default) + "\n"
        )
