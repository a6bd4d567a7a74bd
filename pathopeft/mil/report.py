"""The comparison of continual methods on one task sequence: summary table (CSV, Markdown) and R heatmaps.

:class:`ContinualReport` collects per-method results (:class:`MethodResult`: the raw matrices, so any metric
can be recomputed from the CSV later) and writes them atomically through :mod:`pathopeft.io`, so a crashed
or concurrent run never leaves a truncated report behind. The numbers come from :mod:`pathopeft.mil.metrics`.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from pathopeft.io import atomic_write_text
from pathopeft.mil.metrics import (
    average_accuracy,
    average_incremental_accuracy,
    backward_transfer,
    check_r,
    forgetting,
)
from pathopeft.mil.plots import plot_accuracy_matrix

__all__ = ["ContinualReport", "MethodResult", "seeds_markdown", "seeds_summary"]

NAN = math.nan
PathLike = str | os.PathLike[str]


def _final_mean(m: np.ndarray | None) -> float:
    """Mean of the last row ignoring NaN (tasks without tile labels); NaN, without a warning, if none."""
    if m is None:
        return NAN
    row = m[-1][np.isfinite(m[-1])]
    return float(row.mean()) if row.size else NAN


# ------------------------------------------------------------------------------------------------- reporting


_SUMMARY_KEYS = (
    "avg_acc",
    "avg_inc_acc",
    "forgetting",
    "bwt",
    "final_instance_auc",
    "final_instance_acc",
    "final_bag_auc",
    "train_time_s",
    "peak_memory_mib",
)


#: The matrices a result carries (R first), as CSV columns.
_MATRICES = ("acc_matrix", "instance_auc", "instance_acc", "bag_auc")


def _to_jsonable(m: np.ndarray | None) -> str:
    """Matrix to JSON with ``null`` for NaN, so the CSV cell is standard JSON and round-trips exactly."""
    if m is None:
        return ""
    return json.dumps([[None if not math.isfinite(v) else float(v) for v in row] for row in m.tolist()])


def _from_jsonable(s: str) -> np.ndarray | None:
    """Inverse of :func:`_to_jsonable`; an empty cell means "no matrix"."""
    if not s:
        return None
    return np.array([[NAN if v is None else v for v in row] for row in json.loads(s)], dtype=np.float64)


@dataclass
class MethodResult:
    """One method's outcome on a task sequence: the accuracy matrix and what it cost."""

    method: str
    acc_matrix: np.ndarray  # R, (T, T): R[i, j] = bag accuracy on task j after training task i
    instance_auc: np.ndarray | None = None  # (T, T) like R; NaN where a task has no tile labels
    train_time_s: float = NAN
    peak_memory_mib: float = NAN
    instance_acc: np.ndarray | None = None  # (T, T): tile accuracy at the Youden threshold (CoMEL's measure)
    bag_auc: np.ndarray | None = None  # (T, T): AUC of the bag tumour probability

    def __post_init__(self) -> None:
        self.acc_matrix = check_r(self.acc_matrix)
        for name in _MATRICES[1:]:
            m = getattr(self, name)
            if m is not None:
                m = np.asarray(m, dtype=np.float64)
                if m.shape != self.acc_matrix.shape:
                    raise ValueError(f"{name} shape {m.shape} differs from R shape {self.acc_matrix.shape}")
                setattr(self, name, m)
        self.train_time_s = float(self.train_time_s)
        self.peak_memory_mib = float(self.peak_memory_mib)

    @property
    def n_tasks(self) -> int:
        """T, the number of tasks in the sequence."""
        return int(self.acc_matrix.shape[0])

    def summary(self) -> dict[str, float]:
        """The scalar columns of the comparison table."""
        r = self.acc_matrix
        return {
            "avg_acc": average_accuracy(r),
            "avg_inc_acc": average_incremental_accuracy(r),
            "forgetting": forgetting(r),
            "bwt": backward_transfer(r),
            "final_instance_auc": _final_mean(self.instance_auc),
            "final_instance_acc": _final_mean(self.instance_acc),
            "final_bag_auc": _final_mean(self.bag_auc),
            "train_time_s": self.train_time_s,
            "peak_memory_mib": self.peak_memory_mib,
        }


