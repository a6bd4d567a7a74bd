"""``lora``: one plain LoRA per later task (no projection, no penalty, no truncation, scales fixed) — the
adapter baseline, on the layers and with the trained classifier of the official OWLoRA recipe."""

from __future__ import annotations

from typing import Any

from pathopeft.mil.strategies.adapter import AdapterStrategy
from pathopeft.mil.strategies.base import STRATEGIES


@STRATEGIES.register("lora", adapters=True)
class LoRA(AdapterStrategy):
    """The ``owlora`` adapter with its orthogonality, truncation and per-rank scales switched off."""

    def adapter_kwargs(self) -> dict[str, Any]:
        return {
            **super().adapter_kwargs(),
            "projection": "none",
            "ortho_weight": 0.0,
            "weighted": False,
            "truncate_energy": None,
        }
