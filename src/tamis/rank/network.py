"""RELION's class-ranker network (relion-classranker ``training/model.py``), layer for layer, so
RELION's published weights load as a plain state dict (``load_state_dict``; no code is executed
from a checkpoint).

A 64 x 64 class image goes through four stages of 3 x 3 convolutions (16, 32, 64 channels; the
stride-2 convolutions between them have no ReLU), a linear layer to 48 image features, which are
joined with the 24 per-class features and scored by a two-layer head (no sigmoid: scores are
unbounded, typically 0-1). The heads RELION keeps but does not use (images only, features only)
are kept too, so the state-dict keys match.
"""

from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["ClassRankerNet", "RankerEnsemble", "N_FEATURES", "IMAGE_SIZE"]

N_FEATURES = 24
IMAGE_SIZE = 64


class ClassRankerNet(nn.Module):
    def __init__(self, dropout: float = 0.3, cnn_w: int = 16, feat_w: int = 48, feat_w2: int = 48):
        super().__init__()
        w = cnn_w

        def conv(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
            return nn.Conv2d(cin, cout, 3, stride=stride, padding=1)

        self.cnn_layers = nn.Sequential(
            conv(1, w), nn.ReLU(), nn.Dropout(dropout),  # 0, 1, 2
            conv(w, w), nn.ReLU(),  # 3, 4
            conv(w, 2 * w, 2), nn.Dropout(dropout),  # 5, 6
            conv(2 * w, 2 * w), nn.ReLU(), nn.Dropout(dropout),  # 7, 8, 9
            conv(2 * w, 2 * w), nn.ReLU(),  # 10, 11
            conv(2 * w, 4 * w, 2), nn.Dropout(dropout),  # 12, 13
            conv(4 * w, 4 * w), nn.ReLU(), nn.Dropout(dropout),  # 14, 15, 16
            conv(4 * w, 4 * w), nn.ReLU(),  # 17, 18
            conv(4 * w, 8 * w, 2), nn.Dropout(dropout),  # 19, 20
        )  # fmt: skip
        flat = 8 * w * (IMAGE_SIZE // 8) ** 2
        self.feature_extractor = nn.Sequential(nn.Linear(flat, feat_w))
        self.classifier_images_and_features = nn.Sequential(
            nn.Dropout(dropout),
            nn.Linear(feat_w + N_FEATURES, feat_w2),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(feat_w2, 1),
        )
        self.classifier_images = nn.Sequential(nn.Dropout(dropout), nn.Linear(feat_w, 1))
        self.classifier_features = nn.Sequential(
            nn.Linear(N_FEATURES, 12), nn.ReLU(), nn.Dropout(dropout), nn.Linear(12, 1)
        )

    def forward(self, images: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """``images`` ``(B, 1, 64, 64)``, ``features`` ``(B, 24)`` -> scores ``(B, 1)``."""
        x = self.cnn_layers(images)
        x = self.feature_extractor(x.flatten(1))
        return self.classifier_images_and_features(torch.cat([x, features], 1))


class RankerEnsemble(nn.Module):
    """Several ``ClassRankerNet`` trained from different seeds; the score is their mean (one
    network's score varies with its seed on data unlike its training set). State-dict keys are
    ``members.<i>.<RELION's key>``."""

    def __init__(self, members: list[ClassRankerNet]):
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, images: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        return torch.stack([m(images, features) for m in self.members]).mean(0)
