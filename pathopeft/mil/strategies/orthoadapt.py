"""``orthoadapt``: Orthogonal Adaptation as a continual strategy — each later task trains its own adapter alone,
and the model evaluated after every task is the *sum* of all of them (merging by summation, no data of earlier
tasks, no penalty, no projection).

Po et al. (arXiv 2312.02432; :mod:`pathopeft.adapters.orthoadapt`): task t's adapter has a frozen A_t, block t of
one shared orthogonal basis, so A_t A_sᵀ = 0 and every adapter is blind to the others' input directions. Here,
as the other adapter strategies (:mod:`.adapter`): task 0 trains the whole net; from task 1 on the layers of the
official OWLoRA recipe carry one ``orthoadapt-tasks`` adapter with a B per later task; step t trains B_t and the
bag classifier with only B_t in the forward (the base plus its own adapter: trained separately, as the paper),
and after the step every B is switched on, which is θ + Σ_t B_t A_t, the merged model (λ = 1 for every task;
the paper's 0.6 was tuned for diffusion concepts). Settings: the config's ``orthoadapt`` section (``r``, ``seed``);
the default rank is 8, or the largest that gives every later task its own block in the narrowest adapted layer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pathopeft.mil.strategies.adapter import adapted_layers, wrap_with_adapter
from pathopeft.mil.strategies.base import STRATEGIES, Strategy

if TYPE_CHECKING:
    from torch import nn


@STRATEGIES.register("orthoadapt", adapters=True)
class OrthoAdapt(Strategy):
    """One frozen-orthogonal-A adapter per later task, trained alone, summed for evaluation."""

    def before_task(self, net: nn.Module, t: int) -> nn.Module:
        if t == 0:
            return net
        from pathopeft.adapters.orthoadapt import task_deltas

        if t == 1:
            tasks = len(self.cfg.tasks) - 1
            narrowest = min(net.get_submodule(n).in_features for n in adapted_layers(net))
            kw = {"r": max(1, min(8, narrowest // tasks)), **self.cfg.orthoadapt}  # default: 8, or what fits
            net = wrap_with_adapter(net, "orthoadapt-tasks", tasks=tasks, **kw)
        for d in task_deltas(net):
            d.training_task(t - 1)
        return net

    def after_task(self, net: nn.Module, t: int) -> nn.Module:
        from pathopeft.adapters.orthoadapt import task_deltas

        for d in task_deltas(net):
            d.active_tasks = None  # every task's adapter: the merged model is what is evaluated and saved
        return net

    def rebuild(self, net: nn.Module, t: int) -> nn.Module:
        return self.after_task(self.before_task(net, t), t)
