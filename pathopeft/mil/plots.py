"""Plots of the CoMEL stage: the accuracy matrix ``R`` as a heatmap, and tile scores over a slide thumbnail.

Figures are drawn with the Agg canvas (no pyplot, no global state, no display) and written atomically
through :mod:`pathopeft.io`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.collections import PolyCollection
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from pathopeft.io import atomic_write_figure

__all__ = ["plot_accuracy_matrix", "plot_instance_heatmap"]

PathLike = str | os.PathLike[str]


def plot_accuracy_matrix(m: np.ndarray, names: Sequence[str], path: PathLike, title: str = "", dpi: int = 120) -> Path:
    """Heatmap PNG of a T×T matrix (``R`` or instance AUC) with the values in the cells; NaN cells grey.

    Rows are training steps, columns evaluated tasks, so forgetting reads as colour fading down a column.
    """
    m = np.asarray(m, dtype=np.float64)
    t = m.shape[0]
    names = list(names)
    side = min(3.0 + 0.7 * t, 16.0)
    fig = Figure(figsize=(side + 1.2, side), layout="constrained")
    ax = fig.add_subplot()
    colours = matplotlib.colormaps["viridis"].with_extremes(bad="#eeeeee")  # NaN = not evaluated: light grey
    im = ax.imshow(np.ma.masked_invalid(m), cmap=colours, vmin=0.0, vmax=1.0, interpolation="nearest")
    fontsize = max(5.0, min(11.0, 60.0 / t))
    for i in range(t):
        for j in range(t):
            v = m[i, j]
            ink = "black" if v > 0.6 else "white"  # readable on viridis' light top and dark bottom
            if math.isfinite(v):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=fontsize, color=ink)
    rotate = max(map(len, names)) > 4
    ax.set_xticks(range(t), names, rotation=45 if rotate else 0, ha="right" if rotate else "center")
    ax.set_yticks(range(t), names)
    ax.set_xlabel("evaluated on task j")
    ax.set_ylabel("after training task i")
    if title:
        ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    return atomic_write_figure(fig, path, dpi)


# ------------------------------------------------------------------------------------------ instance heatmap


def plot_instance_heatmap(
    coords: np.ndarray,
    scores: np.ndarray,
    tile_size_l0: float,
    path: PathLike,
    thumbnail: np.ndarray | None = None,
    thumbnail_downsample: float = 1.0,
    labels: np.ndarray | None = None,
    title: str = "",
    *,
    cmap: str = "inferno",
    alpha: float | None = None,
    dpi: int = 100,
) -> Path:
    """Draw tile scores (0..1) as coloured squares over the slide thumbnail and save a PNG.

    Everything is drawn in level-0 pixel coordinates: the thumbnail is stretched to
    ``thumbnail.shape * thumbnail_downsample``, so tiles land where they were cut whatever the thumbnail
    size. Positive ground-truth tiles (``labels == 1``) are outlined in cyan, which stands out against every
    colour of the default colormap, so missed tumour regions are visible next to the attention. ``N = 0``
    still writes a figure (saying "no tiles") so a batch of slides gives one image per slide.
    """
    coords = np.asarray(coords, dtype=np.float64).reshape(-1, 2) if np.size(coords) else np.zeros((0, 2))
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    n = coords.shape[0]
    if scores.shape != (n,):
        raise ValueError(f"scores must be ({n},) to match coords, got {scores.shape}")
    if labels is not None:
        labels = np.asarray(labels).reshape(-1)
        if labels.shape != (n,):
            raise ValueError(f"labels must be ({n},) to match coords, got {labels.shape}")
    if not tile_size_l0 > 0 or not thumbnail_downsample > 0:
        raise ValueError("tile_size_l0 and thumbnail_downsample must be positive")

    # extent of the drawing in level-0 px: the whole slide if a thumbnail is given, else the tiles' bounding box
    if thumbnail is not None:
        thumb = np.asarray(thumbnail)
        width, height = thumb.shape[1] * thumbnail_downsample, thumb.shape[0] * thumbnail_downsample
        x0, y0, x1, y1 = 0.0, 0.0, width, height
    elif n:
        x0, y0 = coords.min(axis=0)
        x1, y1 = coords.max(axis=0) + tile_size_l0
        pad = 0.02 * max(x1 - x0, y1 - y0)
        x0, y0, x1, y1 = x0 - pad, y0 - pad, x1 + pad, y1 + pad
    else:
        x0, y0, x1, y1 = 0.0, 0.0, 1.0, 1.0
    aspect = (x1 - x0) / max(y1 - y0, 1e-9)
    fig_w = 9.0 if aspect >= 1 else max(3.0, 7.5 * aspect) + 1.5
    fig_h = max(3.0, min(12.0, 7.5 / aspect)) if aspect >= 1 else 7.5
    fig = Figure(figsize=(fig_w, fig_h), layout="constrained")
    ax = fig.add_subplot()
    if thumbnail is not None:
        ax.imshow(thumb, extent=(0.0, width, height, 0.0), cmap="gray" if thumb.ndim == 2 else None)
    ax.set_xlim(x0, x1)
    ax.set_ylim(y1, y0)  # image convention: y grows downwards
    ax.set_aspect("equal")
    ax.set_xlabel("x (level-0 px)")
    ax.set_ylabel("y (level-0 px)")
    if title:
        ax.set_title(title)

    if n == 0:
        if thumbnail is None:  # no slide extent to show: the 0..1 axes would only mislead
            ax.set_xticks([])
            ax.set_yticks([])
        ax.text(0.5, 0.5, "no tiles", transform=ax.transAxes, ha="center", va="center", fontsize=20, color="tab:red")
        return atomic_write_figure(fig, path, dpi)

    s = tile_size_l0
    corners = np.array([[0.0, 0.0], [s, 0.0], [s, s], [0.0, s]])
    verts = coords[:, None, :] + corners[None, :, :]  # (N, 4, 2) squares
    tiles = PolyCollection(
        verts,
        array=np.ma.masked_invalid(scores),
        cmap=matplotlib.colormaps[cmap].with_extremes(bad="#888888"),  # NaN score: grey, not a colour
        norm=Normalize(0.0, 1.0),
        edgecolors="none",
        alpha=alpha if alpha is not None else (0.55 if thumbnail is not None else 1.0),
    )
    ax.add_collection(tiles)
    cbar = fig.colorbar(tiles, ax=ax, fraction=0.046, pad=0.03)
    cbar.set_label("instance score")
    if labels is not None and np.any(labels == 1):
        pos = PolyCollection(verts[labels == 1], facecolors="none", edgecolors="cyan", linewidths=1.2)
        ax.add_collection(pos)
    return atomic_write_figure(fig, path, dpi)
