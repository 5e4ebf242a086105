"""Structures for simulation: atomic models (PDB/mmCIF, via gemmi) or maps (MRC) -> density volumes.

A structure is named by a *spec*:

* ``path/to/model.pdb``, ``model.cif`` (optionally gzipped): all atoms of the first model;
* ``path/to/map.mrc`` / ``.map``: a density map, resampled to the simulation pixel size;
* ``builtin:8zpm``: the model shipped with tamis (PDB 8ZPM, a receptor-nanobody complex, ~45 kDa);
* any of the above with ``@CHAINS`` appended selects chains, e.g. ``builtin:8zpm@R`` (the receptor
  alone) or ``model.cif@AB``.

Atoms become density as Gaussian blobs weighted by atomic number, blurred by a B-factor.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from tamis.errors import InputFileError
from tamis.fourier import rfft_frequencies

__all__ = [
    "Structure",
    "load_structure",
    "structure_diameter",
    "random_protein",
    "rotate_about_z",
    "atoms_to_volume",
    "BUILTIN_STRUCTURES",
]

BUILTIN_STRUCTURES = {"8zpm": "8zpm.cif.gz"}


@dataclass
class Structure:
    """A density volume ``(n, n, n)`` (z, y, x) at ``pixel_size`` Å, centred in the box."""

    name: str
    volume: torch.Tensor
    pixel_size: float

    @property
    def box_size(self) -> int:
        return self.volume.shape[-1]

    def diameter(self, threshold: float = 0.02) -> float:
        """Extent in Å of the density above ``threshold`` x its maximum (largest bounding-box side)."""
        mask = self.volume > threshold * self.volume.max()
        idx = torch.nonzero(mask)
        if not len(idx):
            return 0.0
        extent = (idx.max(0).values - idx.min(0).values + 1).max().item()
        return float(extent) * self.pixel_size


def load_structure(
    spec: str,
    *,
    box_size: int,
    pixel_size: float,
    bfactor: float = 50.0,
) -> Structure:
    """Build the density of ``spec`` in a cube of ``box_size`` pixels of ``pixel_size`` Å."""
    path_text, _, chains = spec.partition("@")
    if path_text.startswith("random:"):
        coords, weights = random_protein(spec)
        return Structure(
            spec, atoms_to_volume(coords, weights, box_size, pixel_size, bfactor), pixel_size
        )
    if path_text.startswith("builtin:"):
        key = path_text.split(":", 1)[1]
        if key not in BUILTIN_STRUCTURES:
            raise InputFileError(
                spec, f"unknown built-in structure (have {sorted(BUILTIN_STRUCTURES)})"
            )
        resource = resources.files("tamis.data").joinpath(BUILTIN_STRUCTURES[key])
        with resources.as_file(resource) as path:
            coords, weights = _read_atoms(path, chains, spec)
        return Structure(
            spec, atoms_to_volume(coords, weights, box_size, pixel_size, bfactor), pixel_size
        )
    path = Path(path_text)
    if not path.exists():
        raise InputFileError(path, "structure file not found")
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in (".mrc", ".map", ".mrcs"):
        if chains:
            raise InputFileError(path, "chains can only be selected in atomic models")
        return Structure(spec, _map_volume(path, box_size, pixel_size), pixel_size)
    coords, weights = _read_atoms(path, chains, spec)
    return Structure(
        spec, atoms_to_volume(coords, weights, box_size, pixel_size, bfactor), pixel_size
    )


def random_protein(spec: str) -> tuple[np.ndarray, np.ndarray]:
    """A random pseudo-protein for ``random:SEED[:RESIDUES]`` (default 400 residues): a few
    compact domains, each a self-avoiding-ish random walk of C-alpha beads (3.8 Å steps) pulled
    towards its domain centre, with one carbon-weighted bead of 7 electrons per residue plus a
    side-chain bead. Distinct seeds give distinct shapes (for training on varied structures).
    Coordinates are centred on their weighted centroid (as :func:`atoms_to_volume` places
    them), so copies can be placed around it."""
    parts = spec.split(":")
    try:
        seed = int(parts[1])
        n_res = int(parts[2]) if len(parts) > 2 else 400
    except (IndexError, ValueError):
        raise InputFileError(
            spec, "random structures are random:SEED or random:SEED:RESIDUES"
        ) from None
    if not 20 <= n_res <= 20000:
        raise InputFileError(spec, "random structures need 20 to 20000 residues")
    rng = np.random.default_rng(seed)
    n_dom = int(rng.integers(1, 5))
    sizes = rng.multinomial(n_res - n_dom, np.ones(n_dom) / n_dom) + 1
    # domain centres: a chain of touching spheres (radius ~ 2.2 N^0.38 Å)
    radii = 2.2 * sizes**0.38 + 4
    centres = [np.zeros(3)]
    for d in range(1, n_dom):
        direction = rng.normal(size=3)
        direction /= np.linalg.norm(direction)
        centres.append(centres[rng.integers(0, d)] + direction * (radii[d] + radii[d - 1]) * 0.9)
    beads = []
    for d in range(n_dom):
        pos = centres[d] + rng.normal(size=3) * radii[d] * 0.3
        for _ in range(sizes[d]):
            step = rng.normal(size=3)
            pull = (centres[d] - pos) / max(radii[d], 1.0)
            step = step / np.linalg.norm(step) + 0.6 * pull
            pos = pos + 3.8 * step / np.linalg.norm(step)
            beads.append(pos.copy())
    ca = np.array(beads)
    side = ca + rng.normal(size=ca.shape) * 1.5
    coords = np.concatenate([ca, side])
    weights = np.concatenate([np.full(len(ca), 7.0), np.full(len(side), 6.0 * 3)])
    return coords - (coords * weights[:, None]).sum(0) / weights.sum(), weights


def rotate_about_z(coords: np.ndarray, angle: float) -> np.ndarray:
    """Atom coordinates ``(n, 3)`` (x, y, z) turned by ``angle`` radians about the z axis, for
    building rings and twisted rods of copies."""
    c, s = np.cos(angle), np.sin(angle)
    return coords @ np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]]).T


def structure_diameter(spec: str, *, bfactor: float = 50.0) -> float:
    """Diameter in Å of ``spec`` (largest side of its density's bounding box), measured on a
    coarse grid (3 Å pixels, or 6 Å for structures over 350 Å)."""
    for pixel_size in (3.0, 6.0, 12.0):
        st = load_structure(spec, box_size=128, pixel_size=pixel_size, bfactor=bfactor)
        d = st.diameter()
        if d < 0.9 * 128 * pixel_size:
            return d
    return d


def atoms_to_volume(
    coords: np.ndarray,
    weights: np.ndarray,
    box_size: int,
    pixel_size: float,
    bfactor: float = 50.0,
) -> torch.Tensor:
    """Splat atoms (Å, centred on their weighted centroid) into a ``box_size³`` grid.

    Trilinear splatting, then a Gaussian blur ``exp(-B s² / 4)`` in Fourier space. Atoms outside
    the box are dropped. Returns float32 ``(z, y, x)``.
    """
    n = box_size
    xyz = torch.as_tensor(coords, dtype=torch.float64)
    w = torch.as_tensor(weights, dtype=torch.float64)
    xyz = xyz - (xyz * w[:, None]).sum(0) / w.sum()
    grid = xyz / pixel_size + n // 2  # voxel coordinates, origin at n//2
    base = torch.floor(grid).long()
    frac = grid - base
    vol = torch.zeros(n * n * n, dtype=torch.float64)
    for dz in (0, 1):
        for dy in (0, 1):
            for dx in (0, 1):
                idx = base + torch.tensor([dx, dy, dz])
                wt = (
                    (frac[:, 0] if dx else 1 - frac[:, 0])
                    * (frac[:, 1] if dy else 1 - frac[:, 1])
                    * (frac[:, 2] if dz else 1 - frac[:, 2])
                    * w
                )
                ok = ((idx >= 0) & (idx < n)).all(dim=1)
                flat = (idx[ok, 2] * n + idx[ok, 1]) * n + idx[ok, 0]
                vol.index_add_(0, flat, wt[ok])
    vol = vol.reshape(n, n, n)
    if bfactor > 0:
        spec = torch.fft.rfftn(vol)
        kz = torch.fft.fftfreq(n, dtype=torch.float64)[:, None, None]
        ky, kx = rfft_frequencies((n, n), dtype=torch.float64)
        ky = ky / n
        kx = kx / n
        s2 = (kz**2 + ky[None] ** 2 + kx[None] ** 2) / pixel_size**2
        vol = torch.fft.irfftn(spec * torch.exp(-bfactor * s2 / 4.0), s=(n, n, n))
    return vol.to(torch.float32)


def _read_atoms(path: Path, chains: str, spec: str) -> tuple[np.ndarray, np.ndarray]:
    import gemmi

    try:
        st = gemmi.read_structure(str(path))
    except Exception as exc:
        raise InputFileError(path, f"cannot read atomic model ({exc})") from None
    if len(st) == 0:
        raise InputFileError(path, "atomic model has no models")
    coords, weights = [], []
    wanted = set(chains) if chains else None
    for chain in st[0]:
        if wanted is not None and chain.name not in wanted:
            continue
        for residue in chain:
            for atom in residue:
                z = atom.element.atomic_number
                if z <= 1:  # hydrogens: most models lack them; keep densities comparable
                    continue
                coords.append(atom.pos.tolist())
                weights.append(float(z) * atom.occ)
    if not coords:
        what = f"chain(s) {chains}" if chains else "atoms"
        raise InputFileError(spec, f"no {what} found in the model")
    return np.asarray(coords), np.asarray(weights)


def _map_volume(path: Path, box_size: int, pixel_size: float) -> torch.Tensor:
    from tamis.io.mrc import read_mrc

    data, apix = read_mrc(path)
    if data.ndim != 3 or len(set(data.shape)) != 1:
        raise InputFileError(path, f"expected a cubic 3D map, got shape {data.shape}")
    if apix <= 0:
        raise InputFileError(path, "map header has no pixel size")
    vol = torch.from_numpy(data).to(torch.float32)
    n_new = max(2, int(round(vol.shape[0] * apix / pixel_size)))
    if n_new != vol.shape[0]:
        vol = torch.nn.functional.interpolate(
            vol[None, None], size=(n_new,) * 3, mode="trilinear", align_corners=False
        )[0, 0]
    vol = vol - torch.median(vol)  # solvent level to zero
    out = torch.zeros((box_size,) * 3, dtype=torch.float32)
    src = [slice(max(0, (n_new - box_size) // 2), max(0, (n_new - box_size) // 2) + box_size)] * 3
    crop = vol[tuple(src)]
    m = crop.shape[0]
    off = (box_size - m) // 2
    out[off : off + m, off : off + m, off : off + m] = crop
    return out.clamp(min=0)
