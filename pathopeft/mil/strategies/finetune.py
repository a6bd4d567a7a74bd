"""``finetune``: keep training the same net task after task — the lower bound every method must beat."""

from __future__ import annotations

from pathopeft.mil.strategies.base import STRATEGIES, Strategy


@STRATEGIES.register("finetune")
class Finetune(Strategy):
    """Every hook at its default (:class:`Strategy` is sequential fine-tuning)."""
