"""``agem``: averaged gradient episodic memory (Chaudhry et al. 2019), as CoMEL's baseline.

Official: ``continual/main/continual_instance/cdatmil_ppl_agem_trainer.py`` (CoMEL @ 9fd6679), buffer
``continual/cl_utils/buffer.py``, recipe ``run_cdatmil_ppl_agem.sh`` (``--buffer_size 30``).

* The episodic memory is the reservoir buffer of ``erace`` (every training bag is offered after its step,
  trainer L318); from the second task on, one memory bag per step (L184-L186) gives the reference gradient
  ``g_ref`` of its CE over the classes seen so far; the current gradient ``g`` is replaced by
  :func:`project` ``(g, g_ref)`` when ``g·g_ref < 0`` (L196-L228, ``project`` L44-L46).
* Differences, on purpose: the official code flattens ``param.data.view(-1)``, whose ``.grad`` is always
  None, so its stored gradients stay zero, nothing is projected and the memory bag's gradient is simply
  added to the current one (experience replay); here the gradients are the parameters' own, as A-GEM
  means. The official code also leaves parameters named ``classifier`` out of the projection; here every
  trained parameter is in it. Its ``after_task`` extra add of the loader's first bag is left out.
* The current bag's CE covers every class seen so far: the official head is not masked.

The official baselines all run with BPPL ("ppl" in the trainer names); pathopeft's default runs them
without it unless the config says ``use_bppl: true`` (the registry's ``bppl`` capability stays False).
The memory (slide ids, the reservoir's counter) is saved in ``state.json`` and restored on resume.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pathopeft.mil.strategies.base import STRATEGIES
from pathopeft.mil.strategies.erace import ERACE, bag_logits, torch_label

if TYPE_CHECKING:
    import torch
    from torch import nn


def project(g: torch.Tensor, g_ref: torch.Tensor) -> torch.Tensor:
    """A-GEM's update: ``g`` when ``g·g_ref ≥ 0``, else ``g`` minus its component along ``g_ref`` (so the
    result's dot with ``g_ref`` is 0: the step does not increase the memory's loss, to first order)."""
    dot = g @ g_ref
    if dot >= 0:
        return g
    return g - (dot / (g_ref @ g_ref).clamp_min(1e-12)) * g_ref


@STRATEGIES.register("agem", rehearsal=True)
class AGEM(ERACE):
    """ERACE's buffer as episodic memory; gradients projected in ``after_backward``."""

    key = "agem"

    def __init__(self, cfg: Any, data: Any) -> None:
        super().__init__(cfg, data)
        self.pending: int | None = None  # the memory slot drawn for this step

    def train_classes(self, t: int) -> list[int]:
        return self.cfg.allowed(t)

    def extra_losses(
        self, net: nn.Module, batch: dict[str, Any], out: Any, allowed: list[int], t: int
    ) -> dict[str, torch.Tensor]:
        self.pending = self.buffer.draw(self.rng) if t > 0 and len(self.buffer) else None  # drawn before the add
        self.buffer.offer(batch, self.rng)
        return {}

    def after_backward(self, net: nn.Module, t: int) -> None:
        import torch
        import torch.nn.functional as F

        from pathopeft.mil.module import masked

        if self.pending is None:
            return
        bag, self.pending = self.buffer.bags[self.pending], None
        params = [p for p in net.parameters() if p.requires_grad]
        g = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
        for p in params:
            p.grad = None
        device = params[0].device
        logits = bag_logits(net, bag, device)
        label = torch_label(bag["label"], device)
        F.cross_entropy(masked(logits, self.cfg.seen_classes(t))[None], label).backward()
        g_ref = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
        new, i = project(g, g_ref), 0
        for p in params:
            p.grad = new[i : i + p.numel()].view_as(p).clone()
            i += p.numel()
