"""Per-task adapters that combine (issue 17): merging, reverting and routing on the two-organ task stream.

Protocol (Orthogonal Adaptation's: every task's adapter is trained *separately* from one shared base, then the
adapters are combined without data): the base is the MIL net built from the seed (GDAT at the continual table's
width), its bag classifier frozen at init, so that every adapter speaks to the same 4-way output. Per task
(``lung``, ``oral``) one adapter of rank r is trained on that task's bags only (its two classes), Adam, one bag
per step. Then, evaluated 4-way on every task's test bags (class-incremental: the model must also tell the
organs apart):

* ``per-task + oracle``: each task's own adapter on its own bags (the task label given: the upper bound);
* ``per-task + router``: the adapter picked per bag by :class:`pathopeft.mil.routing.TaskRouter` (no label);
* ``sum (task arithmetic)``: θ + Σ ΔW_t — PEFT's ``cat`` merge, exact;
* ``LoRA-LEGO k=r``: :func:`pathopeft.adapters.merging.lego_merge` to one rank-r LoRA;
* ``RMM K=1 + router``: a basis of one LoRA, each task reverted (:mod:`pathopeft.adapters.rmm`), routed;
* ``orthoadapt sum``: per-task adapters with frozen orthogonal A blocks, trained the same way, summed;
* ``joint LoRA``: one adapter trained on both tasks' bags (the data-sharing upper bound).

Beside the accuracies, each method's cost: the numbers a deployment keeps beside the base model (a merge folded
into W keeps none; a library keeps every task's factors and the router's prototypes; RMM its basis and
coefficients), the seconds to combine the trained adapters (data-free for the merges; the router's fit reads the
training bags' mean features), and whether inference runs one model or picks one per bag.

Usage::

    python benchmarks/merge_mil.py --manifest runs/two_organ_bags/bags.csv --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import copy
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Self

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from pathopeft import adapters
from pathopeft.adapters.merging import lego_merge, peft_lora_factors
from pathopeft.adapters.rmm import rmm_fit, rmm_revert
from pathopeft.mil.data import PreparedBags, read_bag_manifest, validate_bags
from pathopeft.mil.models import bag_logits, create_mil_model
from pathopeft.mil.routing import TaskRouter
from pathopeft.mil.strategies.adapter import adapted_layers

CLASSES = ["lung_normal", "lung_scc", "oral_normal", "oral_scc"]
TASKS = ["lung", "oral"]


def train(net, bags, epochs: int, lr: float, seed: int, on_epoch: Callable[[int], None] | None = None) -> None:
    """Adam, one bag per step, bags shuffled each epoch by ``seed``; ``on_epoch(e)`` after each epoch."""
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    rng = random.Random(seed)
    net.train()
    for epoch in range(epochs):
        for i in rng.sample(range(len(bags)), len(bags)):
            opt.zero_grad()
            F.cross_entropy(bag_logits(net, bags[i])[None], torch.as_tensor([bags[i]["label"]])).backward()
            opt.step()
        if on_epoch is not None:
            on_epoch(epoch)


def base_net(in_dim: int, width: int, seed: int, n_classes: int | None = None):
    """The frozen GDAT base (``n_classes`` outputs; default: every class of the stream)."""
    torch.manual_seed(seed)
    kw = {"hidden_dim": width, "heads": max(1, width // 64), "attn_dim": width // 2, "dropout": 0.0}
    net = create_mil_model("gdat", in_dim, n_classes or len(CLASSES), **kw)
    for p in net.parameters():
        p.requires_grad_(False)
    return net.eval()


def with_deltas(base, deltas: dict[str, torch.Tensor]):
    net = copy.deepcopy(base)
    with torch.no_grad():
        for name, dw in deltas.items():
            w = net.get_submodule(name).weight
            w.add_(dw.reshape(w.shape).to(w.dtype))
    return net.eval()


@torch.no_grad()
def accuracy(pick, bags) -> float:
    """4-way accuracy, ``pick(bag)`` giving the net to use for that bag."""
    return float(np.mean([int(bag_logits(pick(b), b).argmax()) == int(b["label"]) for b in bags]))


def lora_task(base, bags, rank: int, epochs: int, lr: float, seed: int):
    import peft

    net = copy.deepcopy(base)
    torch.manual_seed(seed)
    model = peft.get_peft_model(net, peft.LoraConfig(r=rank, lora_alpha=rank, target_modules=adapted_layers(net)))
    train(model, bags, epochs, lr, seed)
    return peft_lora_factors(model)


def ortho_task(base, bags, rank: int, task: int, epochs: int, lr: float, seed: int) -> dict[str, torch.Tensor]:
    from pathopeft.adapters.core import AdaptedLayer

    net = copy.deepcopy(base)
    torch.manual_seed(seed)
    model = adapters.create("orthoadapt", net, rank=rank, targets=adapted_layers(net), task=task)
    train(model, bags, epochs, lr, seed)
    return {n: m.deltas["default"].delta_weight(m.base_layer).detach()
            for n, m in model.base_model.named_modules() if isinstance(m, AdaptedLayer)}  # fmt: skip


def n_numbers(pairs) -> int:
    """How many numbers a ``{layer: (B, A)}`` LoRA (or any ``{layer: (tensor, tensor)}``) stores."""
    return sum(x.numel() + y.numel() for x, y in pairs.values())


class Stopwatch:
    """Seconds spent inside ``with watch:`` blocks, summed."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def __enter__(self) -> Self:
        self._t = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds += time.perf_counter() - self._t


