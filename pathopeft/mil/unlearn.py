"""Forgetting a withdrawn class or cohort of a trained MIL slide classifier with LoKU (``pathopeft mil unlearn``).

LoKU (:mod:`pathopeft.adapters.loku`; Cha et al., arXiv 2408.10682) on bags: PEFT LoRA on the layers the OWLoRA
recipe adapts (:func:`pathopeft.mil.strategies.adapter.adapted_layers`), initialised by FILA from the base net's
Fisher importance on the forget bags relative to the retained ones (output unchanged at init), then trained on
the inverted hinge loss of a forget bag plus the cross-entropy of a retained bag per step. Only the LoRA factors
train; the classifier and every other weight stay as trained.

What is forgotten: every training bag whose label is ``forget`` (a class name) or, for a withdrawn cohort,
whose manifest ``site`` is ``forget_site``. Choices here (the paper's stopping rule is a fixed step count on
text): unlearning stops at ``steps``, or earlier as soon as the forget bags' training accuracy is at most
chance (1 / number of classes), checked every ``check_every`` steps, so the retained classes are not eroded
for nothing. The result is the merged net (``net_unlearned.safetensors``: base weights + LoRA, the same
architecture as before) and ``results_unlearn.json`` with per-class test accuracy before and after.

The exact, free baseline exists only where the forgotten data trained its own adapter (a per-task adapter of the
continual runner's adapter strategies): deleting that adapter forgets exactly. A class learned into shared
weights has no such baseline, which is what LoKU is for.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pathopeft.io import atomic_write_bytes, atomic_write_text
from pathopeft.mil.models import bag_accuracy, bag_logits, create_mil_model, load_mil_weights

log = logging.getLogger(__name__)


@dataclass
class UnlearnConfig:
    """One unlearning run: the bags, the trained net (or how to train one), what to forget, LoKU's settings."""

    manifest: str
    out_dir: str
    forget: str | None = None  # a class to forget (every bag with this label)
    forget_site: str | None = None  # or a cohort: every bag of this manifest ``site``
    classes: list[str] = field(default_factory=lambda: ["benign", "aca", "scc"])
    tasks: list[str] = field(default_factory=lambda: ["aca", "scc"])
    model: str = "abmil"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    init: str | None = None  # the trained net's .safetensors state dict; None: train one on every bag first
    pretrain_epochs: int = 10
    pretrain_lr: float = 1e-3
    rank: int = 8
    fila: bool = True  # False: PEFT's LoRA init (B = 0), the paper's ablation
    steps: int = 200
    lr: float = 1e-3
    check_every: int = 10
    seed: int = 0

    def __post_init__(self) -> None:
        self.forget, self.forget_site = self.forget or None, self.forget_site or None  # "" = not given
        if (self.forget is None) == (self.forget_site is None):
            raise ValueError("give exactly one of forget (a class) and forget_site (a cohort)")
        if self.forget is not None and self.forget not in self.classes:
            raise ValueError(f"forget: {self.forget!r} is not one of the classes {self.classes}")
        if self.rank < 1 or self.steps < 1 or self.check_every < 1:
            raise ValueError("rank, steps and check_every must be at least 1")


@torch.no_grad()
def per_class_accuracy(model: nn.Module, bags: list[dict[str, Any]], classes: list[str]) -> dict[str, float]:
    """Accuracy on the bags of each class (classes without bags are left out)."""
    model.eval()
    hits: dict[str, list[int]] = {}
    for b in bags:
        hits.setdefault(classes[int(b["label"])], []).append(int(bag_logits(model, b).argmax()) == int(b["label"]))
    return {c: sum(h) / len(h) for c, h in hits.items()}


def _pretrain(net: nn.Module, bags: list[dict[str, Any]], cfg: UnlearnConfig) -> None:
    opt = torch.optim.Adam(net.parameters(), lr=cfg.pretrain_lr)
    rng = random.Random(cfg.seed)
    net.train()
    for _ in range(cfg.pretrain_epochs):
        for i in rng.sample(range(len(bags)), len(bags)):
            opt.zero_grad()
            F.cross_entropy(bag_logits(net, bags[i])[None], torch.as_tensor([bags[i]["label"]])).backward()
            opt.step()


