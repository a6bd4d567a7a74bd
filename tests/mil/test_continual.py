"""BPPL on a case with known answers, the bag data layer, and the continual runner (strategies, resume)."""

from __future__ import annotations

import csv
import errno
import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from pathopeft import io as pathopeft_io
from pathopeft.errors import DiskFullError, UserError
from pathopeft.manifest import ManifestError
from pathopeft.mil.bppl import IGNORE, BPPLConfig, pseudo_labels
from pathopeft.mil.continual import ContinualConfig, InjectedCrash, StaleCheckpointError, run_continual
from pathopeft.mil.data import BagManifestError, read_bag_manifest
from pathopeft.mil.strategies import STRATEGIES
from pathopeft.wsi import h5io

TINY = {"hidden_dim": 16, "n_layers": 1, "heads": 2, "attn_dim": 8, "dropout": 0.0, "trans_dropout": 0.0}


# --- BPPL ----------------------------------------------------------------------------------------------------
def test_bppl_recovers_the_witnesses_when_attention_points_at_them():
    torch.manual_seed(0)
    n, witnesses = 40, torch.arange(5)
    h = torch.randn(n, 8) * 0.1
    h[:, 0] -= 1.0  # benign instances point one way …
    h[witnesses, 0] += 2.0  # … tumour instances the other
    attention = torch.full((n,), 0.1 / (n - 5))
    attention[witnesses] = 0.9 / 5
    labels = pseudo_labels(h, attention, bag_class=2, benign_class=0, cfg=BPPLConfig(keep=0.125))
    assert set(torch.nonzero(labels == 2).flatten().tolist()) == set(witnesses.tolist())
    called_benign = torch.nonzero(labels == 0).flatten()
    assert len(called_benign) == 5
    assert not set(called_benign.tolist()) & set(witnesses.tolist())
    assert (labels == IGNORE).sum() == n - 10  # the unsure middle is left out


def test_bppl_negative_bag_is_all_benign():
    labels = pseudo_labels(torch.randn(7, 4), torch.full((7,), 1 / 7), bag_class=0, benign_class=0, cfg=BPPLConfig())
    assert (labels == 0).all()


