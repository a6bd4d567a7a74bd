"""``codyra``: CoDyRA as a continual strategy — one gated LoRA, pruned by its soft threshold during each task and
merged into the weights at the task's end, so the model never grows and inference never pays for past tasks.

The official loop (Artificer-AI-Lab/CoDyRA @ c1691e4, ``models/codyra.py``): task 0 trains the whole net (as
every adapter strategy here); before task 1 the layers of the official OWLoRA recipe (:func:`.adapter.adapted_layers`)
get a ``codyra`` adapter and everything else but the bag classifier is frozen; after every optimiser step the
gates are soft-thresholded on the method's schedule (dense half, then rising to ``xi_max``); before every later
task :func:`pathopeft.adapters.codyra.next_task` merges the live ranks into W and starts fresh factors. Settings:
the config's ``codyra`` section (:class:`~pathopeft.adapters.codyra.CodyraConfig` fields, e.g. ``r``, ``xi_max``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pathopeft.mil.strategies.adapter import wrap_with_adapter
from pathopeft.mil.strategies.base import STRATEGIES, Strategy

if TYPE_CHECKING:
    from torch import nn


@STRATEGIES.register("codyra", adapters=True)
class CoDyRA(Strategy):
    """A gated LoRA per task, thresholded while it trains and merged into the weights when the task ends."""

    def before_task(self, net: nn.Module, t: int) -> nn.Module:
        if t == 0:
            return net
        from pathopeft.adapters.codyra import next_task

        if t == 1:
            return wrap_with_adapter(net, "codyra", **self.cfg.codyra)
        next_task(net)
        return net

    def after_step(self, net: nn.Module, t: int, step: int, total: int) -> None:
        if t == 0:
            return
        from pathopeft.adapters.sora import gated_deltas, phase_threshold

        for d in gated_deltas(net).values():
            c = d.config
            d.threshold(phase_threshold(step, total, c.xi_max, c.levels, c.dense_fraction))
