"""The continual runner: train task after task, evaluate on every task seen, save, resume after a crash.

One run = one strategy on one task sequence:

* ``comel``     — GDAT (or any registered model) + BPPL instance head; task 1 trains the whole net, every later
  task adds an OWLoRA adapter (orthogonal to earlier adapters and to earlier tasks' input subspaces, per-task
  weight) on all its linear layers, bag and instance classifiers included. Rehearsal-free.
* ``owlora``    — the same without BPPL (ablation).
* ``lora``      — one plain LoRA per later task (no orthogonality, no weights): the adapter baseline.
* ``finetune``  — keep training the same net (lower bound).
* ``ewc``       — finetune + elastic weight consolidation (Kirkpatrick et al. 2017).
* ``replay``    — finetune + a small buffer of earlier tasks' training bags (experience replay).
* ``joint``     — one training run on all tasks together (upper bound).

Settings: ``class`` incremental (one label space, no task id at test time) or ``task`` incremental (the
task id selects the classes, and for adapter strategies the adapters up to that task).

After every task the runner writes ``task_<t>/net.pt`` (the whole net, for resuming), the adapters as
safetensors (``task_<t>/adapters``) and ``state.json`` (atomically); a rerun resumes after the last finished
task. Results: ``results.csv``, ``results.md``, ``R_<strategy>.png`` and per-slide heatmaps.

Before any training every bag of the configured tasks is checked once (:func:`prepare_bags`): a bad file
stops the run in seconds with one line naming it; bags with 0 tiles are skipped and listed in
``skipped_bags.csv`` and ``state.json``. A task that trains into NaN/Inf is never saved, so a rerun resumes
after the last good task.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import random
import resource
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch

from pathopeft import adapters
from pathopeft.adapters.owlora import collect_inputs, next_task, protect_current, set_active_tasks
from pathopeft.errors import UserError
from pathopeft.mil import metrics
from pathopeft.mil.bppl import BPPLConfig
from pathopeft.mil.data import (
    BagDataModule,
    BagDataset,
    BagManifestError,
    BagRecord,
    SkippedBag,
    load_bag,
    read_bag_manifest,
    validate_bags,
)
from pathopeft.mil.module import ContinualMILModule, MILNet, fisher_diagonal, predict_bag

log = logging.getLogger(__name__)
STRATEGIES = ("comel", "owlora", "lora", "finetune", "ewc", "replay", "joint")
ADAPTER_STRATEGIES = ("comel", "owlora", "lora")


class InjectedCrash(RuntimeError):
    """Raised by ``crash_after_task`` (tests of resume)."""


class ContinualError(UserError, ValueError):
    """A run that cannot start as configured (config file, out_dir); the message names the file."""


class NonFiniteTrainingError(UserError, RuntimeError):
    """A task trained into NaN/Inf (loss, weights or accuracy): it is not saved, so earlier tasks stay the
    resume point instead of a poisoned checkpoint."""


@dataclass
class ContinualConfig:
    manifest: str
    out_dir: str
    strategy: str = "comel"
    setting: str = "class"
    classes: list[str] = field(default_factory=lambda: ["benign", "aca", "scc"])
    tasks: list[str] = field(default_factory=lambda: ["aca", "scc"])
    task_class: dict[str, str] = field(default_factory=dict)  # task → its tumour class (default: same name)
    benign: str = "benign"
    model: str = "gdat"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    epochs: int = 10
    lr: float = 2e-4
    weight_decay: float = 1e-4
    seed: int = 0
    use_bppl: bool | None = None  # default: only for comel
    bppl: dict[str, Any] = field(default_factory=dict)
    owlora: dict[str, Any] = field(default_factory=lambda: {"r": 8})
    ewc_lambda: float = 50.0
    replay_per_task: int = 4
    collect_bags: int = 32  # training bags per task used to estimate the input subspaces
    heatmaps: int = 2  # per task, from the test split, with the final model
    train_classes: str = "current"  # logits trained per task: "current" (benign + this task's class) or "seen"
    accelerator: str = "cpu"
    progress: bool = False

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy {self.strategy!r} unknown; choose from {STRATEGIES}")
        if self.setting not in ("class", "task"):
            raise ValueError(f"setting must be 'class' or 'task', got {self.setting!r}")
        if self.train_classes not in ("current", "seen"):
            raise ValueError(f"train_classes must be 'current' or 'seen', got {self.train_classes!r}")
        if self.benign not in self.classes:
            raise ValueError(f"benign class {self.benign!r} is not in classes {self.classes}")
        for t in self.tasks:
            if self.task_class.get(t, t) not in self.classes:
                raise ValueError(f"task {t!r}: class {self.task_class.get(t, t)!r} is not in classes {self.classes}")

    @property
    def bppl_on(self) -> bool:
        return self.use_bppl if self.use_bppl is not None else self.strategy == "comel"

    def cls(self, name: str) -> int:
        return self.classes.index(name)

    def train_allowed(self, t: int) -> list[int]:
        """Classes in the training softmax of task ``t``. "current" keeps old classes' logits out of the loss,
        so learning a new class does not push the old ones down (the usual rehearsal-free CIL masking, as in
        L2P/DualPrompt); used by every strategy alike."""
        if self.strategy == "replay" and self.setting == "class":  # replayed bags carry earlier classes
            return self.allowed(t)
        if self.train_classes == "current" or self.setting == "task":
            return [self.cls(self.benign), self.cls(self.task_class.get(self.tasks[t], self.tasks[t]))]
        return self.allowed(t)

    def allowed(self, t: int) -> list[int]:
        """Classes the model may predict while training task ``t`` (and when evaluating task ``t`` in TIL)."""
        if self.setting == "task":
            return [self.cls(self.benign), self.cls(self.task_class.get(self.tasks[t], self.tasks[t]))]
        return [self.cls(self.benign)] + [self.cls(self.task_class.get(s, s)) for s in self.tasks[: t + 1]]


def _atomic_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=float) + "\n")
    os.replace(tmp, path)


def _non_finite(net: torch.nn.Module) -> str | None:
    """The first parameter (or floating buffer) of ``net`` holding NaN/Inf, described; None if all finite."""
    tensors = [("parameter", n, p) for n, p in net.named_parameters()]
    tensors += [("buffer", n, b) for n, b in net.named_buffers() if b.is_floating_point()]
    for kind, name, x in tensors:
        bad = int((~torch.isfinite(x.detach())).sum())
        if bad:
            return f"{kind} {name} holds {bad} non-finite value(s) of {x.numel()}"
    return None


@dataclass
class PreparedBags:
    """The checked bags of a run: those kept, those skipped (with reasons) and their feature dimension."""

    records: list[BagRecord]
    skipped: list[SkippedBag]
    in_dim: int


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
    return PreparedBags(kept, skipped, in_dim)


def _write_skipped(path: Path, skipped: list[SkippedBag]) -> None:
    """``skipped_bags.csv`` beside the results when bags were skipped (a stale one is removed otherwise)."""
    if not skipped:
        path.unlink(missing_ok=True)
        return
    tmp = path.with_suffix(".csv.tmp")
    with tmp.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["slide_id", "path", "task", "split", "manifest_line", "reason"])
        for s in skipped:
            r = s.record
            w.writerow([r.slide_id, r.path, r.task, r.split, f"{r.manifest}:{r.line}" if r.manifest else "", s.reason])
    os.replace(tmp, path)


def _seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class ContinualRunner:
    def __init__(self, cfg: ContinualConfig, bags: PreparedBags | None = None) -> None:
        """``bags``: already checked bags of the same manifest/tasks/classes (``compare`` checks them once)."""
        self.cfg = cfg
        bags = bags or prepare_bags(cfg)  # before the output folder exists: a bad bag leaves nothing behind
        self.records, self.skipped, self.in_dim = bags.records, bags.skipped, bags.in_dim
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
        return {"config": asdict(self.cfg), "done": 0, "R": [], "I": [], "train_time_s": 0.0, "peak_rss_mib": 0.0}

    def _bags(self, task: str, split: str) -> list[BagRecord]:
        return [r for r in self.records if r.task == task and r.split == split]

    def _loaded(self, records: list[BagRecord], limit: int | None = None) -> list[dict[str, Any]]:
        ds = BagDataset(records, self.cfg.classes)
        idx = range(len(ds)) if limit is None else range(min(limit, len(ds)))
        return [ds[i] for i in idx]

    # --- strategy hooks --------------------------------------------------------------------------------
    def _before_task(self, net: torch.nn.Module, t: int) -> torch.nn.Module:
        cfg = self.cfg
        if cfg.strategy not in ADAPTER_STRATEGIES or t == 0:
            return net
        prev = self._loaded(self._bags(cfg.tasks[t - 1], "train"), cfg.collect_bags)

        def forward(bag: dict[str, Any]) -> None:
            net(bag["features"], bag["coords"].float())

        if t == 1:
            kw = dict(cfg.owlora)
            if cfg.strategy == "lora":
                kw.update(orthogonal=False, weighted=False)
            net = adapters.create("owlora", net, targets="all-linear", **kw)
            collect_inputs(net, prev, forward)
            protect_current(net)
        else:
            collect_inputs(net, prev, forward)
            next_task(net)
        return net

    def _active_tasks(self, t_eval: int) -> list[int] | None:
        """TIL with adapters: adapters up to the evaluated task (adapter s serves task s + 1)."""
        if self.cfg.setting == "task" and self.cfg.strategy in ADAPTER_STRATEGIES:
            return list(range(t_eval))
        return None

    # --- evaluation ------------------------------------------------------------------------------------
    def evaluate(self, net: torch.nn.Module, t_trained: int) -> tuple[list[float], list[float]]:
        cfg = self.cfg
        accs, aucs = [], []
        last = len(cfg.tasks) - 1 if cfg.strategy == "joint" else t_trained  # joint has seen every task
        for j in range(last + 1):
            allowed = cfg.allowed(j) if cfg.setting == "task" else cfg.allowed(last)
            if self._is_adapted(net):
                set_active_tasks(net, self._active_tasks(j))
            correct, n, scores, labels = 0, 0, [], []
            for bag in self._loaded(self._bags(cfg.tasks[j], "test")):
                pred = predict_bag(net, bag, allowed, cfg.cls(cfg.benign))
                correct += int(int(pred["probs"].argmax()) == bag["label"])
                n += 1
                if bag["instance_labels"] is not None:
                    s = self._tile_scores(pred)
                    scores.append(s)
                    labels.append(bag["instance_labels"])
            if self._is_adapted(net):
                set_active_tasks(net, None)
            accs.append(correct / max(n, 1))
            inst = metrics.instance_metrics(torch.cat(scores), torch.cat(labels))["auc"] if scores else float("nan")
            aucs.append(inst)
        return accs, aucs

    def _tile_scores(self, pred: dict[str, Any]) -> torch.Tensor:
        """Per-tile tumour scores: BPPL's instance head when trained, else attention relative to the bag's
        most attended tile times the bag's tumour probability (so tiles of benign-looking bags stay low and
        scores are comparable across slides, as the instance AUC pools them)."""
        if self.cfg.bppl_on:
            return pred["tile_scores"]
        p_tumour = 1.0 - pred["probs"][self.cfg.cls(self.cfg.benign)]
        return p_tumour * pred["attention"] / pred["attention"].max().clamp_min(1e-12)

    @staticmethod
    def _is_adapted(net: torch.nn.Module) -> bool:
        return isinstance(net, adapters.AdapterModel)

    # --- the loop --------------------------------------------------------------------------------------
    def run(self, crash_after_task: int | None = None) -> dict[str, Any]:
        cfg = self.cfg
        state = self._load_state()
        _seed(cfg.seed)
        n_tasks = 1 if cfg.strategy == "joint" else len(cfg.tasks)
        state["skipped_bags"] = [
            {"slide_id": s.record.slide_id, "path": str(s.record.path), "reason": s.reason} for s in self.skipped
        ]
        if state["done"]:
            ckpt = self.root / f"task_{state['done'] - 1}" / "net.pt"
            net = torch.load(ckpt, weights_only=False)
            bad = _non_finite(net)
            if bad:  # written before non-finite tasks were refused: resuming would carry the NaNs on
                raise NonFiniteTrainingError(
                    f"{ckpt}: {bad} (saved before non-finite tasks were refused); delete {self.root} and rerun"
                )
            log.info("resuming %s after task %d", self.root, state["done"])
        else:
            net = MILNet(cfg.model, self.in_dim, len(cfg.classes), **cfg.model_kwargs)
        ewc: dict[str, Any] = {}
        replay: list[BagRecord] = []
        for t in range(state["done"], n_tasks):
            _seed(cfg.seed + t)
            if cfg.strategy == "ewc" and t > 0:
                prev = self._loaded(self._bags(cfg.tasks[t - 1], "train"), cfg.collect_bags)
                ewc.update(fisher_diagonal(net, prev, cfg.train_allowed(t - 1)))  # one penalty per finished task
            if cfg.strategy == "replay" and t > 0:
                rng = random.Random(cfg.seed + t)
                pool = self._bags(cfg.tasks[t - 1], "train")
                replay += rng.sample(pool, min(cfg.replay_per_task, len(pool)))
            net = self._before_task(net, t)
            tasks = cfg.tasks if cfg.strategy == "joint" else [cfg.tasks[t]]
            allowed = list(range(len(cfg.classes))) if cfg.strategy == "joint" else cfg.train_allowed(t)
            module = ContinualMILModule(
                net, allowed, cfg.cls(cfg.benign), cfg.bppl_on, BPPLConfig(**cfg.bppl), cfg.lr, cfg.weight_decay,
                ewc=ewc if cfg.strategy == "ewc" else None, ewc_lambda=cfg.ewc_lambda,
            )  # fmt: skip
            dm = BagDataModule(self.records, cfg.classes, tasks, replay=replay, seed=cfg.seed + t)
            trainer = pl.Trainer(
                max_epochs=cfg.epochs, accelerator=cfg.accelerator, devices=1, logger=False,
                enable_checkpointing=False, enable_progress_bar=cfg.progress, enable_model_summary=False,
                num_sanity_val_steps=0, default_root_dir=str(self.root), limit_val_batches=0,
            )  # fmt: skip
            t0 = time.perf_counter()
            trainer.fit(module, dm)
            state["train_time_s"] += time.perf_counter() - t0
            accs, aucs = self.evaluate(net, t)
            self._check_finite(t, tasks, trainer, net, accs)
            state["R"].append(accs)
            state["I"].append(aucs)
            state["peak_rss_mib"] = max(
                state["peak_rss_mib"], resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            )
            task_dir = self.root / f"task_{t}"
            task_dir.mkdir(exist_ok=True)
            torch.save(net, task_dir / "net.pt.tmp")
            os.replace(task_dir / "net.pt.tmp", task_dir / "net.pt")
            if self._is_adapted(net):
                adapters.save(net, task_dir / "adapters")
            state["done"] = t + 1
            _atomic_json(self.state_path, state)
            log.info("task %d (%s) done: accuracies %s", t, tasks, [round(a, 3) for a in accs])
            if crash_after_task == t:
                raise InjectedCrash(f"injected crash after task {t}")
        self._report(net, state)
        return state

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
        t = len(self.cfg.tasks)
        m = np.full((t, t), np.nan)
        if self.cfg.strategy == "joint":  # one row, evaluated on every task: report it as the final row
            m[-1, :] = rows[-1]
            return m
        for i, row in enumerate(rows):
            m[i, : len(row)] = row
        return m

    def _report(self, net: torch.nn.Module, state: dict[str, Any]) -> None:
        cfg = self.cfg
        report = metrics.ContinualReport(task_names=list(cfg.tasks))
        report.add(
            cfg.strategy, self._matrix(state["R"]), instance_auc=self._matrix(state["I"]),
            train_time_s=state["train_time_s"], peak_memory_mib=state["peak_rss_mib"],
        )  # fmt: skip
        report.to_csv(self.root / "results.csv")
        (self.root / "results.md").write_text(report.to_markdown() + "\n")
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
            if self._is_adapted(net):
                set_active_tasks(net, self._active_tasks(j))
            plotted = 0
            for rec in self._bags(task, "test"):
                bag = load_bag(rec.path, rec.slide_id)
                scores = self._tile_scores(predict_bag(net, bag, final or cfg.allowed(j), cfg.cls(cfg.benign)))
                labels = None if bag["instance_labels"] is None else bag["instance_labels"].numpy()
                rows.append((rec.slide_id, bag["coords"].numpy(), scores.numpy(), labels))
                if rec.label != cfg.benign and plotted < cfg.heatmaps:
                    plotted += 1
                    thumb, ds = _thumbnail(rec, bag)
                    metrics.plot_instance_heatmap(
                        bag["coords"].numpy(), scores.numpy(), bag["tile_size_l0"], heat / f"{rec.slide_id}.png",
                        thumbnail=thumb, thumbnail_downsample=ds, labels=labels,
                        title=f"{cfg.strategy}: {rec.slide_id} ({rec.label})",
                    )  # fmt: skip
            if self._is_adapted(net):
                set_active_tasks(net, None)
        _write_scores(self.root / "tile_scores.h5", rows)


def _write_scores(path: Path, rows: list[tuple[str, np.ndarray, np.ndarray, np.ndarray | None]]) -> None:
    import h5py

    tmp = path.with_suffix(".h5.tmp")
    with h5py.File(tmp, "w") as f:
        for slide_id, coords, scores, labels in rows:
            g = f.create_group(slide_id)
            g["coords"] = coords
            g["scores"] = scores
            if labels is not None:
                g["instance_labels"] = labels
    os.replace(tmp, path)


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


def load_config(path: str | os.PathLike[str], **overrides: Any) -> ContinualConfig:
    """A :class:`ContinualConfig` from YAML; ``overrides`` (not None) replace its fields. Relative paths are
    relative to the working directory (run from the repository root, as the README does)."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ContinualError(f"{p}: config not found")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ContinualError(f"{p}: not valid YAML ({' '.join(str(e).split())})") from e
    if not isinstance(data, dict):
        raise ContinualError(f"{p}: expected a mapping of ContinualConfig fields")
    data.update({k: v for k, v in overrides.items() if v is not None})
    known = set(ContinualConfig.__dataclass_fields__)
    unknown = sorted(set(data) - known)
    if unknown:
        raise ContinualError(f"{p}: unknown field(s) {unknown}; known: {sorted(known)}")
    try:
        return ContinualConfig(**data)
    except ValueError as e:
        raise ContinualError(f"{p}: {e}") from e


def compare(
    cfg: ContinualConfig, strategies: list[str], out: str | os.PathLike[str] | None = None
) -> metrics.ContinualReport:
    """Run several strategies on the same data/seed/setting and gather them in one report."""
    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown:
        raise ContinualError(f"strategies {unknown} unknown; choose from {list(STRATEGIES)}")
    report = metrics.ContinualReport(task_names=list(cfg.tasks))
    bags = prepare_bags(cfg)  # once for all strategies, before the first one trains
    for strategy in strategies:
        run_cfg = ContinualConfig(**{**asdict(cfg), "strategy": strategy})
        runner = ContinualRunner(run_cfg, bags)
        state = runner.run()
        report.add(
            strategy, runner._matrix(state["R"]), instance_auc=runner._matrix(state["I"]),
            train_time_s=state["train_time_s"], peak_memory_mib=state["peak_rss_mib"],
        )  # fmt: skip
    root = Path(out or cfg.out_dir)
    report.to_csv(root / f"compare-{cfg.setting}.csv")
    (root / f"compare-{cfg.setting}.md").write_text(report.to_markdown() + "\n")
    return report
