"""Shared fixtures: the real data in ../shared (skipped cleanly when absent) and tiny builders."""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib
import pytest
import torch

matplotlib.use("Agg")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("PATHOPEFT_SHARED", ROOT.parent / "shared"))
SLIDES = SHARED / "test_slides"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA (run on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"real test data not found at {SHARED} (set PATHOPEFT_SHARED or place ../shared beside the repo)")
    return SHARED


@pytest.fixture(scope="session")
def slides_dir(shared_dir: Path) -> Path:
    if not SLIDES.is_dir():
        pytest.skip(f"{SLIDES} is missing")
    return SLIDES


@pytest.fixture(scope="session")
def cmu_slide(slides_dir: Path) -> Path:
    return slides_dir / "CMU-1-Small-Region.svs"


@pytest.fixture(scope="session")
def cmu_pyramid(cmu_slide: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-level generic-TIFF pyramid (zlib, mpp in resolution tags) generated from CMU-1-Small-Region."""
    from pathopeft.wsi.pyramid import write_pyramid
    from pathopeft.wsi.slide import open_slide

    with open_slide(cmu_slide) as s:
        image = s.read_region((0, 0), 0, s.dimensions)
        mpp = s.mpp
    return write_pyramid(image, tmp_path_factory.mktemp("pyramid") / "cmu_pyramid.tiff", mpp, levels=4)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
