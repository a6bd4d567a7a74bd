"""The continual runner: train step after step, evaluate on every task seen, save, resume after a crash.

One run = one strategy (:mod:`pathopeft.mil.strategies`) on one task sequence (:class:`ContinualConfig`).
The runner is the same for every strategy: at each point where strategies differ it calls the run's
strategy hook (which net trains, on which bags and classes, with which extra loss; what is evaluated after
each step; which adapters serve which task), so a new strategy needs no change here.

After every step the runner writes, each atomically (:mod:`pathopeft.io`): ``task_<t>/net.safetensors`` (the
net's state dict, no pickled module), ``task_<t>/strategy.safetensors`` (the strategy's tensors, e.g. EWC's
Fisher terms, when it has any), the adapters (``task_<t>/adapters``, when the net has any) and ``state.json``
(progress, matrices, the strategy's JSON state such as replay's buffer). A rerun resumes after the last
finished step: it builds the net from the config, replays every finished step's structure changes
(:meth:`Strategy.rebuild`, on that step's starting weights, no training), loads each step's state dict
strictly and restores the strategy's state, so a resumed run gives the results of an uninterrupted one. A
folder from before state dicts (a pickled ``net.pt``) is refused (:class:`StaleCheckpointError`). Results:
``results.csv``, ``results.md``, ``R_<strategy>.png``, ``tile_scores.h5`` and per-slide heatmaps
(``heatmaps/<slide>.geojson`` for QuPath for every test slide, PNGs over the thumbnail for the first few).

Before any training every bag of the configured tasks is checked once (:func:`prepare_bags`): a bad file
stops the run in seconds with one line naming it; bags with 0 tiles are skipped and listed in
``skipped_bags.csv`` and ``state.json``. A step that trains into NaN/Inf is never saved, so a rerun resumes
after the last good one.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import math
import os
import random
import resource
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from safetensors.torch import load_file as load_safetensors
from safetensors.torch import save as safetensors_bytes

from pathopeft import adapters
from pathopeft.adapters.owlora import set_active_tasks
from pathopeft.errors import UserError
from pathopeft.io import atomic_h5, atomic_write_bytes, atomic_write_text
from pathopeft.mil.bppl import BPPLConfig
from pathopeft.mil.config import ContinualConfig, load_config
from pathopeft.mil.data import (
    BagDataModule,
    BagManifestError,
    BagRecord,
    PreparedBags,
    SkippedBag,
    load_bag,
    read_bag_manifest,
    validate_bags,
)
from pathopeft.mil.metrics import bag_auc, localization_metrics
from pathopeft.mil.module import ContinualMILModule, MILNet, predict_bag
from pathopeft.mil.plots import plot_instance_heatmap
from pathopeft.mil.qupath import tile_scores_geojson
from pathopeft.mil.report import ContinualReport
from pathopeft.mil.strategies import STRATEGIES

__all__ = [
    "STRATEGIES",
    "ContinualConfig",
    "ContinualError",
    "ContinualRunner",
    "InjectedCrash",
    "NonFiniteTrainingError",
    "StaleCheckpointError",
    "compare",
    "load_config",
    "prepare_bags",
    "run_continual",
]

log = logging.getLogger(__name__)

NET_FILE = "net.safetensors"  # task_<t>/: the net's state dict after step t
STRATEGY_FILE = "strategy.safetensors"  # task_<t>/: the strategy's tensors after step t (when it has any)
CHECKPOINT_FORMAT = "pathopeft.mil.state_dict/1"


class InjectedCrash(RuntimeError):
    """Raised by ``crash_after_task`` (tests of resume)."""


class ContinualError(UserError, ValueError):
    """A run that cannot go on as configured (out_dir of another configuration); the message names the file."""


class NonFiniteTrainingError(UserError, RuntimeError):
    """A task trained into NaN/Inf (loss, weights or accuracy): it is not saved, so earlier tasks stay the
    resume point instead of a poisoned checkpoint."""


class StaleCheckpointError(ContinualError):
    """A run folder written before checkpoints were state dicts (a pickled ``net.pt``): not resumable."""


def _tensor_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """safetensors bytes of ``tensors`` (copied: contiguous, CPU, no shared storage)."""
    return safetensors_bytes({k: v.detach().cpu().clone().contiguous() for k, v in tensors.items()}, metadata)


def _non_finite(net: torch.nn.Module) -> str | None:
    """The first parameter (or floating buffer) of ``net`` holding NaN/Inf, described; None if all finite."""
    tensors = [("parameter", n, p) for n, p in net.named_parameters()]
    tensors += [("buffer", n, b) for n, b in net.named_buffers() if b.is_floating_point()]
    for kind, name, x in tensors:
        bad = int((~torch.isfinite(x.detach())).sum())
        if bad:
            return f"{kind} {name} holds {bad} non-finite value(s) of {x.numel()}"
    return None


def prepare_bags(cfg: ContinualConfig) -> PreparedBags:
    """Read the manifest and check every bag of the configured tasks before any training, so a bad bag or
    a task without training bags fails in seconds with one line, not mid-run (or silently)."""
    manifest = Path(cfg.manifest)
    records = read_bag_manifest(manifest)
    unused = [r for r in records if r.task not in cfg.tasks]
    if unused:  # legitimate (a run on a subset of tasks), but say so: a typo in a task name looks the same
        log.warning(
            "%s: %d row(s) of task(s) %s not in the config's tasks %s; they are not used",
            manifest, len(unused), sorted({r.task for r in unused}), list(cfg.tasks),
        )  # fmt: skip
    used = [r for r in records if r.task in cfg.tasks]
    no_rows = [t for t in cfg.tasks if not any(r.task == t and r.split == "train" for r in used)]
    if no_rows:
        raise BagManifestError(f"{manifest}: no training bags for task(s) {no_rows} (no rows with split 'train')")
    kept, skipped, in_dim = validate_bags(used, cfg.classes)
    emptied = [t for t in cfg.tasks if not any(r.task == t and r.split == "train" for r in kept)]
    if emptied:
        n = sum(s.record.task in emptied and s.record.split == "train" for s in skipped)
        raise BagManifestError(
            f"{manifest}: no training bags for task(s) {emptied}: all {n} skipped as empty bags (0 tiles)"
        )
    for t in cfg.tasks:
        if not any(r.task == t and r.split == "test" for r in kept):
            log.warning("%s: task %r has no test bags; its accuracy will read 0", manifest, t)
    return PreparedBags(kept, skipped, in_dim, list(cfg.classes))


def _write_skipped(path: Path, skipped: list[SkippedBag]) -> None:
    """``skipped_bags.csv`` beside the results when bags were skipped (a stale one is removed otherwise)."""
    if not skipped:
        path.unlink(missing_ok=True)
        return
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["slide_id", "path", "task", "split", "manifest_line", "reason"])
    for s in skipped:
        r = s.record
        w.writerow([r.slide_id, r.path, r.task, r.split, f"{r.manifest}:{r.line}" if r.manifest else "", s.reason])
    atomic_write_text(path, buf.getvalue())


def _seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class ContinualRunner:
    def __init__(self, cfg: ContinualConfig, bags: PreparedBags | None = None) -> None:
        """``bags``: already checked bags of the same manifest/tasks/classes (``compare`` checks them once)."""
        self.cfg = cfg
        self.data = bags or prepare_bags(cfg)  # before the output folder exists: a bad bag leaves nothing behind
        self.records, self.skipped, self.in_dim = self.data.records, self.data.skipped, self.data.in_dim
        self.strategy = STRATEGIES.get(cfg.strategy)(cfg, self.data)
        self.root = Path(cfg.out_dir) / f"{cfg.strategy}-{cfg.setting}"
        self.root.mkdir(parents=True, exist_ok=True)
        _write_skipped(self.root / "skipped_bags.csv", self.skipped)
        self.state_path = self.root / "state.json"

    # --- state -----------------------------------------------------------------------------------------
    def _load_state(self) -> dict[str, Any]:
        if self.state_path.is_file():
            state = json.loads(self.state_path.read_text())
            if state.get("config") != asdict(self.cfg):
                raise ContinualError(f"{self.state_path}: written by a different configuration; use another out_dir")
            return state
        return {
            "config": asdict(self.cfg), "done": 0, "R": [], "I": [], "IA": [], "B": [], "train_time_s": 0.0,
            "peak_rss_mib": 0.0,
        }  # fmt: skip

    def _save_state(self, state: dict[str, Any]) -> None:
        atomic_write_text(self.state_path, json.dumps(state, indent=2, default=float) + "\n")

    def _set_adapters(self, net: torch.nn.Module, t_eval: int | None) -> None:
        """Switch on the adapters that serve task ``t_eval`` (None: all again); a no-op without adapters."""
        if isinstance(net, adapters.AdapterModel):
            set_active_tasks(net, None if t_eval is None else self.strategy.active_adapters(t_eval))

    # --- evaluation ------------------------------------------------------------------------------------
    def evaluate(self, net: torch.nn.Module, t_trained: int) -> dict[str, list[float]]:
        """On every task the strategy has seen after step ``t_trained``: bag accuracy (``R``), tile AUC
        (``I``), tile accuracy at the Youden threshold (``IA``, CoMEL's localization accuracy; tiles pooled
        over the task's test bags as the official evaluation does) and the AUC of the bag tumour probability
        (``B``). Tile metrics are NaN where bags carry no tile labels."""
        cfg = self.cfg
        out: dict[str, list[float]] = {"R": [], "I": [], "IA": [], "B": []}
        seen = self.strategy.tasks_seen(t_trained)
        normals = cfg.normal_classes
        for j in seen:
            allowed = cfg.allowed(j) if cfg.setting == "task" else cfg.allowed(seen[-1])
            self._set_adapters(net, j)
            correct, n, scores, labels, p_tumour, is_tumour = 0, 0, [], [], [], []
            for bag in self.data.loaded(self.data.bags(cfg.tasks[j], "test")):
                pred = predict_bag(net, bag, allowed, normals)
                correct += int(int(pred["probs"].argmax()) == bag["label"])
                n += 1
                p_tumour.append(float(1.0 - pred["probs"][normals].sum()))
                is_tumour.append(int(bag["label"] not in normals))
                if bag["instance_labels"] is not None:
                    scores.append(self._tile_scores(pred))
                    labels.append(bag["instance_labels"])
            self._set_adapters(net, None)
            out["R"].append(correct / max(n, 1))
            loc = localization_metrics(torch.cat(scores), torch.cat(labels)) if scores else {}
            out["I"].append(loc.get("auc", float("nan")))
            out["IA"].append(loc.get("accuracy", float("nan")))
            out["B"].append(bag_auc(torch.tensor(p_tumour), torch.tensor(is_tumour)))
        return out

    def _tile_scores(self, pred: dict[str, Any]) -> torch.Tensor:
        """Per-tile tumour scores: with BPPL, what it trained (CoMEL: the min-max normalised attention;
        ``legacy``: the instance head), else attention relative to the bag's most attended tile times the bag's
        tumour probability (so tiles of benign-looking bags stay low and scores are comparable across slides,
        as the instance AUC pools them)."""
        if self.cfg.bppl_on:
            legacy = BPPLConfig(**self.cfg.bppl).variant == "legacy"
            return pred["tile_scores"] if legacy else pred["attention_scores"]
        p_tumour = 1.0 - pred["probs"][self.cfg.normal_classes].sum()
        return p_tumour * pred["attention"] / pred["attention"].max().clamp_min(1e-12)

    # --- the loop --------------------------------------------------------------------------------------
    def run(self, crash_after_task: int | None = None) -> dict[str, Any]:
        cfg, strategy = self.cfg, self.strategy
        state = self._load_state()
        _seed(cfg.seed)
        state["skipped_bags"] = [
            {"slide_id": s.record.slide_id, "path": str(s.record.path), "reason": s.reason} for s in self.skipped
        ]
        net: torch.nn.Module = MILNet(cfg.model, self.in_dim, len(cfg.classes), **cfg.model_kwargs)
        if state["done"]:
            net = self._resume(net, state)
            log.info("resuming %s after task %d", self.root, state["done"])
        for t in range(state["done"], strategy.n_steps()):
            _seed(cfg.seed + t)
            net.eval()  # what before_task measures (inputs, Fisher terms) never depends on the mode left behind
            net = strategy.before_task(net, t)
            tasks = strategy.train_tasks(t)
            module = ContinualMILModule(
                net, strategy.train_classes(t), cfg.normal_of(), cfg.bppl_on, BPPLConfig(**cfg.bppl), cfg.lr,
                cfg.weight_decay, **strategy.module_kwargs(t), strategy=strategy, step=t,
            )  # fmt: skip
            dm = BagDataModule(self.records, cfg.classes, tasks, replay=strategy.replay_bags(t), seed=cfg.seed + t)
            trainer = pl.Trainer(
                max_epochs=cfg.epochs, accelerator=cfg.accelerator, devices=1, logger=False,
                enable_checkpointing=False, enable_progress_bar=cfg.progress, enable_model_summary=False,
                num_sanity_val_steps=0, default_root_dir=str(self.root), limit_val_batches=0,
            )  # fmt: skip
            t0 = time.perf_counter()
            trainer.fit(module, dm)
            net = strategy.after_task(net, t)
            state["train_time_s"] += time.perf_counter() - t0
            scores = self.evaluate(net, t)
            self._check_finite(t, tasks, trainer, net, scores["R"])
            for key, row in scores.items():
                state.setdefault(key, []).append(row)
            state["peak_rss_mib"] = max(
                state["peak_rss_mib"], resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            )
            task_dir = self.root / f"task_{t}"
            meta = {"format": CHECKPOINT_FORMAT, "task": str(t), "model": cfg.model, "strategy": cfg.strategy}
            atomic_write_bytes(task_dir / NET_FILE, _tensor_bytes(net.state_dict(), meta))
            tensors, values = strategy.save_state()
            if tensors:
                atomic_write_bytes(task_dir / STRATEGY_FILE, _tensor_bytes(tensors, meta))
            state["strategy_state"] = values
            if isinstance(net, adapters.AdapterModel):
                adapters.save(net, task_dir / "adapters")
            state["done"] = t + 1
            self._save_state(state)
            log.info("task %d (%s) done: accuracies %s", t, tasks, [round(a, 3) for a in scores["R"]])
            if crash_after_task == t:
                raise InjectedCrash(f"injected crash after task {t}")
        self._report(net, state)
        return state

    # --- resuming -------------------------------------------------------------------------------------
    def _resume(self, net: torch.nn.Module, state: dict[str, Any]) -> torch.nn.Module:
        """The net and strategy state after the ``state["done"]`` finished steps, rebuilt without training:
        each step's structure changes are replayed (seeded as the step was) on the weights it started from,
        then its saved state dict is loaded strictly; the strategy's state of the last step is restored."""
        done = state["done"]
        for t in range(done):
            _seed(self.cfg.seed + t)
            net.eval()  # as before before_task in run()
            net = self.strategy.rebuild(net, t)
            self._load_net(net, self.root / f"task_{t}")
        last = self.root / f"task_{done - 1}" / STRATEGY_FILE
        tensors = self._read_tensors(last) if last.is_file() else {}
        self.strategy.load_state(tensors, state.get("strategy_state", {}))
        return net

    def _read_tensors(self, path: Path) -> dict[str, torch.Tensor]:
        try:
            return load_safetensors(path)
        except Exception as e:  # SafetensorError, OSError: the file is at fault
            raise ContinualError(f"{path}: not a readable checkpoint ({e}); delete {self.root} and rerun") from e

    def _load_net(self, net: torch.nn.Module, task_dir: Path) -> None:
        """Copy ``task_dir``'s saved state dict into ``net`` (strictly) and refuse NaN/Inf weights."""
        path = task_dir / NET_FILE
        if not path.is_file():
            if (task_dir / "net.pt").is_file():
                raise StaleCheckpointError(
                    f"{task_dir}: holds a pickled net.pt from an older pathopeft, which cannot be resumed; "
                    f"delete {self.root} and rerun"
                )
            raise ContinualError(
                f"{path}: missing, though state.json says this task finished; delete {self.root} and rerun"
            )
        sd = self._read_tensors(path)
        for name, mod in net.named_modules():  # adapters whose shapes depend on data grow to the saved ones
            if isinstance(mod, adapters.Delta):
                prefix = f"{name}."
                mod.before_load({k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)})
        try:
            net.load_state_dict(sd, strict=True)
        except RuntimeError as e:
            why = " ".join(str(e).split())
            raise ContinualError(
                f"{path}: does not fit the net rebuilt from the configuration ({why[:300]}); "
                f"delete {self.root} and rerun"
            ) from e
        bad = _non_finite(net)
        if bad:  # written before non-finite tasks were refused: resuming would carry the NaNs on
            raise NonFiniteTrainingError(
                f"{path}: {bad} (saved before non-finite tasks were refused); delete {self.root} and rerun"
            )

    def _check_finite(
        self, t: int, tasks: list[str], trainer: pl.Trainer, net: torch.nn.Module, accs: list[float]
    ) -> None:
        """Refuse to mark task ``t`` done when its loss, weights or accuracies are NaN/Inf: a saved NaN net
        would be resumed from and every later task would train on it. (Instance AUCs may be NaN: no labels.)"""
        reason = None
        for key, value in sorted(trainer.callback_metrics.items()):
            v = float(value)
            if key.startswith("train/") and not math.isfinite(v):
                reason = f"training loss {key} is {v}"
                break
        reason = reason or _non_finite(net)
        if reason is None:
            bad = [j for j, a in enumerate(accs) if not math.isfinite(a)]
            reason = f"accuracy on task(s) {bad} is not finite" if bad else None
        if reason:
            resume = f"a rerun resumes after task {t - 1}" if t else "nothing was saved"
            raise NonFiniteTrainingError(
                f"task {t} ({'+'.join(tasks)!r}), strategy {self.cfg.strategy}: {reason}; the task was not saved "
                f"(check the bags' features and the learning rate {self.cfg.lr}); {resume}"
            )

    def _matrix(self, rows: list[list[float]]) -> np.ndarray:
        """The T×T matrix of per-step evaluations: step ``i``'s row lands on the last task it has seen."""
        t = len(self.cfg.tasks)
        m = np.full((t, t), np.nan)
        for i, row in enumerate(rows):
            m[self.strategy.tasks_seen(i)[-1], : len(row)] = row
        return m

    def extra_matrices(self, state: dict[str, Any]) -> dict[str, np.ndarray]:
        """The tile AUC, tile accuracy and bag AUC matrices of a run's state, as report keyword arguments."""
        keys = {"instance_auc": "I", "instance_acc": "IA", "bag_auc": "B"}
        return {name: self._matrix(state[k]) for name, k in keys.items() if len(state.get(k, [])) == len(state["R"])}

    def _report(self, net: torch.nn.Module, state: dict[str, Any]) -> None:
        cfg = self.cfg
        report = ContinualReport(task_names=list(cfg.tasks))
        report.add(
            cfg.strategy, self._matrix(state["R"]), **self.extra_matrices(state), train_time_s=state["train_time_s"],
            peak_memory_mib=state["peak_rss_mib"],
        )  # fmt: skip
        report.to_csv(self.root / "results.csv")
        atomic_write_text(self.root / "results.md", report.to_markdown() + "\n")
        report.plot_matrix(self.root / f"R_{cfg.strategy}.png", cfg.strategy)
        self._score_test_bags(net)

    def _score_test_bags(self, net: torch.nn.Module) -> None:
        """One pass of the final model over every test bag: ``tile_scores.h5`` (level-0 coords, tile scores,
        tile ground truth when known) and heatmaps of the first ``heatmaps`` positive bags of each task."""
        cfg = self.cfg
        heat = self.root / "heatmaps"
        heat.mkdir(exist_ok=True)
        final = cfg.allowed(len(cfg.tasks) - 1) if cfg.setting == "class" else None
        rows = []
        for j, task in enumerate(cfg.tasks):
            self._set_adapters(net, j)
            plotted = 0
            for rec in self.data.bags(task, "test"):
                bag = load_bag(rec.path, rec.slide_id)
                scores = self._tile_scores(predict_bag(net, bag, final or cfg.allowed(j), cfg.normal_classes))
                labels = None if bag["instance_labels"] is None else bag["instance_labels"].numpy()
                rows.append((rec.slide_id, bag["coords"].numpy(), scores.numpy(), labels, float(bag["tile_size_l0"])))
                tile_scores_geojson(
                    bag["coords"].numpy(),
                    scores.numpy(),
                    bag["tile_size_l0"],
                    heat / f"{rec.slide_id}.geojson",
                    labels=labels,
                )  # QuPath: File › Import objects
                if cfg.cls(rec.label) not in cfg.normal_classes and plotted < cfg.heatmaps:
                    plotted += 1
                    thumb, ds = _thumbnail(rec, bag)
                    plot_instance_heatmap(
                        bag["coords"].numpy(), scores.numpy(), bag["tile_size_l0"], heat / f"{rec.slide_id}.png",
                        thumbnail=thumb, thumbnail_downsample=ds, labels=labels,
                        title=f"{cfg.strategy}: {rec.slide_id} ({rec.label})",
                    )  # fmt: skip
            self._set_adapters(net, None)
        _write_scores(self.root / "tile_scores.h5", rows)


