"""``owlora``: CoMEL without BPPL — the ablation that shows what the instance pseudo-labels add."""

from __future__ import annotations

from pathopeft.mil.strategies.adapter import AdapterStrategy
from pathopeft.mil.strategies.base import STRATEGIES


@STRATEGIES.register("owlora", adapters=True, ablation=True)
class OWLoRA(AdapterStrategy):
    """CoMEL's adapters, attention-based tile scores instead of BPPL's instance head."""