def _fmt(v: float, spec: str, suffix: str = "") -> str:
    """Table cell: ``n/a`` for undefined or unmeasured values rather than a misleading ``nan``."""
    return "n/a" if not math.isfinite(v) else f"{v:{spec}}{suffix}"


@dataclass
class ContinualReport:
    """Per-method continual-learning results on one task sequence, and their table and plots.

    Keeping the raw matrices (not only the summary numbers) lets the CSV be read back and any metric be
    recomputed later, e.g. with a different definition of forgetting.
    """

    task_names: list[str] | None = None
    results: list[MethodResult] = field(default_factory=list)

    def add(
        self,
        method: str,
        acc_matrix: np.ndarray,
        *,
        instance_auc: np.ndarray | None = None,
        train_time_s: float = NAN,
        peak_memory_mib: float = NAN,
        instance_acc: np.ndarray | None = None,
        bag_auc: np.ndarray | None = None,
    ) -> MethodResult:
        """Add one method's results; every method must be evaluated on the same tasks to be comparable."""
        res = MethodResult(method, acc_matrix, instance_auc, train_time_s, peak_memory_mib, instance_acc, bag_auc)
        if any(r.method == method for r in self.results):
            raise ValueError(f"method {method!r} is already in the report")
        t = self.results[0].n_tasks if self.results else len(self.task_names or []) or res.n_tasks
        if res.n_tasks != t:
            raise ValueError(f"{method!r} has {res.n_tasks} tasks, the report has {t}")
        self.results.append(res)
        return res

    def get(self, method: str) -> MethodResult:
        """One method's result by name; the KeyError lists the names present, to catch typos quickly."""
        for r in self.results:
            if r.method == method:
                return r
        raise KeyError(f"no method {method!r} in the report; have {[r.method for r in self.results]}")

    def names(self, n_tasks: int) -> list[str]:
        """Task names for plots and tables: the given ones, or ``T1 … Tn``."""
        if self.task_names is not None:
            if len(self.task_names) != n_tasks:
                raise ValueError(f"{len(self.task_names)} task names for {n_tasks} tasks")
            return [str(s) for s in self.task_names]
        return [f"T{j + 1}" for j in range(n_tasks)]

    def summary(self) -> list[dict[str, Any]]:
        """One dict per method (``method`` plus the summary numbers), e.g. for a DataFrame or a logger."""
        return [{"method": r.method, **r.summary()} for r in self.results]

    def to_csv(self, path: PathLike) -> Path:
        """One row per method: the summary numbers (full precision) plus the matrices and task names as JSON."""
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["method", *_SUMMARY_KEYS, "task_names", *_MATRICES])
        for r in self.results:
            s = r.summary()
            names = json.dumps(self.task_names) if self.task_names is not None else ""
            matrices = [_to_jsonable(getattr(r, m)) for m in _MATRICES]
            w.writerow([r.method, *(repr(s[k]) for k in _SUMMARY_KEYS), names, *matrices])
        atomic_write_text(path, buf.getvalue())
        return Path(path)

    @classmethod
    def from_csv(cls, path: PathLike) -> ContinualReport:
        """Read back a report written by :meth:`to_csv` (the summary columns are recomputed, not trusted)."""
        with open(path, newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
        names = json.loads(rows[0]["task_names"]) if rows and rows[0]["task_names"] else None
        rep = cls(task_names=names)
        for row in rows:
            r = _from_jsonable(row["acc_matrix"])
            if r is None:
                raise ValueError(f"{path}: row for {row['method']!r} has no acc_matrix")
            rep.add(
                row["method"],
                r,
                instance_auc=_from_jsonable(row["instance_auc"]),
                train_time_s=float(row["train_time_s"]),
                peak_memory_mib=float(row["peak_memory_mib"]),
                instance_acc=_from_jsonable(row.get("instance_acc") or ""),  # absent in older reports
                bag_auc=_from_jsonable(row.get("bag_auc") or ""),
            )
        return rep

    def to_markdown(self) -> str:
        """The comparison table in GitHub Markdown, one row per method."""
        head = (
            "| method | avg acc | forgetting | BWT | bag AUC | tile AUC | tile acc | time | memory |\n"
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|\n"
        )
        lines = []
        for row in self.summary():
            name = str(row["method"]).replace("|", "\\|")
            cells = [
                _fmt(row["avg_acc"], ".3f"),
                _fmt(row["forgetting"], ".3f"),
                _fmt(row["bwt"], "+.3f"),
                _fmt(row["final_bag_auc"], ".3f"),
                _fmt(row["final_instance_auc"], ".3f"),
                _fmt(row["final_instance_acc"], ".3f"),
                _fmt(row["train_time_s"], ".1f", " s"),
                _fmt(row["peak_memory_mib"], ".0f", " MiB"),
            ]
            lines.append(f"| {name} | " + " | ".join(cells) + " |\n")
        return head + "".join(lines)

    def plot_matrix(
        self, path: PathLike, method: str, *, which: Literal["accuracy", "instance_auc"] = "accuracy", dpi: int = 120
    ) -> Path:
        """Heatmap PNG of one method's ``R`` (or instance-AUC) matrix with the values written in the cells.

        Rows are training steps, columns evaluated tasks, so forgetting reads as colour fading down a column.
        """
        res = self.get(method)
        m = res.acc_matrix if which == "accuracy" else res.instance_auc
        if m is None:
            raise ValueError(f"{method!r} has no {which} matrix")
        title = f"{method}: {'accuracy' if which == 'accuracy' else 'instance AUC'}"
        return plot_accuracy_matrix(m, self.names(res.n_tasks), path, title=title, dpi=dpi)


#: The columns of the multi-seed table: (summary key, header, format).
_SEED_COLUMNS = (
    ("avg_acc", "avg acc", ".3f"),
    ("forgetting", "forgetting", ".3f"),
    ("bwt", "BWT", "+.3f"),
    ("final_bag_auc", "bag AUC", ".3f"),
    ("final_instance_auc", "tile AUC", ".3f"),
    ("final_instance_acc", "tile acc", ".3f"),
    ("train_time_s", "time s", ".1f"),
    ("peak_memory_mib", "memory MiB", ".0f"),
)


def seeds_summary(reports: Sequence[ContinualReport]) -> list[dict[str, Any]]:
    """Per method (in first-seen order), the mean and sample std over ``reports`` (one per seed) of every
    summary number: ``{"method", "n", "<key>": mean, "<key>_std": std}``; NaN-only columns stay NaN."""
    by_method: dict[str, list[dict[str, float]]] = {}
    for rep in reports:
        for row in rep.summary():
            by_method.setdefault(str(row["method"]), []).append(row)
    out = []
    for method, rows in by_method.items():
        entry: dict[str, Any] = {"method": method, "n": len(rows)}
        for key in _SUMMARY_KEYS:
            v = np.array([r[key] for r in rows], dtype=np.float64)
            v = v[np.isfinite(v)]
            entry[key] = float(v.mean()) if v.size else NAN
            entry[f"{key}_std"] = float(v.std(ddof=1)) if v.size > 1 else NAN
        out.append(entry)
    return out


def seeds_markdown(reports: Sequence[ContinualReport]) -> str:
    """The comparison over seeds as a Markdown table: ``mean ± std`` per cell (std over seeds, ddof 1)."""
    head = "| method | seeds | " + " | ".join(h for _, h, _ in _SEED_COLUMNS) + " |\n"
    head += "|---|---:|" + "---:|" * len(_SEED_COLUMNS) + "\n"
    lines = []
    for row in seeds_summary(reports):
        cells = []
        for key, _, spec in _SEED_COLUMNS:
            mean, std = row[key], row[f"{key}_std"]
            cells.append(_fmt(mean, spec) + ("" if not math.isfinite(std) else f" ± {std:{spec.lstrip('+')}}"))
        lines.append(
            f"| {str(row['method']).replace('|', chr(92) + '|')} | {row['n']} | " + " | ".join(cells) + " |\n"
        )
    return head + "".join(lines)
