"""LC25000 bags: the spec (grid, witness rate, bags per class) and the seeded mosaics with one tumour blob."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from pathopeft.datasets.lc25000.tiles import SPLITS, TASKS, TILE_PX, TileRecord

DEFAULT_WITNESS_RANGE = (0.05, 0.30)
HARD_WITNESS_RANGE = (0.01, 0.05)


class TaskPools(NamedTuple):
    """One task of a bag stream: its name and the tile labels of its normal and tumour pools.

    Why: CoMEL's protocol gives each task its own normal class (e.g. lung parenchyma vs oral mucosa), so
    the normal pool is per task, not one shared ``benign``.
    """

    task: str
    normal: str
    tumour: str


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


def lc25000_tasks() -> tuple[TaskPools, ...]:
    """LC25000's sequence: each tumour class against the shared ``benign`` pool."""
    return tuple(TaskPools(t, "benign", t) for t in TASKS)


def make_bags(
    splits: Mapping[str, Sequence[TileRecord]],
    spec: BagSpec,
    seed: int = 0,
    tasks: Sequence[TaskPools] | None = None,
) -> list[Bag]:
    """All bags of the task sequence, in (task, split, label, index) order.

    ``tasks``: the (task, normal pool, tumour pool) sequence, by default LC25000's (:func:`lc25000_tasks`);
    a negative bag is labelled with its task's normal label, a positive one with its tumour label. Every bag
    has its own RNG keyed on (seed, task, split, label, index), so changing the number of bags only adds or
    removes bags at the end of each cell and never alters the others.
    """
    lo, hi = spec.witness_counts()
    n = spec.n_instances
    bags: list[Bag] = []
    for ti, (task, normal, tumour_label) in enumerate(tasks if tasks is not None else lc25000_tasks()):
        for si, split in enumerate(SPLITS):
            pools = {lab: [t for t in splits.get(split, ()) if t.label == lab] for lab in (normal, tumour_label)}
            for lab, pool in pools.items():
                if not pool and spec.n_bags(split) > 0:
                    raise ValueError(f"split {split!r} has no {lab!r} tiles: cannot build task {task!r} bags")
            for li, label in enumerate((normal, tumour_label)):
                for i in range(spec.n_bags(split)):
                    rng = np.random.default_rng([seed, ti, si, li, i])
                    if label == normal:
                        mask = np.zeros((spec.grid, spec.grid), dtype=bool)
                    else:
                        mask = grow_blob(spec.grid, int(rng.integers(lo, hi + 1)), rng)
                    flat = mask.ravel()
                    tumour = iter(_draw(pools[tumour_label], int(flat.sum()), rng))
                    benign = iter(_draw(pools[normal], n - int(flat.sum()), rng))
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
