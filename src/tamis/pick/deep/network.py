"""The picker network: a three-level U-Net (about 0.1 M parameters) mapping a normalised
micrograph, binned so the particle diameter spans ``DIAMETER_PX`` pixels, to a logit per pixel
(high at particle centres). Fully convolutional: any micrograph size (multiple of 4 internally)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["PickerNet", "DIAMETER_PX"]

#: Particle diameter in network pixels: micrographs are binned to ``diameter / DIAMETER_PX`` Å/px.
DIAMETER_PX = 20.0


def _block(cin: int, cout: int, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=dilation, dilation=dilation),
        nn.GroupNorm(4, cout),
        nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=dilation, dilation=dilation),
        nn.GroupNorm(4, cout),
        nn.ReLU(inplace=True),
    )


class PickerNet(nn.Module):
    def __init__(self, width: int = 16) -> None:
        super().__init__()
        w = width
        self.enc1 = _block(1, w)
        self.enc2 = _block(w, 2 * w)
        self.enc3 = _block(2 * w, 4 * w, dilation=2)
        self.dec2 = _block(6 * w, 2 * w)
        self.dec1 = _block(3 * w, w)
        self.head = nn.Conv2d(w, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 1, H, W)`` -> logits ``(B, 1, H, W)``."""
        h, w = x.shape[-2:]
        ph, pw = (-h) % 4, (-w) % 4
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph), mode="reflect")
        e1 = self.enc1(x)
        e2 = self.enc2(F.max_pool2d(e1, 2))
        e3 = self.enc3(F.max_pool2d(e2, 2))
        d2 = self.dec2(torch.cat([F.interpolate(e3, scale_factor=2.0, mode="nearest"), e2], 1))
        d1 = self.dec1(torch.cat([F.interpolate(d2, scale_factor=2.0, mode="nearest"), e1], 1))
        return self.head(d1)[..., :h, :w]
