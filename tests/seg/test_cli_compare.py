"""The seg CLI end to end on the GlaS fixture: LightningCLI fit from a YAML twin, predict, compare."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
import yaml

from pathopeft.cli import main
from pathopeft.datasets.glas import write_glas_manifest
from pathopeft.seg.compare import CompareConfig, run_compare
from pathopeft.seg.module import early_stopping
from tests.seg.test_data import red_is_mask, squares_mask, write_csv, write_pair

HERE = Path(__file__).parent
REPO = HERE.parents[1]


@pytest.fixture
def glas_manifest(shared_dir, tmp_path):
    root = shared_dir / "data" / "glas_subset22"
    if not root.is_dir():
        pytest.skip(f"{root} missing")
    out = write_glas_manifest(root, tmp_path / "glas.csv", split_map={"testA": "train"})
    rows = list(csv.DictReader(out.open()))
    assert {r["split"] for r in rows} == {"train", "test"}
    return out


@pytest.mark.shared
def test_fit_from_yaml_then_predict(glas_manifest, tmp_path):
    cfg = (HERE / "conf" / "tiny_fit.yaml").read_text().replace("MANIFEST", str(glas_manifest))
    (tmp_path / "fit.yaml").write_text(cfg)
    ckpt = tmp_path / "last.ckpt"
    assert main(["seg", "fit", "--config", str(tmp_path / "fit.yaml"), f"--trainer.default_root_dir={tmp_path}"]) == 0
    found = list(tmp_path.rglob("*.ckpt"))
    assert found, "LightningCLI wrote no checkpoint"
    found[0].rename(ckpt)
    image = next(r["image"] for r in csv.DictReader(glas_manifest.open()))
    image = (glas_manifest.parent / image).resolve()
    assert (
        main(["seg", "predict", "--ckpt", str(ckpt), "--out", str(tmp_path / "pred"), "--crop", "32", str(image)]) == 0
    )
    from PIL import Image

    mask = Image.open(tmp_path / "pred" / f"{image.stem}_mask.png")
    assert mask.size == Image.open(image).size  # stitched back to full size


@pytest.mark.slow
@pytest.mark.shared
def test_compare_writes_a_report(glas_manifest, tmp_path):
    cfg = CompareConfig(
        manifest=str(glas_manifest), out_dir=str(tmp_path / "cmp"), encoder="vit_tiny_patch16_224", img_size=32,
        encoder_kwargs={"depth": 1, "embed_dim": 32, "num_heads": 2}, crop=32, batch_size=4,
        methods=["frozen", "lora"], rank=2, lrs=[1e-3, 1e-2], seeds=[0, 1], max_steps=3, val_fraction=0.25,
        eval_batch=64, grid_images=1,
    )  # fmt: skip
    rows = run_compare(cfg)
    assert [r["method"] for r in rows] == ["frozen", "lora"]
    assert all(0.0 <= r["dice_mean"] <= 1.0 and r["n_seeds"] == 2 for r in rows)
    assert rows[0]["trainable"] < rows[1]["trainable"]  # adapters add parameters to the decoder's
    report = (tmp_path / "cmp" / "report.md").read_text()
    assert "| lora |" in report
    assert "RANDOM INIT" in report
    assert (tmp_path / "cmp" / "grid.png").stat().st_size > 5_000
    assert len(list((tmp_path / "cmp" / "runs").glob("*.json"))) == 2 + 2 + 2  # 2 LRs + 1 extra seed per method


@pytest.mark.slow
@pytest.mark.shared
def test_compare_resumes_and_only_trains_what_is_missing(glas_manifest, tmp_path, monkeypatch):
    from pathopeft.seg import compare

    cfg = CompareConfig(
        manifest=str(glas_manifest), out_dir=str(tmp_path / "cmp"), encoder="vit_tiny_patch16_224", img_size=32,
        encoder_kwargs={"depth": 1, "embed_dim": 32, "num_heads": 2}, crop=32, batch_size=4,
        methods=["lora"], rank=2, lrs=[1e-3, 1e-2], seeds=[0], max_steps=2, val_fraction=0.25, grid_images=1,
    )  # fmt: skip
    first = run_compare(cfg)
    trained = []
    real_fit = compare.fit_one
    monkeypatch.setattr(
        compare, "fit_one", lambda c, m, lr, s, dm: trained.append((m, lr, s)) or real_fit(c, m, lr, s, dm)
    )
    assert run_compare(cfg)[0]["dice_mean"] == first[0]["dice_mean"]  # everything reused
    assert trained == []
    cfg.seeds = [0, 1]
    assert run_compare(cfg)[0]["n_seeds"] == 2
    assert trained == [("lora", first[0]["best_lr"], 1)]  # only the new seed, at the chosen LR
    cfg.max_steps = 3  # a different run: old records are not reused
    run_compare(cfg)
    assert len(trained) == 1 + 3


def test_compare_sweeps_each_method_over_its_own_learning_rates(glas_manifest, tmp_path, monkeypatch):
    from pathopeft.seg import compare

    cfg = CompareConfig(
        manifest=str(glas_manifest), out_dir=str(tmp_path / "cmp"), encoder="vit_tiny_patch16_224", img_size=32,
        encoder_kwargs={"depth": 1, "embed_dim": 32, "num_heads": 2}, crop=32, batch_size=4,
        methods=["frozen", "lora"], rank=2, lrs=[1e-3], method_lrs={"lora": [1e-2, 3e-2]}, seeds=[0],
        max_steps=1, val_fraction=0.25, grid_images=1,
    )  # fmt: skip
    trained = []
    real_fit = compare.fit_one
    monkeypatch.setattr(
        compare, "fit_one", lambda c, m, lr, s, dm: trained.append((m, lr)) or real_fit(c, m, lr, s, dm)
    )
    rows = {r["method"]: r for r in run_compare(cfg)}
    assert trained == [("frozen", 1e-3), ("lora", 1e-2), ("lora", 3e-2)]
    assert set(rows["lora"]["sweep"]) == {1e-2, 3e-2}
    assert set(rows["frozen"]["sweep"]) == {1e-3}
    cfg.method_lrs = {"lora": [3e-2]}  # a narrower sweep later reuses the finished runs
    run_compare(cfg)
    assert len(trained) == 3


@pytest.mark.shared
def test_compare_never_shares_one_learning_rate_across_methods(glas_manifest, tmp_path, monkeypatch):
    """LoRAFactory's finding (the learning rate matters more than the variant) is why each method is scored at
    its own best LR: here LoRA is best at 1e-2 and DoRA at 1e-3, and each row reports and reruns its own."""
    from pathopeft.seg import compare

    val = {("lora", 1e-3): 0.5, ("lora", 1e-2): 0.7, ("dora", 1e-3): 0.8, ("dora", 1e-2): 0.6}
    calls = []

    def fake_run(cfg, method, lr, seed, dm, out):
        calls.append((method, lr, seed))
        d = val[(method, lr)] + 0.01 * seed
        return {"method": method, "lr": lr, "seed": seed, "val_dice": d, "test_dice": d, "test_iou": d / 2,
                "trainable": 10, "total": 100, "peak_mib": 1.0, "s_per_step": 0.1,
                "grid": {0: torch.zeros(4, 4, dtype=torch.uint8)}}  # fmt: skip

    monkeypatch.setattr(compare, "run_cached", fake_run)
    monkeypatch.setattr(compare, "picture_grid", lambda *a, **k: None)
    cfg = CompareConfig(manifest=str(glas_manifest), out_dir=str(tmp_path / "cmp"), methods=["lora", "dora"],
                        lrs=[1e-3, 1e-2], seeds=[0, 1], val_fraction=0.25)  # fmt: skip
    rows = {r["method"]: r for r in run_compare(cfg)}
    assert rows["lora"]["best_lr"] == 1e-2
    assert rows["dora"]["best_lr"] == 1e-3
    assert ("lora", 1e-2, 1) in calls
    assert ("dora", 1e-3, 1) in calls  # the extra seed at each method's own LR
    assert ("lora", 1e-3, 1) not in calls
    assert ("dora", 1e-2, 1) not in calls


@pytest.mark.shared
def test_a_failing_run_is_reported_and_retried_without_stopping_the_compare(glas_manifest, tmp_path, monkeypatch):
    from pathopeft.seg import compare

    cfg = CompareConfig(
        manifest=str(glas_manifest), out_dir=str(tmp_path / "cmp"), encoder="vit_tiny_patch16_224", img_size=32,
        encoder_kwargs={"depth": 1, "embed_dim": 32, "num_heads": 2}, crop=32, batch_size=4,
        methods=["frozen", "lora"], rank=2, lrs=[1e-3, 1e-2], seeds=[0], max_steps=1, val_fraction=0.25,
        grid_images=1,
    )  # fmt: skip
    real_fit = compare.fit_one

    def fit_or_fail(c, m, lr, s, dm):
        if m == "frozen" or lr == 1e-2:
            raise IndexError("index -9223372036854775808 is out of bounds")
        return real_fit(c, m, lr, s, dm)

    monkeypatch.setattr(compare, "fit_one", fit_or_fail)
    rows = {r["method"]: r for r in run_compare(cfg)}
    assert rows["frozen"]["best_lr"] is None  # every LR failed
    assert "IndexError" in rows["frozen"]["error"]
    assert rows["lora"]["best_lr"] == 1e-3  # the surviving LR, whatever its score
    assert rows["lora"]["sweep"][1e-2] is None
    report = (tmp_path / "cmp" / "report.md").read_text()
    assert "| frozen | – | 0.001: failed, 0.01: failed | failed: IndexError" in report
    assert "0.01: failed" in report.split("| lora |")[1]
    runs = tmp_path / "cmp" / "runs"
    assert sorted(p.name for p in runs.glob("*.failed.json")) == [
        "frozen_lr0.001_seed0.failed.json", "frozen_lr0.01_seed0.failed.json", "lora_lr0.01_seed0.failed.json"
    ]  # fmt: skip
    trained = []
    monkeypatch.setattr(
        compare, "fit_one", lambda c, m, lr, s, dm: trained.append((m, lr)) or real_fit(c, m, lr, s, dm)
    )
    rows = {r["method"]: r for r in run_compare(cfg)}  # a rerun retries only the failures, which now succeed
    assert sorted(trained) == [("frozen", 1e-3), ("frozen", 1e-2), ("lora", 1e-2)]
    assert rows["frozen"]["best_lr"] is not None
    assert list(runs.glob("*.failed.json")) == []


def test_compare_yaml_is_typed_and_its_inputs_are_relative_to_it(tmp_path, monkeypatch, capsys):
    from pathopeft.seg import compare

    seen = []

    def fake_run(cfg):
        seen.append(cfg)
        Path(cfg.out_dir).mkdir(parents=True)
        (Path(cfg.out_dir) / "report.md").write_text("# report\n")

    monkeypatch.setattr(compare, "run_compare", fake_run)
    (tmp_path / "conf").mkdir()
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    cfg = tmp_path / "conf" / "cmp.yaml"
    cfg.write_text("manifest: ../data/seg.csv\nout_dir: out\nweights: w.safetensors\nlrs: [0.001]\n")
    assert main(["seg", "compare", "--config", str(cfg)]) == 0
    assert seen[0].manifest == str(tmp_path / "data" / "seg.csv")  # against the YAML, not the working directory
    assert seen[0].weights == str(tmp_path / "conf" / "w.safetensors")
    assert seen[0].out_dir == "out"  # outputs: relative to the working directory
    assert main(["seg", "compare", "--config", str(cfg), "--out-dir", "other"]) == 0
    assert seen[1].out_dir == "other"
    for text, message in [
        ("manifest: m.csv\nout_dir: o\nmethod: [lora]\n", "unknown key 'method'"),  # was a TypeError traceback
        ("manifest: m.csv\nout_dir: o\nlrs: fast\n", 'Parser key "lrs"'),  # was accepted, failed in the sweep
    ]:
        cfg.write_text(text)
        assert main(["seg", "compare", "--config", str(cfg)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: {cfg}: ")
        assert message in err
        assert len(err.splitlines()) == 1


def _synthetic_set(folder: Path, n: int = 4) -> Path:
    """``n`` train pairs (40×48, mask {0, 1}) and their manifest ``folder/seg.csv``; no real data needed."""
    rows = []
    for i in range(n):
        mask = squares_mask(40, 48, seed=i)
        write_pair(folder / "data", f"im{i}", red_is_mask(mask), mask)
        rows.append({"id": f"r{i}", "image": f"data/im{i}.png", "mask": f"data/im{i}_mask.png", "split": "train"})
    return write_csv(folder / "seg.csv", rows)


def test_fit_resumes_from_its_checkpoint_with_the_shipped_callbacks(tmp_path, monkeypatch):
    """``--ckpt_path`` resume with the shipped EarlyStopping + ModelCheckpoint; it used to stop with "Early stopping
    conditioned on metric val/dice which is not available" (checked at train-epoch end, before validation ran)."""
    _synthetic_set(tmp_path)
    shipped = yaml.safe_load((REPO / "configs" / "seg" / "monuseg_densenet_lora.yaml").read_text())
    callbacks = shipped["trainer"]["callbacks"]
    assert [c["class_path"].rsplit(".", 1)[1] for c in callbacks] == ["EarlyStopping", "ModelCheckpoint"]
    callbacks[1]["init_args"]["save_last"] = True  # to see where the resumed run ended
    cfg = yaml.safe_load((HERE / "conf" / "tiny_fit.yaml").read_text())
    cfg["trainer"]["callbacks"] = callbacks
    cfg["data"]["manifest"] = "../seg.csv"  # relative to the config file, not to the working directory
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "fit.yaml").write_text(yaml.safe_dump(cfg))
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    argv = ["seg", "fit", "--config", str(tmp_path / "conf" / "fit.yaml")]
    assert main([*argv, f"--trainer.default_root_dir={tmp_path / 'first'}"]) == 0  # one epoch of 2 steps, validated
    best = tmp_path / "first" / "checkpoints" / "best.ckpt"  # written at validation end
    assert torch.load(best, weights_only=False)["global_step"] == 2
    resumed = [f"--trainer.default_root_dir={tmp_path / 'resumed'}", "--ckpt_path", str(best), "--trainer.max_steps=4"]
    assert main([*argv, *resumed]) == 0
    assert torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 4


