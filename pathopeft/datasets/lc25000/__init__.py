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
* Features are computed once per unique tile (:mod:`pathopeft.mil.tile_features`, cached as
  ``tile_features_<hash>.h5``) and looked up per bag.

Output folder::

    bags.csv                 slide_id,path,label,task,split,witness_rate,n_instances,thumbnail (paths relative)
    bags.json                spec, seed, feature kind, label space, tiles/groups per split
    bags/<slide_id>.h5       features (N, D), coords (N, 2), instance_labels (N,) int8, tile_paths (N,)
    thumbnails/<slide_id>.png  the mosaic downsampled 8× (pixel = level-0 coordinate / 8), for heatmaps
    tile_features_<hash>.h5  the per-tile feature cache

Modules: :mod:`.tiles` (label space, tile table, splits), :mod:`.bags` (spec, mosaics), :mod:`.build`
(files on disk), :mod:`.baseline` (the colour baseline). ``bags.csv`` is a bag manifest
(:func:`pathopeft.mil.data.read_bag_manifest` with ``extra_columns=EXTRA_COLUMNS``).
"""

from __future__ import annotations

from pathopeft.datasets.lc25000.bags import (
    DEFAULT_WITNESS_RANGE,
    HARD_WITNESS_RANGE,
    Bag,
    BagSpec,
    TaskPools,
    grow_blob,
    lc25000_tasks,
    make_bags,
)
from pathopeft.datasets.lc25000.baseline import colour_centroid_baseline
from pathopeft.datasets.lc25000.build import EXTRA_COLUMNS, MANIFEST_COLUMNS, build_bags, write_bag
from pathopeft.datasets.lc25000.tiles import (
    CLASS_NAMES,
    LABEL_SPACE,
    SPLITS,
    TASKS,
    TILE_PX,
    TileRecord,
    load_tile_table,
    read_tile,
    split_groups,
)
from pathopeft.mil.tile_features import COLOUR_DIM, colour_features, parse_feature_kind, tile_features

__all__ = [
    "CLASS_NAMES",
    "COLOUR_DIM",
    "DEFAULT_WITNESS_RANGE",
    "EXTRA_COLUMNS",
    "HARD_WITNESS_RANGE",
    "LABEL_SPACE",
    "MANIFEST_COLUMNS",
    "SPLITS",
    "TASKS",
    "TILE_PX",
    "Bag",
    "BagSpec",
    "TaskPools",
    "TileRecord",
    "build_bags",
    "colour_centroid_baseline",
    "colour_features",
    "grow_blob",
    "lc25000_tasks",
    "load_tile_table",
    "make_bags",
    "parse_feature_kind",
    "read_tile",
    "split_groups",
    "tile_features",
    "write_bag",
]
