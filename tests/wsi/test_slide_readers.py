"""Slide readers are registry entries: open_slide tries those that take the suffix, by priority, and records
which one opened the slide; a toy reader registered here (and removed afterwards) is used like the built-in ones."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import pytest

from pathopeft.wsi.slide import SLIDE_READERS, Slide, SlideError, TiffSlide, open_slide, readers_for


class ToySlide(Slide):
    """An 8×6 white slide from any file that starts with ``TOY``."""

    def __init__(self, path: str | Path, manifest_mpp: float | None = None) -> None:
        super().__init__(path, manifest_mpp)
        if not Path(path).read_bytes().startswith(b"TOY"):
            raise SlideError(f"{path}: not a toy slide (no TOY magic)")

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return ((8, 6),)

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        return (1.0,)

    @property
    def properties(self) -> Mapping[str, str]:
        return {"openslide.mpp-x": "0.5", "openslide.mpp-y": "0.5"}

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        return np.full((size[1], size[0], 3), 255, dtype=np.uint8)


@pytest.fixture
def toy_reader() -> Iterator[str]:
    SLIDE_READERS.register("toy", suffixes=(".toy",), priority=-1)(ToySlide)
    yield "toy"
    SLIDE_READERS.remove("toy")


def test_builtin_readers_by_suffix() -> None:
    assert list(SLIDE_READERS) == ["openslide", "tifffile", "tiff-direct"]
    assert readers_for("a.svs") == ["tiff-direct", "openslide"]  # tiles read directly where it applies
    assert readers_for("a.TIFF") == ["tiff-direct", "openslide", "tifffile"]
    assert readers_for("a.ndpi") == ["openslide"]


def test_a_registered_reader_opens_its_files_and_is_recorded(toy_reader: str, tmp_path: Path) -> None:
    assert readers_for("x.toy") == ["toy", "openslide"]  # its priority puts it before OpenSlide
    assert "toy" not in readers_for("x.svs")
    good = tmp_path / "good.toy"
    good.write_bytes(b"TOY slide")
    with open_slide(good) as s:
        assert isinstance(s, ToySlide)
        assert s.backend == "toy"  # the registry name, what the batch writes as backend=
        assert s.mpp == 0.5
    bad = tmp_path / "bad.toy"
    bad.write_bytes(b"not one")
    with pytest.raises(
        SlideError,
        match=r"bad\.toy: unsupported or unreadable slide \(not a toy slide \(no TOY magic\); OpenSlide cannot open",
    ):
        open_slide(bad)


def test_reader_removed_after_the_test() -> None:
    assert "toy" not in SLIDE_READERS
    assert readers_for("x.toy") == ["openslide"]


def test_plain_tiff_falls_through_to_tifffile(tmp_path: Path) -> None:
    """A stripped (non-tiled) TIFF: OpenSlide refuses it, the next reader for .tif opens it."""
    import tifffile

    path = tmp_path / "plain.tif"
    tifffile.imwrite(path, np.full((20, 30, 3), 200, dtype=np.uint8), photometric="rgb")
    with open_slide(path) as s:
        assert isinstance(s, TiffSlide)
        assert s.backend == "tifffile"
        assert s.dimensions == (30, 20)