def test_early_stopping_waits_for_validation():
    assert early_stopping()._check_on_train_epoch_end is False  # see test_fit_resumes_from_its_checkpoint_...


def _snella_sparsities(state_dict: dict[str, torch.Tensor]) -> list[float]:
    return [float(v) for k, v in state_dict.items() if k.endswith("layer_sparsity") for v in v.reshape(-1)]


def test_seg_fit_with_snella_runs_its_budget_competition(tmp_path, monkeypatch):
    """A ``seg fit`` with ``snella`` attaches the budget allocator by itself: at the end the layers' (and q/k/v
    parts') sparsities differ and their mean is the final sparsity. Fails if a run ends with one sparsity in
    every layer (the fixed-sparsity kernel the old pipelines ran)."""
    _synthetic_set(tmp_path)
    cfg = yaml.safe_load((HERE / "conf" / "tiny_fit.yaml").read_text())
    cfg["model"]["model"]["adapter"] = "snella"
    cfg["model"]["model"]["adapter_kwargs"] = {"rank": 4, "final_sparsity": 0.5}
    cfg["model"]["model"]["targets"] = "attn+mlp"
    cfg["data"]["manifest"] = str(tmp_path / "seg.csv")
    cfg["trainer"]["max_steps"] = 6
    cfg["data"]["samples_per_epoch"] = 12
    (tmp_path / "fit.yaml").write_text(yaml.safe_dump(cfg))
    monkeypatch.chdir(tmp_path)
    assert main(["seg", "fit", "--config", str(tmp_path / "fit.yaml"), f"--trainer.default_root_dir={tmp_path}"]) == 0
    ckpt = max(tmp_path.rglob("*.ckpt"), key=lambda p: p.stat().st_mtime)
    sp = _snella_sparsities(torch.load(ckpt, weights_only=False)["state_dict"])
    assert len(sp) == 3 + 3  # q, k, v of the split qkv, proj, fc1, fc2
    assert max(sp) - min(sp) > 0.05  # competition, not one sparsity everywhere
    assert sum(sp) / len(sp) == pytest.approx(0.5, abs=0.1)  # sizes differ, so the mean is weighted: roughly


