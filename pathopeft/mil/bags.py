"""Reproducible MIL bags with known tile labels, built from real H&E tiles (LC25000 lung), for CoMEL.

Why: continual MIL needs bags whose witnesses are known, so that localisation (attention vs. tumour tiles) can
be scored next to bag accuracy, and a task sequence for class-incremental learning. No annotated WSIs are at
hand, so a bag is a k×k mosaic of real 224-px tiles: a *negative* bag is all benign; a *positive* bag for
tumour class c is benign background with ONE 4-connected blob of class-c tiles, grown from a random cell to
a witness count drawn from the spec's range (tumours are contiguous; scattered witnesses would be easier).

* Tasks, in order: ``"aca"`` (adenocarcinoma vs benign), then ``"scc"`` (squamous vs benign); bag labels
  ``"benign"``/``"aca"``/``"scc"``; class-incremental label space :data:`LABEL_SPACE`.
* Splits are by ``group_id`` (LC25000 augmented copies of one image are near-duplicates), stratified per
  class; every tile of a bag comes from that bag's split. Splits hold only ~200 tiles per class for val/test,
  so tiles recur across bags of a split (never twice in one bag while the pool allows).
* Features are computed once per unique tile (cached as ``tile_features_<hash>.h5``) and looked up per bag.

Output folder::

    bags.csv                 slide_id,path,label,task,split,witness_rate,n_instances,thumbnail (paths relative)
    bags.json                spec, seed, feature kind, label space, tiles/groups per split
    bags/<slide_id>.h5       features (N, D), coords (N, 2), instance_labels (N,) int8, tile_paths (N,)
    thumbnails/<slide_id>.png  the mosaic downsampled 8× (pixel = level-0 coordinate / 8), for heatmaps
    tile_features_<hash>.h5  the per-tile feature cache
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import logging
import math
import os
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from PIL import Image
from tqdm import tqdm

from pathopeft.io import atomic_write_text
from pathopeft.wsi import h5io

log = logging.getLogger(__name__)

TILE_PX = 224
#: manifest.csv class → bag label string (short names are accepted too).
CLASS_NAMES = {"lung_n": "benign", "lung_aca": "aca", "lung_scc": "scc"}
#: Class-incremental label space shared by all tasks.
LABEL_SPACE = {"benign": 0, "aca": 1, "scc": 2}
#: Task order of the continual sequence; task t is "tumour class t vs benign".
TASKS = ("aca", "scc")
SPLITS = ("train", "val", "test")
MANIFEST_COLUMNS = ("slide_id", "path", "label", "task", "split", "witness_rate", "n_instances", "thumbnail")
DEFAULT_WITNESS_RANGE = (0.05, 0.30)
HARD_WITNESS_RANGE = (0.01, 0.05)
#: 16-bin RGB + HSV histograms (96) + RGB/HSV channel means and stds (12).
COLOUR_DIM = 108
_FEATURE_CACHE_VERSION = 1  # bump when a feature definition changes: old caches then miss


# --------------------------------------------------------------------------------------------- tiles and splits


@dataclass(frozen=True)
class TileRecord:
    """One tile: ``path`` (absolute), ``label`` (``benign``/``aca``/``scc``), ``group_id`` (near-duplicate group).

    ``rel`` is the path relative to the data root, the tile's identity in caches and H5 files (it does not
    change when the data moves); ``sha256`` comes from the manifest when present.
    """

    path: Path
    label: str
    group_id: str
    rel: str
    sha256: str = ""


def load_tile_table(root: str | os.PathLike[str], check_files: bool = True) -> list[TileRecord]:
    """Read ``<root>/manifest.csv`` (``path,class,group_id,...``) into tile records, in manifest order.

    Errors name the manifest and line, because a silently skipped row would bias every split.
    """
    root = Path(root)
    manifest = root / "manifest.csv"
    if not manifest.is_file():
        raise FileNotFoundError(f"{manifest}: tile manifest not found (expected columns path,class,group_id)")
    short = {v: v for v in CLASS_NAMES.values()}
    records: list[TileRecord] = []
    seen: set[str] = set()
    with manifest.open(newline="") as fh:
        reader = csv.DictReader(fh)
        missing = {"path", "class", "group_id"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{manifest}: missing column(s) {sorted(missing)}; found {reader.fieldnames}")
        for row in reader:
            where = f"{manifest}:{reader.line_num}"
            rel, cls, group = ((row.get(k) or "").strip() for k in ("path", "class", "group_id"))
            if not rel or not group:
                raise ValueError(f"{where}: empty path or group_id")
            label = CLASS_NAMES.get(cls) or short.get(cls)
            if label is None:
                raise ValueError(f"{where}: unknown class {cls!r} (expected one of {sorted(CLASS_NAMES)})")
            if rel in seen:
                raise ValueError(f"{where}: duplicate path {rel!r}")
            seen.add(rel)
            path = root / rel
            if check_files and not path.is_file():
                raise FileNotFoundError(f"{where}: tile {path} not found")
            records.append(TileRecord(path, label, group, rel, (row.get("sha256") or "").strip()))
    if not records:
        raise ValueError(f"{manifest}: no tiles listed")
    return records


def split_groups(
    tiles: Sequence[TileRecord], fractions: Sequence[float] = (0.6, 0.2, 0.2), seed: int = 0
) -> dict[str, list[TileRecord]]:
    """Train/val/test by ``group_id``, stratified per class, deterministic from ``seed``.

    Whole groups are assigned (near-duplicates never straddle splits); each class's groups are shuffled by
    an RNG keyed on (seed, class name), so adding a class does not reshuffle the others.
    """
    fractions = tuple(float(f) for f in fractions)
    if len(fractions) != 3 or min(fractions) < 0 or not math.isclose(sum(fractions), 1.0, abs_tol=1e-6):
        raise ValueError(f"fractions must be 3 non-negative numbers summing to 1, got {fractions}")
    by_group: dict[str, list[TileRecord]] = {}
    for t in tiles:
        by_group.setdefault(t.group_id, []).append(t)
    group_label: dict[str, str] = {}
    for g, members in by_group.items():
        labels = {t.label for t in members}
        if len(labels) != 1:
            raise ValueError(f"group {g!r} mixes classes {sorted(labels)}: cannot stratify by class")
        group_label[g] = labels.pop()
    out: dict[str, list[TileRecord]] = {s: [] for s in SPLITS}
    for label in sorted(set(group_label.values())):
        groups = sorted(g for g, lab in group_label.items() if lab == label)
        order = np.random.default_rng([seed, zlib.crc32(label.encode())]).permutation(len(groups))
        n = len(groups)
        n_train = round(fractions[0] * n)
        n_trainval = max(n_train, round((fractions[0] + fractions[1]) * n))
        for rank, gi in enumerate(order):
            split = "train" if rank < n_train else "val" if rank < n_trainval else "test"
            out[split].extend(by_group[groups[gi]])
    return {s: sorted(ts, key=lambda t: t.rel) for s, ts in out.items()}


# --------------------------------------------------------------------------------------------------- the spec


@dataclass(frozen=True)
class BagSpec:
    """How bags look: a ``grid``×``grid`` mosaic (N = grid², up to 16×16 = 256), positives' witness-rate range,
    and bags per (task, class, split) — one int for every split or a (train, val, test) triple.

    ``BagSpec.hard()`` is the low-witness preset (1–5 %, but always at least one tumour tile).
    """

    grid: int = 8
    witness_range: tuple[float, float] = DEFAULT_WITNESS_RANGE
    bags_per_class: int | tuple[int, int, int] = 50
    fractions: tuple[float, float, float] = (0.6, 0.2, 0.2)
    thumbnail_downsample: int = 8

    def __post_init__(self) -> None:
        if not 1 <= self.grid <= 16:
            raise ValueError(f"grid must be 1..16 (bag of grid² tiles), got {self.grid}")
        lo, hi = self.witness_range
        if not 0 <= lo <= hi <= 1:
            raise ValueError(f"witness_range must satisfy 0 <= lo <= hi <= 1, got {self.witness_range}")
        self.witness_counts()  # raises when no integer count fits
        counts = self.bags_per_class if isinstance(self.bags_per_class, tuple) else (self.bags_per_class,) * 3
        if len(counts) != 3 or min(counts) < 0:
            raise ValueError(
                f"bags_per_class must be >= 0 (or a (train, val, test) triple), got {self.bags_per_class}"
            )
        if TILE_PX % self.thumbnail_downsample:
            raise ValueError(f"thumbnail_downsample must divide {TILE_PX}, got {self.thumbnail_downsample}")

    @classmethod
    def hard(cls, **overrides: Any) -> BagSpec:
        """The hard preset: witness rate 1–5 % (at least one tumour tile)."""
        return cls(**{"witness_range": HARD_WITNESS_RANGE, **overrides})

    @property
    def n_instances(self) -> int:
        return self.grid * self.grid

    def witness_counts(self) -> tuple[int, int]:
        """Inclusive range of tumour-tile counts whose rate lies in ``witness_range`` (at least 1)."""
        n = self.n_instances
        lo = max(1, math.ceil(self.witness_range[0] * n - 1e-9))
        hi = min(n, math.floor(self.witness_range[1] * n + 1e-9))
        if hi < lo:
            raise ValueError(
                f"no tumour-tile count in 1..{n} gives a witness rate in {self.witness_range} for a "
                f"{self.grid}×{self.grid} bag: use a larger grid"
            )
        return lo, hi

    def n_bags(self, split: str) -> int:
        if isinstance(self.bags_per_class, tuple):
            return int(self.bags_per_class[SPLITS.index(split)])
        return int(self.bags_per_class)

    def as_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


# ------------------------------------------------------------------------------------------------------- bags


@dataclass
class Bag:
    """One bag: tiles in row-major grid order (instance i sits at row i // grid, column i % grid)."""

    slide_id: str
    task: str
    split: str
    label: str
    grid: int
    tiles: tuple[TileRecord, ...]
    instance_labels: np.ndarray = field(repr=False)  # (N,) int8: 1 tumour, 0 benign

    @property
    def n_witness(self) -> int:
        return int(self.instance_labels.sum())

    @property
    def witness_rate(self) -> float:
        return self.n_witness / len(self.tiles)

    @property
    def coords(self) -> np.ndarray:
        """Level-0 top-left (x, y) = (col·224, row·224), int64, row-major."""
        rows, cols = np.divmod(np.arange(self.grid * self.grid, dtype=np.int64), self.grid)
        return np.stack([cols * TILE_PX, rows * TILE_PX], axis=1)


def grow_blob(grid: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """A (grid, grid) bool mask of ``n`` cells forming one 4-connected region (random growth from a random cell).

    Each step adds a uniformly chosen cell of the current 4-neighbour frontier, which gives compact but
    irregular shapes; the frontier is sorted before drawing so the result depends only on ``rng``.
    """
    if not 1 <= n <= grid * grid:
        raise ValueError(f"blob size must be 1..{grid * grid}, got {n}")
    mask = np.zeros((grid, grid), dtype=bool)
    frontier: set[tuple[int, int]] = set()

    def add(r: int, c: int) -> None:
        mask[r, c] = True
        frontier.discard((r, c))
        for rr, cc in ((r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1)):
            if 0 <= rr < grid and 0 <= cc < grid and not mask[rr, cc]:
                frontier.add((rr, cc))

    add(*divmod(int(rng.integers(grid * grid)), grid))
    for _ in range(n - 1):
        cells = sorted(frontier)
        add(*cells[int(rng.integers(len(cells)))])
    return mask


def _draw(pool: Sequence[TileRecord], n: int, rng: np.random.Generator) -> list[TileRecord]:
    """``n`` tiles from ``pool``: without replacement while the pool lasts, then further shuffled passes."""
    if not pool:
        raise ValueError("empty tile pool")
    idx: list[int] = []
    while len(idx) < n:
        idx.extend(rng.permutation(len(pool))[: n - len(idx)].tolist())
    return [pool[i] for i in idx]


def make_bags(splits: Mapping[str, Sequence[TileRecord]], spec: BagSpec, seed: int = 0) -> list[Bag]:
    """All bags of the task sequence, in (task, split, label, index) order.

    Every bag has its own RNG keyed on (seed, task, split, label, index), so changing the number of bags
    only adds or removes bags at the end of each cell and never alters the others.
    """
    lo, hi = spec.witness_counts()
    n = spec.n_instances
    bags: list[Bag] = []
    for ti, task in enumerate(TASKS):
        for si, split in enumerate(SPLITS):
            pools = {lab: [t for t in splits.get(split, ()) if t.label == lab] for lab in ("benign", task)}
            for lab, pool in pools.items():
                if not pool and spec.n_bags(split) > 0:
                    raise ValueError(f"split {split!r} has no {lab!r} tiles: cannot build task {task!r} bags")
            for li, label in enumerate(("benign", task)):
                for i in range(spec.n_bags(split)):
                    rng = np.random.default_rng([seed, ti, si, li, i])
                    if label == "benign":
                        mask = np.zeros((spec.grid, spec.grid), dtype=bool)
                    else:
                        mask = grow_blob(spec.grid, int(rng.integers(lo, hi + 1)), rng)
                    flat = mask.ravel()
                    tumour = iter(_draw(pools[task], int(flat.sum()), rng))
                    benign = iter(_draw(pools["benign"], n - int(flat.sum()), rng))
                    tiles = tuple(next(tumour) if m else next(benign) for m in flat)
                    bags.append(
                        Bag(
                            f"{task}_{split}_{label}_{i:03d}",
                            task,
                            split,
                            label,
                            spec.grid,
                            tiles,
                            flat.astype(np.int8),
                        )
                    )
    return bags


# --------------------------------------------------------------------------------------------------- features


def read_tile(path: str | os.PathLike[str]) -> np.ndarray:
    """A tile as (224, 224, 3) uint8 RGB; other sizes are an error (coordinates assume 224-px tiles)."""
    with Image.open(path) as im:
        rgb = np.asarray(im.convert("RGB"))
    if rgb.shape != (TILE_PX, TILE_PX, 3):
        raise ValueError(f"{path}: expected a {TILE_PX}×{TILE_PX} RGB tile, got {rgb.shape}")
    return rgb


def colour_features(rgb: np.ndarray) -> np.ndarray:
    """Hand-crafted colour descriptor (108,) float32 of an RGB uint8 tile, honest when no pretrained encoder exists.

    Layout: RGB histograms (3 × 16 bins, fractions of pixels), HSV histograms (3 × 16, PIL's 0–255 HSV),
    then per-channel means (RGB, HSV) and standard deviations (RGB, HSV) on a 0–1 scale. H&E stain colour
    separates benign lung from carcinoma well on LC25000, so this is the shortcut any MIL result must beat.
    """
    hsv = np.asarray(Image.fromarray(rgb).convert("HSV"))
    values = np.arange(256) / 255.0
    hists, means, stds = [], [], []
    for img in (rgb, hsv):
        for ch in range(3):  # one 256-bin count per channel gives the histogram and exact moments cheaply
            p = np.bincount(np.ascontiguousarray(img[..., ch]).ravel(), minlength=256) / (img.shape[0] * img.shape[1])
            hists.append(p.reshape(16, 16).sum(1))
            mean = float(p @ values)
            means.append(mean)
            stds.append(math.sqrt(max(float(p @ values**2) - mean * mean, 0.0)))
    parts = [*hists, np.array(means), np.array(stds)]
    return np.concatenate(parts).astype(np.float32)


def parse_feature_kind(features: str) -> tuple[str, str | None]:
    """``"colour"`` → ``("colour", None)``; ``"timm:<arch>"`` → ``("timm", arch)``."""
    if features in ("colour", "color"):
        return "colour", None
    if features.startswith("timm:") and len(features) > 5:
        return "timm", features[5:]
    raise ValueError(f"unknown feature kind {features!r}: use 'colour' or 'timm:<arch>'")


def _decoded(tiles: Sequence[TileRecord], desc: str) -> Iterator[tuple[int, np.ndarray]]:
    for i, t in enumerate(tqdm(tiles, desc=desc, unit="tile", leave=False)):
        yield i, read_tile(t.path)


def _timm_features(
    tiles: Sequence[TileRecord],
    arch: str,
    weights: str | os.PathLike[str] | None,
    model_kwargs: Mapping[str, Any],
    seed: int,
    batch_size: int,
    device: str,
    on_image: Callable[[int, np.ndarray], None] | None,
) -> np.ndarray:
    import torch

    from pathopeft.backbones import create_backbone

    with torch.random.fork_rng(devices=[]):  # random init reproducible from the seed, global RNG untouched
        torch.manual_seed(seed)
        backbone = create_backbone(arch, weights=weights, **dict(model_kwargs))
    if backbone.is_random_init:
        log.warning(
            "RANDOM WEIGHTS: %s features are from an untrained network (seed %d): a lower bound only", arch, seed
        )
    model = backbone.model.to(device).eval()
    out = np.zeros((len(tiles), backbone.dim), dtype=np.float32)
    batch: list[np.ndarray] = []
    start = 0

    def flush() -> None:
        nonlocal start
        x = torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2).to(device)
        x = backbone.normalize(x)
        if x.shape[-1] != backbone.input_size:
            x = torch.nn.functional.interpolate(
                x, size=(backbone.input_size,) * 2, mode="bilinear", antialias=True, align_corners=False
            )
        with torch.inference_mode():
            out[start : start + len(batch)] = model(x).float().cpu().numpy()
        start += len(batch)
        batch.clear()

    for i, rgb in _decoded(tiles, f"timm:{arch} features"):
        if on_image is not None:
            on_image(i, rgb)
        batch.append(rgb)
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    return out


def tile_features(
    tiles: Sequence[TileRecord],
    features: str = "colour",
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    weights: str | os.PathLike[str] | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    seed: int = 0,
    batch_size: int = 64,
    device: str = "cpu",
    on_image: Callable[[int, np.ndarray], None] | None = None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Features (M, D) float32 for ``tiles`` (rows in the given order) and a description of them.

    Cached in ``cache_dir/tile_features_<hash>.h5``, the hash covering (kind, arch, weights, model kwargs,
    seed for random init, the ordered tile list with checksums): a rerun loads the file instead of decoding
    and encoding again. ``on_image(i, rgb)`` sees each decoded tile on a cache miss (thumbnails piggyback).
    """
    kind, arch = parse_feature_kind(features)
    model_kwargs = dict(model_kwargs or {})
    tile_digest = hashlib.sha256("\n".join(f"{t.rel}\t{t.sha256}" for t in tiles).encode()).hexdigest()
    key = {
        "version": _FEATURE_CACHE_VERSION,
        "kind": kind,
        "arch": arch,
        "weights": str(weights) if weights is not None else None,
        "model_kwargs": model_kwargs,
        "seed": seed if kind == "timm" and weights is None else None,
        "tiles": tile_digest,
    }
    digest = h5io.params_hash(key)
    info = {
        "features": "colour" if kind == "colour" else f"timm:{arch}",
        "hash": digest,
        "random_init": kind == "timm" and weights is None,
        "weights": str(weights) if weights is not None else "",
    }
    cache = Path(cache_dir) / f"tile_features_{digest}.h5" if cache_dir is not None else None
    if cache is not None and cache.is_file():
        try:
            with h5py.File(cache, "r") as f:
                feats = f["features"][:]
            if len(feats) == len(tiles):
                log.info("tile features: cache hit %s (%d tiles)", cache, len(tiles))
                return feats, {**info, "dim": int(feats.shape[1])}
        except (OSError, KeyError) as e:
            log.warning("tile features: ignoring unreadable cache %s (%s)", cache, e)
    if kind == "colour":
        feats = np.zeros((len(tiles), COLOUR_DIM), dtype=np.float32)
        for i, rgb in _decoded(tiles, "colour features"):
            if on_image is not None:
                on_image(i, rgb)
            feats[i] = colour_features(rgb)
    else:
        feats = _timm_features(tiles, arch or "", weights, model_kwargs, seed, batch_size, device, on_image)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f".{cache.name}.tmp{os.getpid()}")
        try:
            with h5py.File(tmp, "w") as f:
                f.create_dataset("features", data=feats)
                f.create_dataset("tile_paths", data=[t.rel for t in tiles], dtype=h5py.string_dtype())
                f.attrs["key"] = json.dumps(key, sort_keys=True)
            os.replace(tmp, cache)
        finally:
            if tmp.exists():
                tmp.unlink()
    return feats, {**info, "dim": int(feats.shape[1])}


# ------------------------------------------------------------------------------------------------------ write


def _thumb(rgb: np.ndarray, downsample: int) -> np.ndarray:
    s = TILE_PX // downsample
    return np.asarray(Image.fromarray(rgb).resize((s, s), Image.Resampling.BOX))


def _coords_meta(slide_id: str, grid: int) -> dict[str, Any]:
    side = grid * TILE_PX
    return {
        "patch_size": TILE_PX,
        "patch_level": 0,
        "downsample": np.array([1.0, 1.0]),
        "downsampled_level_dim": np.array([side, side], dtype=np.int64),
        "level_dim": np.array([side, side], dtype=np.int64),
        "custom_downsample": 1.0,
        "name": slide_id,
        "patch_size_level0": TILE_PX,
        "target_patch_size": TILE_PX,
        "overlap": 0,
        "level0_width": side,
        "level0_height": side,
        # target_mpp / magnification omitted: LC25000 tiles are resized 768-px crops of unknown mpp
    }


def write_bag(
    path: Path, bag: Bag, features: np.ndarray, root_meta: Mapping[str, Any], thumbnail: Path, thumb: np.ndarray
) -> None:
    """Write the thumbnail, then the bag H5 (features, coords, ``instance_labels``, ``tile_paths``), each atomically.

    The H5 goes last and is renamed into place only once complete, so an existing H5 means a finished bag.
    """
    thumbnail.parent.mkdir(parents=True, exist_ok=True)
    tmp_png = thumbnail.with_name(f".{thumbnail.name}.tmp{os.getpid()}")
    tmp_h5 = path.with_name(f".{path.name}.part{os.getpid()}")
    try:
        Image.fromarray(thumb).save(tmp_png, format="PNG")
        os.replace(tmp_png, thumbnail)
        h5io.write_features(tmp_h5, features, bag.coords, _coords_meta(bag.slide_id, bag.grid), root_meta)
        with h5py.File(tmp_h5, "a") as f:
            f.create_dataset("instance_labels", data=bag.instance_labels.astype(np.int8))
            f.create_dataset("tile_paths", data=[t.rel for t in bag.tiles], dtype=h5py.string_dtype())
        os.replace(tmp_h5, path)
    finally:
        for tmp in (tmp_png, tmp_h5):
            if tmp.exists():
                tmp.unlink()


def build_bags(
    root: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    spec: BagSpec | None = None,
    features: str = "colour",
    seed: int = 0,
    *,
    weights: str | os.PathLike[str] | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    batch_size: int = 64,
    device: str = "cpu",
) -> Path:
    """Build the bag set under ``out_dir`` and return the path of its manifest ``bags.csv``.

    Same (data, spec, features, seed) → byte-identical ``bags.csv`` and identical features; bags whose H5
    already carries the same ``params_hash`` (and whose thumbnail exists) are not rewritten.
    """
    spec = spec or BagSpec()
    root, out_dir = Path(root), Path(out_dir)
    tiles = load_tile_table(root)
    splits = split_groups(tiles, spec.fractions, seed)
    bags = make_bags(splits, spec, seed)
    used = sorted({t.rel: t for b in bags for t in b.tiles}.values(), key=lambda t: t.rel)
    index = {t.rel: i for i, t in enumerate(used)}
    thumbs: dict[int, np.ndarray] = {}

    def keep_thumb(i: int, rgb: np.ndarray) -> None:
        thumbs[i] = _thumb(rgb, spec.thumbnail_downsample)

    feats, info = tile_features(
        used,
        features,
        out_dir,
        weights=weights,
        model_kwargs=model_kwargs,
        seed=seed,
        batch_size=batch_size,
        device=device,
        on_image=keep_thumb,
    )
    if info["random_init"]:
        log.warning("RANDOM WEIGHTS: bags in %s carry features of a randomly initialised %s", out_dir, features)

    rows: list[dict[str, str]] = []
    todo: list[tuple[Bag, Path, Path, str]] = []
    for bag in bags:
        h5_rel, png_rel = f"bags/{bag.slide_id}.h5", f"thumbnails/{bag.slide_id}.png"
        rows.append(
            {
                "slide_id": bag.slide_id,
                "path": h5_rel,
                "label": bag.label,
                "task": bag.task,
                "split": bag.split,
                "witness_rate": f"{bag.witness_rate:.6f}",
                "n_instances": str(len(bag.tiles)),
                "thumbnail": png_rel,
            }
        )
        bag_hash = h5io.params_hash(
            {
                "features": info["hash"],
                "tiles": [t.rel for t in bag.tiles],
                "labels": bag.instance_labels.tolist(),
                "meta": [bag.slide_id, bag.label, bag.task, bag.split, bag.grid, spec.thumbnail_downsample],
            }
        )
        if h5io.read_hash(out_dir / h5_rel) != bag_hash or not (out_dir / png_rel).is_file():
            todo.append((bag, out_dir / h5_rel, out_dir / png_rel, bag_hash))

    missing = sorted({index[t.rel] for bag, *_ in todo for t in bag.tiles} - set(thumbs))
    for j, rgb in _decoded([used[i] for i in missing], "thumbnails"):
        keep_thumb(missing[j], rgb)
    s = TILE_PX // spec.thumbnail_downsample
    for bag, h5_path, png_path, bag_hash in tqdm(todo, desc="writing bags", unit="bag", leave=False):
        rows_idx = np.array([index[t.rel] for t in bag.tiles])
        mosaic = np.stack([thumbs[i] for i in rows_idx]).reshape(bag.grid, bag.grid, s, s, 3)
        mosaic = mosaic.transpose(0, 2, 1, 3, 4).reshape(bag.grid * s, bag.grid * s, 3)
        root_meta = {
            "params_hash": bag_hash,
            "encoder": info["features"],
            "feature_kind": info["features"],
            "weights": info["weights"],
            "random_init": bool(info["random_init"]),
            "slide_id": bag.slide_id,
            "label": bag.label,
            "label_index": LABEL_SPACE[bag.label],
            "task": bag.task,
            "split": bag.split,
            "witness_rate": bag.witness_rate,
            "n_witness": bag.n_witness,
            "grid": bag.grid,
            "seed": seed,
            "thumbnail_downsample": spec.thumbnail_downsample,
            "data_root": str(root.resolve()),
            "source": "LC25000 lung (arXiv:1912.12142), LC25000-clean groups",
        }
        write_bag(h5_path, bag, feats[rows_idx], root_meta, png_path, mosaic)
    log.info("bags: %d written, %d up to date", len(todo), len(bags) - len(todo))

    listed = {r["path"] for r in rows}
    stale = [p for p in sorted((out_dir / "bags").glob("*.h5")) if f"bags/{p.name}" not in listed]
    if stale:
        log.warning(
            "%s: %d bag files not in bags.csv (from another run?), e.g. %s", out_dir, len(stale), stale[0].name
        )

    summary = {
        "spec": spec.as_dict(),
        "seed": seed,
        "features": info["features"],
        "feature_dim": info["dim"],
        "feature_cache": f"tile_features_{info['hash']}.h5",
        "random_init": bool(info["random_init"]),
        "label_space": LABEL_SPACE,
        "tasks": list(TASKS),
        "splits": {
            s: {
                lab: {
                    "tiles": sum(t.label == lab for t in ts),
                    "groups": len({t.group_id for t in ts if t.label == lab}),
                }
                for lab in LABEL_SPACE
            }
            for s, ts in splits.items()
        },
    }
    atomic_write_text(out_dir / "bags.json", json.dumps(summary, indent=2) + "\n")
    manifest = out_dir / "bags.csv"
    lines = [",".join(MANIFEST_COLUMNS)] + [",".join(r[c] for c in MANIFEST_COLUMNS) for r in rows]
    atomic_write_text(manifest, "\n".join(lines) + "\n")
    return manifest


def read_bag_manifest(manifest_csv: str | os.PathLike[str]) -> list[dict[str, str]]:
    """Rows of ``bags.csv`` with ``path`` and ``thumbnail`` resolved against the CSV's folder."""
    manifest_csv = Path(manifest_csv)
    if not manifest_csv.is_file():
        raise FileNotFoundError(f"{manifest_csv}: bag manifest not found")
    with manifest_csv.open(newline="") as fh:
        reader = csv.DictReader(fh)
        missing = set(MANIFEST_COLUMNS) - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{manifest_csv}: missing column(s) {sorted(missing)}")
        rows = list(reader)
    for r in rows:
        r["path"] = str(manifest_csv.parent / r["path"])
        r["thumbnail"] = str(manifest_csv.parent / r["thumbnail"])
    return rows


# --------------------------------------------------------------------------------------------------- baseline


def _best_threshold(scores: np.ndarray, accuracy: Callable[[float], float]) -> float:
    """The cut t between observed scores (tumour when score > t) with the best ``accuracy(t)``; lowest of ties."""
    u = np.unique(scores)
    cands = np.concatenate([[u[0] - 1.0], (u[:-1] + u[1:]) / 2, [u[-1]]])
    return float(cands[int(np.argmax([accuracy(float(t)) for t in cands]))])


def _auc(scores: np.ndarray, positive: np.ndarray) -> float:
    pos, neg = scores[positive], scores[~positive]
    if not len(pos) or not len(neg):
        return float("nan")
    diff = pos[:, None] - neg[None, :]
    return float((diff > 0).mean() + 0.5 * (diff == 0).mean())


def colour_centroid_baseline(
    manifest_csv: str | os.PathLike[str], data_root: str | os.PathLike[str] | None = None
) -> dict[str, float]:
    """The trivial colour baseline to report next to every MIL result on these bags.

    Tiles are described by :func:`colour_features` (read from the bags when they hold colour features, else
    recomputed from the images under ``data_root``, by default the root recorded in the bag files) and
    z-scored with train statistics. A nearest-centroid classifier is fitted on the unique TRAIN-split tiles
    (their class known from the instance labels). Per task, bag score = fraction of tiles nearer the task's
    tumour centroid than the benign one; the bag threshold is tuned on the val bags (train when there are
    none) and accuracy/AUC are reported on the test bags. ``3class`` uses all three centroids: a bag is
    benign when its tumour fraction is at most a val-tuned threshold, else its majority tumour class.

    Returns floats keyed ``<task>/bag_acc``, ``<task>/bag_auc``, ``<task>/tile_acc``, ``<task>/threshold``,
    ``<task>/n_test_bags`` and the same (without AUC) under ``3class/``.
    """
    rows = read_bag_manifest(manifest_csv)
    colour_of: dict[str, np.ndarray] = {}
    bags: list[tuple[dict[str, str], list[str], np.ndarray]] = []  # row, tile rel paths, tile class (0/1/2)
    for r in rows:
        with h5py.File(r["path"], "r") as f:
            rels = [p.decode() if isinstance(p, bytes) else str(p) for p in f["tile_paths"][:]]
            inst = f["instance_labels"][:].astype(bool)
            kind = f.attrs.get("feature_kind", "")
            root = Path(data_root) if data_root is not None else Path(str(f.attrs.get("data_root", "")))
            if kind == "colour":
                for rel, x in zip(rels, f["features"][:], strict=True):
                    colour_of.setdefault(rel, x)
        for rel in rels:
            if rel not in colour_of:
                colour_of[rel] = colour_features(read_tile(root / rel))
        cls = np.where(inst, LABEL_SPACE[r["label"]], 0)
        bags.append((r, rels, cls))

    def unique_tiles(split: str) -> tuple[np.ndarray, np.ndarray]:
        seen: dict[str, int] = {}
        for r, rels, cls in bags:
            if r["split"] == split:
                seen.update({rel: int(c) for rel, c in zip(rels, cls, strict=True)})
        keys = sorted(seen)
        return np.stack([colour_of[k] for k in keys]), np.array([seen[k] for k in keys])

    x_train, y_train = unique_tiles("train")
    mu, sd = x_train.mean(0), x_train.std(0) + 1e-6
    centroids = {c: ((x_train[y_train == c] - mu) / sd).mean(0) for c in np.unique(y_train)}

    def dists(rels: Sequence[str]) -> dict[int, np.ndarray]:
        z = (np.stack([colour_of[k] for k in rels]) - mu) / sd
        return {c: np.linalg.norm(z - m, axis=1) for c, m in centroids.items()}

    tune_split = "val" if any(r["split"] == "val" for r, *_ in bags) else "train"
    out: dict[str, float] = {}
    for task in TASKS:
        c = LABEL_SPACE[task]
        if c not in centroids or 0 not in centroids:
            continue
        scores, positive, split_of = [], [], []
        for r, rels, _ in bags:
            if r["task"] == task:
                d = dists(rels)
                scores.append(float((d[c] < d[0]).mean()))
                positive.append(r["label"] == task)
                split_of.append(r["split"])
        s, p, sp = np.array(scores), np.array(positive), np.array(split_of)
        tune, test = sp == tune_split, sp == "test"
        if not test.any() or not tune.any():
            continue
        t = _best_threshold(s[tune], lambda t, s=s[tune], p=p[tune]: float(((s > t) == p).mean()))
        x_test, y_test = unique_tiles("test")
        keep = np.isin(y_test, (0, c))
        z = (x_test[keep] - mu) / sd
        tile_pred = np.linalg.norm(z - centroids[c], axis=1) < np.linalg.norm(z - centroids[0], axis=1)
        out[f"{task}/bag_acc"] = float(((s[test] > t) == p[test]).mean())
        out[f"{task}/bag_auc"] = _auc(s[test], p[test])
        out[f"{task}/tile_acc"] = float((tile_pred == (y_test[keep] == c)).mean())
        out[f"{task}/threshold"] = t
        out[f"{task}/n_test_bags"] = float(test.sum())

    classes = sorted(centroids)
    frac, counts, truth, split_of = [], [], [], []
    for r, rels, _ in bags:
        d = dists(rels)
        pred = np.array(classes)[np.argmin(np.stack([d[k] for k in classes]), axis=0)]
        frac.append(float((pred != 0).mean()))
        counts.append([int((pred == k).sum()) for k in range(len(LABEL_SPACE))])
        truth.append(LABEL_SPACE[r["label"]])
        split_of.append(r["split"])
    f_, n_, y_, sp = np.array(frac), np.array(counts), np.array(truth), np.array(split_of)
    tune, test = sp == tune_split, sp == "test"

    def predict(t: float) -> np.ndarray:
        return np.where(f_ > t, 1 + np.argmax(n_[:, 1:], axis=1), 0)

    if tune.any() and test.any():
        t = _best_threshold(f_[tune], lambda t: float((predict(t)[tune] == y_[tune]).mean()))
        bag_pred = predict(t)
        x_test, y_test = unique_tiles("test")
        z = (x_test - mu) / sd
        tile_pred = np.array(classes)[
            np.argmin(np.stack([np.linalg.norm(z - centroids[k], axis=1) for k in classes]), 0)
        ]
        out["3class/bag_acc"] = float((bag_pred[test] == y_[test]).mean())
        out["3class/tile_acc"] = float((tile_pred == y_test).mean())
        out["3class/threshold"] = t
        out["3class/n_test_bags"] = float(test.sum())
    return out
