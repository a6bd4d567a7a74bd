"""Metrics, report and plots of the CoMEL stage: hand-computed continual metrics, NaN-safe degenerate cases,
table/CSV contents and PNGs read back with PIL."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pathopeft.mil.metrics import (
    average_accuracy,
    average_incremental_accuracy,
    backward_transfer,
    bag_metrics,
    forgetting,
    forward_transfer,
    instance_metrics,
)
from pathopeft.mil.plots import plot_instance_heatmap
from pathopeft.mil.report import ContinualReport

NAN = math.nan
R2 = np.array([[0.9, NAN], [0.6, 0.8]])
# task 0 improves after task 1 (0.7 -> 0.9) then drops to 0.8: forgetting counts from the best (0.9), BWT from
# the diagonal (0.7), so the two differ and a mix-up fails
R3 = np.array([[0.7, NAN, NAN], [0.9, 0.8, NAN], [0.8, 0.6, 0.85]])


# ------------------------------------------------------------------------------------------ continual metrics


def test_two_task_matrix_by_hand() -> None:
    assert average_accuracy(R2) == pytest.approx(0.7)
    assert forgetting(R2) == pytest.approx(0.3)
    assert backward_transfer(R2) == pytest.approx(-0.3)
    assert average_incremental_accuracy(R2) == pytest.approx((0.9 + 0.7) / 2)


def test_three_task_matrix_by_hand() -> None:
    assert average_accuracy(R3) == pytest.approx((0.8 + 0.6 + 0.85) / 3)
    assert forgetting(R3) == pytest.approx(((0.9 - 0.8) + (0.8 - 0.6)) / 2)  # 0.15
    assert backward_transfer(R3) == pytest.approx(((0.8 - 0.7) + (0.6 - 0.8)) / 2)  # -0.05
    assert average_incremental_accuracy(R3) == pytest.approx((0.7 + 0.85 + 0.75) / 3)


def test_filled_upper_triangle_does_not_count_as_forgetting() -> None:
    # zero-shot evaluations before a task is trained (here high) must not enter the max of forgetting
    r = R3.copy()
    r[np.triu_indices(3, k=1)] = 0.99
    assert forgetting(r) == pytest.approx(forgetting(R3))
    assert backward_transfer(r) == pytest.approx(backward_transfer(R3))


def test_single_task_is_nan_and_bad_shapes_raise() -> None:
    r = np.array([[0.8]])
    assert average_accuracy(r) == pytest.approx(0.8)
    assert math.isnan(forgetting(r))
    assert math.isnan(backward_transfer(r))
    assert math.isnan(forward_transfer(r, [0.5]))
    with pytest.raises(ValueError, match="square"):
        forgetting(np.zeros((2, 3)))


def test_forward_transfer_uses_super_diagonal_and_baseline() -> None:
    r = np.array([[0.9, 0.55, 0.4], [0.6, 0.8, 0.7], [0.5, 0.6, 0.85]])
    b = np.array([0.5, 0.5, 0.3])
    assert forward_transfer(r, b) == pytest.approx(((0.55 - 0.5) + (0.7 - 0.3)) / 2)
    with pytest.raises(ValueError, match="baseline"):
        forward_transfer(r, [0.5, 0.5])


# ------------------------------------------------------------------------------------------------- bag level


def test_bag_auc_perfect_and_inverted() -> None:
    labels = torch.tensor([0, 0, 1, 1, 1])
    margin = torch.tensor([-2.0, -1.0, 0.5, 1.0, 3.0])
    logits = torch.stack([torch.zeros(5), margin], dim=1)
    good = bag_metrics(logits, labels)
    assert good["auc"] == pytest.approx(1.0)
    assert good["accuracy"] == pytest.approx(1.0)
    assert good["balanced_accuracy"] == pytest.approx(1.0)
    bad = bag_metrics(logits.flip(1), labels)
    assert bad["auc"] == pytest.approx(0.0)
    assert bad["accuracy"] == pytest.approx(0.0)


def test_bag_balanced_accuracy_and_macro_auc_multiclass() -> None:
    # 4 of class 0 all right, 2 of class 1 all predicted 0: accuracy 4/6, balanced (1 + 0) / 2
    labels = torch.tensor([0, 0, 0, 0, 1, 1])
    logits = torch.tensor([[3.0, 0, 0]] * 4 + [[2.0, 1.0, 0]] * 2)
    m = bag_metrics(logits, labels)
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["balanced_accuracy"] == pytest.approx(0.5)
    # class 2 is absent: the macro AUC averages over classes 0 and 1 only, both perfectly ranked
    assert m["auc"] == pytest.approx(1.0)
    assert m["n"] == 6


def test_bag_one_class_gives_nan_auc_not_an_exception() -> None:
    m = bag_metrics(torch.randn(4, 2), torch.ones(4, dtype=torch.long))
    assert math.isnan(m["auc"])
    assert 0.0 <= m["accuracy"] <= 1.0
    empty = bag_metrics(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long))
    assert all(math.isnan(empty[k]) for k in ("accuracy", "auc", "balanced_accuracy"))


def test_bag_classes_selects_task_columns() -> None:
    # a 4-class head; the task holds classes 2 and 3, which the model ranks right, while column 0 dominates
    logits = torch.tensor([[9.0, 0, 2.0, 0.0], [9.0, 0, 0.0, 2.0], [9.0, 0, 1.0, 0.0]])
    labels = torch.tensor([2, 3, 2])
    assert bag_metrics(logits, labels)["accuracy"] == pytest.approx(0.0)
    task = bag_metrics(logits, labels, classes=[2, 3])
    assert task["accuracy"] == pytest.approx(1.0)
    assert task["auc"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="not in classes"):
        bag_metrics(logits, torch.tensor([2, 1, 2]), classes=[2, 3])


# -------------------------------------------------------------------------------------------- instance level


def test_instance_metrics_known_case() -> None:
    scores = torch.tensor([0.9, 0.8, 0.3, 0.6, 0.1, 0.2])
    labels = torch.tensor([1, 1, 1, 0, 0, 0])
    m = instance_metrics(scores, labels)
    # predictions at 0.5: 1 1 0 1 0 0 -> TP 2, FN 1, FP 1, TN 2
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3)
    # positive-negative pairs ranked right: 0.9, 0.8 beat all 3 negatives, 0.3 beats 0.1 and 0.2 -> 8 / 9
    assert m["auc"] == pytest.approx(8 / 9)
    assert m["n_pos"] == 3
    assert instance_metrics(scores, labels, threshold=0.85)["recall"] == pytest.approx(1 / 3)


def test_instance_metrics_one_class_is_nan_safe() -> None:
    m = instance_metrics(torch.tensor([0.1, 0.2, 0.7]), torch.zeros(3, dtype=torch.long))
    assert math.isnan(m["auc"])
    assert math.isnan(m["recall"])  # no positive tiles
    assert m["precision"] == pytest.approx(0.0)  # one false alarm out of one positive prediction
    assert m["accuracy"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="0 or 1"):
        instance_metrics(torch.rand(3), torch.tensor([0, 2, 1]))


def test_instance_threshold_is_not_a_sigmoid_of_raw_scores() -> None:
    # raw attention logits: torchmetrics alone would sigmoid them; here score >= threshold is taken literally
    m = instance_metrics(torch.tensor([3.0, 2.0, -1.0]), torch.tensor([1, 0, 0]), threshold=2.5)
    assert m["accuracy"] == pytest.approx(1.0)
    assert m["auc"] == pytest.approx(1.0)


# ------------------------------------------------------------------------------------------------- reporting


def _report() -> ContinualReport:
    rep = ContinualReport(task_names=["BRCA", "NSCLC", "RCC"])
    inst = np.array([[0.8, NAN, NAN], [0.7, 0.75, NAN], [0.65, NAN, 0.9]])
    bag = np.array([[0.91, NAN, NAN], [0.8, 0.9, NAN], [0.7, 0.6, 0.95]])
    rep.add("CoMEL", R3, instance_auc=inst, train_time_s=123.45, peak_memory_mib=2048.4, bag_auc=bag,
            instance_acc=inst - 0.1)  # fmt: skip
    rep.add("finetune", np.array([[0.9, NAN, NAN], [0.3, 0.9, NAN], [0.2, 0.25, 0.95]]), train_time_s=60.0)
    return rep


def test_markdown_table_has_methods_and_formatted_numbers() -> None:
    md = _report().to_markdown()
    lines = md.strip().splitlines()
    assert lines[0].startswith(
        "| method | avg acc | forgetting | BWT | bag AUC | tile AUC | tile acc | time | memory |"
    )
    assert len(lines) == 4
    comel = next(line for line in lines if line.startswith("| CoMEL |"))
    # avg 0.75, forgetting 0.15, BWT -0.05, final instance AUC mean(0.65, 0.9) = 0.775 (NaN task skipped)
    # final bag AUC mean(0.7, 0.6, 0.95) = 0.750, tile acc 0.775 − 0.1
    for cell in ("| 0.750 | 0.150 | -0.050 | 0.750 | 0.775 | 0.675 | 123.5 s | 2048 MiB |",):
        assert cell in comel, (cell, comel)
    ft = next(line for line in lines if line.startswith("| finetune |"))
    assert "n/a" in ft  # no instance AUC, no memory
    assert "0.467" in ft  # (0.2 + 0.25 + 0.95) / 3


def test_csv_round_trip(tmp_path: Path) -> None:
    rep = _report()
    path = rep.to_csv(tmp_path / "out" / "report.csv")
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["method"] for r in rows] == ["CoMEL", "finetune"]
    assert float(rows[0]["forgetting"]) == pytest.approx(0.15)
    back = ContinualReport.from_csv(path)
    assert back.task_names == rep.task_names
    for a, b in zip(rep.results, back.results, strict=True):
        assert a.method == b.method
        np.testing.assert_array_equal(a.acc_matrix, b.acc_matrix)  # NaN positions included
        for m in ("instance_auc", "instance_acc", "bag_auc"):
            assert (getattr(a, m) is None) == (getattr(b, m) is None)
            if getattr(a, m) is not None:
                np.testing.assert_array_equal(getattr(a, m), getattr(b, m))
        assert a.train_time_s == b.train_time_s
        assert (
            math.isnan(a.peak_memory_mib) and math.isnan(b.peak_memory_mib)
        ) or a.peak_memory_mib == b.peak_memory_mib
    assert back.to_markdown() == rep.to_markdown()
    assert [p.name for p in path.parent.iterdir()] == ["report.csv"]  # no temporary file left behind


def test_report_rejects_mismatched_tasks_and_duplicates() -> None:
    rep = _report()
    with pytest.raises(ValueError, match="already"):
        rep.add("CoMEL", R3)
    with pytest.raises(ValueError, match="tasks"):
        rep.add("other", R2)
    with pytest.raises(KeyError, match="nope"):
        rep.get("nope")


def _png_size(path: Path) -> tuple[int, int]:
    assert path.is_file()
    assert path.stat().st_size > 1000
    with Image.open(path) as im:
        assert im.format == "PNG"
        return im.size


def test_plot_matrix_png(tmp_path: Path) -> None:
    rep = _report()
    w, h = _png_size(rep.plot_matrix(tmp_path / "comel_R.png", "CoMEL"))
    assert 300 <= w <= 2500
    assert 300 <= h <= 2500
    _png_size(rep.plot_matrix(tmp_path / "comel_inst.png", "CoMEL", which="instance_auc"))
    with pytest.raises(ValueError, match="instance_auc"):
        rep.plot_matrix(tmp_path / "x.png", "finetune", which="instance_auc")


def test_instance_heatmap_with_thumbnail_and_labels(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    ys, xs = np.mgrid[0:8, 0:12]
    coords = np.stack([xs.ravel(), ys.ravel()], axis=1) * 256.0 + 512.0
    scores = rng.random(len(coords))
    labels = (scores > 0.7).astype(np.int64)
    thumb = rng.integers(180, 255, size=(100, 150, 3), dtype=np.uint8)  # 150×100 thumbnail at downsample 32
    kwargs = {"thumbnail": thumb, "thumbnail_downsample": 32.0, "title": "slide 1"}
    out = plot_instance_heatmap(coords, scores, 256.0, tmp_path / "heat.png", labels=labels, **kwargs)
    w, h = _png_size(out)
    assert 400 <= w <= 2000
    assert 250 <= h <= 2000

    def cyan_pixels(path: Path) -> int:
        rgb = np.asarray(Image.open(path).convert("RGB")).astype(int)
        return int(((rgb[..., 0] < 80) & (rgb[..., 1] > 200) & (rgb[..., 2] > 200)).sum())

    # the positive-tile outlines are the only cyan in the picture (thumbnail red >= 180, inferno never cyan)
    assert cyan_pixels(out) > 100
    assert cyan_pixels(plot_instance_heatmap(coords, scores, 256.0, tmp_path / "nolab.png", **kwargs)) == 0


def test_instance_heatmap_places_and_scales_tiles(tmp_path: Path) -> None:
    # a uniform grey 100×100 thumbnail at downsample 10 (a 1000×1000 level-0 slide) and one 250 px tile, drawn
    # once in the top-left and once in the bottom-right corner: the tile must cover 1/16 of the thumbnail,
    # be square, and sit where its coordinates say
    thumb = np.full((100, 100, 3), 200, dtype=np.uint8)

    def render(xy: tuple[float, float], name: str) -> np.ndarray:
        path = plot_instance_heatmap(np.array([xy]), np.array([1.0]), 250.0, tmp_path / name, thumb, 10.0, alpha=1.0)
        return np.asarray(Image.open(path).convert("RGB")).astype(int)

    a, b = render((0.0, 0.0), "tl.png"), render((750.0, 750.0), "br.png")
    assert a.shape == b.shape
    grey_a, grey_b = (a == 200).all(axis=2), (b == 200).all(axis=2)
    tile_a = grey_b & ~grey_a  # thumbnail pixels that only image a paints over
    tile_b = grey_a & ~grey_b
    thumb_px = (grey_a | tile_a).sum()
    assert tile_a.sum() == pytest.approx(thumb_px / 16, rel=0.1)
    assert tile_b.sum() == pytest.approx(tile_a.sum(), rel=0.1)
    ys, xs = np.nonzero(tile_a)
    assert (ys.max() - ys.min()) == pytest.approx(xs.max() - xs.min(), abs=2)
    ys_b, xs_b = np.nonzero(tile_b)
    assert ys.mean() < ys_b.mean()
    assert xs.mean() < xs_b.mean()
    # flush with the thumbnail's top-left corner (rows/columns mostly thumbnail, so stray grey text pixels don't count)
    thumb = grey_a | tile_a
    assert ys.min() == pytest.approx(np.nonzero(thumb.sum(axis=1) > 50)[0].min(), abs=2)
    assert xs.min() == pytest.approx(np.nonzero(thumb.sum(axis=0) > 50)[0].min(), abs=2)


def test_instance_heatmap_handles_no_tiles(tmp_path: Path) -> None:
    w, h = _png_size(plot_instance_heatmap(np.zeros((0, 2)), np.zeros(0), 256.0, tmp_path / "empty.png"))
    assert 250 <= w <= 2000
    assert 250 <= h <= 2000
    thumb = np.zeros((40, 60), dtype=np.uint8)
    _png_size(plot_instance_heatmap(np.zeros((0, 2)), np.zeros(0), 256.0, tmp_path / "e2.png", thumb, 16.0))
    with pytest.raises(ValueError, match="scores"):
        plot_instance_heatmap(np.zeros((3, 2)), np.zeros(2), 256.0, tmp_path / "bad.png")


def test_youden_threshold_and_localization_accuracy():
    from pathopeft.mil.metrics import bag_auc, localization_metrics, youden_threshold

    # scores 0.1 0.4 0.35 0.8, labels 0 0 1 1: cut at 0.35 gives TPR 1, FPR 0.5 (J 0.5); at 0.8 TPR 0.5, FPR 0
    # (J 0.5) — the first maximum in descending order is 0.8; at 0.4 TPR 0.5, FPR 0.5 (J 0)
    s, y = torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0, 0, 1, 1])
    assert youden_threshold(s, y) == pytest.approx(0.8)
    loc = localization_metrics(s, y)
    assert loc["accuracy"] == pytest.approx(0.75)  # only the 0.8 tile called tumour
    assert loc["auc"] == pytest.approx(0.75)
    # a perfect separation: the threshold is the lowest positive score and accuracy is 1
    s2, y2 = torch.tensor([0.2, 0.3, 0.6, 0.9]), torch.tensor([0, 0, 1, 1])
    assert youden_threshold(s2, y2) == pytest.approx(0.6)
    assert localization_metrics(s2, y2)["accuracy"] == 1.0
    assert math.isnan(youden_threshold(s2, torch.ones(4)))
    assert math.isnan(localization_metrics(s2, torch.ones(4))["accuracy"])
    assert bag_auc(torch.tensor([0.9, 0.2, 0.7]), torch.tensor([1, 0, 0])) == pytest.approx(1.0)
    assert math.isnan(bag_auc(torch.tensor([0.9, 0.2]), torch.tensor([1, 1])))


def test_seeds_table_is_mean_and_std_over_reports():
    from pathopeft.mil.report import seeds_markdown, seeds_summary

    reps = []
    for a in (0.6, 0.8):
        rep = ContinualReport(task_names=["A", "B"])
        rep.add("m", np.array([[a, NAN], [a, a]]), train_time_s=10 * a)
        reps.append(rep)
    (row,) = seeds_summary(reps)
    assert row["n"] == 2
    assert row["avg_acc"] == pytest.approx(0.7)
    assert row["avg_acc_std"] == pytest.approx(np.std([0.6, 0.8], ddof=1))
    assert math.isnan(row["final_bag_auc"])
    md = seeds_markdown(reps)
    assert "| m | 2 | 0.700 ± 0.141 |" in md
    assert "n/a" in md  # no bag AUC measured
