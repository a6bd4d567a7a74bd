"""Metrics, reports and plots for continual multiple-instance learning (the CoMEL stage).

Three levels are measured, because a continual MIL method can look good on one and fail on another:

* **bag** (slide) classification: accuracy, balanced accuracy, macro F1 and AUC (:func:`bag_metrics`);
* **instance** (tile) localisation from attention or instance scores against tile ground truth
  (:func:`instance_metrics`), the reason to use MIL rather than a slide-level classifier at all;
* **continual** behaviour over a task sequence, from the accuracy matrix ``R`` (``R[i, j]`` = accuracy on
  task ``j`` after training task ``i``): :func:`average_accuracy`, :func:`average_incremental_accuracy`,
  :func:`forgetting`, :func:`backward_transfer`, :func:`forward_transfer`.

Undefined quantities (an AUC with one class present, forgetting after a single task, ...) are ``NaN`` rather
than exceptions or silent zeros: a benchmark sweep must not die on one degenerate split, and a zero would be
averaged in as if it were a measurement.

:class:`ContinualReport` collects the per-method results and writes the comparison table (CSV, Markdown) and
the ``R`` heatmaps; :func:`plot_instance_heatmap` draws tile scores over a slide thumbnail. Every file is
written atomically (temporary file in the same folder, then :func:`os.replace`), so a crashed or concurrent
run never leaves a truncated report behind.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import matplotlib
import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import PolyCollection
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from torch import Tensor
from torchmetrics.functional.classification import (
    binary_accuracy,
    binary_auroc,
    binary_f1_score,
    binary_precision,
    binary_recall,
    multiclass_accuracy,
    multiclass_f1_score,
    multiclass_recall,
)

__all__ = [
    "ContinualReport",
    "MethodResult",
    "average_accuracy",
    "average_incremental_accuracy",
    "backward_transfer",
    "bag_metrics",
    "forgetting",
    "forward_transfer",
    "instance_metrics",
    "plot_instance_heatmap",
]

NAN = math.nan
PathLike = str | os.PathLike[str]


# --------------------------------------------------------------------------------------------- file writing


def _atomic_write_bytes(path: PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` via a temporary file in the same folder and :func:`os.replace`.

    Same folder, so the rename never crosses a filesystem and readers see the old file or the new one, never
    a partial one.
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    # a unique name opened with "xb" (not mkstemp) so the file gets the usual umask permissions, not 0600
    tmp = p.with_name(f".{p.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "xb") as fh:
            fh.write(data)
        os.replace(tmp, p)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return p


def _save_figure(fig: Figure, path: PathLike, dpi: int) -> Path:
    """Render ``fig`` with the Agg canvas (no pyplot, no global state, no display needed) and write it atomically."""
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return _atomic_write_bytes(path, buf.getvalue())


# ------------------------------------------------------------------------------------------------- bag level


def _as_float(x: Tensor) -> float:
    """Plain Python float, so results serialise (JSON/CSV) and compare without tensor semantics."""
    return float(x.detach().cpu().item())


def bag_metrics(logits: Tensor, labels: Tensor, classes: list[int] | None = None) -> dict[str, float]:
    """Slide-level metrics from bag logits ``(B, C)`` and integer labels ``(B,)``.

    Returns ``accuracy``, ``balanced_accuracy`` (mean recall over the classes present in ``labels``, so a
    majority-class predictor scores 1/K and not the class prior), ``f1_macro`` (over classes present in labels
    or predictions), ``auc`` and ``n``. AUC is binary on the softmax probability of the second class when there
    are two classes, otherwise the macro one-vs-rest mean over the classes present; it is ``NaN`` when fewer
    than two classes are present, since a ranking metric is undefined then.

    ``classes`` restricts the evaluation to those logit columns (e.g. one task's classes in task-incremental
    evaluation of a model whose head has grown over tasks); labels are class ids and are mapped to positions
    in ``classes``. A label outside ``classes`` is an error, not silently dropped.
    """
    logits = torch.as_tensor(logits).detach().cpu().float()
    labels = torch.as_tensor(labels).detach().cpu().long()
    if logits.dim() != 2:
        raise ValueError(f"logits must be (B, C), got shape {tuple(logits.shape)}")
    if labels.shape != (logits.shape[0],):
        raise ValueError(f"labels must be ({logits.shape[0]},), got shape {tuple(labels.shape)}")
    if classes is not None:
        cls = [int(c) for c in classes]
        if len(set(cls)) != len(cls) or any(c < 0 or c >= logits.shape[1] for c in cls):
            raise ValueError(f"classes must be distinct column indices of logits (C = {logits.shape[1]}), got {cls}")
        position = {c: k for k, c in enumerate(cls)}
        unknown = sorted({int(y) for y in labels.tolist()} - set(cls))
        if unknown:
            raise ValueError(f"labels {unknown} are not in classes {cls}")
        logits = logits[:, cls]
        labels = torch.tensor([position[int(y)] for y in labels.tolist()], dtype=torch.long)
    n, c = logits.shape
    if c < 2:
        raise ValueError(f"need at least 2 classes, got C = {c}")
    if labels.numel() and (labels.min() < 0 or labels.max() >= c):
        raise ValueError(f"labels must lie in [0, {c - 1}], got range [{int(labels.min())}, {int(labels.max())}]")
    out = {"accuracy": NAN, "balanced_accuracy": NAN, "f1_macro": NAN, "auc": NAN, "n": float(n)}
    if n == 0:
        return out

    preds = logits.argmax(dim=1)
    present = torch.bincount(labels, minlength=c) > 0
    predicted = torch.bincount(preds, minlength=c) > 0
    out["accuracy"] = _as_float(multiclass_accuracy(preds, labels, num_classes=c, average="micro"))
    # per-class recall/F1 from torchmetrics, averaged here: its own macro mode would count absent classes as 0
    recall = multiclass_recall(preds, labels, num_classes=c, average="none")
    out["balanced_accuracy"] = _as_float(recall[present].mean())
    f1 = multiclass_f1_score(preds, labels, num_classes=c, average="none")
    out["f1_macro"] = _as_float(f1[present | predicted].mean())

    probs = logits.softmax(dim=1)
    if int(present.sum()) >= 2:
        if c == 2:
            out["auc"] = _as_float(binary_auroc(probs[:, 1], labels))
        else:
            per_class = [binary_auroc(probs[:, k], (labels == k).long()) for k in range(c) if present[k]]
            out["auc"] = _as_float(torch.stack(per_class).mean())
    return out


# -------------------------------------------------------------------------------------------- instance level


def instance_metrics(scores: Tensor, labels: Tensor, threshold: float = 0.5) -> dict[str, float]:
    """Tile-level localisation metrics of instance ``scores`` ``(N,)`` against tile labels ``(N,)`` in {0, 1}.

    Returns ``auc`` (threshold-free, so attention weights that are not calibrated probabilities are still
    comparable), and at ``score >= threshold``: ``accuracy``, ``f1``, ``precision``, ``recall``, plus ``n`` and
    ``n_pos``. The threshold is applied here, not by torchmetrics, which would pass scores outside [0, 1]
    through a sigmoid first. Undefined values are ``NaN``: AUC with one class only, precision with no
    predicted positives, recall with no true positives, F1 when both are absent.
    """
    scores = torch.as_tensor(scores).detach().cpu().float().reshape(-1)
    labels = torch.as_tensor(labels).detach().cpu().reshape(-1)
    if scores.shape != labels.shape:
        raise ValueError(f"scores {tuple(scores.shape)} and labels {tuple(labels.shape)} differ in length")
    if labels.numel() and not bool(((labels == 0) | (labels == 1)).all()):
        raise ValueError("instance labels must be 0 or 1")
    labels = labels.long()
    n, n_pos = labels.numel(), int(labels.sum()) if labels.numel() else 0
    out = dict.fromkeys(("auc", "accuracy", "f1", "precision", "recall"), NAN) | {"n": float(n), "n_pos": float(n_pos)}
    if n == 0:
        return out
    preds = (scores >= threshold).long()
    n_pred_pos = int(preds.sum())
    out["accuracy"] = _as_float(binary_accuracy(preds, labels))
    if 0 < n_pos < n:
        out["auc"] = _as_float(binary_auroc(scores, labels))
    if n_pred_pos > 0:
        out["precision"] = _as_float(binary_precision(preds, labels))
    if n_pos > 0:
        out["recall"] = _as_float(binary_recall(preds, labels))
    if n_pos > 0 or n_pred_pos > 0:
        out["f1"] = _as_float(binary_f1_score(preds, labels))
    return out


# ------------------------------------------------------------------------------------------ continual metrics


def _check_r(r: np.ndarray | Sequence[Sequence[float]]) -> np.ndarray:
    """R as a float array, rejecting non-square input early (a transposed or ragged R gives plausible garbage)."""
    r = np.asarray(r, dtype=np.float64)
    if r.ndim != 2 or r.shape[0] != r.shape[1] or r.shape[0] == 0:
        raise ValueError(f"R must be a non-empty square T×T matrix, got shape {r.shape}")
    return r


def average_accuracy(r: np.ndarray) -> float:
    """Mean accuracy over all tasks after training the last one: ``mean_j R[T-1, j]``.

    The headline number of continual learning (e.g. Chaudhry et al. 2018, "Riemannian Walk for Incremental
    Learning", A_k). The last row must be complete; a missing evaluation gives ``NaN`` rather than a mean over
    the tasks that happen to be there.
    """
    r = _check_r(r)
    return float(np.mean(r[-1]))


def average_incremental_accuracy(r: np.ndarray) -> float:
    """Mean over training steps ``i`` of the average accuracy on tasks seen so far, ``mean_{j<=i} R[i, j]``.

    Rebuffi et al. 2017 (iCaRL): rewards methods that are good throughout the sequence, not only at its end.
    """
    r = _check_r(r)
    return float(np.mean([np.mean(r[i, : i + 1]) for i in range(r.shape[0])]))


def forgetting(r: np.ndarray) -> float:
    """Average forgetting, Chaudhry et al. 2018 ("Riemannian Walk for Incremental Learning"), eq. (5)-(6).

    ``mean_{j < T-1} [ max_{i < T-1} R[i, j] - R[T-1, j] ]``: how far each old task fell from its best
    accuracy. The max runs over ``j <= i < T-1`` only, the steps after task ``j`` was learned (with the usual
    NaN upper triangle this is exactly the paper's formula; if the upper triangle holds zero-shot evaluations
    they must not count as "knowledge" to forget). ``NaN`` for a single task.
    """
    r = _check_r(r)
    t = r.shape[0]
    if t < 2:
        return NAN
    return float(np.mean([np.max(r[j : t - 1, j]) - r[t - 1, j] for j in range(t - 1)]))


def backward_transfer(r: np.ndarray) -> float:
    """Backward transfer, Lopez-Paz & Ranzato 2017 ("Gradient Episodic Memory for Continual Learning"), eq. (3).

    ``mean_{j < T-1} ( R[T-1, j] - R[j, j] )``: the effect of learning later tasks on earlier ones, measured
    from just after each was learned; negative means forgetting. ``NaN`` for a single task.
    """
    r = _check_r(r)
    t = r.shape[0]
    if t < 2:
        return NAN
    return float(np.mean([r[t - 1, j] - r[j, j] for j in range(t - 1)]))


def forward_transfer(r: np.ndarray, baseline: np.ndarray | Sequence[float]) -> float:
    """Forward transfer, Lopez-Paz & Ranzato 2017 ("Gradient Episodic Memory for Continual Learning"), eq. (4).

    ``mean_{j >= 1} ( R[j-1, j] - b[j] )`` with ``b[j]`` the accuracy on task ``j`` of a model at random
    initialisation: how much earlier tasks help a task before it is trained. Needs the first super-diagonal
    of ``R`` (evaluations before training) and the baseline vector; ``NaN`` for a single task.
    """
    r = _check_r(r)
    b = np.asarray(baseline, dtype=np.float64).reshape(-1)
    t = r.shape[0]
    if b.shape != (t,):
        raise ValueError(f"baseline must have one entry per task ({t}), got shape {b.shape}")
    if t < 2:
        return NAN
    return float(np.mean([r[j - 1, j] - b[j] for j in range(1, t)]))


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
    "train_time_s",
    "peak_memory_mib",
)


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

    def __post_init__(self) -> None:
        self.acc_matrix = _check_r(self.acc_matrix)
        if self.instance_auc is not None:
            self.instance_auc = np.asarray(self.instance_auc, dtype=np.float64)
            if self.instance_auc.shape != self.acc_matrix.shape:
                raise ValueError(
                    f"instance_auc shape {self.instance_auc.shape} differs from R shape {self.acc_matrix.shape}"
                )
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
    ) -> MethodResult:
        """Add one method's results; every method must be evaluated on the same tasks to be comparable."""
        res = MethodResult(method, acc_matrix, instance_auc, train_time_s, peak_memory_mib)
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
        w.writerow(["method", *_SUMMARY_KEYS, "task_names", "acc_matrix", "instance_auc"])
        for r in self.results:
            s = r.summary()
            names = json.dumps(self.task_names) if self.task_names is not None else ""
            matrices = [_to_jsonable(r.acc_matrix), _to_jsonable(r.instance_auc)]
            w.writerow([r.method, *(repr(s[k]) for k in _SUMMARY_KEYS), names, *matrices])
        return _atomic_write_bytes(path, buf.getvalue().encode("utf-8"))

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
            )
        return rep

    def to_markdown(self) -> str:
        """The comparison table in GitHub Markdown, one row per method."""
        head = (
            "| method | avg acc | forgetting | BWT | final instance AUC | time | memory |\n"
            "|---|---:|---:|---:|---:|---:|---:|\n"
        )
        lines = []
        for row in self.summary():
            name = str(row["method"]).replace("|", "\\|")
            cells = [
                _fmt(row["avg_acc"], ".3f"),
                _fmt(row["forgetting"], ".3f"),
                _fmt(row["bwt"], "+.3f"),
                _fmt(row["final_instance_auc"], ".3f"),
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
        t = res.n_tasks
        names = self.names(t)
        side = min(3.0 + 0.7 * t, 16.0)
        fig = Figure(figsize=(side + 1.2, side), layout="constrained")
        ax = fig.add_subplot()
        colours = matplotlib.colormaps["viridis"].with_extremes(bad="#eeeeee")  # NaN = not evaluated: light grey
        im = ax.imshow(np.ma.masked_invalid(m), cmap=colours, vmin=0.0, vmax=1.0, interpolation="nearest")
        fontsize = max(5.0, min(11.0, 60.0 / t))
        for i in range(t):
            for j in range(t):
                v = m[i, j]
                ink = "black" if v > 0.6 else "white"  # readable on viridis' light top and dark bottom
                if math.isfinite(v):
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=fontsize, color=ink)
        rotate = max(map(len, names)) > 4
        ax.set_xticks(range(t), names, rotation=45 if rotate else 0, ha="right" if rotate else "center")
        ax.set_yticks(range(t), names)
        ax.set_xlabel("evaluated on task j")
        ax.set_ylabel("after training task i")
        ax.set_title(f"{method}: {'accuracy' if which == 'accuracy' else 'instance AUC'}")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
        return _save_figure(fig, path, dpi)


