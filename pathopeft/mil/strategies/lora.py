"""``lora``: one plain LoRA per later task (no orthogonality, no per-task weights) — the adapter baseline."""

from __future__ import annotations

from typing import Any

from pathopeft.mil.strategies.adapter import AdapterStrategy
from pathopeft.mil.strategies.base import STRATEGIES


@STRATEGIES.register("lora", adapters=True)
class LoRA(AdapterStrategy):
    """The ``owlora`` adapter with its orthogonality and task weights switched off."""

    def adapter_kwargs(self) -> dict[str, Any]:
        return {**super().adapter_kwargs(), "orthogonal": False, "weighted": False}
