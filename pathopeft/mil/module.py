"""The LightningModule that trains a MIL model on one task of a continual sequence.

``MILNet`` = a registered MIL model (bag classifier inside) + an instance classifier on its per-instance
features. ``ContinualMILModule`` trains it on bags one at a time with

    loss = CE(bag logits restricted to the classes allowed now, bag label)
         + λ_inst · BPPL instance loss on the attention              (strategy uses BPPL; :mod:`~pathopeft.mil.bppl`)
         + λ_ewc/2 · Σ F_k (θ_k − θ*_k)²                               (EWC: its ``module_kwargs``)

Which classes are "allowed" is the setting: class-incremental — every class seen so far (no task id at test
time); task-incremental — benign and the current task's class (the task id picks the head). Continual
strategies that change the *parameters* (OWLoRA adapters, freezing) do so in their ``before_task`` hook
(:mod:`pathopeft.mil.strategies`) between tasks, so this module stays one plain Lightning training step.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn

from pathopeft.mil.bppl import (
    BPPLConfig,
    attention_scores,
    bag_quality,
    comel_instance_loss,
    instance_loss,
    next_tau2,
    pseudo_labels,
)
from pathopeft.mil.models import create_mil_model
from pathopeft.mil.models.base import MILOutput

if TYPE_CHECKING:
    from pathopeft.mil.strategies.base import Strategy


class MILNet(nn.Module):
    """Bag model + instance head: ``forward(x, coords) -> (MILOutput, instance_logits (N, C))``.

    The instance head is trained only by the ``legacy`` BPPL variant; CoMEL's BPPL trains the attention.
    The buffer ``bppl_tau2`` is BPPL's adaptive τ₂ (0 until a first epoch ends; every estimate is ≥ ½); it
    lives in the net's state dict so that it carries from task to task and through a resume, as the official
    trainer's ``self.tau2`` does.
    """

    def __init__(self, model: str, in_dim: int, n_classes: int, **model_kwargs: Any) -> None:
        super().__init__()
        self.mil = create_mil_model(model, in_dim=in_dim, n_classes=n_classes, **model_kwargs)
        self.instance_head = nn.Linear(self.mil.hidden_dim, n_classes)
        self.register_buffer("bppl_tau2", torch.tensor(0.0))

    def forward(self, x: torch.Tensor, coords: torch.Tensor | None = None) -> tuple[MILOutput, torch.Tensor]:
        out = self.mil(x, coords)
        return out, self.instance_head(out.instance_features)


def masked(logits: torch.Tensor, allowed: Sequence[int]) -> torch.Tensor:
    """Logits with the classes outside ``allowed`` at −inf (they can be neither predicted nor trained)."""
    mask = torch.full_like(logits, float("-inf"))
    mask[..., list(allowed)] = 0.0
    return logits + mask


class ContinualMILModule(pl.LightningModule):
    def __init__(
        self,
        net: MILNet,
        allowed_classes: Sequence[int],
        benign_class: int | Mapping[int, int] = 0,
        use_bppl: bool = True,
        bppl: BPPLConfig | None = None,
        lr: float = 2e-4,
        weight_decay: float = 1e-4,
        ewc: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
        ewc_lambda: float = 0.0,
        strategy: Strategy | None = None,
        step: int = 0,
    ) -> None:
        super().__init__()
        self.net = net
        self.allowed = list(allowed_classes)
        # each class → the normal class of its task (one int: that class is every task's normal class)
        self.normal_of: Mapping[int, int] | None = None if isinstance(benign_class, int) else dict(benign_class)
        self.benign = benign_class if isinstance(benign_class, int) else None
        self.use_bppl = use_bppl
        self.bppl = bppl or BPPLConfig()
        self.lr, self.weight_decay = lr, weight_decay
        self.ewc, self.ewc_lambda = ewc or {}, ewc_lambda
        self.strategy, self.step = strategy, step  # the run's strategy: extra losses, gradient edits
        self._quality_sum, self._quality_n = 0.0, 0

    @property
    def tau2(self) -> float:
        """BPPL's τ₂ now: the last epoch's re-estimate (carried on the net), else ``bppl.tau2_init``."""
        tau2 = float(self.net.bppl_tau2) if hasattr(self.net, "bppl_tau2") else 0.0
        return tau2 if tau2 > 0 else self.bppl.tau2_init

    def forward(self, x: torch.Tensor, coords: torch.Tensor | None = None) -> tuple[MILOutput, torch.Tensor]:
        return self.net(x, coords)

    def _normal(self, label: int) -> int:
        """The normal class of the task of class ``label``."""
        if self.normal_of is None:
            return int(self.benign)
        return self.normal_of.get(label, label)

    def _losses(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        out, inst_logits = self.net(batch["features"], batch["coords"].float())
        label = torch.as_tensor(batch["label"], device=out.bag_logits.device)
        losses = {"bag": F.cross_entropy(masked(out.bag_logits, self.allowed)[None], label[None])}
        if self.use_bppl and self.bppl.variant == "comel":
            bag_logits = masked(out.bag_logits, self.allowed)
            self._quality_sum += bag_quality(bag_logits, int(label))
            self._quality_n += 1
            if self.current_epoch >= self.bppl.warmup_epochs:
                is_tumour = int(label) != self._normal(int(label))
                inst, _ = comel_instance_loss(
                    out.attention, out.instance_features, bag_logits, int(label), is_tumour, self.tau2, self.bppl
                )
                losses["instance"] = self.bppl.weight * inst
        elif self.use_bppl and self.current_epoch >= self.bppl.warmup_epochs:
            pl_labels = pseudo_labels(
                out.instance_features, out.attention, int(label), self._normal(int(label)), self.bppl
            )
            losses["instance"] = self.bppl.weight * instance_loss(masked(inst_logits, self.allowed), pl_labels)
        if self.ewc and self.ewc_lambda > 0:
            params = dict(self.net.named_parameters())
            pen = sum((fisher * (params[n] - star).pow(2)).sum() for n, (fisher, star) in self.ewc.items())
            losses["ewc"] = 0.5 * self.ewc_lambda * pen
        if self.strategy is not None:
            losses.update(self.strategy.extra_losses(self.net, batch, out, self.allowed, self.step))
        return losses

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        losses = self._losses(batch)
        total = sum(losses.values())
        for k, v in losses.items():
            self.log(f"train/{k}", v, batch_size=1, on_epoch=True, on_step=False)
        return total

    def on_after_backward(self) -> None:
        if self.strategy is not None:
            self.strategy.after_backward(self.net, self.step)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.strategy is not None:
            total = int(self.trainer.estimated_stepping_batches)
            self.strategy.after_step(self.net, self.step, self.global_step, total)

    def on_train_epoch_start(self) -> None:
        # Lightning keeps the mode a module arrives in; evaluation between tasks leaves the net in eval mode,
        # and training a later task with dropout off (and differently from a resumed run) was a bug
        self.net.train()
        self._quality_sum, self._quality_n = 0.0, 0

    def on_train_epoch_end(self) -> None:
        """CoMEL's τ₂ re-estimate from this epoch's bags (official trainer L352), used from the next epoch on."""
        if self.use_bppl and self.bppl.variant == "comel" and self._quality_n:
            self.net.bppl_tau2.fill_(next_tau2(self.bppl.tau, self._quality_sum, self._quality_n))
            self.log("train/bppl_tau2", self.tau2, on_epoch=True, on_step=False)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        out, _ = self.net(batch["features"], batch["coords"].float())
        pred = int(masked(out.bag_logits, self.allowed).argmax())
        self.log("val/acc", float(pred == int(batch["label"])), batch_size=1, on_epoch=True, prog_bar=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for p in self.net.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)


@torch.no_grad()
def predict_bag(
    net: MILNet, bag: dict[str, Any], allowed: Sequence[int], benign_class: int | Sequence[int] = 0
) -> dict[str, Any]:
    """Bag probabilities over ``allowed`` classes, attention and per-tile tumour scores of one bag:
    ``attention_scores`` (CoMEL BPPL's min-max normalised attention) and ``tile_scores`` (the instance head,
    BPPL's ``legacy`` variant: 1 − the probability of the normal classes, ``benign_class``)."""
    net.eval()
    out, inst = net(bag["features"], bag["coords"].float())
    probs = torch.softmax(masked(out.bag_logits, allowed).float(), dim=-1)
    inst_probs = torch.softmax(masked(inst, allowed).float(), dim=-1)
    normals = [benign_class] if isinstance(benign_class, int) else list(benign_class)
    return {
        "probs": probs,
        "attention": out.attention.float(),
        "attention_scores": attention_scores(out.attention.float()),
        "tile_scores": 1.0 - inst_probs[:, normals].sum(-1),
    }


def fisher_diagonal(net: MILNet, bags: Sequence[dict[str, Any]], allowed: Sequence[int]) -> dict[str, tuple]:
    """Diagonal empirical Fisher of the bag loss at the current parameters (EWC, Kirkpatrick et al. 2017)."""
    params = {n: p for n, p in net.named_parameters() if p.requires_grad}
    fisher = {n: torch.zeros_like(p) for n, p in params.items()}
    net.eval()
    for bag in bags:
        net.zero_grad()
        out, _ = net(bag["features"], bag["coords"].float())
        label = torch.as_tensor([bag["label"]])
        F.cross_entropy(masked(out.bag_logits, allowed)[None], label).backward()
        for n, p in params.items():
            if p.grad is not None:
                fisher[n] += p.grad.detach() ** 2 / max(1, len(bags))
    net.zero_grad()
    return {n: (fisher[n], params[n].detach().clone()) for n in params}