def _compare_one_method(glas_manifest, tmp_path, monkeypatch, method: str, max_steps: int, look, **kwargs) -> list:
    """Run a one-method seg compare on GlaS with a tiny ViT; ``look(model)`` is recorded after each fit."""
    from pathopeft.seg import compare

    seen: list = []
    real_fit = compare.fit_one

    def fit_and_look(c, m, lr, s, dm):
        run = real_fit(c, m, lr, s, dm)
        seen.append(look(run["model"]))
        return run

    monkeypatch.setattr(compare, "fit_one", fit_and_look)
    cfg = CompareConfig(
        manifest=str(glas_manifest), out_dir=str(tmp_path / "cmp"), encoder="vit_tiny_patch16_224", img_size=32,
        encoder_kwargs={"depth": 1, "embed_dim": 32, "num_heads": 2}, crop=32, batch_size=4, methods=[method],
        rank=4, targets="attn+mlp", lrs=[1e-2], seeds=[0], max_steps=max_steps, val_fraction=0.25, grid_images=1,
        method_kwargs={method: kwargs},
    )  # fmt: skip
    run_compare(cfg)
    return seen


@pytest.mark.shared
def test_seg_compare_with_snella_runs_its_budget_competition(glas_manifest, tmp_path, monkeypatch):
    seen = _compare_one_method(glas_manifest, tmp_path, monkeypatch, "snella", 4,
                               lambda model: _snella_sparsities(model.state_dict()))  # fmt: skip
    assert len(seen) == 1
    assert len(seen[0]) == 6
    assert max(seen[0]) - min(seen[0]) > 0.05


