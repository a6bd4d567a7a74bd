"""``pathopeft seg compare``: which adapter is best on *your* data, at each method's best learning rate.

LoRAFactory's lesson ("A Unified Study of LoRA Variants", 2026): most LoRA variants stop beating plain LoRA
once every method gets its own tuned learning rate. So for every method this runs a small learning-rate sweep
(seed 0, selected by full-image validation Dice), then trains the chosen rate with every seed and scores the
test images, stitched back to full size. The report (Markdown + CSV + a picture grid) gives Dice mean ± std
over seeds, IoU, trainable parameters (count and %), peak memory and time per step.
"""

from __future__ import annotations

import csv
import io
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch import nn

from pathopeft.io import atomic_write_bytes, atomic_write_figure, atomic_write_json, atomic_write_text
from pathopeft.memory import peak_mib, start_peak
from pathopeft.seg.data import SegDataModule, SegDataset
from pathopeft.seg.metrics import DiceIoU
from pathopeft.seg.model import SegModel
from pathopeft.seg.module import SegModule
from pathopeft.seg.predict import predict_image


@dataclass
class CompareConfig:
    """One ``seg compare`` run: data, encoder, the methods, the learning-rate sweep and the seeds."""

    manifest: str
    out_dir: str
    encoder: str = "densenet121"
    weights: str | None = None
    mean: list[float] | None = None
    std: list[float] | None = None
    bn_eps: float | None = None
    img_size: int | None = None
    encoder_kwargs: dict[str, Any] = field(default_factory=dict)
    n_classes: int = 2
    mask_mode: str = "binary"
    crop: int = 128
    batch_size: int = 8
    methods: list[str] = field(default_factory=lambda: ["frozen", "lora", "dora", "salt", "wara", "snella"])
    rank: int = 8  # every adapter's rank unless its method_kwargs say otherwise ({rank: null}: the method's default)
    targets: str | None = None
    method_kwargs: dict[str, dict[str, Any]] = field(default_factory=dict)
    train_norms: bool = False  # every adapter method also trains norms + position embeddings (SALT's recipe)
    lrs: list[float] = field(default_factory=lambda: [1e-3, 3e-3])
    method_lrs: dict[str, list[float]] = field(default_factory=dict)  # a method's own sweep (vector-sized methods
    # such as NOLA or SVFit train a few hundred numbers and need larger rates than LoRA); others sweep ``lrs``
    seeds: list[int] = field(default_factory=lambda: [0])
    max_steps: int = 200
    loss: str = "dicece"
    val_fraction: float = 0.2
    eval_batch: int = 16
    grid_images: int = 2
    accelerator: str = "cpu"
    precision: str = "32-true"


#: Input paths of a compare YAML, resolved against the YAML's folder (``$VAR`` expanded); ``out_dir`` is an output
#: and stays relative to the working directory.
COMPARE_PATH_FIELDS = ("manifest", "weights")


def load_compare_config(path: str | os.PathLike[str], out_dir: str | os.PathLike[str] | None = None) -> CompareConfig:
    """The typed :class:`CompareConfig` of a YAML (unknown keys and wrong types: one error naming file and key)."""
    from pathopeft.config import load_config

    overrides = {"out_dir": None if out_dir is None else str(out_dir)}
    return load_config(CompareConfig, path, overrides, COMPARE_PATH_FIELDS)


def _adapter(method: str) -> tuple[str | None, bool]:
    """(adapter name for SegModel, freeze_encoder). ``name@label`` is method ``name`` under a row label of its
    own (its options in ``method_kwargs["name@label"]``), e.g. ``salt@official`` and ``salt@budget``."""
    method = method.split("@", 1)[0]
    if method == "frozen":
        return None, True
    if method == "full":
        return "full", False
    return method, True


def build_model(cfg: CompareConfig, method: str, seed: int) -> SegModel:
    adapter, freeze = _adapter(method)
    kwargs = {"rank": cfg.rank, **cfg.method_kwargs.get(method, {})} if adapter not in (None, "full") else None
    return SegModel(
        cfg.encoder, cfg.n_classes, weights=cfg.weights, adapter=adapter, adapter_kwargs=kwargs, targets=cfg.targets,
        img_size=cfg.img_size, encoder_kwargs=cfg.encoder_kwargs, mean=cfg.mean, std=cfg.std,
        freeze_encoder=freeze, bn_eps=cfg.bn_eps, init_seed=seed,
        train_norms=cfg.train_norms and adapter not in (None, "full"),
    )  # fmt: skip