def _write_scores(path: Path, rows: list[tuple[str, np.ndarray, np.ndarray, np.ndarray | None, float]]) -> None:
    with atomic_h5(path) as f:
        for slide_id, coords, scores, labels, tile_size_l0 in rows:
            g = f.create_group(slide_id)
            g.attrs["tile_size_l0"] = tile_size_l0
            g["coords"] = coords
            g["scores"] = scores
            if labels is not None:
                g["instance_labels"] = labels


def _thumbnail(rec: BagRecord, bag: dict[str, Any]) -> tuple[np.ndarray | None, float]:
    if rec.thumbnail is None or not rec.thumbnail.is_file():
        return None, 1.0
    from PIL import Image

    img = np.asarray(Image.open(rec.thumbnail).convert("RGB"))
    extent = float(bag["coords"][:, 0].max()) + bag["tile_size_l0"] if len(bag["coords"]) else img.shape[1]
    return img, extent / img.shape[1]


def run_continual(cfg: ContinualConfig, crash_after_task: int | None = None) -> dict[str, Any]:
    """Run (or resume) one strategy on one task sequence; see the module docstring."""
    return ContinualRunner(cfg).run(crash_after_task)


def compare(cfg: ContinualConfig, strategies: list[str], out: str | os.PathLike[str] | None = None) -> ContinualReport:
    """Run several strategies on the same data/seed/setting and gather them in one report."""
    for s in strategies:  # every name before the first run: UnknownPluginError lists the known ones
        STRATEGIES.entry(s)
    report = ContinualReport(task_names=list(cfg.tasks))
    bags = prepare_bags(cfg)  # once for all strategies, before the first one trains
    for strategy in strategies:
        runner = ContinualRunner(dataclasses.replace(cfg, strategy=strategy), bags)
        state = runner.run()
        report.add(
            runner.cfg.strategy, runner._matrix(state["R"]), **runner.extra_matrices(state),
            train_time_s=state["train_time_s"], peak_memory_mib=state["peak_rss_mib"],
        )  # fmt: skip
    root = Path(out or cfg.out_dir)
    report.to_csv(root / f"compare-{cfg.setting}.csv")
    atomic_write_text(root / f"compare-{cfg.setting}.md", report.to_markdown() + "\n")
    return report
