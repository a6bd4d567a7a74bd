"""DyLoRA — one LoRA trained at every rank at once, so any truncation of it is a usable adapter.

Valipour et al., "DyLoRA: Parameter Efficient Tuning of Pre-trained Models using Dynamic Search-Free Low-Rank
Adaptation" (arXiv 2210.07558; code huawei-noah/Efficient-NLP @ bb44348, ``DyLoRA/loralib/DyLoRA.py`` and
``layers.py`` ``Linear``; the per-step sampling is a ``TrainerCallback`` in ``run_glue.py``). Each training step
draws one rank b uniformly from {1, …, r} for the whole model and every layer uses the first b ranks::

    ΔW_b = (α / b) · B[:, :b] A[:b]          A (r×in) Kaiming-uniform, B (out×r) zero: identity at init

The code scales with α/r and multiplies A and B by √(r/b) each, which is α/b. In its "frozen" mode (the mode
its script trains with, and the default here) ranks 1…b−1 are detached, so a step trains only the b-th row of A
and the b-th column of B; ``frozen=False`` trains all of the first b (nested dropout). Evaluation and merging
use ``eval_rank`` (default r). Because rank b′ ≤ r of the trained adapter *is* its first b′ rows and columns,
:func:`truncate_adapter` writes a rank-b′ adapter file by slicing, with α kept, and it loads as an ordinary
DyLoRA adapter of rank b′: a rank sweep at the price of one run (``seg compare`` scores every rank listed in
``rank_sweep``). Left open by the code and chosen here: α = r by default (the scripts use α = 2r), and the
sampling uses torch's global generator (seeded by ``seed_everything``). Conv2d layers are adapted on the
out × in·kh·kw view; the code's ``Conv2d`` is plain LoRA.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import lightning.pytorch as pl
import torch
from torch import nn

from pathopeft.adapters.core import AdapterConfig, Delta, register


@dataclass
class DyLoraConfig(AdapterConfig):
    """DyLoRA: a rank-``r`` LoRA trained at a random rank b ≤ r each step (scale alpha/b), truncatable to any b."""

    adapter_type: ClassVar[str] = "dylora"
    r: int = 8
    alpha: float | None = None  # None: alpha = r
    frozen: bool = True  # train only the sampled rank's row/column (the official script); False: nested dropout
    eval_rank: int | None = None  # the rank used outside training and for merging; None: r
    rank_sweep: list[int] = field(default_factory=list)  # ranks seg compare scores after training ([]: none)


class DyLoraDelta(Delta):
    def __init__(self, base: nn.Module, config: DyLoraConfig) -> None:
        super().__init__(base, config)
        r = config.r
        self.r = r
        self.alpha = float(config.alpha if config.alpha is not None else r)
        self.A = nn.Parameter(torch.empty(r, self.in_features))
        self.B = nn.Parameter(torch.zeros(self.out_features, r))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.frozen = config.frozen
        self.eval_rank = min(config.eval_rank or r, r)
        self.train_rank: int | None = None  # set each step by DyLoraRankSampler; None: r

    @property
    def rank(self) -> int:
        """The rank this forward uses: the sampled one in training, ``eval_rank`` otherwise."""
        return (self.train_rank or self.r) if self.training else self.eval_rank

    def factors(self, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(B[:, :b], A[:b]); in frozen training mode ranks before the b-th carry no gradient."""
        A, B = self.A[:b], self.B[:, :b]
        if self.frozen and self.training and b > 1:
            A = torch.cat([A[:-1].detach(), A[-1:]], 0)
            B = torch.cat([B[:, :-1].detach(), B[:, -1:]], 1)
        return B, A

    def delta_weight(self, base: nn.Module) -> torch.Tensor:
        b = self.rank
        B, A = self.factors(b)
        return (self.alpha / b) * (B @ A)

    @staticmethod
    def expected_trainable(out_features: int, in_features: int, config: DyLoraConfig) -> int:
        return config.r * (out_features + in_features)


def dylora_deltas(model: nn.Module) -> list[DyLoraDelta]:
    return [m for m in model.modules() if isinstance(m, DyLoraDelta)]


