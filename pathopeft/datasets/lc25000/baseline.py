"""The trivial colour baseline to report next to every MIL result on the LC25000 bags.

On LC25000, stain colour alone nearly solves tumour vs benign, so a MIL result on these bags means little
without this nearest-centroid number beside it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import h5py
import numpy as np

from pathopeft.datasets.lc25000.build import EXTRA_COLUMNS, read_stream
from pathopeft.datasets.lc25000.tiles import read_tile
from pathopeft.mil.data import BagRecord, read_bag_manifest
from pathopeft.mil.tile_features import colour_features


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
    none) and accuracy/AUC are reported on the test bags. ``<K>class`` (``3class`` on LC25000) uses all
    centroids: a bag is its majority normal class when its tumour fraction is at most a val-tuned
    threshold, else its majority tumour class. Label space and each task's (normal, tumour) labels come
    from ``bags.json`` beside the manifest (``task_pools``), LC25000's when it has none.

    Returns floats keyed ``<task>/bag_acc``, ``<task>/bag_auc``, ``<task>/tile_acc``, ``<task>/threshold``,
    ``<task>/n_test_bags`` and the same (without AUC) under ``<K>class/``.
    """
    rows = read_bag_manifest(manifest_csv, extra_columns=EXTRA_COLUMNS)
    space, tasks = read_stream(manifest_csv)
    pools = {t.task: (t.normal, t.tumour) for t in tasks}
    colour_of: dict[str, np.ndarray] = {}
    bags: list[tuple[BagRecord, list[str], np.ndarray]] = []  # row, tile rel paths, tile class (0/1/2)
    for r in rows:
        with h5py.File(r.path, "r") as f:
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
        normal, tumour = pools[r.task]
        cls = np.where(inst, space[tumour], space[normal])
        bags.append((r, rels, cls))

    def unique_tiles(split: str) -> tuple[np.ndarray, np.ndarray]:
        seen: dict[str, int] = {}
        for r, rels, cls in bags:
            if r.split == split:
                seen.update({rel: int(c) for rel, c in zip(rels, cls, strict=True)})
        keys = sorted(seen)
        return np.stack([colour_of[k] for k in keys]), np.array([seen[k] for k in keys])

    x_train, y_train = unique_tiles("train")
    mu, sd = x_train.mean(0), x_train.std(0) + 1e-6
    centroids = {c: ((x_train[y_train == c] - mu) / sd).mean(0) for c in np.unique(y_train)}

    def dists(rels: Sequence[str]) -> dict[int, np.ndarray]:
        z = (np.stack([colour_of[k] for k in rels]) - mu) / sd
        return {c: np.linalg.norm(z - m, axis=1) for c, m in centroids.items()}

    tune_split = "val" if any(r.split == "val" for r, *_ in bags) else "train"
    out: dict[str, float] = {}
    for task, (normal, tumour) in pools.items():
        c, c0 = space[tumour], space[normal]
        if c not in centroids or c0 not in centroids:
            continue
        scores, positive, split_of = [], [], []
        for r, rels, _ in bags:
            if r.task == task:
                d = dists(rels)
                scores.append(float((d[c] < d[c0]).mean()))
                positive.append(r.label == tumour)
                split_of.append(r.split)
        s, p, sp = np.array(scores), np.array(positive), np.array(split_of)
        tune, test = sp == tune_split, sp == "test"
        if not test.any() or not tune.any():
            continue
        t = _best_threshold(s[tune], lambda t, s=s[tune], p=p[tune]: float(((s > t) == p).mean()))
        x_test, y_test = unique_tiles("test")
        keep = np.isin(y_test, (c0, c))
        z = (x_test[keep] - mu) / sd
        tile_pred = np.linalg.norm(z - centroids[c], axis=1) < np.linalg.norm(z - centroids[c0], axis=1)
        out[f"{task}/bag_acc"] = float(((s[test] > t) == p[test]).mean())
        out[f"{task}/bag_auc"] = _auc(s[test], p[test])
        out[f"{task}/tile_acc"] = float((tile_pred == (y_test[keep] == c)).mean())
        out[f"{task}/threshold"] = t
        out[f"{task}/n_test_bags"] = float(test.sum())

    classes = sorted(centroids)
    normals = np.array(sorted({space[n] for n, _ in pools.values()}))
    tumours = np.array(sorted(set(space.values()) - set(normals.tolist())))
    key = f"{len(space)}class"
    frac, counts, truth, split_of = [], [], [], []
    for r, rels, _ in bags:
        d = dists(rels)
        pred = np.array(classes)[np.argmin(np.stack([d[k] for k in classes]), axis=0)]
        frac.append(float(np.isin(pred, tumours).mean()))
        counts.append([int((pred == k).sum()) for k in range(len(space))])
        truth.append(space[r.label])
        split_of.append(r.split)
    f_, n_, y_, sp = np.array(frac), np.array(counts), np.array(truth), np.array(split_of)
    tune, test = sp == tune_split, sp == "test"

    def predict(t: float) -> np.ndarray:
        return np.where(f_ > t, tumours[np.argmax(n_[:, tumours], 1)], normals[np.argmax(n_[:, normals], 1)])

    if tune.any() and test.any():
        t = _best_threshold(f_[tune], lambda t: float((predict(t)[tune] == y_[tune]).mean()))
        bag_pred = predict(t)
        x_test, y_test = unique_tiles("test")
        z = (x_test - mu) / sd
        tile_pred = np.array(classes)[
            np.argmin(np.stack([np.linalg.norm(z - centroids[k], axis=1) for k in classes]), 0)
        ]
        out[f"{key}/bag_acc"] = float((bag_pred[test] == y_[test]).mean())
        out[f"{key}/tile_acc"] = float((tile_pred == y_test).mean())
        out[f"{key}/threshold"] = t
        out[f"{key}/n_test_bags"] = float(test.sum())
    return out
