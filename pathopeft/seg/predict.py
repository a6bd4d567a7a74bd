"""Full-size prediction: tile an image of any size, run the model, stitch, write the mask and an overlay."""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pathopeft.io import atomic_write_bytes
from pathopeft.seg.images import read_image, read_size
from pathopeft.seg.model import SegModel
from pathopeft.seg.tiling import stitch, tile_starts


@torch.no_grad()
def predict_image(
    model: SegModel, image: np.ndarray, crop: int, stride: int | None = None, batch: int = 16
) -> torch.Tensor:
    """Class probabilities (C, H, W) of an (H, W, 3) uint8 image, from overlapping ``crop`` tiles."""
    model.eval()
    h, w = image.shape[:2]
    pad_h, pad_w = max(0, crop - h), max(0, crop - w)
    padded = np.pad(image, ((0, pad_h), (0, pad_w), (0, 0)), mode="reflect") if pad_h or pad_w else image
    stride = stride or crop // 2
    ys, xs = tile_starts(padded.shape[0], crop, stride), tile_starts(padded.shape[1], crop, stride)
    origins = [(y, x) for y in ys for x in xs]
    device = next(model.parameters()).device
    tiles = []
    for start in range(0, len(origins), batch):
        chunk = origins[start : start + batch]
        x = torch.stack(
            [torch.from_numpy(padded[y : y + crop, x : x + crop]).permute(2, 0, 1).float() / 255 for y, x in chunk]
        ).to(device)
        probs = torch.softmax(model(x).float(), dim=1).cpu()
        tiles += [(p, y, x) for p, (y, x) in zip(probs, chunk, strict=True)]
    return stitch(tiles, padded.shape[:2])[:, :h, :w]


def _atomic_png(array: np.ndarray, path: Path) -> None:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


def check_images(images: Sequence[str | os.PathLike[str]]) -> None:
    """Every image exists and has a readable header: a typo in the last path fails before any output is written
    (and before a checkpoint is loaded), not after the first images were predicted."""
    for path in images:
        read_size(path)


def predict_files(
    model: SegModel, images: Sequence[str | os.PathLike[str]], out_dir: str | os.PathLike[str], crop: int
) -> list[Path]:
    """``<stem>_mask.png`` (class indices; ×255 for binary so it is visible) and ``<stem>_overlay.png``."""
    check_images(images)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for path in images:
        img = read_image(path)
        labels = predict_image(model, img, crop).argmax(0).numpy().astype(np.uint8)
        scale = 255 if labels.max() <= 1 else 1
        stem = Path(path).stem
        _atomic_png(labels * scale, out / f"{stem}_mask.png")
        overlay = img.copy()
        fg = labels > 0
        overlay[fg] = (0.5 * overlay[fg] + 0.5 * np.array([0, 255, 0])).astype(np.uint8)
        _atomic_png(overlay, out / f"{stem}_overlay.png")
        written.append(out / f"{stem}_mask.png")
    return written