def set_rank(model: nn.Module, rank: int) -> None:
    """Evaluate (and merge) every DyLoRA adapter of ``model`` at ``rank`` (1 ≤ rank ≤ its r)."""
    deltas = dylora_deltas(model)
    if not deltas:
        raise ValueError("set_rank: the model has no DyLoRA adapter")
    for d in deltas:
        if not 1 <= rank <= d.r:
            raise ValueError(f"DyLoRA rank {rank} is outside 1..{d.r}")
        d.eval_rank = rank


@contextlib.contextmanager
def at_rank(model: nn.Module, rank: int) -> Iterator[None]:
    """Evaluate ``model``'s DyLoRA adapters at ``rank`` inside the ``with`` block, then restore their ranks."""
    deltas = dylora_deltas(model)
    before = [d.eval_rank for d in deltas]
    set_rank(model, rank)
    try:
        yield
    finally:
        for d, b in zip(deltas, before, strict=True):
            d.eval_rank = b


def rank_variants(model: nn.Module) -> dict[str, Callable[[], contextlib.AbstractContextManager[None]]]:
    """The ``variants`` capability: one evaluation per rank of the adapter's ``rank_sweep`` (``seg compare``
    scores each, so one run gives the whole rank sweep)."""
    deltas = dylora_deltas(model)
    sweep = sorted({b for d in deltas for b in d.config.rank_sweep if 1 <= b <= d.r})
    return {f"rank {b}": functools.partial(at_rank, model, b) for b in sweep}


class DyLoraRankSampler(pl.Callback):
    """Draws one rank b ~ U{1, …, r} per training batch for every DyLoRA layer (the official per-step callback):
    the ``callback`` capability of the ``dylora`` entry, so every Lightning fit through the library does it."""

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        deltas = dylora_deltas(pl_module)
        if deltas:
            b = int(torch.randint(1, deltas[0].r + 1, ()).item())
            for d in deltas:
                d.train_rank = min(b, d.r)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for d in dylora_deltas(pl_module):
            d.train_rank = None


def truncate_adapter(src: str | os.PathLike[str], dst: str | os.PathLike[str], rank: int) -> Path:
    """Write the rank-``rank`` DyLoRA adapter that ``src`` (a saved DyLoRA adapter folder) contains: its first
    ``rank`` rows of A and columns of B, α kept, so it loads as an ordinary rank-``rank`` adapter and computes
    what ``src`` computes at that rank."""
    from safetensors.torch import save as safetensors_bytes

    from pathopeft.adapters.serialization import (
        CONFIG_NAME,
        WEIGHTS_NAME,
        AdapterLoadError,
        read_json,
        read_safetensors,
    )
    from pathopeft.io import atomic_write_bytes, atomic_write_text

    src, dst = Path(src), Path(dst)
    cfg = read_json(src / CONFIG_NAME)  # unreadable: one error naming the file
    if cfg.get("adapter_type") != "dylora":
        raise AdapterLoadError(f"{src / CONFIG_NAME}: not a DyLoRA adapter (adapter_type {cfg.get('adapter_type')!r})")
    if not 1 <= rank <= cfg["r"]:
        raise AdapterLoadError(f"{src}: rank {rank} is outside 1..{cfg['r']}")
    tensors = read_safetensors(src / WEIGHTS_NAME)
    out = {}
    for k, v in tensors.items():
        if k.endswith(".dylora.A"):
            v = v[:rank]
        elif k.endswith(".dylora.B"):
            v = v[:, :rank]
        out[k] = v.contiguous()
    cfg["alpha"] = float(cfg["alpha"] if cfg.get("alpha") is not None else cfg["r"])
    cfg["r"], cfg["eval_rank"] = rank, None
    cfg["rank_sweep"] = [b for b in cfg.get("rank_sweep", []) if b <= rank]
    dst.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(dst / WEIGHTS_NAME, safetensors_bytes(out, metadata={"format": "pt"}))
    atomic_write_text(dst / CONFIG_NAME, json.dumps(cfg, indent=2) + "\n")
    return dst


register("dylora", DyLoraConfig, DyLoraDelta, conv=True, identity_at_init=True, callback=DyLoraRankSampler,
         variants=rank_variants)  # fmt: skip

__all__ = [
    "DyLoraConfig",
    "DyLoraDelta",
    "DyLoraRankSampler",
    "at_rank",
    "rank_variants",
    "set_rank",
    "truncate_adapter",
]
