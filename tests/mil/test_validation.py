"""Bad bags and manifests fail up front with one line naming the file; non-finite training is never saved (issue 9)."""

from __future__ import annotations

import csv
import json
import logging
import re
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from pathopeft.cli import main
from pathopeft.mil import continual
from pathopeft.mil import data as mil_data
from pathopeft.mil.continual import ContinualRunner, InjectedCrash, run_continual
from pathopeft.mil.data import BagManifestError, read_bag_manifest
from pathopeft.mil.strategies import STRATEGIES
from pathopeft.wsi import h5io
from tests.mil.test_continual import TINY, _cfg, make_bags

ATTRS = {"patch_size": 224, "patch_size_level0": 224}


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small clean bag set (2 train bags per class and task) that each test copies and breaks."""
    return make_bags(tmp_path_factory.mktemp("clean"), n_per_class=2).parent


@pytest.fixture
def bags(base: Path, tmp_path: Path) -> Path:
    root = tmp_path / "bags"
    shutil.copytree(base, root)
    return root


def _rows(manifest: Path) -> list[dict[str, str]]:
    with manifest.open(newline="") as f:
        return list(csv.DictReader(f))


def _write_rows(manifest: Path, rows: list[dict[str, str]]) -> None:
    with manifest.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def _line_of(manifest: Path, slide_id: str) -> int:
    return next(i for i, r in enumerate(_rows(manifest), start=2) if r["slide_id"] == slide_id)


def _yaml(tmp_path: Path, manifest: Path, **kw) -> Path:
    cfg = {"manifest": str(manifest), "out_dir": str(tmp_path / "out"), "strategy": "finetune", "epochs": 1,
           "model_kwargs": TINY, "collect_bags": 2, "heatmaps": 0, **kw}  # fmt: skip
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _cli_fails(capsys, *argv: str) -> str:
    """Run the CLI, expect exit 2 with exactly one line on stderr and no traceback; return that line."""
    rc = main(list(argv))
    out, err = capsys.readouterr()
    assert rc == 2, (out, err)
    assert "Traceback" not in out + err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


# --- the manifest ---------------------------------------------------------------------------------------------
def test_manifest_refuses_an_unknown_split(bags):
    manifest = bags / "bags.csv"
    rows = _rows(manifest)
    rows[4]["split"] = "training"
    _write_rows(manifest, rows)
    with pytest.raises(
        BagManifestError, match=r"bags\.csv:6: split 'training' is not one of \['train', 'val', 'test'\]"
    ):
        read_bag_manifest(manifest)


def test_manifest_refuses_empty_fields_and_no_rows(tmp_path, bags):
    bad = bags / "bad.csv"
    name = next(bags.glob("*.h5")).name
    bad.write_text(f"slide_id,path,label,task,split\na,{name},benign,aca,train\nb,{name}\n")
    with pytest.raises(BagManifestError, match=r"bad\.csv:3: empty label"):
        read_bag_manifest(bad)
    bad.write_text("slide_id,path,label,task,split\n")
    with pytest.raises(BagManifestError, match=r"bad\.csv: manifest has no rows"):
        read_bag_manifest(bad)


# --- the up-front check of every bag ---------------------------------------------------------------------------
def _nan(path: Path) -> None:
    with h5py.File(path, "a") as f:
        feats = f["features"][:]
        feats[3, 1] = np.nan
        f["features"][...] = feats


def _inf(path: Path) -> None:
    with h5py.File(path, "a") as f:
        feats = f["features"][:]
        feats[0, 0] = np.inf
        f["features"][...] = feats


def _no_features(path: Path) -> None:
    with h5py.File(path, "a") as f:
        del f["features"]


def _short_coords(path: Path) -> None:
    with h5py.File(path, "a") as f:
        coords = f["coords"][:]
        del f["coords"]
        f["coords"] = coords[:-3]


def _wrong_dim(path: Path) -> None:
    h5io.write_features(path, np.zeros((16, 5), np.float32), np.zeros((16, 2), np.int64), ATTRS, {})


def _corrupt(path: Path) -> None:
    path.write_bytes(b"this is not an HDF5 file\n" * 10)


BROKEN = {
    "nan": (_nan, r"1 non-finite value.*row 3"),
    "inf": (_inf, r"1 non-finite value.*row 0"),
    "no_features": (_no_features, r"no 'features' dataset"),
    "coords_rows": (_short_coords, r"coords has 13 rows but features has 16"),
    "wrong_dim": (_wrong_dim, r"feature dimension 5 differs from 8 of bag aca_train_benign_0"),
    "corrupt": (_corrupt, r"not a readable HDF5 file"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_bag_fails_before_training_with_one_line(tmp_path, bags, capsys, case):
    """A bad bag of the *second* task must stop the run before task 0 trains (nothing is saved)."""
    breaker, problem = BROKEN[case]
    sid = "scc_train_scc_1"
    breaker(bags / f"{sid}.h5")
    manifest = bags / "bags.csv"
    msg = _cli_fails(capsys, "mil", "run", "--config", str(_yaml(tmp_path, manifest)))
    assert str(bags / f"{sid}.h5") in msg
    assert f"bag {sid}" in msg
    assert f"{manifest}:{_line_of(manifest, sid)}" in msg
    assert re.search(problem, msg), msg
    assert not (tmp_path / "out" / "finetune-class" / "state.json").exists()
    assert not (tmp_path / "out" / "finetune-class" / "task_0").exists()


def test_label_not_among_the_classes_names_the_manifest_line(tmp_path, bags, capsys):
    manifest = bags / "bags.csv"
    rows = _rows(manifest)
    i = next(i for i, r in enumerate(rows) if r["slide_id"] == "scc_test_scc_2")
    rows[i]["label"] = "squamous"
    _write_rows(manifest, rows)
    msg = _cli_fails(capsys, "mil", "run", "--config", str(_yaml(tmp_path, manifest)))
    assert f"{manifest}:{i + 2}: label 'squamous' of bag scc_test_scc_2 is not one of the classes" in msg
    assert not (tmp_path / "out" / "finetune-class" / "state.json").exists()


def test_compare_checks_the_bags_before_training(tmp_path, bags, capsys):
    _nan(bags / "scc_test_benign_0.h5")
    cfg = _yaml(tmp_path, bags / "bags.csv")
    msg = _cli_fails(capsys, "mil", "compare", "--config", str(cfg), "--strategies", "finetune", "joint")
    assert "scc_test_benign_0.h5" in msg
    assert "non-finite" in msg
    assert not list((tmp_path / "out").glob("*/state.json"))


def test_load_bag_refuses_non_finite_features(bags):
    _nan(bags / "aca_train_aca_0.h5")
    with pytest.raises(BagManifestError, match=r"aca_train_aca_0\.h5: features hold 1 non-finite value.*bag xyz"):
        mil_data.load_bag(bags / "aca_train_aca_0.h5", slide_id="xyz")


def test_validate_bags_skips_empty_bags_and_keeps_the_rest(bags):
    h5io.write_features(bags / "aca_val_aca_0.h5", np.zeros((0, 8), np.float32), np.zeros((0, 2)), ATTRS, {})
    records = read_bag_manifest(bags / "bags.csv")
    kept, skipped, dim = mil_data.validate_bags(records, ["benign", "aca", "scc"])
    assert dim == 8
    assert [s.record.slide_id for s in skipped] == ["aca_val_aca_0"]
    assert "0 tiles" in skipped[0].reason
    assert len(kept) == len(records) - 1


# --- empty bags, unknown and bag-less tasks ----------------------------------------------------------------------
def _empty(path: Path) -> None:
    h5io.write_features(path, np.zeros((0, 8), np.float32), np.zeros((0, 2), np.int64), ATTRS, {})


def test_empty_bags_are_skipped_with_a_warning_and_listed(tmp_path, bags, caplog):
    _empty(bags / "aca_train_aca_1.h5")
    _empty(bags / "scc_test_scc_0.h5")
    with caplog.at_level(logging.WARNING, logger="pathopeft.mil"):
        state = run_continual(_cfg(bags / "bags.csv", tmp_path / "out", strategy="finetune", epochs=1, heatmaps=0))
    assert state["done"] == 2
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("aca_train_aca_1.h5" in m and "0 tiles" in m for m in warned), warned
    root = tmp_path / "out" / "finetune-class"
    listed = _rows(root / "skipped_bags.csv")
    assert [r["slide_id"] for r in listed] == ["aca_train_aca_1", "scc_test_scc_0"]
    assert all("0 tiles" in r["reason"] for r in listed)
    saved = json.loads((root / "state.json").read_text())
    assert [s["slide_id"] for s in saved["skipped_bags"]] == ["aca_train_aca_1", "scc_test_scc_0"]
    with h5py.File(root / "tile_scores.h5") as f:
        assert "scc_test_scc_0" not in f
        assert "scc_test_scc_1" in f


def test_task_left_without_training_bags_by_empty_bags_is_an_error(tmp_path, bags, capsys):
    for label in ("benign", "scc"):
        for i in range(2):
            _empty(bags / f"scc_train_{label}_{i}.h5")
    manifest = bags / "bags.csv"
    msg = _cli_fails(capsys, "mil", "run", "--config", str(_yaml(tmp_path, manifest)))
    assert f"{manifest}: no training bags for task(s) ['scc']" in msg
    assert "4 skipped" in msg
    assert not (tmp_path / "out" / "finetune-class" / "state.json").exists()


def test_configured_task_without_training_rows_is_an_error_up_front(tmp_path, bags, capsys):
    manifest = bags / "bags.csv"
    _write_rows(manifest, [r for r in _rows(manifest) if not (r["task"] == "scc" and r["split"] == "train")])
    msg = _cli_fails(capsys, "mil", "run", "--config", str(_yaml(tmp_path, manifest)))
    assert f"{manifest}: no training bags for task(s) ['scc']" in msg
    assert not (tmp_path / "out" / "finetune-class" / "state.json").exists()


def test_configured_task_absent_from_the_manifest_is_a_one_line_error(tmp_path, bags, capsys):
    manifest = bags / "bags.csv"
    _write_rows(manifest, [r for r in _rows(manifest) if r["task"] != "scc"])
    msg = _cli_fails(capsys, "mil", "run", "--config", str(_yaml(tmp_path, manifest)))
    assert f"{manifest}: no training bags for task(s) ['scc']" in msg


def test_rows_of_tasks_outside_the_config_are_warned_about(tmp_path, bags, caplog):
    manifest = bags / "bags.csv"
    rows = _rows(manifest)
    rows += [{**rows[0], "slide_id": "extra_0", "task": "colon"}, {**rows[1], "slide_id": "extra_1", "task": "colon"}]
    _write_rows(manifest, rows)
    with caplog.at_level(logging.WARNING, logger="pathopeft.mil"):
        runner = ContinualRunner(_cfg(manifest, tmp_path / "out"))
    warned = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "bags.csv" in warned
    assert "2 row(s) of task(s) ['colon']" in warned
    assert not any(r.task == "colon" for r in runner.records)


def test_config_yaml_syntax_error_is_one_line(tmp_path, capsys):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("manifest: [unclosed\n")
    msg = _cli_fails(capsys, "mil", "run", "--config", str(cfg))
    assert "cfg.yaml" in msg


# --- never save a non-finite task --------------------------------------------------------------------------------
def _poison_param_at_task_1(monkeypatch):
    finetune = STRATEGIES.get("finetune")
    orig = finetune.before_task

    def before(self, net, t):
        net = orig(self, net, t)
        if t == 1:
            with torch.no_grad():
                net.instance_head.bias[0] = float("nan")  # unused by finetune's loss: only the weight check sees it
        return net

    monkeypatch.setattr(finetune, "before_task", before)


def _poison_features_of_task_1(monkeypatch):
    orig = mil_data.load_bag

    def load(path, slide_id=None):
        bag = orig(path, slide_id)
        if Path(path).name.startswith("scc_train"):
            bag["features"][0, 0] = float("nan")
        return bag

    monkeypatch.setattr(mil_data, "load_bag", load)


@pytest.mark.parametrize(
    ("poison", "what"),
    [(_poison_param_at_task_1, r"parameter instance_head\.bias"), (_poison_features_of_task_1, r"training loss")],
    ids=["weights", "loss"],
)
def test_non_finite_task_is_not_marked_done_and_a_rerun_resumes(tmp_path, bags, monkeypatch, poison, what):
    cfg = _cfg(bags / "bags.csv", tmp_path / "out", strategy="finetune", epochs=1, heatmaps=0)
    root = tmp_path / "out" / "finetune-class"
    with monkeypatch.context() as m:
        poison(m)
        with pytest.raises(
            continual.NonFiniteTrainingError, match=rf"task 1 \('scc'\), strategy finetune: .*{what}"
        ) as e:
            run_continual(cfg)
    assert "\n" not in str(e.value)
    state = json.loads((root / "state.json").read_text())
    assert state["done"] == 1
    assert not (root / "task_1").exists()
    first = (root / "task_0" / "net.safetensors").stat().st_mtime_ns
    resumed = run_continual(cfg)
    assert resumed["done"] == 2
    assert (root / "task_0" / "net.safetensors").stat().st_mtime_ns == first
    assert resumed["R"][0] == state["R"][0]


def test_resume_refuses_a_non_finite_checkpoint(tmp_path, bags):
    """A checkpoint written before the check existed must not be resumed from silently."""
    cfg = _cfg(bags / "bags.csv", tmp_path / "out", strategy="finetune", epochs=1, heatmaps=0)
    with pytest.raises(InjectedCrash):
        run_continual(cfg, crash_after_task=0)
    ckpt = tmp_path / "out" / "finetune-class" / "task_0" / "net.safetensors"
    sd = load_file(ckpt)
    for v in sd.values():
        if v.is_floating_point():
            v.fill_(float("nan"))
    save_file(sd, ckpt)
    with pytest.raises(
        continual.NonFiniteTrainingError, match=r"task_0.net\.safetensors: parameter \S+ holds \d+ non-finite value"
    ):
        run_continual(cfg)
