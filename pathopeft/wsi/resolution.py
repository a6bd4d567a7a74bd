"""Microns-per-pixel arithmetic: where a slide's mpp comes from and which pyramid level serves a target.

Users ask for a physical resolution (``--mpp 0.5`` or ``--mag 20``), never for a pyramid level; everything
that turns that request into a level, a read size and a resize factor lives here as pure functions so it
can be tested without a slide.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

#: 10 µm/px divided by the objective magnification is the usual scanner convention (20x ≈ 0.5 µm/px).
MICRONS_AT_1X = 10.0

#: Relative tolerance when comparing downsamples: OpenSlide reports 4.000301 for a nominal 4x level.
DOWNSAMPLE_RTOL = 1e-3


def mag_to_mpp(magnification: float) -> float:
    """Convert an objective magnification to microns per pixel (``20 -> 0.5``)."""
    if magnification <= 0:
        raise ValueError(f"magnification must be > 0, got {magnification}")
    return MICRONS_AT_1X / magnification


def mpp_to_mag(mpp: float) -> float:
    """Convert microns per pixel to the equivalent objective magnification (``0.5 -> 20``)."""
    if mpp <= 0:
        raise ValueError(f"mpp must be > 0, got {mpp}")
    return MICRONS_AT_1X / mpp


@dataclass(frozen=True)
class MppInfo:
    """A slide's level-0 resolution and the metadata field it was read from (so reports can say why)."""

    mpp: float | None
    source: str  # "openslide.mpp-x" | "tiff.XResolution" | "objective-power" | "manifest" | "none"


def _tiff_resolution_mpp(props: Mapping[str, str]) -> float | None:
    res = props.get("tiff.XResolution")
    unit = (props.get("tiff.ResolutionUnit") or "").lower()
    if not res:
        return None
    try:
        value = float(res)
    except ValueError:
        return None
    if value <= 0:
        return None
    if unit in ("centimeter", "3", "cm"):
        return 1e4 / value
    if unit in ("inch", "2"):
        # Many plain TIFFs carry a default 72 dpi that is not a scan resolution; reject obviously bogus values.
        mpp = 25400.0 / value
        return mpp if mpp < 50 else None
    return None


def resolve_mpp(props: Mapping[str, str], manifest_mpp: float | None = None) -> MppInfo:
    """Find a slide's level-0 mpp from its metadata, in a fixed order of trust.

    Order: ``openslide.mpp-x``, TIFF resolution tags, objective power (10/mag), the manifest's ``mpp``
    column. A value in the manifest never silently overrides metadata; it only fills a gap. When nothing is
    found, ``MppInfo(None, "none")`` is returned and the caller must skip the slide rather than guess.
    """
    raw = props.get("openslide.mpp-x")
    if raw:
        try:
            mpp = float(raw)
            if mpp > 0:
                return MppInfo(mpp, "openslide.mpp-x")
        except ValueError:
            pass
    mpp = _tiff_resolution_mpp(props)
    if mpp is not None:
        return MppInfo(mpp, "tiff.XResolution")
    power = props.get("openslide.objective-power") or props.get("aperio.AppMag")
    if power:
        try:
            return MppInfo(mag_to_mpp(float(power)), "objective-power")
        except ValueError:
            pass
    if manifest_mpp is not None and math.isfinite(manifest_mpp) and manifest_mpp > 0:
        return MppInfo(float(manifest_mpp), "manifest")
    return MppInfo(None, "none")


@dataclass(frozen=True)
class LevelChoice:
    """How to produce tiles at a target mpp: read ``read_size_px`` at ``level``, resize to the tile size."""

    level: int
    level_downsample: float  # level size relative to level 0
    target_downsample: float  # target mpp / level-0 mpp
    resize_factor: float  # target_downsample / level_downsample (>= 1 means shrink after reading)


def choose_level(level_downsamples: Sequence[float], level0_mpp: float, target_mpp: float) -> LevelChoice:
    """Pick the highest-resolution level whose downsample does not exceed the target.

    Reading the coarsest level that is still at least as sharp as the target keeps decode cost low without
    losing detail; the remaining factor is a plain resize. No rounding into magnification buckets: a target
    of 0.6 µm/px on a 0.25 µm/px slide reads the 2x level and shrinks by 1.2.
    """
    if level0_mpp <= 0 or target_mpp <= 0:
        raise ValueError(f"mpp values must be > 0 (level0={level0_mpp}, target={target_mpp})")
    target_ds = target_mpp / level0_mpp
    best = 0
    for i, ds in enumerate(level_downsamples):
        if ds <= target_ds * (1 + DOWNSAMPLE_RTOL) and ds >= level_downsamples[best]:
            best = i
    level_ds = float(level_downsamples[best])
    factor = target_ds / level_ds
    if abs(factor - 1.0) < DOWNSAMPLE_RTOL:
        factor = 1.0
    return LevelChoice(level=best, level_downsample=level_ds, target_downsample=target_ds, resize_factor=factor)


def size_at_level(tile_px: int, choice: LevelChoice) -> int:
    """Pixels to read at the chosen level so that resizing by ``choice.resize_factor`` gives ``tile_px``."""
    return max(1, round(tile_px * choice.resize_factor))