def predict_full(model: SegModel, ds: SegDataset, batch: int, device: str = "cpu") -> dict[int, torch.Tensor]:
    """Softmax probabilities (C, H, W) per image of ``ds``, tiled on the dataset's eval grid and stitched."""
    model.eval().to(device)
    return {i: predict_image(model, ds.load(i)[0], ds.crop, ds.stride, batch) for i in range(len(ds.records))}


def score(model: SegModel, ds: SegDataset, cfg: CompareConfig) -> tuple[float, float, dict[int, torch.Tensor]]:
    probs = predict_full(model, ds, cfg.eval_batch)
    scores = DiceIoU(cfg.n_classes)  # per whole image, then the mean over images
    for i, p in probs.items():
        scores.update(p.argmax(0), ds.full_mask(i))
    return (*scores.compute(), probs)


def fit_one(cfg: CompareConfig, method: str, lr: float, seed: int, dm: SegDataModule) -> dict[str, Any]:
    pl.seed_everything(seed, workers=True, verbose=False)
    model = build_model(cfg, method, seed)
    module = SegModule(model, loss=cfg.loss, lr=lr, max_epochs=None)
    trainer = pl.Trainer(
        max_steps=cfg.max_steps, accelerator=cfg.accelerator, devices=1, precision=cfg.precision, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, num_sanity_val_steps=0,
    )  # fmt: skip
    rss0 = start_peak()
    t0 = time.perf_counter()
    trainer.fit(module, train_dataloaders=dm.train_dataloader())
    seconds = time.perf_counter() - t0
    peak = peak_mib(rss0)
    if torch.cuda.is_available() and cfg.accelerator != "cpu":
        peak = torch.cuda.max_memory_allocated() / 2**20
    return {
        "model": model, "method": method, "lr": lr, "seed": seed, "s_per_step": seconds / max(1, trainer.global_step),
        "peak_mib": peak, "trainable": model.n_trainable(), "total": model.n_total(),
        "nonfinite_steps": module.nonfinite_steps, **final_ranks(method, model),
    }  # fmt: skip


def final_ranks(method: str, model: nn.Module) -> dict[str, Any]:
    """For a rank-allocating method (its ``layer_ranks`` capability): the rank it left each layer and the
    parameters a plain LoRA with those ranks holds, Σ rank·(in + out) — the final count that "equal parameter
    count" compares; {} for fixed-rank methods."""
    from pathopeft.adapters import ADAPTERS

    name = _adapter(method)[0]
    ranks_of = ADAPTERS.entry(name).caps.get("layer_ranks") if name is not None and name in ADAPTERS else None
    if ranks_of is None:
        return {}
    ranks = ranks_of(model)
    mods = dict(model.named_modules())
    params = 0
    for layer, rank in ranks.items():
        module = next(m for n, m in mods.items() if n == layer or n.endswith("." + layer))
        w = module.weight
        params += rank * (w.shape[0] + w[0].numel())
    return {"layer_ranks": ranks, "final_rank_params": params}


#: Config fields that do not change what one (method, lr, seed) run computes, so a finished run is reusable.
_NOT_PER_RUN = {"out_dir", "methods", "lrs", "method_lrs", "seeds", "grid_images", "eval_batch", "method_kwargs"}


def _run_signature(cfg: CompareConfig, method: str) -> dict[str, Any]:
    sig = {k: v for k, v in asdict(cfg).items() if k not in _NOT_PER_RUN}
    sig["method_kwargs"] = cfg.method_kwargs.get(method, {})
    return sig


def score_variants(cfg: CompareConfig, method: str, model: SegModel, dm: SegDataModule) -> dict[str, Any]:
    """Val and test Dice of every evaluation variant the adapter's ``variants`` capability offers for this
    trained model (DyLoRA: each rank of its ``rank_sweep``), as ``{"variants": {label: {...}}}``; {} for none."""
    from pathopeft.adapters import ADAPTERS

    name = _adapter(method)[0]
    factory = ADAPTERS.entry(name).caps.get("variants") if name is not None and name in ADAPTERS else None
    if factory is None:
        return {}
    scores = {}
    for label, ctx in factory(model).items():
        with ctx():
            val, _, _ = score(model, dm.val_set, cfg)
            test, _, _ = score(model, dm.test_set, cfg)
        scores[label] = {"val_dice": val, "test_dice": test}
    return {"variants": scores} if scores else {}