@pytest.mark.shared
def test_seg_compare_with_lorasb_initialises_from_the_training_gradient(glas_manifest, tmp_path, monkeypatch):
    from pathopeft.adapters.lorasb import LoraSbDelta

    def initialised(model):
        return [
            bool(d.initialised) and float(d.R.abs().sum()) > 0 for d in model.modules() if isinstance(d, LoraSbDelta)
        ]

    (seen,) = _compare_one_method(glas_manifest, tmp_path, monkeypatch, "lorasb", 2, initialised)
    assert seen
    assert all(seen)  # every LoRA-SB layer was initialised by the callback, none left at its random B, A


@pytest.mark.shared
def test_seg_compare_scores_every_rank_of_one_dylora_run(glas_manifest, tmp_path, monkeypatch):
    from pathopeft.adapters.dylora import DyLoraDelta

    def trained_ranks(model):  # B starts at zero and a frozen-mode step trains only the sampled rank's column
        return {int(j) for d in model.modules() if isinstance(d, DyLoraDelta)
                for j in torch.nonzero(d.B.detach().abs().sum(0)).flatten()}  # fmt: skip

    (seen,) = _compare_one_method(glas_manifest, tmp_path, monkeypatch, "dylora", 3, trained_ranks,
                                  rank_sweep=[1, 2, 4])  # fmt: skip
    assert len(seen) > 1  # the sampler drew ranks (without it every step trains rank r alone)
    record = json.loads(next((tmp_path / "cmp" / "runs").glob("dylora_*.json")).read_text())
    assert list(record["variants"]) == ["rank 1", "rank 2", "rank 4"]
    assert all(0 <= v["test_dice"] <= 1 for v in record["variants"].values())
    assert record["variants"]["rank 4"]["test_dice"] == pytest.approx(record["test_dice"])  # eval_rank = r = 4
    report = (tmp_path / "cmp" / "report.md").read_text()
    assert "| rank 2 |" in report


