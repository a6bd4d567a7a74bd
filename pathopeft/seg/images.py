"""Reading segmentation images and label masks: RGB images of any common format, one-channel label masks.

Every function raises :class:`SegDataError` naming the file for anything it cannot use (missing, unreadable,
a colour mask, labels outside the classes), so the data module can check a whole manifest up front.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import numpy as np
import tifffile
from PIL import Image

from pathopeft.manifest import ManifestError

MaskMode = Literal["binary", "index"]
_TIFF = (".tif", ".tiff")
# what PIL / tifffile raise for a broken file (PIL reports some broken PNG chunks as SyntaxError)
_DECODE_ERRORS = (OSError, ValueError, IndexError, KeyError, SyntaxError, EOFError, Image.DecompressionBombError)


class SegDataError(ManifestError):
    """Segmentation data that cannot be used; the message names the file (and manifest line) at fault."""


def _check_exists(path: Path) -> None:
    if not path.is_file():
        raise SegDataError(f"{path}: file not found")


def _tiff_yx(arr: np.ndarray, axes: str, path: Path) -> np.ndarray:
    """Reduce a tifffile series to (Y, X) or (Y, X, S): first plane of any extra axis (pages, Z, time)."""
    if "Y" not in axes or "X" not in axes:
        raise SegDataError(f"{path}: TIFF axes {axes!r} have no Y/X plane")
    index = tuple(slice(None) if a in "YXS" else 0 for a in axes)
    kept = [a for a in axes if a in "YXS"]
    return np.moveaxis(arr[index], [kept.index(a) for a in "YXS" if a in kept], range(len(kept)))


def _read_tiff(path: Path) -> np.ndarray:
    with tifffile.TiffFile(path) as tf:
        series = tf.series[0]
        return _tiff_yx(series.asarray(), series.axes, path)


def read_size(path: str | os.PathLike[str]) -> tuple[int, int]:
    """(height, width) from the file header alone, so sizes are checked before any pixel is decoded."""
    path = Path(path)
    _check_exists(path)
    try:
        if path.suffix.lower() in _TIFF:
            with tifffile.TiffFile(path) as tf:
                series = tf.series[0]
                if "Y" not in series.axes or "X" not in series.axes:
                    raise SegDataError(f"{path}: TIFF axes {series.axes!r} have no Y/X plane")
                return int(series.shape[series.axes.index("Y")]), int(series.shape[series.axes.index("X")])
        with Image.open(path) as im:
            return im.height, im.width
    except _DECODE_ERRORS as e:
        if isinstance(e, SegDataError):
            raise
        raise SegDataError(f"{path}: not a readable image ({e})") from e


def _rgb_uint8(arr: np.ndarray, path: Path) -> np.ndarray:
    """Any decoded picture → (H, W, 3) uint8: grey replicated, alpha dropped, 16-bit/float rescaled."""
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[2] < 1:
        raise SegDataError(f"{path}: image of shape {arr.shape} is not (H, W[, C])")
    c = arr.shape[2]
    arr = np.repeat(arr[..., :1], 3, axis=2) if c < 3 else arr[..., :3]
    if arr.dtype == np.uint8:
        return np.ascontiguousarray(arr)
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8) * 255
    if np.issubdtype(arr.dtype, np.unsignedinteger):
        return (arr.astype(np.float64) * (255.0 / np.iinfo(arr.dtype).max)).round().astype(np.uint8)
    scale = 255.0 if np.issubdtype(arr.dtype, np.floating) and float(arr.max(initial=0)) <= 1.0 else 1.0
    return np.clip(arr.astype(np.float64) * scale, 0, 255).round().astype(np.uint8)


def read_image(path: str | os.PathLike[str]) -> np.ndarray:
    """An RGB image as (H, W, 3) uint8 (PNG/JPEG via PIL, TIFF via tifffile)."""
    path = Path(path)
    _check_exists(path)
    try:
        if path.suffix.lower() in _TIFF:
            return _rgb_uint8(_read_tiff(path), path)
        with Image.open(path) as im:
            if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):  # PIL's convert("RGB") would clip, not rescale
                return _rgb_uint8(np.asarray(im), path)
            return np.array(im.convert("RGB"))  # a writable copy: torch warns about read-only arrays
    except _DECODE_ERRORS as e:
        if isinstance(e, SegDataError):
            raise
        raise SegDataError(f"{path}: not a readable image ({e})") from e


def read_mask(path: str | os.PathLike[str]) -> np.ndarray:
    """The raw label values of a mask as a 2-D integer array (palette PNGs give their indices)."""
    path = Path(path)
    _check_exists(path)
    try:
        if path.suffix.lower() in _TIFF:
            arr = _read_tiff(path)
        else:
            with Image.open(path) as im:
                arr = np.asarray(im.convert("L") if im.mode == "1" else im)
    except _DECODE_ERRORS as e:
        if isinstance(e, SegDataError):
            raise
        raise SegDataError(f"{path}: not a readable mask ({e})") from e
    if arr.ndim == 3:  # an RGB(A) file holding a grey label image is fine; a colour-coded one is not
        if arr.shape[2] > 1 and not all(
            np.array_equal(arr[..., 0], arr[..., k]) for k in range(1, min(3, arr.shape[2]))
        ):
            raise SegDataError(f"{path}: colour mask (channels differ); save labels as a one-channel image")
        arr = arr[..., 0]
    if arr.ndim != 2:
        raise SegDataError(f"{path}: mask of shape {arr.shape} is not 2-D")
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8)
    if np.issubdtype(arr.dtype, np.floating):
        if not np.all(np.isfinite(arr)) or not np.array_equal(arr, np.round(arr)):
            raise SegDataError(f"{path}: mask holds non-integer values; labels must be whole numbers")
        arr = arr.astype(np.int64)
    return arr


def decode_mask(
    raw: np.ndarray, n_classes: int, mask_mode: MaskMode, path: str | os.PathLike[str] = "mask"
) -> np.ndarray:
    """Raw mask values → class indices (uint8 when they fit); values outside range(n_classes) are an error."""
    if mask_mode == "binary":
        return (raw > 0).astype(np.uint8)
    if mask_mode != "index":
        raise ValueError(f"mask_mode must be 'binary' or 'index', got {mask_mode!r}")
    bad = (raw < 0) | (raw >= n_classes)
    if bad.any():
        values = np.unique(raw[bad])
        shown = ", ".join(str(v) for v in values[:10]) + (", ..." if len(values) > 10 else "")
        raise SegDataError(
            f"{path}: mask values [{shown}] ({int(bad.sum())} px) are outside the {n_classes} classes "
            f"range(0, {n_classes}); use mask_mode='binary' for 0/255 masks"
        )
    return raw.astype(np.uint8 if n_classes <= 256 else np.int32)


# ------------------------------------------------------------------------------------------ augmentation
