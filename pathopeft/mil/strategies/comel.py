"""``comel``: CoMEL (Lee et al., arXiv 2507.02395) — OWLoRA adapters per task plus BPPL.

Any registered MIL model (GDAT by default) with BPPL pseudo-labels training its attention, from which tile
scores are read (:mod:`pathopeft.mil.bppl`; ``bppl: {variant: legacy}`` trains a separate instance head); task 1
trains the whole net, every later task adds the official OWLoRA LoRA (per-rank scales, gradients projected
against earlier tasks' factors, orthonormality penalty; :mod:`.adapter`). Rehearsal-free.
"""

from __future__ import annotations

from pathopeft.mil.strategies.adapter import AdapterStrategy
from pathopeft.mil.strategies.base import STRATEGIES


@STRATEGIES.register("comel", adapters=True, bppl=True)
class CoMEL(AdapterStrategy):
    """OWLoRA adapters as configured; BPPL on by default (the ``bppl`` capability)."""
