"""Deep picker inference: score map -> blobs -> centroids."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from tamis.errors import InputFileError
from tamis.io.records import read_model_record
from tamis.pick.deep.data import TARGET_RADIUS, prepare
from tamis.pick.deep.network import DIAMETER_PX, PickerNet
from tamis.pick.micrograph import Micrograph
from tamis.pick.peaks import Picks, find_peaks

__all__ = [
    "DeepPicker",
    "load_model",
    "save_model",
    "pick_deep",
    "picks_from_scores",
    "score_map",
    "SHIPPED_MODEL",
]

SHIPPED_MODEL = Path(__file__).resolve().parents[2] / "data" / "picker_general.safetensors"


def save_model(path: str | Path, model: PickerNet, meta: dict) -> None:
    """Weights as safetensors (a plain state dict) and ``<path>.json`` beside them."""
    from safetensors.torch import save_file

    from tamis.io.star import atomic_path

    path = Path(path)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt", "tamis": "picker"})
    with atomic_path(path.with_suffix(".json")) as tmp:
        tmp.write_text(json.dumps(meta, indent=2, default=str))


def load_model(path: str | Path | None = None) -> tuple[PickerNet, dict]:
    """A picker (the shipped general model when ``path`` is None). Only tensors are read."""
    from safetensors.torch import load_file

    path = Path(path) if path is not None else SHIPPED_MODEL
    if not path.is_file():
        raise InputFileError(path, "picker model not found")
    try:
        state = load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types
        raise InputFileError(
            path, f"not a safetensors model ({' '.join(str(exc).split())})"
        ) from None
    meta = read_model_record(path.with_suffix(".json"))
    try:
        width = int(meta.get("width", 16))
    except (TypeError, ValueError):
        raise InputFileError(path.with_suffix(".json"), "width is not an integer") from None
    if not 1 <= width <= 1024:
        raise InputFileError(path.with_suffix(".json"), f"width {width} is out of range")
    model = PickerNet(width)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise InputFileError(
            path, f"weights do not fit the picker network ({' '.join(str(exc).split())})"
        ) from None
    model.eval()
    if "threshold" in meta:
        try:
            ok = 0.0 <= float(meta["threshold"]) < 1.0
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise InputFileError(
                path.with_suffix(".json"), f"threshold {meta['threshold']!r} is not in [0, 1)"
            )
    return model, meta


@torch.no_grad()
def score_map(model: PickerNet, image: torch.Tensor) -> torch.Tensor:
    """Sigmoid scores ``(h, w)`` for a prepared micrograph ``(h, w)``."""
    dev = next(model.parameters()).device
    return torch.sigmoid(model(image[None, None].to(dev)))[0, 0].cpu()


def blobs_to_centres(
    score: torch.Tensor, threshold: float, min_distance: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Connected regions of ``score > threshold``; a region about one target disc large gives its
    score-weighted centroid, a larger one (touching particles) its score peaks at least
    ``min_distance`` pixels apart. Returns rows, columns (float) and the region's peak score."""
    s = score.numpy().astype(np.float64)
    labels, n = ndimage.label(s > threshold)
    if n == 0:
        z = np.zeros(0)
        return z, z.copy(), z.copy()
    idx = np.arange(1, n + 1)
    area = ndimage.sum_labels(np.ones_like(s), labels, idx)
    peak = ndimage.maximum(s, labels, idx)
    com = np.array(ndimage.center_of_mass(s, labels, idx)).reshape(-1, 2)
    disc = np.pi * TARGET_RADIUS**2
    big = area > 2.0 * disc
    rows, cols, foms = list(com[~big, 0]), list(com[~big, 1]), list(peak[~big])
    if big.any():
        masked = torch.from_numpy(np.where(np.isin(labels, idx[big]), s, 0.0))
        r, c, v = find_peaks(masked, min_distance, threshold=threshold)
        rows += list(r.astype(float))
        cols += list(c.astype(float))
        foms += list(v)
    order = np.argsort(-np.asarray(foms), kind="stable")
    return np.asarray(rows)[order], np.asarray(cols)[order], np.asarray(foms)[order]


def picks_from_scores(score: torch.Tensor, scale: tuple[float, float], threshold: float) -> Picks:
    """Picks in micrograph pixels from a score map of a prepared micrograph (``scale``: its
    ``(sy, sx)`` network pixels per micrograph pixel), by :func:`blobs_to_centres`."""
    rows, cols, fom = blobs_to_centres(score, threshold, 0.5 * DIAMETER_PX)
    return Picks(cols / scale[1], rows / scale[0], fom)


#: The score threshold of a model whose record names none.
DEFAULT_THRESHOLD = 0.5


def recommended_threshold(meta: dict) -> float:
    """The model's recommended score threshold (its record's ``threshold``, checked by
    :func:`load_model`)."""
    return float(meta.get("threshold", DEFAULT_THRESHOLD))


@dataclass
class DeepPicker:
    """``threshold`` None: the model's recommended one (:func:`recommended_threshold`)."""

    model: PickerNet
    meta: dict = field(default_factory=dict)
    diameter: float = 100.0  # Å
    threshold: float | None = None
    lowpass: float | None = None
    normalize: bool = True

    def __post_init__(self) -> None:
        if self.threshold is None:
            self.threshold = recommended_threshold(self.meta)

    @classmethod
    def from_model(
        cls, model: PickerNet, meta: dict, diameter: float, threshold: float | None = None
    ) -> DeepPicker:
        """A picker as the model was trained: its low-pass and normalisation from its record."""
        return cls(
            model, meta, diameter, threshold, meta.get("lowpass"), meta.get("normalize", True)
        )

    def scores(self, mic: Micrograph) -> tuple[torch.Tensor, tuple[float, float]]:
        """The network's score map of the prepared micrograph and its ``(sy, sx)`` scale (for
        :func:`picks_from_scores` at any threshold)."""
        prep = prepare(mic, self.diameter, lowpass=self.lowpass, normalize=self.normalize)
        return score_map(self.model, prep.image), prep.scale

    def pick(self, mic: Micrograph) -> Picks:
        return picks_from_scores(*self.scores(mic), self.threshold)


def pick_deep(
    mic: Micrograph,
    diameter: float,
    model_path: str | Path | None = None,
    threshold: float | None = None,
) -> Picks:
    """Pick one micrograph (``threshold`` None: the model's recommended one)."""
    model, meta = load_model(model_path)
    return DeepPicker.from_model(model, meta, diameter, threshold).pick(mic)