@pytest.mark.shared
def test_seg_compare_with_sora_thresholds_its_gates_to_exact_zeros(glas_manifest, tmp_path, monkeypatch):
    from pathopeft.adapters.sora import live_ranks

    (seen,) = _compare_one_method(glas_manifest, tmp_path, monkeypatch, "sora", 4, live_ranks,
                                  xi_max=0.5, levels=2, dense_fraction=0.0)  # fmt: skip
    assert 0 <= seen < 4 * 4  # 4 layers (qkv, proj, fc1, fc2) of rank 4: the callback zeroed some gates


@pytest.mark.shared
def test_seg_compare_with_diffora_discretises_and_records_the_ranks_it_chose(glas_manifest, tmp_path, monkeypatch):
    from pathopeft.adapters.diffora import chosen_ranks

    (seen,) = _compare_one_method(glas_manifest, tmp_path, monkeypatch, "diffora", 4, chosen_ranks,
                                  keep_fraction=0.5, search_fraction=0.5)  # fmt: skip
    assert sorted(seen.values()) == [0, 0, 4, 4]  # the callback cut the search: 2 of the 4 layers kept
    record = json.loads(next((tmp_path / "cmp" / "runs").glob("diffora_*.json")).read_text())
    assert sorted(record["layer_ranks"].values()) == [0, 0, 4, 4]
    kept = [n for n, r in record["layer_ranks"].items() if r]
    in_plus_out = {"qkv": 32 + 96, "proj": 32 + 32, "fc1": 32 + 128, "fc2": 128 + 32}  # embed 32, mlp 128
    assert record["final_rank_params"] == sum(4 * in_plus_out[n.rsplit(".", 1)[-1]] for n in kept)
    assert (tmp_path / "cmp" / "layer_ranks.png").stat().st_size > 1000
    assert "| diffora | 8 | 2 of 4 |" in (tmp_path / "cmp" / "report.md").read_text()