# ------------------------------------------------------------------------------------------ instance heatmap


def plot_instance_heatmap(
    coords: np.ndarray,
    scores: np.ndarray,
    tile_size_l0: float,
    path: PathLike,
    thumbnail: np.ndarray | None = None,
    thumbnail_downsample: float = 1.0,
    labels: np.ndarray | None = None,
    title: str = "",
    *,
    cmap: str = "inferno",
    alpha: float | None = None,
    dpi: int = 100,
) -> Path:
    """Draw tile scores (0..1) as coloured squares over the slide thumbnail and save a PNG.

    Everything is drawn in level-0 pixel coordinates: the thumbnail is stretched to
    ``thumbnail.shape * thumbnail_downsample``, so tiles land where they were cut whatever the thumbnail
    size. Positive ground-truth tiles (``labels == 1``) are outlined in cyan, which stands out against every
    colour of the default colormap, so missed tumour regions are visible next to the attention. ``N = 0``
    still writes a figure (saying "no tiles") so a batch of slides gives one image per slide.
    """
    coords = np.asarray(coords, dtype=np.float64).reshape(-1, 2) if np.size(coords) else np.zeros((0, 2))
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    n = coords.shape[0]
    if scores.shape != (n,):
        raise ValueError(f"scores must be ({n},) to match coords, got {scores.shape}")
    if labels is not None:
        labels = np.asarray(labels).reshape(-1)
        if labels.shape != (n,):
            raise ValueError(f"labels must be ({n},) to match coords, got {labels.shape}")
    if not tile_size_l0 > 0 or not thumbnail_downsample > 0:
        raise ValueError("tile_size_l0 and thumbnail_downsample must be positive")

    # extent of the drawing in level-0 px: the whole slide if a thumbnail is given, else the tiles' bounding box
    if thumbnail is not None:
        thumb = np.asarray(thumbnail)
        width, height = thumb.shape[1] * thumbnail_downsample, thumb.shape[0] * thumbnail_downsample
        x0, y0, x1, y1 = 0.0, 0.0, width, height
    elif n:
        x0, y0 = coords.min(axis=0)
        x1, y1 = coords.max(axis=0) + tile_size_l0
        pad = 0.02 * max(x1 - x0, y1 - y0)
        x0, y0, x1, y1 = x0 - pad, y0 - pad, x1 + pad, y1 + pad
    else:
        x0, y0, x1, y1 = 0.0, 0.0, 1.0, 1.0
    aspect = (x1 - x0) / max(y1 - y0, 1e-9)
    fig_w = 9.0 if aspect >= 1 else max(3.0, 7.5 * aspect) + 1.5
    fig_h = max(3.0, min(12.0, 7.5 / aspect)) if aspect >= 1 else 7.5
    fig = Figure(figsize=(fig_w, fig_h), layout="constrained")
    ax = fig.add_subplot()
    if thumbnail is not None:
        ax.imshow(thumb, extent=(0.0, width, height, 0.0), cmap="gray" if thumb.ndim == 2 else None)
    ax.set_xlim(x0, x1)
    ax.set_ylim(y1, y0)  # image convention: y grows downwards
    ax.set_aspect("equal")
    ax.set_xlabel("x (level-0 px)")
    ax.set_ylabel("y (level-0 px)")
    if title:
        ax.set_title(title)

    if n == 0:
        if thumbnail is None:  # no slide extent to show: the 0..1 axes would only mislead
            ax.set_xticks([])
            ax.set_yticks([])
        ax.text(0.5, 0.5, "no tiles", transform=ax.transAxes, ha="center", va="center", fontsize=20, color="tab:red")
        return _save_figure(fig, path, dpi)

    s = tile_size_l0
    corners = np.array([[0.0, 0.0], [s, 0.0], [s, s], [0.0, s]])
    verts = coords[:, None, :] + corners[None, :, :]  # (N, 4, 2) squares
    tiles = PolyCollection(
        verts,
        array=np.ma.masked_invalid(scores),
        cmap=matplotlib.colormaps[cmap].with_extremes(bad="#888888"),  # NaN score: grey, not a colour
        norm=Normalize(0.0, 1.0),
        edgecolors="none",
        alpha=alpha if alpha is not None else (0.55 if thumbnail is not None else 1.0),
    )
    ax.add_collection(tiles)
    cbar = fig.colorbar(tiles, ax=ax, fraction=0.046, pad=0.03)
    cbar.set_label("instance score")
    if labels is not None and np.any(labels == 1):
        pos = PolyCollection(verts[labels == 1], facecolors="none", edgecolors="cyan", linewidths=1.2)
        ax.add_collection(pos)
    return _save_figure(fig, path, dpi)