def run_cached(cfg: CompareConfig, method: str, lr: float, seed: int, dm: SegDataModule, out: Path) -> dict[str, Any]:
    """Train and score one (method, lr, seed), or reuse its record from an earlier, interrupted or smaller compare.

    Every run is scored on validation (for the LR choice) and test (so extra seeds or a wider sweep later never
    retrain what exists); the record is written atomically, with the first ``grid_images`` test masks.
    """
    key = f"{method}_lr{lr:g}_seed{seed}"
    record, masks = out / "runs" / f"{key}.json", out / "runs" / f"{key}.masks.npz"
    sig = _run_signature(cfg, method)
    if record.is_file() and masks.is_file():
        saved = json.loads(record.read_text())
        if saved.get("signature") == sig:
            with np.load(masks) as z:
                saved["grid"] = {int(k): torch.from_numpy(z[k]) for k in z.files}
            print(f"[compare] {key}: reused {record}", file=sys.stderr)
            return saved
        print(f"[compare] {key}: {record} was made with another configuration; retraining", file=sys.stderr)
    try:
        run = fit_one(cfg, method, lr, seed, dm)
        model = run.pop("model")
        run["val_dice"], run["val_iou"], _ = score(model, dm.val_set, cfg)
        run["test_dice"], run["test_iou"], probs = score(model, dm.test_set, cfg)
        run.update(score_variants(cfg, method, model, dm))
    except Exception as e:  # noqa: BLE001 - one failing run must not stop the sweep or lose the finished ones
        error = f"{type(e).__name__}: {e}".splitlines()[0]
        atomic_write_json(out / "runs" / f"{key}.failed.json", {"method": method, "lr": lr, "seed": seed,
                                                                 "error": error, "signature": sig}, indent=1)  # fmt: skip
        print(f"[compare] {key}: FAILED ({error}); a rerun retries it", file=sys.stderr)
        return {"method": method, "lr": lr, "seed": seed, "error": error}
    (out / "runs" / f"{key}.failed.json").unlink(missing_ok=True)
    grid = {i: p.argmax(0).to(torch.uint8) for i, p in list(probs.items())[: cfg.grid_images]}
    buf = io.BytesIO()
    np.savez_compressed(buf, **{str(i): m.numpy() for i, m in grid.items()})
    atomic_write_bytes(masks, buf.getvalue())
    atomic_write_json(record, {**run, "signature": sig}, indent=1)  # last: a record means its masks exist
    print(
        f"[compare] {key}: val Dice {run['val_dice']:.4f}, test Dice {run['test_dice']:.4f}, "
        f"{run['s_per_step']:.2f} s/step",
        file=sys.stderr,
    )
    return {**run, "grid": grid}


def run_compare(cfg: CompareConfig) -> list[dict[str, Any]]:
    """The sweep and the seeds for every method; writes report.md, results.csv and grid.png in ``out_dir``.

    Finished runs are kept under ``out_dir/runs``: a rerun after an interruption, or with more seeds, methods or
    learning rates, trains only what is missing.
    """
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dm = SegDataModule(
        cfg.manifest, n_classes=cfg.n_classes, mask_mode=cfg.mask_mode, crop=cfg.crop, batch_size=cfg.batch_size,
        val_fraction=cfg.val_fraction, seed=0, stride=cfg.crop,
        samples_per_epoch=cfg.batch_size * cfg.max_steps,
    )  # fmt: skip
    dm.setup()  # every split at once: all records are checked (and kept) before the first run trains
    rows, grids = [], {}
    for method in cfg.methods:
        sweep = [run_cached(cfg, method, lr, cfg.seeds[0], dm, out) for lr in cfg.method_lrs.get(method, cfg.lrs)]
        swept = {r["lr"]: round(r["val_dice"], 4) if "error" not in r else None for r in sweep}
        finished = [r for r in sweep if "error" not in r]
        if not finished:
            rows.append({"method": method, "best_lr": None, "sweep": swept, "error": sweep[0]["error"]})
            write_report(cfg, rows, out)
            continue
        best = max(finished, key=lambda r: r["val_dice"])
        runs = [best] + [run_cached(cfg, method, best["lr"], s, dm, out) for s in cfg.seeds[1:]]
        failed_seeds = [r["seed"] for r in runs if "error" in r]
        runs = [r for r in runs if "error" not in r]
        grids[method] = best["grid"]
        dices, ious = [r["test_dice"] for r in runs], [r["test_iou"] for r in runs]
        rows.append({
            "method": method, "best_lr": best["lr"], "sweep": swept, "failed_seeds": failed_seeds,
            "dice_mean": statistics.mean(dices), "dice_std": statistics.stdev(dices) if len(dices) > 1 else 0.0,
            "iou_mean": statistics.mean(ious), "trainable": best["trainable"],
            "trainable_pct": 100 * best["trainable"] / best["total"], "peak_mib": best["peak_mib"],
            "s_per_step": statistics.mean(r["s_per_step"] for r in runs), "n_seeds": len(runs),
            "test_dice_per_seed": {r["seed"]: round(r["test_dice"], 4) for r in runs},
            **({"variants": variants_over_seeds(runs)} if best.get("variants") else {}),
            **({"layer_ranks": [r["layer_ranks"] for r in runs],
                "final_rank_params": statistics.mean(r["final_rank_params"] for r in runs)}
               if all("layer_ranks" in r for r in runs) else {}),
        })  # fmt: skip
        write_report(cfg, rows, out)
    if grids:
        picture_grid(dm.test_set, grids, out / "grid.png")
    if any(r.get("layer_ranks") for r in rows):
        plot_layer_ranks(rows, out / "layer_ranks.png")
    return rows


