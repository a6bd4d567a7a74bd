"""The strategy interface: how a continual run differs from plain sequential fine-tuning, as hooks.

The runner (:mod:`pathopeft.mil.continual`) trains one *step* after another and asks the run's strategy
at each point where strategies differ, so it never tests a strategy's name:

* :meth:`Strategy.n_steps` — how many training steps (``joint``: one, on every task);
* :meth:`Strategy.before_task` — change the net or the strategy's state before step ``t`` (add an adapter,
  estimate an EWC penalty, fill a replay buffer); it also decides which parameters train, by freezing;
* :meth:`Strategy.train_tasks`, :meth:`Strategy.replay_bags` — the training bags of step ``t``;
* :meth:`Strategy.train_classes` — the logits in the training softmax of step ``t``;
* :meth:`Strategy.module_kwargs` — extra arguments of the training module (EWC's penalty);
* :meth:`Strategy.extra_losses` — loss terms added to every training step (distillation, a penalty on the
  adapter's factors, a loss on replayed bags);
* :meth:`Strategy.after_backward` — change the gradients after ``backward`` and before the optimizer step
  (gradient projection: OWLoRA, A-GEM);
* :meth:`Strategy.after_task` — after step ``t`` trained and before it is evaluated and saved (record logits,
  snapshot a teacher, estimate a subspace);
* :meth:`Strategy.tasks_seen` — the tasks evaluated after step ``t`` (its row of the accuracy matrix);
* :meth:`Strategy.active_adapters` — the adapters switched on when evaluating task ``j``;
* :meth:`Strategy.rebuild`, :meth:`Strategy.save_state`, :meth:`Strategy.load_state` — resuming: redo a
  finished step's structure changes (no training), and the state a strategy carries to later steps
  (EWC's penalty, replay's buffer), saved after every step and restored on resume.

Capabilities declared at registration (``@STRATEGIES.register("x", bppl=True)``) are what callers may ask
without running anything: the config's BPPL default, the CLI's default comparison, the test matrix.
Strategy modules import torch-heavy code inside their hooks, so listing the names (CLI help) stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from pathopeft.errors import UserError
from pathopeft.registry import Registry

if TYPE_CHECKING:
    import torch
    from torch import nn

    from pathopeft.mil.config import ContinualConfig
    from pathopeft.mil.data import BagRecord


class BagSource(Protocol):
    """The checked bags of a run, as a strategy reads them (:class:`pathopeft.mil.data.PreparedBags`)."""

    def bags(self, task: str, split: str) -> list[BagRecord]: ...

    def loaded(self, records: list[BagRecord], limit: int | None = None) -> list[dict[str, Any]]: ...


class StrategyStateError(UserError, ValueError):
    """A strategy's saved state does not fit this run (a replayed bag no longer in the manifest)."""


class Strategy:
    """Plain sequential fine-tuning: every hook's default is what ``finetune`` does.

    One instance per run, so a strategy may keep state across its steps (a buffer, a penalty).
    """

    def __init__(self, cfg: ContinualConfig, data: BagSource) -> None:
        self.cfg = cfg
        self.data = data

    def n_steps(self) -> int:
        """Training steps of the run; step ``t`` trains :meth:`train_tasks` ``(t)``."""
        return len(self.cfg.tasks)

    def before_task(self, net: nn.Module, t: int) -> nn.Module:
        """The net to train at step ``t`` (called after seeding, before the training module is built)."""
        return net

    def train_tasks(self, t: int) -> list[str]:
        """Tasks whose training bags step ``t`` trains on."""
        return [self.cfg.tasks[t]]

    def replay_bags(self, t: int) -> list[BagRecord]:
        """Bags of earlier tasks added to step ``t``'s training bags."""
        return []

    def train_classes(self, t: int) -> list[int]:
        """Class indices in the training softmax of step ``t`` (see :meth:`ContinualConfig.train_allowed`)."""
        return self.cfg.train_allowed(t)

    def module_kwargs(self, t: int) -> dict[str, Any]:
        """Extra keyword arguments of :class:`pathopeft.mil.module.ContinualMILModule` at step ``t``."""
        return {}

    def extra_losses(
        self, net: nn.Module, batch: dict[str, Any], out: Any, allowed: list[int], t: int
    ) -> dict[str, torch.Tensor]:
        """Loss terms (by name, logged as ``train/<name>``) added to step ``t``'s loss for one training bag;
        ``out`` is the net's :class:`~pathopeft.mil.models.base.MILOutput` on ``batch``, ``allowed`` the
        classes of the training softmax."""
        return {}

    def after_backward(self, net: nn.Module, t: int) -> None:
        """Called after every ``backward`` of step ``t``, before the optimizer step: may edit ``.grad``."""

    def after_step(self, net: nn.Module, t: int, step: int, total: int) -> None:
        """Called after every optimiser step of step ``t`` (``step`` of about ``total`` in this step's fit)."""

    def after_task(self, net: nn.Module, t: int) -> nn.Module:
        """The net after step ``t`` trained, before it is evaluated and saved. Changes to the net land in the
        saved state dict; state kept for later steps must go through :meth:`save_state`. On resume it is not
        called again (its effects are in what was saved)."""
        return net

    def tasks_seen(self, t: int) -> list[int]:
        """Task indices evaluated after step ``t``; the last one is the row of ``R`` the evaluation fills."""
        return list(range(t + 1))

    def active_adapters(self, t_eval: int) -> list[int] | None:
        """Adapters switched on when evaluating task ``t_eval`` (None: all of them, or no adapters)."""
        return None

    # --- resuming ------------------------------------------------------------------------------------------
    def rebuild(self, net: nn.Module, t: int) -> nn.Module:
        """On resume, redo finished step ``t``'s changes to the net's *structure* (adapters added, freezing)
        without training: the runner calls it on the weights step ``t`` started from (after seeding as for
        the step), then loads the step's saved state dict strictly. The default replays :meth:`before_task`;
        a strategy whose ``before_task`` only fills state that :meth:`load_state` restores may skip it."""
        return self.before_task(net, t)

    def save_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """What later steps need of this strategy, saved after every step: tensors (``task_<t>/strategy.
        safetensors``) and JSON values (``state.json``); both empty for a stateless strategy."""
        return {}, {}

    def load_state(self, tensors: dict[str, torch.Tensor], values: dict[str, Any]) -> None:
        """Restore what :meth:`save_state` returned after the last finished step (on resume, after
        :meth:`rebuild` of every finished step)."""


#: Every continual strategy, by name; the capabilities an entry can declare, with their defaults.
STRATEGIES: Registry[type[Strategy]] = Registry(
    "continual strategy",
    capabilities={
        "bppl": False,  # BPPL's instance loss is on unless the config says otherwise
        "adapters": False,  # adds a (OW)LoRA adapter per later task and saves it (task_<t>/adapters)
        "rehearsal": False,  # keeps training bags of earlier tasks (not rehearsal-free)
        "all_tasks_at_once": False,  # one training step on every task: an upper bound, not continual
        "ablation": False,  # a variant of another strategy, left out of default comparisons
    },
)