def run_seed(data: PreparedBags, width: int, rank: int, epochs: int, lr: float, seed: int) -> dict[str, float]:
    """Every method of the module docstring for one seed: ``{"method|task": accuracy, …}``, plus each method's
    ``"method|stored"`` (numbers kept beside the base) and ``"method|combine s"``."""
    split = {(t, s): data.loaded(data.bags(t, s)) for t in TASKS for s in ("train", "test")}
    base = base_net(data.in_dim, width, seed)
    t0 = time.perf_counter()
    loras = [lora_task(base, split[(t, "train")], rank, epochs, lr, seed + i) for i, t in enumerate(TASKS)]
    deltas = [{n: B @ A for n, (B, A) in f.items()} for f in loras]
    per_task = [with_deltas(base, d) for d in deltas]
    with Stopwatch() as fit_router:
        router = TaskRouter.fit([split[(t, "train")] for t in TASKS], TASKS)
    library = sum(n_numbers(f) for f in loras)
    test = {i: split[(t, "test")] for i, t in enumerate(TASKS)}
    out: dict[str, float] = {}

    def cost(name: str, stored: int, combine_s: float) -> None:
        out[f"{name}|stored"], out[f"{name}|combine s"] = float(stored), combine_s

    def score(name: str, pick_for_task) -> None:
        accs = [accuracy(lambda b, i=i: pick_for_task(i, b), test[i]) for i in test]
        out.update({f"{name}|{t}": a for t, a in zip(TASKS, accs, strict=True)})
        out[f"{name}|avg"] = float(np.mean(accs))

    score("per-task + oracle", lambda i, b: per_task[i])
    cost("per-task + oracle", library, 0.0)
    score("per-task + router", lambda i, b: per_task[router.route(b)])
    cost("per-task + router", library + router.prototypes.numel(), fit_router.seconds)
    out["router accuracy"] = float(np.mean([router.route(b) == i for i in test for b in test[i]]))
    with Stopwatch() as watch:
        summed = with_deltas(base, {n: sum(d[n] for d in deltas) for n in deltas[0]})
    score("sum (task arithmetic)", lambda i, b: summed)
    cost("sum (task arithmetic)", 0, watch.seconds)
    with Stopwatch() as watch:
        lego = with_deltas(base, {n: B @ A for n, (B, A) in lego_merge(loras, k=rank, seed=seed).items()})
    score(f"LoRA-LEGO k={rank}", lambda i, b: lego)
    cost(f"LoRA-LEGO k={rank}", 0, watch.seconds)
    with Stopwatch() as watch:
        rmm = rmm_fit(loras, k=1, tasks=TASKS)
        reverted = [
            with_deltas(base, {n: B @ A for n, (B, A) in rmm_revert(rmm, i).items()}) for i in range(len(TASKS))
        ]
    score("RMM K=1 + router", lambda i, b: reverted[router.route(b)])
    rmm_numbers = n_numbers(rmm.basis) + n_numbers(rmm.coefficients)
    cost("RMM K=1 + router", rmm_numbers + router.prototypes.numel(), watch.seconds + fit_router.seconds)
    ortho = [ortho_task(base, split[(t, "train")], rank, i, epochs, lr, seed + i) for i, t in enumerate(TASKS)]
    with Stopwatch() as watch:
        ortho_sum = with_deltas(base, {n: sum(d[n] for d in ortho) for n in ortho[0]})
    score("orthoadapt sum", lambda i, b: ortho_sum)
    cost("orthoadapt sum", 0, watch.seconds)
    with Stopwatch() as watch:
        joint_f = lora_task(base, [b for t in TASKS for b in split[(t, "train")]], rank, epochs, lr, seed)
        joint = with_deltas(base, {n: B @ A for n, (B, A) in joint_f.items()})
    score("joint LoRA", lambda i, b: joint)
    cost("joint LoRA", 0, watch.seconds)  # not a combination: a training run on every task's bags
    out["time s"] = time.perf_counter() - t0
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--manifest", type=Path, default=ROOT / "runs" / "two_organ_bags" / "bags.csv")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--classes", nargs="+", default=CLASSES)
    p.add_argument("--tasks", nargs="+", default=TASKS)
    args = p.parse_args(argv)
    CLASSES[:], TASKS[:] = args.classes, args.tasks
    records = [r for r in read_bag_manifest(args.manifest) if r.task in TASKS]
    kept, _, in_dim = validate_bags(records, CLASSES)
    data = PreparedBags(kept, [], in_dim, CLASSES)
    rows = [run_seed(data, args.width, args.rank, args.epochs, args.lr, s) for s in args.seeds]
    methods = list(dict.fromkeys(k.split("|")[0] for k in rows[0] if "|" in k))
    print(f"seeds {args.seeds}; GDAT width {args.width}, rank {args.rank}, {args.epochs} epochs per task, "
          f"lr {args.lr}; router accuracy {np.mean([r['router accuracy'] for r in rows]):.3f}; "
          f"{np.mean([r['time s'] for r in rows]):.0f} s per seed")  # fmt: skip
    print(f"\n| method | {' | '.join(f'{t} acc' for t in TASKS)} | avg acc ({len(CLASSES)}-way) "
          "| numbers kept beside the base | combine s | inference |")  # fmt: skip
    print("|---|" + "---:|" * (len(TASKS) + 3) + "---|")
    for m in methods:
        cells = []
        for col in (*TASKS, "avg"):
            v = [r[f"{m}|{col}"] for r in rows]
            cells.append(f"{np.mean(v):.3f} ± {np.std(v):.3f}")
        cells.append(f"{int(np.mean([r[f'{m}|stored'] for r in rows])):,}")
        cells.append(f"{np.mean([r[f'{m}|combine s'] for r in rows]):.3f}")
        cells.append("one adapter picked per bag" if "router" in m or "oracle" in m else "one merged model")
        print(f"| {m} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
