"""A two-organ continual-MIL stream of real tiles for CoMEL's per-organ protocol: lung, then oral cavity.

Why: CoMEL's official protocol gives every task its own normal and tumour classes (labels offset by
2·task) and scores class-incremental accuracy over all classes seen so far. Here both tasks are squamous
cell carcinoma against its organ's normal tissue, so a class-incremental model must tell lung SCC from
oral SCC (and lung parenchyma from oral mucosa) without ever training on both at once: a hard case,
unlike LC25000's shared-benign stream, where colour alone nearly separates the classes.

* Task ``lung``: LC25000 ``lung_n`` → ``lung_normal`` vs ``lung_scc`` (split by ``group_id``);
  ``lung_aca`` is unused, so no tile belongs to two classes.
* Task ``oral``: Rahman et al. ``oral_normal`` vs ``oral_scc`` (split by ``seq_block10`` units,
  :mod:`pathopeft.datasets.oral_rahman`).
* Labels: :data:`CLASSES` in that order (``lung_normal``=0, ``lung_scc``=1, ``oral_normal``=2,
  ``oral_scc``=3). Tile ``rel`` paths are relative to the common ``patch_data`` folder
  (``lc25000_lung224/images/…``, ``oral_rahman224/images/…``), which is the bag set's ``data_root``.
* Features: real DenseNet-121 (capricorn weights, inputs in [0, 1]: mean 0 / std 1) by default,
  ``colour`` as the option behind the trivial baseline. Every tile of the splits is encoded once
  (``encode_all``), so changing bag counts reuses the feature cache.

Bags, files and the baseline are those of :mod:`pathopeft.datasets.lc25000` (its builder takes any
``splits`` and :class:`~pathopeft.datasets.lc25000.TaskPools`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pathopeft.datasets.lc25000 import BagSpec, TaskPools, TileRecord, build_bags, load_tile_table, split_groups
from pathopeft.datasets.oral_rahman import load_oral_tiles

LUNG_DIR, ORAL_DIR = "lc25000_lung224", "oral_rahman224"
#: Class-incremental label space: task t's normal class is 2·t, its tumour class 2·t + 1.
CLASSES = ("lung_normal", "lung_scc", "oral_normal", "oral_scc")
LABEL_SPACE = {c: i for i, c in enumerate(CLASSES)}
TASKS = (TaskPools("lung", "lung_normal", "lung_scc"), TaskPools("oral", "oral_normal", "oral_scc"))
#: LC25000 manifest class → stream label (lung_aca is left out on purpose).
LUNG_LABELS = {"benign": "lung_normal", "scc": "lung_scc"}
#: The opt-in third task (``with_lung_aca``): lung adenocarcinoma against the same benign lung pool, label 4.
#: Why: a cancer type absent from the two-organ library, for adapters generated from a task description.
LUNG_ACA = TaskPools("lung_aca", "lung_normal", "lung_aca")
DENSENET = "timm:densenet121"
#: The capricorn DenseNet-121 was trained on inputs scaled to [0, 1] only (no ImageNet mean/std).
DENSENET_KWARGS: dict[str, Any] = {"mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]}
DENSENET_WEIGHTS = Path("weights") / "capricorn_densenet121" / "capricorn0.1_densenet121_timm.safetensors"
#: 4×4 mosaics: the oral normal pool (~55 tiles in val/test) still fills a bag with distinct tiles.
DEFAULT_SPEC = BagSpec(grid=4, bags_per_class=(60, 20, 40), thumbnail_downsample=8)
SOURCE = (
    "LC25000 lung (arXiv:1912.12142, LC25000-clean groups) + oral mucosa (Rahman et al., Data in Brief 29, "
    "2020, 105114)"
)


def default_weights(patch_root: str | os.PathLike[str]) -> Path:
    """The capricorn DenseNet-121 weights beside ``patch_data`` (``<shared>/weights/...``)."""
    return Path(patch_root).resolve().parent / DENSENET_WEIGHTS


def load_stream_tiles(
    patch_root: str | os.PathLike[str], check_files: bool = True, with_lung_aca: bool = False
) -> list[TileRecord]:
    """Every tile of the stream (lung_n, lung_scc, oral; lung_aca too if asked), labelled with :data:`CLASSES`
    (+ ``lung_aca``), ``rel`` from ``patch_root``."""
    root = Path(patch_root)
    labels = {**LUNG_LABELS, "aca": "lung_aca"} if with_lung_aca else LUNG_LABELS
    lung = [
        dataclasses.replace(t, label=labels[t.label], rel=f"{LUNG_DIR}/{t.rel}")
        for t in load_tile_table(root / LUNG_DIR, check_files=check_files)
        if t.label in labels
    ]
    return lung + load_oral_tiles(root / ORAL_DIR, rel_prefix=f"{ORAL_DIR}/", check_files=check_files)


def stream_splits(
    patch_root: str | os.PathLike[str],
    fractions: tuple[float, float, float] = DEFAULT_SPEC.fractions,
    seed: int = 0,
    with_lung_aca: bool = False,
) -> dict[str, list[TileRecord]]:
    """Train/val/test of the stream: whole groups (lung ``group_id``, oral ``seq_block10`` units) per split,
    stratified per class, seeded (:func:`~pathopeft.datasets.lc25000.split_groups`)."""
    return split_groups(load_stream_tiles(patch_root, with_lung_aca=with_lung_aca), fractions, seed)


def build_two_organ_bags(
    patch_root: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    spec: BagSpec | None = None,
    features: str = DENSENET,
    seed: int = 0,
    *,
    weights: str | os.PathLike[str] | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    batch_size: int = 64,
    device: str = "cpu",
    encode_all: bool = True,
    with_lung_aca: bool = False,
) -> Path:
    """Build the two-organ bag set under ``out_dir`` and return its ``bags.csv``.

    ``with_lung_aca`` adds the third task :data:`LUNG_ACA` (class ``lung_aca``, label 4); the first two tasks'
    labels are unchanged.

    ``encode_all`` (default) encodes every tile of the splits once, so other bag counts reuse the cache;
    False encodes only the tiles drawn into bags (small test builds).

    For ``timm:densenet121`` without ``weights``/``model_kwargs`` the capricorn weights beside ``patch_root``
    and mean 0 / std 1 are used (a missing weights file is an error, never silent random init).
    """
    spec = spec or DEFAULT_SPEC
    if features == DENSENET:
        if weights is None:
            weights = default_weights(patch_root)
            if not Path(weights).is_file():
                raise FileNotFoundError(f"{weights}: capricorn DenseNet-121 weights not found (pass weights=...)")
        model_kwargs = DENSENET_KWARGS if model_kwargs is None else model_kwargs
    return build_bags(
        Path(patch_root),
        out_dir,
        spec,
        features,
        seed,
        weights=weights,
        model_kwargs=model_kwargs,
        batch_size=batch_size,
        device=device,
        splits=stream_splits(patch_root, spec.fractions, seed, with_lung_aca),
        tasks=(*TASKS, LUNG_ACA) if with_lung_aca else TASKS,
        label_space={**LABEL_SPACE, "lung_aca": len(CLASSES)} if with_lung_aca else LABEL_SPACE,
        source=SOURCE,
        encode_all=encode_all,
    )
