"""What the shipped deep picker's extra picks are on the real EMPIAR-10017 micrographs: a picture.

For two micrographs (2 and 4 of the six, sorted by name), a 1,600-px square of the micrograph
with the manual picks as green circles and the picker's picks as squares, blue where they match a
manual pick (within half a diameter) and red where they do not; one panel at threshold 0.5 (the
old default) and one at the model's recommended threshold. Writes
``docs/images/empiar10017_picks.jpg`` (or ``--out``).

Run: ``.venv/bin/python benchmarks/pick_real_overlay.py [--data ../shared/data/micrographs/empiar-10017]``
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parent))

from pick_real import PIXEL, mask_centres  # noqa: E402

from tamis.pick.deep.predict import DeepPicker, load_model  # noqa: E402
from tamis.pick.evaluate import match_picks  # noqa: E402
from tamis.pick.micrograph import read_micrograph  # noqa: E402

DIAMETER = 191.0  # Å, the masks' discs
REGION = (1200, 1200, 1600)  # x0, y0, side (px)
PANEL = 400  # px per panel in the figure


def panel(raw: np.ndarray, truth: np.ndarray, xy: np.ndarray, matched: np.ndarray) -> Image.Image:
    x0, y0, s = REGION
    reg = raw[y0 : y0 + s, x0 : x0 + s]
    lo, hi = np.percentile(reg, [1, 99])
    img = Image.fromarray((np.clip((reg - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8))
    img = img.convert("RGB")
    draw = ImageDraw.Draw(img)
    r = DIAMETER / PIXEL / 2
    for x, y in truth - (x0, y0):
        if 0 <= x < s and 0 <= y < s:
            draw.ellipse([x - r, y - r, x + r, y + r], outline=(0, 220, 0), width=5)
    for (x, y), ok in zip(xy - (x0, y0), matched, strict=True):
        if 0 <= x < s and 0 <= y < s:
            draw.rectangle(
                [x - 10, y - 10, x + 10, y + 10], fill=(0, 120, 255) if ok else (255, 0, 0)
            )
    return img.resize((PANEL, PANEL), Image.LANCZOS)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--data", default="../shared/data/micrographs/empiar-10017")
    ap.add_argument("--out", default="docs/images/empiar10017_picks.jpg")
    args = ap.parse_args()
    torch.set_num_threads(2)
    mics = sorted(p for p in Path(args.data).glob("*.jpg") if not p.name.endswith("_mask.jpg"))
    if len(mics) < 4:
        sys.exit(f"{args.data}: the EMPIAR-10017 micrographs are not there")
    model, meta = load_model(None)
    d = DIAMETER / PIXEL
    edge = 1.5 * DIAMETER / 2 / PIXEL
    fig = Image.new("RGB", (2 * PANEL + 8, 2 * PANEL + 8), "white")
    for row, k in enumerate((2, 4)):
        m = mics[k - 1]
        raw = np.asarray(Image.open(m).convert("L")).astype(np.float32)
        mic = read_micrograph(m, PIXEL)
        h, w = mic.shape
        truth = mask_centres(m.with_name(m.stem + "_mask.jpg"))
        for col, thr in enumerate((0.5, None)):
            picker = DeepPicker.from_model(model, meta, DIAMETER, thr)
            p = picker.pick(mic)
            keep = (p.x >= edge) & (p.x < w - edge) & (p.y >= edge) & (p.y < h - edge)
            xy = np.c_[p.x[keep], p.y[keep]]
            matched = match_picks(xy, truth, 0.5 * d) >= 0
            print(f"micrograph {k}, threshold {picker.threshold}: {len(xy)} picks, "
                  f"{int(matched.sum())} matched, {len(truth)} manual")  # fmt: skip
            fig.paste(panel(raw, truth, xy, matched), (col * (PANEL + 8), row * (PANEL + 8)))
    fig.save(args.out, quality=85)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
