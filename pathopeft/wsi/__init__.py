"""The WSI stage: slides → tissue → tiles → features, one HDF5 file per slide.

Typical use::

    from pathopeft.wsi import BatchConfig, read_manifest, run_batch
    run_batch(read_manifest("data_manifests/my_slides.csv"), BatchConfig(out_dir="runs/x"))
"""

from pathopeft.wsi.batch import process_slide, run_batch
from pathopeft.wsi.config import BatchConfig, ExtractConfig, SlideEntry, TilingConfig, read_manifest
from pathopeft.wsi.extract import extract_features
from pathopeft.wsi.resolution import choose_level, mag_to_mpp, resolve_mpp
from pathopeft.wsi.slide import Slide, SlideError, open_slide, read_at_mpp
from pathopeft.wsi.tiling import TileGrid, tile_grid
from pathopeft.wsi.tissue import OtsuTissueDetector, TissueMask, detect_tissue

__all__ = [
    "BatchConfig",
    "ExtractConfig",
    "OtsuTissueDetector",
    "Slide",
    "SlideEntry",
    "SlideError",
    "TileGrid",
    "TilingConfig",
    "TissueMask",
    "choose_level",
    "detect_tissue",
    "extract_features",
    "mag_to_mpp",
    "open_slide",
    "process_slide",
    "read_at_mpp",
    "read_manifest",
    "resolve_mpp",
    "run_batch",
    "tile_grid",
]
