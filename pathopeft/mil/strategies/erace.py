"""``erace``: experience replay with asymmetric cross-entropy (ER-ACE, Caccia et al. 2022), as CoMEL's baseline.

Official: ``continual/main/continual_instance/cdatmil_ppl_erace_trainer.py`` (CoMEL @ 9fd6679) with its
buffer ``continual/cl_utils/buffer.py`` (``Buffer``, ``reservoir``) and recipe
``continual/shell_scripts/continual_instance/run_cdatmil_ppl_erace.sh`` (``--buffer_size 30``).

* A reservoir buffer of ``erace["buffer_size"]`` training bags over every training step of every task
  (buffer.py L62-L76, L131-L164: a bag is offered after each step, epochs included, so a bag can hold more
  than one slot); from the second task on, one buffer bag drawn at random joins each step (trainer L84-L99).
* Asymmetric loss: the current bag's cross-entropy sees only the current task's classes, the buffer bag's
  sees every class seen so far (trainer L204-L219). The official mask is "classes present in the batch, plus
  those not yet seen"; with one bag per step that is the bag's own label once both of the task's classes
  have been seen, which makes the current bag's CE identically zero — so here it is the current task's
  classes, which is what the batch's present classes are with a batch of that task's bags.
* The buffer bag's loss has no BPPL term here (officially it reuses the current bag's instance loss).

The official baselines all run with BPPL ("ppl" in the trainer names); pathopeft's default runs them
without it unless the config says ``use_bppl: true`` (the registry's ``bppl`` capability stays False).
The buffer (slide ids, the reservoir's counter) is saved in ``state.json`` and restored on resume.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any

from pathopeft.mil.strategies.base import STRATEGIES, BagSource, Strategy, StrategyStateError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from pathopeft.mil.config import ContinualConfig


class BagReservoir:
    """Reservoir sampling over bags (one slot per offer): slide ids, loaded bags and per-slot extras
    (DER++'s logits). Shared by ``erace``, ``derpp`` and ``agem``, whose official buffer is the same."""

    def __init__(self, size: int) -> None:
        self.size = int(size)
        self.seen = 0  # offers so far (buffer.py's num_seen_examples)
        self.ids: list[str] = []
        self.bags: list[dict[str, Any]] = []
        self.extra: list[Any] = []

    def __len__(self) -> int:
        return len(self.ids)

    def offer(self, bag: dict[str, Any], rng: random.Random, extra: Any = None) -> int:
        """Offer one bag; returns its slot or −1 (not kept). Fills first, then keeps with probability
        size/(seen+1), as reservoir sampling does."""
        slot = self.seen if self.seen < self.size else rng.randint(0, self.seen)
        self.seen += 1
        if slot >= self.size:
            return -1
        kept = {k: bag[k] for k in ("features", "coords", "label", "slide_id")}
        kept = {k: v.detach() if hasattr(v, "detach") else v for k, v in kept.items()}
        if slot == len(self.ids):
            self.ids.append(str(bag["slide_id"]))
            self.bags.append(kept)
            self.extra.append(extra)
        else:
            self.ids[slot], self.bags[slot], self.extra[slot] = str(bag["slide_id"]), kept, extra
        return slot

    def draw(self, rng: random.Random) -> int:
        """A slot drawn uniformly."""
        return rng.randrange(len(self.ids))

    def state(self) -> dict[str, Any]:
        return {"ids": list(self.ids), "seen": self.seen}

    def restore(self, values: dict[str, Any], data: BagSource, cfg: ContinualConfig) -> None:
        """Reload the saved slots' bags (extras are set by the caller)."""
        by_id = {r.slide_id: r for task in cfg.tasks for r in data.bags(task, "train")}
        ids = [str(s) for s in values.get("ids", [])]
        missing = [s for s in ids if s not in by_id]
        if missing:
            raise StrategyStateError(
                f"buffer of the saved run holds {len(missing)} bag(s) no longer among the training bags of "
                f"{cfg.manifest} (first: {missing[0]!r}); restore the manifest or use another out_dir"
            )
        self.ids, self.seen = ids, int(values.get("seen", len(ids)))
        unique = sorted(set(ids))
        loaded = dict(zip(unique, data.loaded([by_id[s] for s in unique]), strict=True))
        self.bags = [loaded[s] for s in ids]
        self.extra = [None] * len(ids)


def bag_logits(net: nn.Module, bag: dict[str, Any], device: torch.device) -> torch.Tensor:
    """The net's bag logits (all classes) on a stored bag, moved to ``device``."""
    out, _ = net(bag["features"].to(device), bag["coords"].to(device).float())
    return out.bag_logits


@STRATEGIES.register("erace", rehearsal=True)
class ERACE(Strategy):
    """Reservoir buffer + asymmetric CE; the buffer is drawn from, not added to the training set."""

    key = "erace"

    def __init__(self, cfg: ContinualConfig, data: BagSource) -> None:
        super().__init__(cfg, data)
        self.opts = {**DEFAULTS[self.key], **getattr(cfg, self.key)}
        self.buffer = BagReservoir(self.opts["buffer_size"])
        self.rng = random.Random(cfg.seed)

    def before_task(self, net: nn.Module, t: int) -> nn.Module:
        self.rng = random.Random(self.cfg.seed * 1000 + t)  # per step, so a resumed step draws the same
        return net

    def rebuild(self, net: nn.Module, t: int) -> nn.Module:
        return net  # no structure change; the buffer comes back through load_state

    def train_classes(self, t: int) -> list[int]:
        return self.cfg.task_classes(t)  # the asymmetric half: the current bag sees its task's classes

    def replay_loss(self, net: nn.Module, batch: dict[str, Any], out: Any, t: int) -> dict[str, torch.Tensor]:
        import torch.nn.functional as F

        from pathopeft.mil.module import masked

        if t == 0 or not len(self.buffer):
            return {}
        bag = self.buffer.bags[self.buffer.draw(self.rng)]
        logits = bag_logits(net, bag, out.bag_logits.device)
        label = torch_label(bag["label"], logits.device)
        return {"buffer": F.cross_entropy(masked(logits, self.cfg.seen_classes(t))[None], label)}

    def extra_losses(
        self, net: nn.Module, batch: dict[str, Any], out: Any, allowed: list[int], t: int
    ) -> dict[str, torch.Tensor]:
        losses = self.replay_loss(net, batch, out, t)
        self.buffer.offer(batch, self.rng)  # officially after the optimizer step; nothing reads it in between
        return losses

    def save_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return {}, {"buffer": self.buffer.state()}

    def load_state(self, tensors: dict[str, torch.Tensor], values: dict[str, Any]) -> None:
        self.buffer.restore(values.get("buffer", {}), self.data, self.cfg)


def torch_label(label: Any, device: torch.device) -> torch.Tensor:
    import torch

    return torch.as_tensor(label, device=device).reshape(1)


#: Official defaults (configs.py L148-L150, the continual_instance recipes); a config's dict overrides them.
DEFAULTS: dict[str, dict[str, Any]] = {
    "erace": {"buffer_size": 30},
    "derpp": {"buffer_size": 30, "alpha": 3.0, "beta": 1.0},
    "agem": {"buffer_size": 30},
    "lwf": {"weight": 1.0, "temperature": 2.0},
}
