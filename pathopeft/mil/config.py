"""The settings of a continual MIL run (:class:`ContinualConfig`) and their YAML form (``configs/mil/``).

Settings: ``class`` incremental (one label space, no task id at test time) or ``task`` incremental (the
task id selects the classes, and for adapter strategies the adapters up to that task). ``strategy`` is a
name of :data:`pathopeft.mil.strategies.STRATEGIES`.

:func:`load_config` goes through :func:`pathopeft.config.load_config`: unknown keys, wrong types and bad
values are one :class:`~pathopeft.config.ConfigError` naming the file and the key; ``manifest`` (an input)
is resolved against the YAML's folder, ``out_dir`` stays relative to the working directory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from pathopeft.config import load_config as _load_typed
from pathopeft.mil.strategies import STRATEGIES
from pathopeft.registry import UnknownPluginError

#: Config fields that are input paths, resolved against the config file's folder.
PATH_FIELDS = ("manifest",)


@dataclass
class ContinualConfig:
    """One strategy on one task sequence: data, label space, model, training and strategy settings."""

    manifest: str
    out_dir: str
    strategy: str = "comel"
    setting: str = "class"
    classes: list[str] = field(default_factory=lambda: ["benign", "aca", "scc"])
    tasks: list[str] = field(default_factory=lambda: ["aca", "scc"])
    task_class: dict[str, str] = field(default_factory=dict)  # task → its tumour class (default: same name)
    benign: str = "benign"  # the normal class of every task not in ``task_normal``
    task_normal: dict[str, str] = field(default_factory=dict)  # task → its own normal class (CoMEL's protocol)
    model: str = "gdat"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    epochs: int = 10
    lr: float = 2e-4
    weight_decay: float = 1e-4
    seed: int = 0
    use_bppl: bool | None = None  # default: the strategy's ``bppl`` capability
    bppl: dict[str, Any] = field(default_factory=dict)
    owlora: dict[str, Any] = field(default_factory=dict)  # OwloraConfig fields; empty: the official OWLoRA
    ewc_lambda: float = 50.0
    # CoMEL's official baselines (keys left out take the official defaults, see each strategy's docstring):
    erace: dict[str, Any] = field(default_factory=dict)  # buffer_size (30)
    derpp: dict[str, Any] = field(default_factory=dict)  # buffer_size (30), alpha (3.0, logit MSE), beta (1.0, CE)
    agem: dict[str, Any] = field(default_factory=dict)  # buffer_size (30): the episodic memory, in bags
    lwf: dict[str, Any] = field(default_factory=dict)  # weight (1.0), temperature (2.0)
    inflora: dict[str, Any] = field(default_factory=dict)  # r (16; a qkv layer's LoRA has rank 3r)
    codyra: dict[str, Any] = field(default_factory=dict)  # CodyraConfig fields (r 16, xi_max 5e-3, levels 50)
    orthoadapt: dict[str, Any] = field(default_factory=dict)  # OrthoAdaptTasksConfig fields (r 8, seed 0)
    replay_per_task: int = 4
    collect_bags: int = 32  # training bags per task used to estimate the input subspaces
    heatmaps: int = 2  # per task, from the test split, with the final model
    train_classes: str = "current"  # logits trained per task: "current" (benign + this task's class) or "seen"
    accelerator: str = "cpu"
    progress: bool = False

    def __post_init__(self) -> None:
        try:
            self.strategy = STRATEGIES.entry(self.strategy).name
        except UnknownPluginError as e:  # it lists the known names; say which setting it is about
            raise UnknownPluginError(f"strategy: {e}") from None
        if self.setting not in ("class", "task"):
            raise ValueError(f"setting must be 'class' or 'task', got {self.setting!r}")
        if self.train_classes not in ("current", "seen"):
            raise ValueError(f"train_classes must be 'current' or 'seen', got {self.train_classes!r}")
        if self.benign not in self.classes:
            raise ValueError(f"benign class {self.benign!r} is not in classes {self.classes}")
        for t in self.tasks:
            if self.task_class.get(t, t) not in self.classes:
                raise ValueError(f"task {t!r}: class {self.task_class.get(t, t)!r} is not in classes {self.classes}")
            if self.task_normal.get(t, self.benign) not in self.classes:
                raise ValueError(
                    f"task {t!r}: normal class {self.task_normal.get(t, self.benign)!r} is not in classes {self.classes}"
                )
        unknown = sorted(set(self.task_normal) - set(self.tasks))
        if unknown:
            raise ValueError(f"task_normal names task(s) {unknown} not in tasks {self.tasks}")
        normals = set(self.normal_classes)
        tumours = [self.task_cls(t) for t in range(len(self.tasks))]
        both = sorted(self.classes[c] for c in set(tumours) & normals)
        if both:
            raise ValueError(f"class(es) {both} are a task's tumour class and a task's normal class at once")

    @property
    def bppl_on(self) -> bool:
        return self.use_bppl if self.use_bppl is not None else STRATEGIES.entry(self.strategy).supports("bppl")

    def cls(self, name: str) -> int:
        return self.classes.index(name)

    def task_cls(self, t: int) -> int:
        """Class index of task ``t``'s tumour class."""
        return self.cls(self.task_class.get(self.tasks[t], self.tasks[t]))

    def normal_cls(self, t: int) -> int:
        """Class index of task ``t``'s normal class (``benign`` unless ``task_normal`` gives the task its own)."""
        return self.cls(self.task_normal.get(self.tasks[t], self.benign))

    def task_classes(self, t: int) -> list[int]:
        """Task ``t``'s classes: its normal class, then its tumour class."""
        return [self.normal_cls(t), self.task_cls(t)]

    @property
    def normal_classes(self) -> list[int]:
        """Every class that is some task's normal class (tiles and bags of these classes are not tumour)."""
        return list(dict.fromkeys(self.normal_cls(t) for t in range(len(self.tasks))))

    def normal_of(self) -> dict[int, int]:
        """Each class of the run → the normal class of its task (a normal class maps to itself)."""
        out = {}
        for t in range(len(self.tasks)):
            out.setdefault(self.task_cls(t), self.normal_cls(t))
            out[self.normal_cls(t)] = self.normal_cls(t)
        return out

    def seen_classes(self, t: int) -> list[int]:
        """Every class of tasks ``0..t``, in task order (the class-incremental label space after task ``t``)."""
        return list(dict.fromkeys(c for s in range(t + 1) for c in self.task_classes(s)))

    def train_allowed(self, t: int) -> list[int]:
        """Classes in the training softmax of task ``t``. "current" keeps old classes' logits out of the loss,
        so learning a new class does not push the old ones down (the usual rehearsal-free CIL masking, as in
        L2P/DualPrompt); strategies that train on earlier classes widen it (``Strategy.train_classes``)."""
        if self.train_classes == "current" or self.setting == "task":
            return self.task_classes(t)
        return self.allowed(t)

    def allowed(self, t: int) -> list[int]:
        """Classes the model may predict while training task ``t`` (and when evaluating task ``t`` in TIL)."""
        if self.setting == "task":
            return self.task_classes(t)
        return self.seen_classes(t)


def load_config(path: str | os.PathLike[str], **overrides: Any) -> ContinualConfig:
    """A :class:`ContinualConfig` from YAML; ``overrides`` (not None) replace its fields (command-line paths
    are relative to the working directory, the YAML's ``manifest`` to the YAML's folder)."""
    return _load_typed(ContinualConfig, path, overrides, path_fields=PATH_FIELDS)