def run_unlearn(cfg: UnlearnConfig) -> dict[str, Any]:
    """Unlearn ``cfg``'s class or cohort; write the merged net and ``results_unlearn.json`` into ``out_dir``."""
    import peft
    from safetensors.torch import save as safetensors_bytes

    from pathopeft.adapters.loku import fila_init, fisher_diagonals, unlearn_step_loss
    from pathopeft.mil.data import PreparedBags, read_bag_manifest, validate_bags
    from pathopeft.mil.strategies.adapter import adapted_layers

    records = [r for r in read_bag_manifest(Path(cfg.manifest), extra_columns=()) if r.task in cfg.tasks]
    kept, _, in_dim = validate_bags(records, cfg.classes)
    data = PreparedBags(kept, [], in_dim, list(cfg.classes))

    def forgotten(r: Any) -> bool:
        return r.label == cfg.forget if cfg.forget is not None else r.extra.get("site") == cfg.forget_site

    train = [r for r in data.records if r.split == "train"]
    forget_train = data.loaded([r for r in train if forgotten(r)])
    retain_train = data.loaded([r for r in train if not forgotten(r)])
    if not forget_train or not retain_train:
        what = f"class {cfg.forget!r}" if cfg.forget is not None else f"site {cfg.forget_site!r}"
        raise ValueError(f"{cfg.manifest}: {what} leaves {len(forget_train)} bags to forget and "
                         f"{len(retain_train)} to retain in the training split; both must be non-empty")  # fmt: skip
    test_recs = [r for r in data.records if r.split == "test"]
    test_forget, test_retain = (
        data.loaded([r for r in test_recs if forgotten(r)]),
        data.loaded([r for r in test_recs if not forgotten(r)]),
    )

    torch.manual_seed(cfg.seed)
    net = create_mil_model(cfg.model, in_dim, len(cfg.classes), **cfg.model_kwargs)
    if cfg.init:  # a plain net's state dict, or a continual run's task_<t>/net.safetensors
        load_mil_weights(net, cfg.init)
    else:
        _pretrain(net, forget_train + retain_train, cfg)
    before = per_class_accuracy(net, test_forget + test_retain, cfg.classes)
    acc_before = (bag_accuracy(net, test_forget), bag_accuracy(net, test_retain))

    lora = peft.LoraConfig(r=cfg.rank, lora_alpha=cfg.rank, target_modules=adapted_layers(net), lora_dropout=0.0)
    model = peft.get_peft_model(net, lora)
    if cfg.fila:

        def loss_fn(m: nn.Module, bag: dict[str, Any]) -> tuple[torch.Tensor, int]:
            return F.cross_entropy(bag_logits(m, bag)[None], torch.as_tensor([bag["label"]])), 1

        fila_init(
            model, fisher_diagonals(model, forget_train, loss_fn), fisher_diagonals(model, retain_train, loss_fn)
        )
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)
    rng = random.Random(cfg.seed)
    chance = 1.0 / len(cfg.classes)
    steps_done = 0
    for step in range(1, cfg.steps + 1):
        model.train()
        fb, rb = rng.choice(forget_train), rng.choice(retain_train)
        opt.zero_grad()
        loss = unlearn_step_loss(bag_logits(model, fb)[None], torch.as_tensor([fb["label"]]), bag_logits(model, rb)[None],
                                 torch.as_tensor([rb["label"]]))  # fmt: skip
        loss.backward()
        opt.step()
        steps_done = step
        if step % cfg.check_every == 0:
            acc = bag_accuracy(model, forget_train)
            log.info("unlearn step %d: forget-train accuracy %.3f", step, acc)
            if acc <= chance:
                break
    merged = model.merge_and_unload()
    after = per_class_accuracy(merged, test_forget + test_retain, cfg.classes)
    acc_after = (bag_accuracy(merged, test_forget), bag_accuracy(merged, test_retain))
    result = {
        "config": asdict(cfg), "steps": steps_done, "chance": chance,
        "test_forget_acc": {"before": acc_before[0], "after": acc_after[0]},
        "test_retain_acc": {"before": acc_before[1], "after": acc_after[1]},
        "per_class_before": before, "per_class_after": after,
        "bags": {"forget_train": len(forget_train), "retain_train": len(retain_train),
                 "forget_test": len(test_forget), "retain_test": len(test_retain)},
    }  # fmt: skip
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in merged.state_dict().items()}
    atomic_write_bytes(out / "net_unlearned.safetensors", safetensors_bytes(state, metadata={"format": "pt"}))
    atomic_write_text(out / "results_unlearn.json", json.dumps(result, indent=2) + "\n")
    return result


__all__ = ["UnlearnConfig", "per_class_accuracy", "run_unlearn"]