@pytest.mark.shared
def test_seg_compare_runs_peft_adalora_with_its_budget_allocation(glas_manifest, tmp_path, monkeypatch):
    from pathopeft.adapters.adalora import adalora_layer_ranks

    (seen,) = _compare_one_method(glas_manifest, tmp_path, monkeypatch, "adalora", 8, adalora_layer_ranks,
                                  init_r=6, tinit=1, tfinal=2, deltaT=1)  # fmt: skip
    # no total_step: the callback gave PEFT the run's 8 steps (with its 1000-step placeholder the cut would not end)
    assert len(seen) == 4
    assert sum(seen.values()) == 4 * 4
    record = json.loads(next((tmp_path / "cmp" / "runs").glob("adalora_*.json")).read_text())
    assert record["layer_ranks"] == seen


def test_compare_rows_can_label_one_method_at_several_settings(tmp_path):
    """``name@label`` is method ``name`` with the options under that label (a method at its official settings
    and at an equal budget); ``rank: null`` leaves the method's own default."""
    from pathopeft.seg.compare import build_model

    cfg = CompareConfig(
        manifest="unused.csv", out_dir=str(tmp_path), encoder="vit_tiny_patch16_224", img_size=32,
        encoder_kwargs={"depth": 1, "embed_dim": 32, "num_heads": 2}, rank=2,
        method_kwargs={"lora@r4": {"rank": 4}, "salt@official": {"rank": None}},
    )  # fmt: skip
    small, large = build_model(cfg, "lora", 0), build_model(cfg, "lora@r4", 0)
    assert large.n_trainable() > small.n_trainable()
    official = build_model(cfg, "salt@official", 0).encoder.peft_config["default"]
    assert official.r is None  # top 10 % of the singular values, the official default


def test_an_adapter_entry_with_its_own_optimizer_trains_with_it_in_seg_module(tmp_path):
    """LoRA-Pro's entry names its optimiser: SegModule uses it instead of AdamW (and AdamW for plain LoRA)."""
    from pathopeft.adapters.lorapro import LoraProAdamW
    from pathopeft.seg.compare import build_model
    from pathopeft.seg.module import SegModule

    cfg = CompareConfig(
        manifest="unused.csv", out_dir=str(tmp_path), encoder="vit_tiny_patch16_224", img_size=32,
        encoder_kwargs={"depth": 1, "embed_dim": 32, "num_heads": 2}, rank=2,
    )  # fmt: skip
    opt = SegModule(build_model(cfg, "lorapro", 0), lr=1e-3).configure_optimizers()
    opt = opt["optimizer"] if isinstance(opt, dict) else opt
    assert isinstance(opt, LoraProAdamW)
    from pathopeft.optim import DctAdamW

    full = SegModule(build_model(cfg, "full", 0), lr=1e-3, optimizer="dct-adamw", dct_rank=4).configure_optimizers()
    assert isinstance(full["optimizer"] if isinstance(full, dict) else full, DctAdamW)
    trained = {id(p) for g in opt.param_groups for p in g["params"]}
    model = build_model(cfg, "lorapro", 0)
    assert len(trained) == sum(1 for p in model.parameters() if p.requires_grad)  # decoder + LoRA, nothing lost
    plain = SegModule(build_model(cfg, "lora", 0), lr=1e-3).configure_optimizers()
    assert type(plain["optimizer"] if isinstance(plain, dict) else plain) is torch.optim.AdamW


def test_variant_scores_are_averaged_over_the_seeds_that_scored_them():
    from pathopeft.seg.compare import variants_over_seeds

    runs = [{"variants": {"rank 1": {"val_dice": 0.5, "test_dice": 0.6}, "rank 2": {"val_dice": 0.7, "test_dice": 0.8}}},
            {"variants": {"rank 1": {"val_dice": 0.7, "test_dice": 0.8}, "rank 2": {"val_dice": 0.7, "test_dice": 0.8}}},
            {"variants": {"rank 1": {"val_dice": 0.6, "test_dice": 0.7}}}]  # fmt: skip
    out = variants_over_seeds(runs)
    assert out["rank 1"] == pytest.approx({"val_dice": 0.6, "test_dice": 0.7, "test_dice_std": 0.1, "n_seeds": 3})
    assert out["rank 2"] == pytest.approx({"val_dice": 0.7, "test_dice": 0.8, "test_dice_std": 0.0, "n_seeds": 2})
