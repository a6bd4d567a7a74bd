"""Routing over a library of task adapters: pick (or mix) the adapter of the task a new bag comes from.

After continual or per-site training a user holds one adapter per cancer type; a slide arriving without its
task label needs the right one. The transferable idea of LoRA libraries with routers (LoRALib and its kin,
arXiv 2509.…, whose method text was not reachable here) is a light router over the library, trained without
touching the adapters. Here it is the lightest that works on slide bags: one prototype per task, the mean over
its training bags of the L2-normalised mean tile feature; a bag is routed by cosine similarity to the
prototypes, ``probs = softmax(cos / temperature)``. ``pick`` uses the adapter of the most similar task; ``mix``
averages the class probabilities of every task's adapter weighted by ``probs`` (one forward per task: the price
of mixing). The router needs only the features already extracted for the training bags, is a few kB
(``tasks × D`` numbers), and adds one dot product per bag.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F


def bag_embedding(bag: dict[str, Any]) -> torch.Tensor:
    """A bag's routing vector: its mean tile feature, L2-normalised."""
    return F.normalize(bag["features"].float().mean(0), dim=0)


class TaskRouter:
    """Nearest-prototype router over tasks (one prototype per task from its training bags)."""

    def __init__(self, prototypes: torch.Tensor, tasks: Sequence[str], temperature: float = 0.05) -> None:
        if prototypes.ndim != 2 or prototypes.shape[0] != len(tasks):
            raise ValueError(f"router: {prototypes.shape[0]} prototypes for {len(tasks)} tasks")
        if temperature <= 0:
            raise ValueError(f"router: temperature must be positive, got {temperature}")
        self.prototypes = F.normalize(prototypes.float(), dim=1)
        self.tasks = list(tasks)
        self.temperature = float(temperature)

    @classmethod
    def fit(cls, bags_by_task: Sequence[Sequence[dict[str, Any]]], tasks: Sequence[str], temperature: float = 0.05):
        """Prototypes from each task's training bags (``bags_by_task[t]``: loaded bags of task ``tasks[t]``)."""
        empty = [t for t, bags in zip(tasks, bags_by_task, strict=True) if not bags]
        if empty:
            raise ValueError(f"router: no training bags for task(s) {empty}")
        protos = torch.stack([torch.stack([bag_embedding(b) for b in bags]).mean(0) for bags in bags_by_task])
        return cls(protos, tasks, temperature)

    def probs(self, bag: dict[str, Any]) -> torch.Tensor:
        """Routing weights over the tasks for one bag."""
        return (self.prototypes @ bag_embedding(bag) / self.temperature).softmax(0)

    def route(self, bag: dict[str, Any]) -> int:
        """The index of the task whose adapter serves ``bag``."""
        return int(self.probs(bag).argmax())

    def predict(
        self, bag: dict[str, Any], predict_with: Callable[[int, dict[str, Any]], torch.Tensor], mode: str = "pick"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(class probabilities, routing weights) for ``bag``; ``predict_with(t, bag)`` returns the class
        probabilities with task ``t``'s adapter active. ``pick``: the routed task's; ``mix``: the weighted mean."""
        w = self.probs(bag)
        if mode == "pick":
            return predict_with(int(w.argmax()), bag), w
        if mode == "mix":
            return sum(w[t] * predict_with(t, bag) for t in range(len(self.tasks))), w
        raise ValueError(f"router: mode must be 'pick' or 'mix', got {mode!r}")

    def state(self) -> dict[str, Any]:
        """What a saved router holds (the prototypes as a list, the tasks, the temperature)."""
        return {"tasks": self.tasks, "temperature": self.temperature, "prototypes": self.prototypes.tolist()}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> TaskRouter:
        return cls(torch.tensor(state["prototypes"]), state["tasks"], state["temperature"])


__all__ = ["TaskRouter", "bag_embedding"]
