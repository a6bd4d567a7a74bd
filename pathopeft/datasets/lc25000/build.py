"""Write the LC25000 bag set: per-tile features (cached), bag H5 files, thumbnails, ``bags.csv``, ``bags.json``.

Every file is written atomically through :mod:`pathopeft.io` (one temporary-name convention the stale-file
cleaner knows); a bag's H5 is written last, so an H5 carrying the right ``params_hash`` means a finished bag.
"""

from __future__ import annotations

import io
import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from pathopeft.datasets.lc25000.bags import Bag, BagSpec, TaskPools, lc25000_tasks, make_bags
from pathopeft.datasets.lc25000.tiles import LABEL_SPACE, TILE_PX, TileRecord, load_tile_table, read_tile, split_groups
from pathopeft.io import atomic_write_bytes, atomic_write_text
from pathopeft.mil.tile_features import tile_features
from pathopeft.wsi import h5io

log = logging.getLogger(__name__)

MANIFEST_COLUMNS = ("slide_id", "path", "label", "task", "split", "witness_rate", "n_instances", "thumbnail")
#: Columns of ``bags.csv`` beyond the bag manifest's own (``read_bag_manifest(m, extra_columns=...)``).
EXTRA_COLUMNS = ("witness_rate", "n_instances", "thumbnail")


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


def _write_h5(path: Path, bag: Bag, features: np.ndarray, root_meta: Mapping[str, Any]) -> None:
    """The bag's H5: the WSI stage's features-file layout (:func:`pathopeft.wsi.h5io.write_features`) plus the
    tile ground truth (``instance_labels``) and the tiles it came from (``tile_paths``)."""
    extra = {"instance_labels": bag.instance_labels.astype(np.int8), "tile_paths": [t.rel for t in bag.tiles]}
    h5io.write_features(path, features, bag.coords, _coords_meta(bag.slide_id, bag.grid), root_meta, extra)


def write_bag(
    path: Path, bag: Bag, features: np.ndarray, root_meta: Mapping[str, Any], thumbnail: Path, thumb: np.ndarray
) -> None:
    """Write the thumbnail, then the bag H5 (features, coords, ``instance_labels``, ``tile_paths``), each atomically.

    The H5 goes last, so an existing H5 means a finished bag.
    """
    png = io.BytesIO()
    Image.fromarray(thumb).save(png, format="PNG")
    atomic_write_bytes(thumbnail, png.getvalue())
    _write_h5(path, bag, features, root_meta)


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
    splits: Mapping[str, Sequence[TileRecord]] | None = None,
    tasks: Sequence[TaskPools] | None = None,
    label_space: Mapping[str, int] | None = None,
    source: str = "LC25000 lung (arXiv:1912.12142), LC25000-clean groups",
    encode_all: bool = False,
) -> Path:
    """Build the bag set under ``out_dir`` and return the path of its manifest ``bags.csv``.

    Same (data, spec, features, seed) → byte-identical ``bags.csv`` and identical features; bags whose H5
    already carries the same ``params_hash`` (and whose thumbnail exists) are not rewritten.

    By default the LC25000 tiles under ``root`` are split here; another dataset passes its own ``splits``
    (tile ``rel`` paths relative to ``root``), ``tasks`` (:class:`TaskPools`) and ``label_space``.
    ``encode_all`` encodes every tile of ``splits`` rather than only those drawn into bags, so the feature
    cache survives a change of bag counts (worth it for a CNN on CPU).
    """
    spec = spec or BagSpec()
    root, out_dir = Path(root), Path(out_dir)
    if splits is None:
        splits = split_groups(load_tile_table(root), spec.fractions, seed)
    tasks = tuple(tasks if tasks is not None else lc25000_tasks())
    label_space = dict(label_space if label_space is not None else LABEL_SPACE)
    bags = make_bags(splits, spec, seed, tasks)
    pool = [t for ts in splits.values() for t in ts] if encode_all else [t for b in bags for t in b.tiles]
    used = sorted({t.rel: t for t in pool}.values(), key=lambda t: t.rel)
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
        read=read_tile,
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
    for i in tqdm(missing, desc="thumbnails", unit="tile", leave=False):
        keep_thumb(i, read_tile(used[i].path))
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
            "label_index": label_space[bag.label],
            "task": bag.task,
            "split": bag.split,
            "witness_rate": bag.witness_rate,
            "n_witness": bag.n_witness,
            "grid": bag.grid,
            "seed": seed,
            "thumbnail_downsample": spec.thumbnail_downsample,
            "data_root": str(root.resolve()),
            "source": source,
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
        "label_space": label_space,
        "tasks": [t.task for t in tasks],
        "task_pools": {t.task: {"normal": t.normal, "tumour": t.tumour} for t in tasks},
        "splits": {
            s: {
                lab: {
                    "tiles": sum(t.label == lab for t in ts),
                    "groups": len({t.group_id for t in ts if t.label == lab}),
                }
                for lab in label_space
            }
            for s, ts in splits.items()
        },
    }
    atomic_write_text(out_dir / "bags.json", json.dumps(summary, indent=2) + "\n")
    manifest = out_dir / "bags.csv"
    lines = [",".join(MANIFEST_COLUMNS)] + [",".join(r[c] for c in MANIFEST_COLUMNS) for r in rows]
    atomic_write_text(manifest, "\n".join(lines) + "\n")
    return manifest


def read_stream(manifest: str | os.PathLike[str]) -> tuple[dict[str, int], tuple[TaskPools, ...]]:
    """(label space, tasks) of a bag set, from the ``bags.json`` :func:`build_bags` wrote beside ``manifest``;
    LC25000's when it records none (bag sets built before tasks had their own normal pools)."""
    meta = Path(manifest).parent / "bags.json"
    info = json.loads(meta.read_text()) if meta.is_file() else {}
    if "task_pools" in info and "label_space" in info:
        tasks = tuple(TaskPools(t, v["normal"], v["tumour"]) for t, v in info["task_pools"].items())
        return {k: int(v) for k, v in info["label_space"].items()}, tasks
    return dict(LABEL_SPACE), lc25000_tasks()