# --- synthetic bags --------------------------------------------------------------------------------------------
def make_bags(
    root, n_per_class: int = 6, k: int = 4, dim: int = 8, seed: int = 0, tasks=(("aca", 1), ("scc", 2)), n_eval=3
):
    """Tasks (name, feature axis): tumour tiles of a task's class are shifted along its axis; a 2×2 blob per
    positive bag. ``n_per_class`` training and ``n_eval`` val/test bags per class and task."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    coords = np.array([(c * 224, r * 224) for r in range(k) for c in range(k)], dtype=np.int64)
    for task, cls_idx in tasks:
        for split in ("train", "val", "test"):
            for label in ("benign", task):
                for i in range(n_per_class if split == "train" else n_eval):
                    feats = rng.normal(0, 0.3, (k * k, dim)).astype(np.float32)
                    inst = np.zeros(k * k, dtype=np.int8)
                    if label != "benign":
                        r0, c0 = rng.integers(0, k - 1, 2)
                        for dr in (0, 1):
                            for dc in (0, 1):
                                idx = (r0 + dr) * k + (c0 + dc)
                                inst[idx] = 1
                                feats[idx, cls_idx] += 3.0
                    sid = f"{task}_{split}_{label}_{i}"
                    path = root / f"{sid}.h5"
                    h5io.write_features(path, feats, coords, {"patch_size": 224, "patch_size_level0": 224}, {})
                    with h5py.File(path, "a") as f:
                        f["instance_labels"] = inst
                    rows.append({"slide_id": sid, "path": path.name, "label": label, "task": task, "split": split})
    manifest = root / "bags.csv"
    with manifest.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return manifest


def _cfg(manifest, out, **kw):
    base = {"manifest": str(manifest), "out_dir": str(out), "epochs": 3, "lr": 5e-3, "model_kwargs": TINY,
            "collect_bags": 6, "heatmaps": 1, "owlora": {"r": 2}}  # fmt: skip
    return ContinualConfig(**{**base, **kw})


def test_manifest_errors_name_file_and_line(tmp_path, manifest):
    assert len(read_bag_manifest(manifest)) == 2 * 2 * (6 + 3 + 3)
    bad = tmp_path / "bad.csv"
    bad.write_text("slide_id,path,label,task\n")
    with pytest.raises(BagManifestError, match=r"bad\.csv: missing column\(s\) \['split'\]"):
        read_bag_manifest(bad)
    bad.write_text("slide_id,path,label,task,split\na,nope.h5,benign,aca,train\n")
    with pytest.raises(BagManifestError, match=r"bad\.csv:2: feature file .*nope\.h5 not found"):
        read_bag_manifest(bad)


def test_bag_manifest_reads_through_the_shared_manifest_core(manifest):
    """One reader for bag manifests (pathopeft.manifest's rules); a producer's extra columns are checked too."""
    assert issubclass(BagManifestError, ManifestError)
    rows = manifest.read_text().splitlines()
    records = read_bag_manifest(manifest)
    assert records[0].path == manifest.parent / f"{records[0].slide_id}.h5"  # relative to the CSV
    assert (records[0].manifest, records[0].line) == (manifest, 2)
    with pytest.raises(BagManifestError, match=r"bags\.csv: missing column\(s\) \['witness_rate'\]"):
        read_bag_manifest(manifest, extra_columns=("witness_rate",))
    with_rate = manifest.parent / "with_rate.csv"
    with_rate.write_text("\n".join([rows[0] + ",witness_rate", *(ln + ",0.25" for ln in rows[1:])]) + "\n")
    assert {r.extra["witness_rate"] for r in read_bag_manifest(with_rate, extra_columns=("witness_rate",))} == {"0.25"}
    twice = manifest.parent / "twice.csv"
    twice.write_text("\n".join([rows[0], rows[1], rows[2], rows[1]]) + "\n")
    with pytest.raises(BagManifestError, match=r"twice\.csv:4: duplicate slide_id '\w+' \(first on line 2\)"):
        read_bag_manifest(twice)


def test_every_output_is_written_through_pathopeft_io(manifest, tmp_path, monkeypatch):
    """State, checkpoints, scores, tables and figures all use pathopeft.io's temporary names and rename."""
    written: list[str] = []
    real = pathopeft_io._write_all

    def spy(tmp, data):
        written.append(tmp.name)
        real(tmp, data)

    monkeypatch.setattr(pathopeft_io, "_write_all", spy)
    run_continual(_cfg(manifest, tmp_path, strategy="comel", epochs=1))
    root = tmp_path / "comel-class"
    outputs = [p for p in root.rglob("*") if p.is_file()]
    names = {p.name for p in outputs}
    assert {"state.json", "net.safetensors", "tile_scores.h5", "results.csv", "results.md", "R_comel.png"} <= names
    not_via_io = [p for p in outputs if pathopeft_io.tmp_path(p).name not in written and "adapters" not in p.parts]
    assert not not_via_io


def test_a_full_disk_while_saving_state_is_one_error_naming_the_file(manifest, tmp_path, monkeypatch):
    real = pathopeft_io._write_all

    def full(tmp, data):
        if "state.json" in tmp.name:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(tmp, data)

    monkeypatch.setattr(pathopeft_io, "_write_all", full)
    with pytest.raises(DiskFullError, match=r"state\.json: disk full"):
        run_continual(_cfg(manifest, tmp_path, strategy="finetune", epochs=1, heatmaps=0))
    root = tmp_path / "finetune-class"
    assert not (root / "state.json").exists()
    assert not [p for p in root.rglob(".*") if p.name.endswith(".tmp")]


@pytest.mark.parametrize("strategy", STRATEGIES.names())
def test_every_strategy_runs_and_reports(manifest, tmp_path, strategy):
    """Every registered strategy, with what its capabilities promise (one step for all-at-once, adapters)."""
    caps = STRATEGIES.entry(strategy).caps
    state = run_continual(_cfg(manifest, tmp_path, strategy=strategy))
    root = tmp_path / f"{strategy}-class"
    assert state["done"] == (1 if caps["all_tasks_at_once"] else 2)
    assert len(state["R"][-1]) == 2  # the last evaluation covers both tasks
    assert all(0.0 <= a <= 1.0 for a in state["R"][-1])
    for name in ("results.csv", "results.md", f"R_{strategy}.png", "state.json", "tile_scores.h5"):
        assert (root / name).is_file(), name
    assert list((root / "heatmaps").glob("*.png"))
    adapter_file = root / f"task_{state['done'] - 1}" / "adapters" / "adapter_model.safetensors"
    assert adapter_file.is_file() == caps["adapters"]
    assert not [p for p in root.rglob(".*") if p.name.endswith(".tmp")]  # every write renamed into place


def test_comel_learns_both_tasks_and_localizes(manifest, tmp_path):
    """Direction, not numbers: on separable synthetic bags CoMEL ends well above chance on both tasks
    and its tile scores rank tumour tiles above benign ones."""
    state = run_continual(_cfg(manifest, tmp_path, epochs=8))
    assert min(state["R"][-1]) >= 0.8
    assert state["I"][-1][0] > 0.8
    with h5py.File(tmp_path / "comel-class" / "tile_scores.h5") as f:
        g = f["aca_test_aca_0"]
        assert g["scores"].shape == g["instance_labels"].shape == (16,)
        assert (
            g["scores"][:][g["instance_labels"][:] == 1].mean() > g["scores"][:][g["instance_labels"][:] == 0].mean()
        )
        scores, coords, size = g["scores"][:], g["coords"][:], g.attrs["tile_size_l0"]
        slides = list(f)
    # every scored test slide has a QuPath GeoJSON: one square detection per tile, the score as a measurement
    doc = json.loads((tmp_path / "comel-class" / "heatmaps" / "aca_test_aca_0.geojson").read_text())
    assert len(doc["features"]) == len(scores)
    first = doc["features"][0]
    assert first["properties"]["objectType"] == "detection"
    assert first["properties"]["measurements"]["score"] == pytest.approx(float(scores[0]), abs=1e-6)
    ring = np.asarray(first["geometry"]["coordinates"][0])
    np.testing.assert_allclose(ring[2] - ring[0], [size, size])
    np.testing.assert_allclose(ring[0], coords[0])
    assert {p.stem for p in (tmp_path / "comel-class" / "heatmaps").glob("*.geojson")} == set(slides)
    # and the command rebuilds them (and PNGs) from tile_scores.h5
    from pathopeft.cli import main

    assert main(["mil", "heatmap", str(tmp_path / "comel-class"), "--out", str(tmp_path / "hm"), "--png"]) == 0
    assert json.loads((tmp_path / "hm" / "aca_test_aca_0.geojson").read_text()) == doc
    assert (tmp_path / "hm" / "aca_test_aca_0.png").is_file()


@pytest.mark.parametrize("strategy", ["replay", "joint"])
def test_replay_and_joint_keep_the_old_class_in_class_incremental(manifest, tmp_path, strategy):
    """The rehearsal/joint bounds must tell aca from scc at the end (they see both classes)."""
    state = run_continual(_cfg(manifest, tmp_path, strategy=strategy, epochs=6, replay_per_task=6))
    assert min(state["R"][-1]) >= 0.8


def test_task_incremental_setting(manifest, tmp_path):
    state = run_continual(_cfg(manifest, tmp_path, setting="task", epochs=5))
    assert min(state["R"][-1]) >= 0.8


def test_replay_in_the_task_incremental_setting_trains_on_its_replayed_bags(manifest, tmp_path):
    """The replayed aca bags must be in the training softmax (masked to benign+scc their loss was infinite)."""
    state = run_continual(_cfg(manifest, tmp_path, strategy="replay", setting="task", epochs=5, replay_per_task=6))
    assert state["done"] == 2
    assert min(state["R"][-1]) >= 0.8


def test_resume_after_injected_crash_trains_each_task_once(manifest, tmp_path):
    cfg = _cfg(manifest, tmp_path)
    with pytest.raises(InjectedCrash):
        run_continual(cfg, crash_after_task=0)
    root = tmp_path / "comel-class"
    state = json.loads((root / "state.json").read_text())
    assert state["done"] == 1
    first = (root / "task_0" / "net.safetensors").stat().st_mtime_ns
    resumed = run_continual(cfg)
    assert resumed["done"] == 2
    assert (root / "task_0" / "net.safetensors").stat().st_mtime_ns == first  # task 0 was not trained again
    assert resumed["R"][0] == state["R"][0]
    with pytest.raises(ValueError, match="different configuration"):
        run_continual(_cfg(manifest, tmp_path, lr=1e-2))


@pytest.fixture(scope="module")
def three_tasks(tmp_path_factory: pytest.TempPathFactory):
    """A tiny three-task stream (so a resume has earlier strategy state to carry: Fisher terms, a buffer)."""
    tasks = (("aca", 1), ("scc", 2), ("ade", 3))
    return make_bags(tmp_path_factory.mktemp("bags3"), n_per_class=3, n_eval=2, tasks=tasks)


def _results_without_cost(path):
    """results.csv's rows minus the wall-time and memory columns (the only ones a resume may change)."""
    with path.open(newline="") as f:
        return [
            {k: v for k, v in r.items() if k not in ("train_time_s", "peak_memory_mib")} for r in csv.DictReader(f)
        ]


@pytest.mark.slow  # ~30 s for the seven strategies on two CPU cores
@pytest.mark.parametrize("strategy", STRATEGIES.names())
def test_a_resumed_run_gives_the_results_of_an_uninterrupted_one(three_tasks, tmp_path, strategy, one_thread):
    """Crash after task 1 (joint: after its only step), rerun: the same results as one uninterrupted run —
    the net is rebuilt from state dicts and the strategy's state (EWC's penalty, replay's buffer) restored.
    Bit-equality is asked, so it runs on one thread: on a loaded machine the BLAS may change its thread count
    between the two runs, and a changed summation order flips CoDyRA's exact-zero gates."""
    classes = {"classes": ["benign", "aca", "scc", "ade"], "tasks": ["aca", "scc", "ade"]}
    kw = {"epochs": 1, "heatmaps": 0, "collect_bags": 3, "replay_per_task": 2, "strategy": strategy, **classes}
    kw["model_kwargs"] = {**TINY, "dropout": 0.1, "trans_dropout": 0.1}  # RNG-dependent training, as configs are
    whole = run_continual(_cfg(three_tasks, tmp_path / "whole", **kw))
    cfg = _cfg(three_tasks, tmp_path / "resumed", **kw)
    crash_after = min(1, whole["done"] - 1)
    with pytest.raises(InjectedCrash):
        run_continual(cfg, crash_after_task=crash_after)
    resumed = run_continual(cfg)
    a, b = tmp_path / "whole" / f"{strategy}-class", tmp_path / "resumed" / f"{strategy}-class"
    assert resumed["done"] == whole["done"]
    assert (resumed["R"], resumed["I"]) == (whole["R"], whole["I"])
    assert resumed.get("strategy_state") == whole.get("strategy_state")
    assert _results_without_cost(b / "results.csv") == _results_without_cost(a / "results.csv")
    for t in range(whole["done"]):  # the same weights (the files' headers may order their metadata differently)
        wa, wb = load_file(a / f"task_{t}" / "net.safetensors"), load_file(b / f"task_{t}" / "net.safetensors")
        assert wa.keys() == wb.keys()
        assert all(torch.equal(wa[k], wb[k]) for k in wa)
    with h5py.File(a / "tile_scores.h5") as fa, h5py.File(b / "tile_scores.h5") as fb:
        assert sorted(fa) == sorted(fb)
        assert all(np.array_equal(fa[k]["scores"][:], fb[k]["scores"][:]) for k in fa)
    if strategy == "ewc":
        assert (b / "task_1" / "strategy.safetensors").is_file()
    if strategy == "replay":
        assert len(resumed["strategy_state"]["buffer"]) == 2 * 2  # two earlier tasks' bags
    if strategy == "derpp":  # the buffer's stored logits travel as tensors, its slide ids as JSON
        assert (b / "task_1" / "strategy.safetensors").is_file()
        assert resumed["strategy_state"]["buffer"]["ids"]


def test_every_task_trains_in_training_mode(manifest, tmp_path, monkeypatch):
    """Evaluation between tasks puts the net in eval mode and Lightning keeps a module's mode: later tasks
    must still train with dropout on (they once did not, and a resumed run then differed)."""
    from pathopeft.mil.module import ContinualMILModule

    modes = []
    step = ContinualMILModule.training_step

    def spy(self, batch, batch_idx):
        modes.append(self.net.training and all(m.training for m in self.net.modules()))
        return step(self, batch, batch_idx)

    monkeypatch.setattr(ContinualMILModule, "training_step", spy)
    run_continual(_cfg(manifest, tmp_path, epochs=1, heatmaps=0, strategy="finetune"))
    assert modes
    assert all(modes)


def test_no_pickle_in_the_runner(manifest, tmp_path):
    """Checkpoints are plain state dicts: nothing in pathopeft/mil pickles or unpickles (torch.save/load)."""
    import pathopeft.mil

    root = Path(pathopeft.mil.__file__).parent
    offenders = [p for p in root.rglob("*.py") if "torch.save(" in p.read_text() or "torch.load(" in p.read_text()]
    assert not offenders


def test_a_folder_with_a_pickled_net_is_refused_with_one_line(manifest, tmp_path):
    """A run folder of an older pathopeft (whole pickled module in net.pt): one line naming it, saying to delete it."""
    cfg = _cfg(manifest, tmp_path, strategy="finetune", epochs=1, heatmaps=0)
    with pytest.raises(InjectedCrash):
        run_continual(cfg, crash_after_task=0)
    task_dir = tmp_path / "finetune-class" / "task_0"
    (task_dir / "net.safetensors").rename(task_dir / "net.pt")  # what an old run left there
    with pytest.raises(
        StaleCheckpointError, match=r"task_0: holds a pickled net\.pt .*; delete .*finetune-class and rerun"
    ):
        run_continual(cfg)
    assert issubclass(StaleCheckpointError, UserError)


def test_codyra_strategy_thresholds_gates_while_training_and_merges_them_at_the_task_boundary(manifest, tmp_path):
    """CoDyRA as a continual strategy: the gates reach exact zeros during a task (its after-step threshold) and
    the adapter never grows — after the second task the saved adapter has the first one's shapes."""
    from safetensors.torch import load_file

    state = run_continual(_cfg(manifest, tmp_path, strategy="codyra", codyra={"r": 4, "xi_max": 0.3, "levels": 2}))
    assert state["done"] == 2
    tensors = load_file(str(tmp_path / "codyra-class" / "task_1" / "adapters" / "adapter_model.safetensors"))
    gates = [v for k, v in tensors.items() if k.endswith(".gate")]
    assert gates
    assert all(g.shape == (4,) for g in gates)  # one gated LoRA of rank 4 per layer, not one per task
    assert sum(int((g == 0).sum()) for g in gates) > 0  # thresholded to exact zeros during the task


def test_orthoadapt_strategy_trains_each_task_alone_and_evaluates_the_sum(tmp_path):
    """Orthogonal Adaptation as a continual strategy: step 1 trains only its own B (the next task's B stays 0),
    step 2 trains only its own and leaves step 1's untouched; the frozen blocks are orthogonal
    (tests/adapters/test_merging.py), and the evaluated model is the sum."""
    from safetensors.torch import load_file

    three = make_bags(tmp_path / "bags3", tasks=(("aca", 1), ("scc", 2), ("sqm", 3)), n_per_class=3, n_eval=2)
    cfg = _cfg(three, tmp_path, strategy="orthoadapt", tasks=["aca", "scc", "sqm"],
               classes=["benign", "aca", "scc", "sqm"], orthoadapt={"r": 2}, epochs=2)  # fmt: skip
    assert run_continual(cfg)["done"] == 3
    t1, t2 = (load_file(str(tmp_path / "orthoadapt-class" / f"task_{t}" / "adapters" / "adapter_model.safetensors"))
              for t in (1, 2))  # fmt: skip
    b0 = {k: v for k, v in t1.items() if k.endswith("B.0")}
    assert b0
    assert any(v.abs().sum() > 0 for v in b0.values())  # step 1 trained its B
    assert all(t1[k.replace("B.0", "B.1")].abs().sum() == 0 for k in b0)  # and not the next task's
    for k, v in b0.items():
        torch.testing.assert_close(t2[k], v)  # step 2 left step 1's B alone
    assert any(t2[k.replace("B.0", "B.1")].abs().sum() > 0 for k in b0)  # and trained its own
