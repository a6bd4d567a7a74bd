"""Microns-per-pixel arithmetic: where a slide's mpp comes from and which pyramid level serves a target.

Users ask for a physical resolution (``--mpp 0.5`` or ``--mag 20``), never for a pyramid level; everything
that turns that request into a level, a read size and a resize factor lives here as pure functions so it
can be tested without a slide.
"""

from __future__ import annotations

import contextlib
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


#: Level-0 resolutions a microscope scan can have (µm/px). Outside this range the metadata is a default or a
#: unit error (a 72-dpi TIFF tag reads as 352.8 µm/px), not a scan resolution.
PLAUSIBLE_MPP = (0.05, 20.0)

#: The most a target may be finer than level 0: beyond this, tiles would be invented by upsampling.
MAX_UPSAMPLE = 2.0


def is_plausible_mpp(mpp: float) -> bool:
    return PLAUSIBLE_MPP[0] <= mpp <= PLAUSIBLE_MPP[1]


@dataclass(frozen=True)
class MppInfo:
    """A slide's level-0 resolution, the metadata field it was read from, and any value refused on the way.

    ``rejected`` describes metadata that was present but implausible (``"352.78 µm/px from openslide.mpp-x"``):
    when nothing else is found, ``mpp`` is None and the slide is skipped with that reason.
    """

    mpp: float | None
    source: str  # "openslide.mpp-x" | "tiff.XResolution" | "objective-power" | "manifest" | "none"
    rejected: str | None = None


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
        return 25400.0 / value
    return None


def _metadata_candidates(props: Mapping[str, str]) -> list[tuple[float, str]]:
    """Every level-0 mpp the metadata offers, in order of trust."""
    found = []
    raw = props.get("openslide.mpp-x")
    if raw:
        with contextlib.suppress(ValueError):
            found.append((float(raw), "openslide.mpp-x"))
    mpp = _tiff_resolution_mpp(props)
    if mpp is not None:
        found.append((mpp, "tiff.XResolution"))
    power = props.get("openslide.objective-power") or props.get("aperio.AppMag")
    if power:
        try:
            if float(power) > 0:
                found.append((mag_to_mpp(float(power)), "objective-power"))
        except ValueError:
            pass
    return [(v, src) for v, src in found if v > 0 and math.isfinite(v)]


def resolve_mpp(props: Mapping[str, str], manifest_mpp: float | None = None) -> MppInfo:
    """Find a slide's level-0 mpp from its metadata, in a fixed order of trust.

    Order: ``openslide.mpp-x``, TIFF resolution tags, objective power (10/mag), the manifest's ``mpp``
    column. Values outside :data:`PLAUSIBLE_MPP` are refused (and named in ``rejected``). A plausible value in
    the metadata is never silently overridden by the manifest; the manifest fills a gap or replaces an
    implausible value. When nothing usable is found, ``mpp`` is None and the caller must skip the slide rather
    than guess.
    """
    rejected = []
    for value, source in _metadata_candidates(props):
        if is_plausible_mpp(value):
            return MppInfo(value, source, "; ".join(rejected) or None)
        rejected.append(f"{value:.4g} µm/px from {source}")
    note = "; ".join(rejected) or None
    if manifest_mpp is not None and math.isfinite(manifest_mpp) and manifest_mpp > 0:
        return MppInfo(float(manifest_mpp), "manifest", note)
    return MppInfo(None, "none", note)


def mpp_problem(info: MppInfo, target_mpp: float) -> str | None:
    """Why a slide cannot be tiled at ``target_mpp`` (the skip reason), or None when it can."""
    lo, hi = PLAUSIBLE_MPP
    if info.mpp is None:
        if info.rejected:
            return (
                f"implausible resolution {info.rejected} (microscopy scans are {lo}–{hi} µm/px); "
                "give the slide's mpp in the manifest's mpp column (or --slide-mpp) to override"
            )
        return "no mpp"
    if not is_plausible_mpp(info.mpp):
        return f"implausible resolution {info.mpp:.4g} µm/px from {info.source} (microscopy scans are {lo}–{hi} µm/px)"
    if target_mpp * MAX_UPSAMPLE < info.mpp:
        return (
            f"target {target_mpp:g} µm/px is {info.mpp / target_mpp:.1f}× finer than the slide's level 0 "
            f"({info.mpp:.4g} µm/px from {info.source}); at most {MAX_UPSAMPLE:g}× upsampling is allowed"
        )
    return None


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
