"""Metrics of continual multiple-instance learning (the CoMEL stage): numbers only, no files.

Three levels are measured, because a continual MIL method can look good on one and fail on another:

* **bag** (slide) classification: accuracy, balanced accuracy, macro F1 and AUC (:func:`bag_metrics`);
* **instance** (tile) localisation from attention or instance scores against tile ground truth
  (:func:`instance_metrics`), the reason to use MIL rather than a slide-level classifier at all;
* **continual** behaviour over a task sequence, from the accuracy matrix ``R`` (``R[i, j]`` = accuracy on
  task ``j`` after training task ``i``): :func:`average_accuracy`, :func:`average_incremental_accuracy`,
  :func:`forgetting`, :func:`backward_transfer`, :func:`forward_transfer`.

Undefined quantities (an AUC with one class present, forgetting after a single task, ...) are ``NaN`` rather
than exceptions or silent zeros: a benchmark sweep must not die on one degenerate split, and a zero would be
averaged in as if it were a measurement. Tables and plots of these numbers: :mod:`pathopeft.mil.report`,
:mod:`pathopeft.mil.plots`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
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
    "average_accuracy",
    "average_incremental_accuracy",
    "backward_transfer",
    "bag_auc",
    "bag_metrics",
    "check_r",
    "forgetting",
    "forward_transfer",
    "instance_metrics",
    "localization_metrics",
    "youden_threshold",
]

NAN = math.nan


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


def check_r(r: np.ndarray | Sequence[Sequence[float]]) -> np.ndarray:
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
    r = check_r(r)
    return float(np.mean(r[-1]))


def average_incremental_accuracy(r: np.ndarray) -> float:
    """Mean over training steps ``i`` of the average accuracy on tasks seen so far, ``mean_{j<=i} R[i, j]``.

    Rebuffi et al. 2017 (iCaRL): rewards methods that are good throughout the sequence, not only at its end.
    """
    r = check_r(r)
    return float(np.mean([np.mean(r[i, : i + 1]) for i in range(r.shape[0])]))


def forgetting(r: np.ndarray) -> float:
    """Average forgetting, Chaudhry et al. 2018 ("Riemannian Walk for Incremental Learning"), eq. (5)-(6).

    ``mean_{j < T-1} [ max_{i < T-1} R[i, j] - R[T-1, j] ]``: how far each old task fell from its best
    accuracy. The max runs over ``j <= i < T-1`` only, the steps after task ``j`` was learned (with the usual
    NaN upper triangle this is exactly the paper's formula; if the upper triangle holds zero-shot evaluations
    they must not count as "knowledge" to forget). ``NaN`` for a single task.
    """
    r = check_r(r)
    t = r.shape[0]
    if t < 2:
        return NAN
    return float(np.mean([np.max(r[j : t - 1, j]) - r[t - 1, j] for j in range(t - 1)]))


def backward_transfer(r: np.ndarray) -> float:
    """Backward transfer, Lopez-Paz & Ranzato 2017 ("Gradient Episodic Memory for Continual Learning"), eq. (3).

    ``mean_{j < T-1} ( R[T-1, j] - R[j, j] )``: the effect of learning later tasks on earlier ones, measured
    from just after each was learned; negative means forgetting. ``NaN`` for a single task.
    """
    r = check_r(r)
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
    r = check_r(r)
    b = np.asarray(baseline, dtype=np.float64).reshape(-1)
    t = r.shape[0]
    if b.shape != (t,):
        raise ValueError(f"baseline must have one entry per task ({t}), got shape {b.shape}")
    if t < 2:
        return NAN
    return float(np.mean([r[j - 1, j] - b[j] for j in range(1, t)]))


def youden_threshold(scores: Tensor, labels: Tensor) -> float:
    """The score threshold maximising TPR − FPR (Youden's J) over the ROC of ``scores`` against 0/1 ``labels``.

    Why: CoMEL's official evaluation (``continual/utils.py``, ``five_scores_and_seg_scores`` with
    ``optimal_thresh``) reports tile accuracy at this threshold, chosen on the evaluated tiles themselves; it
    is optimistic, but it is how the paper's localization accuracy is measured. NaN with one class only.
    """
    scores = torch.as_tensor(scores).detach().cpu().double().reshape(-1)
    labels = torch.as_tensor(labels).detach().cpu().reshape(-1).long()
    n_pos = int(labels.sum())
    n_neg = labels.numel() - n_pos
    if n_pos == 0 or n_neg == 0:
        return NAN
    order = torch.argsort(scores, descending=True, stable=True)
    s, y = scores[order], labels[order]
    tpr = torch.cumsum(y, 0).double() / n_pos
    fpr = torch.cumsum(1 - y, 0).double() / n_neg
    last = torch.ones_like(s, dtype=torch.bool)  # only the last of tied scores is a reachable cut
    last[:-1] = s[1:] != s[:-1]
    j = torch.where(last, tpr - fpr, torch.full_like(tpr, -math.inf))
    return float(s[int(torch.argmax(j))])


def localization_metrics(scores: Tensor, labels: Tensor) -> dict[str, float]:
    """Tile AUC and tile accuracy at the Youden threshold (as CoMEL measures localization); NaN if undefined."""
    thr = youden_threshold(scores, labels)
    out = instance_metrics(scores, labels, threshold=thr if math.isfinite(thr) else 0.5)
    return {"auc": out["auc"], "accuracy": out["accuracy"] if math.isfinite(thr) else NAN, "threshold": thr}


def bag_auc(tumour_prob: Tensor, is_tumour: Tensor) -> float:
    """AUC of bag tumour probabilities against bag tumour status (NaN with one class only)."""
    p = torch.as_tensor(tumour_prob).detach().cpu().float().reshape(-1)
    y = torch.as_tensor(is_tumour).detach().cpu().reshape(-1).long()
    if p.numel() == 0 or int(y.sum()) in (0, y.numel()):
        return NAN
    return _as_float(binary_auroc(p, y))