def variants_over_seeds(runs: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Each variant's val and test Dice averaged over the seeds that scored it (DyLoRA's rank sweep is only worth
    reading over seeds, like the method's own row), with the test Dice's sample std and the seed count."""
    out = {}
    for label in runs[0]["variants"]:
        scored = [r["variants"][label] for r in runs if label in r.get("variants", {})]
        tests = [v["test_dice"] for v in scored]
        out[label] = {"val_dice": statistics.mean(v["val_dice"] for v in scored), "test_dice": statistics.mean(tests),
                      "test_dice_std": statistics.stdev(tests) if len(tests) > 1 else 0.0, "n_seeds": len(tests)}  # fmt: skip
    return out


def write_report(cfg: CompareConfig, rows: list[dict[str, Any]], out: Path) -> None:
    lines = [
        (
            f"# Segmentation adapter comparison\n\nEncoder `{cfg.encoder}` "
            f"({'weights ' + Path(cfg.weights).name if cfg.weights else 'RANDOM INIT'}), manifest `{cfg.manifest}`, "
            f"crop {cfg.crop}, batch {cfg.batch_size}, {cfg.max_steps} steps, rank {cfg.rank}, loss {cfg.loss}, "
            f"seeds {cfg.seeds}, LR sweep {cfg.lrs} (best by full-image val Dice, seed {cfg.seeds[0]}); "
            f"{platform.machine()}, torch {torch.__version__}, {cfg.accelerator}."
        ),
        "",
        (
            "| method | best LR | val Dice per LR | test Dice (mean ± std) | per seed | test IoU | trainable | % "
            "| peak MiB | s/step | train min/run |"
        ),
        "|---|---:|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        sweep = ", ".join(f"{lr:g}: " + (f"{d:.3f}" if d is not None else "failed") for lr, d in r["sweep"].items())
        if r["best_lr"] is None:
            lines.append(f"| {r['method']} | – | {sweep} | failed: {r['error']} |" + " |" * 7)
            continue
        per_seed = ", ".join([f"{d:.3f}" for d in r["test_dice_per_seed"].values()]
                             + [f"seed {s} failed" for s in r["failed_seeds"]])  # fmt: skip
        lines.append(
            f"| {r['method']} | {r['best_lr']:g} | {sweep} | {r['dice_mean']:.4f} ± {r['dice_std']:.4f} | "
            f"{per_seed} | {r['iou_mean']:.4f} | {r['trainable']:,} | {r['trainable_pct']:.2f} | "
            f"{r['peak_mib']:.0f} | {r['s_per_step']:.2f} | {r['s_per_step'] * cfg.max_steps / 60:.1f} |"
        )
    for r in rows:  # one trained model scored several ways (DyLoRA's ranks), at the best LR, mean over seeds
        if r.get("variants"):
            n = max(v["n_seeds"] for v in r["variants"].values())
            lines += ["", (f"{r['method']} at LR {r['best_lr']:g}, each trained model evaluated per variant "
                      f"(mean over {n} seed{'s' if n > 1 else ''}):"), "",
                      "| variant | val Dice | test Dice (mean ± std) |", "|---|---:|---:|"]  # fmt: skip
            lines += [f"| {k} | {v['val_dice']:.4f} | {v['test_dice']:.4f} ± {v['test_dice_std']:.4f} |"
                      for k, v in r["variants"].items()]  # fmt: skip
    ranked = [r for r in rows if r.get("layer_ranks")]
    if ranked:  # rank-allocating methods: what they ended with (per layer: layer_ranks.png)
        lines += ["", ("Ranks the rank-allocating methods ended with (best LR, mean over seeds; per layer: "
                  "`layer_ranks.png`):"), "", "| method | ranks kept | layers with a rank | LoRA-equivalent parameters |",
                  "|---|---:|---:|---:|"]  # fmt: skip
        for r in ranked:
            kept = statistics.mean(sum(s.values()) for s in r["layer_ranks"])
            live = statistics.mean(sum(v > 0 for v in s.values()) for s in r["layer_ranks"])
            lines.append(f"| {r['method']} | {kept:.0f} | {live:.0f} of {len(r['layer_ranks'][0])} | "
                         f"{r['final_rank_params']:,.0f} |")  # fmt: skip
    atomic_write_text(out / "report.md", "\n".join(lines) + "\n")
    table = io.StringIO(newline="")
    w = csv.DictWriter(table, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))  # failed rows: fewer
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(out / "results.csv", table.getvalue())
    atomic_write_json(out / "config.json", asdict(cfg), indent=2)


def plot_layer_ranks(rows: list[dict[str, Any]], path: Path) -> None:
    """The rank each rank-allocating method left every layer (mean over seeds, a min–max whisker where there are
    several), layers in model order: where in the encoder the budget went."""
    from matplotlib.figure import Figure

    rows = [r for r in rows if r.get("layer_ranks")]
    fig = Figure(figsize=(11, 1.2 + 1.9 * len(rows)))
    axes = fig.subplots(len(rows), 1, squeeze=False, sharex=False)
    for ax, r in zip(axes[:, 0], rows, strict=True):
        layers = list(r["layer_ranks"][0])
        per_seed = np.array([[s.get(n, 0) for n in layers] for s in r["layer_ranks"]], dtype=float)
        x = np.arange(len(layers))
        ax.bar(x, per_seed.mean(0), width=1.0, color="tab:blue")
        if len(per_seed) > 1:
            ax.vlines(x, per_seed.min(0), per_seed.max(0), color="k", linewidth=0.6)
        ax.set_xlim(-0.5, len(layers) - 0.5)
        ax.set_ylabel("rank")
        ax.set_title(f"{r['method']} (LR {r['best_lr']:g}): {per_seed.sum(1).mean():.0f} ranks over {len(layers)} "
                     f"layers, ≈{r['final_rank_params']:,.0f} LoRA-equivalent parameters", fontsize=9)  # fmt: skip
        ticks = x[:: max(1, len(layers) // 12)]
        ax.set_xticks(ticks, [layers[i].removeprefix("encoder.").removeprefix("base_model.")[-28:] for i in ticks],
                      fontsize=6, rotation=20)  # fmt: skip
    fig.tight_layout()
    atomic_write_figure(fig, path)


def picture_grid(ds: SegDataset, grids: dict[str, dict[int, torch.Tensor]], path: Path) -> None:
    """Rows: test images; columns: image, ground truth, then each method's prediction."""
    from matplotlib.figure import Figure

    methods = list(grids)
    images = list(next(iter(grids.values())))
    fig = Figure(figsize=(2.2 * (2 + len(methods)), 2.2 * len(images)))
    axes = fig.subplots(len(images), 2 + len(methods), squeeze=False)
    for row, idx in enumerate(images):
        img = ds.load(idx)[0]
        panels = [("image", img), ("ground truth", ds.full_mask(idx).numpy())]
        panels += [(m, grids[m][idx].numpy()) for m in methods]
        for col, (title, arr) in enumerate(panels):
            ax = axes[row][col]
            ax.imshow(arr, cmap=None if arr.ndim == 3 else "gray", interpolation="nearest")
            ax.set_axis_off()
            if row == 0:
                ax.set_title(title, fontsize=9)
    fig.tight_layout()
    atomic_write_figure(fig, path)
