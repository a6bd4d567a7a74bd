"""A LoRA for a cancer type with no training data, generated from its description (issue 17, SG-LoRA's row).

Protocol (leave one task out, the zero-shot open-world setting of SG-LoRA's outline): three binary MIL tasks
of tumour against benign tissue on the three-task bag set (``pipelines/two_organ_bags.py --with-lung-aca``),

* ``lung``     — lung squamous cell carcinoma versus benign lung tissue,
* ``oral``     — oral squamous cell carcinoma versus normal oral mucosa,
* ``lung_aca`` — lung adenocarcinoma versus benign lung tissue,

share one frozen GDAT base with a 2-way head (benign, tumour) frozen at init, so every adapter speaks to the
same output. Each task's expert LoRA is trained ``--runs`` times (different data orders, one LoRA
initialisation for the whole library) and its last ``--snapshots`` epochs are kept as checkpoints. Then each
task in turn is held out: a generator (:mod:`pathopeft.adapters.lora_generation`, WordLlama descriptions) is
fitted on the other tasks' checkpoints alone, and every way of getting an adapter for the held-out task *without
its data* is scored on its test bags:

* ``base``: no adapter (the frozen head at init);
* ``top-1 expert``: the expert whose description is nearest (a text router);
* ``uniform merge``: the mean of the experts' ΔW;
* ``weighted merge``: Σ wₖ ΔWₖ with the generator's semantic weights (the deterministic fusion SG-LoRA
  contrasts itself with);
* ``generated (z = 0)`` and ``generated (5 samples)``: the generator's LoRA(s) for the description;
* ``oracle``: the held-out task's own experts (its data used: the upper bound).

Beside them, the generator's fidelity: asked for each task it *was* fitted on (that expert's own description),
scored on that task's test bags, against the expert itself (both averaged over the library's tasks).

Usage::

    python benchmarks/generate_mil.py --manifest runs/three_task_bags/bags.csv --seeds 0 1 2 \
        --save-library runs/three_task_library
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from merge_mil import accuracy, base_net, train, with_deltas

from pathopeft.adapters.lora_generation import Expert, GeneratorConfig, LoRAGenerator
from pathopeft.adapters.merging import peft_lora_factors
from pathopeft.mil.data import PreparedBags, read_bag_manifest, validate_bags
from pathopeft.mil.strategies.adapter import adapted_layers

DESCRIPTIONS = {
    "lung": "lung squamous cell carcinoma versus benign lung tissue",
    "oral": "oral squamous cell carcinoma versus normal oral mucosa",
    "lung_aca": "lung adenocarcinoma versus benign lung tissue",
}
CLASSES = ["lung_normal", "lung_scc", "oral_normal", "oral_scc", "lung_aca"]


def binary(bags: list[dict]) -> list[dict]:
    """The bags with label 1 for tumour, 0 for benign (the class name says which)."""
    return [{**b, "label": int(not CLASSES[int(b["label"])].endswith("normal"))} for b in bags]


def train_expert(
    base, bags, rank: int, epochs: int, snapshots: int, lr: float, init_seed: int, order_seed: int,
    save_to: Path | None = None,
):  # fmt: skip
    """One LoRA run: the factors after each of the last ``snapshots`` epochs (also saved as PEFT folders
    ``save_to/epoch<e>`` when given)."""
    import peft

    torch.manual_seed(init_seed)  # one initialisation for the whole library
    model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=rank, lora_alpha=rank,
                                                                     target_modules=adapted_layers(base)))  # fmt: skip
    kept = []

    def snapshot(epoch: int) -> None:
        if epoch >= epochs - snapshots:
            if save_to is not None:
                model.save_pretrained(save_to / f"epoch{epoch}")
            kept.append({n: (B.clone(), A.clone()) for n, (B, A) in peft_lora_factors(model).items()})

    train(model, bags, epochs, lr, order_seed, on_epoch=snapshot)
    return kept


def net_accuracy(net, bags) -> float:
    return accuracy(lambda _bag: net, bags)


def mean_delta(checkpoints) -> dict[str, torch.Tensor]:
    return {n: torch.stack([c[n][0] @ c[n][1] for c in checkpoints]).mean(0) for n in checkpoints[0]}


def run_seed(data: PreparedBags, tasks: list[str], args: argparse.Namespace, seed: int) -> dict[str, float]:
    """``{"method|held-out task": accuracy, …}`` for one seed."""
    split = {(t, s): binary(data.loaded(data.bags(t, s))) for t in tasks for s in ("train", "test")}
    base = base_net(data.in_dim, args.width, seed, n_classes=2)
    save = args.save_library if seed == args.seeds[0] else None
    runs = {t: [train_expert(base, split[(t, "train")], args.rank, args.epochs, args.snapshots, args.lr,
                             init_seed=1000 + seed, order_seed=100 * seed + r,
                             save_to=save / t / f"run{r}" if save else None) for r in range(args.runs)]
            for t in tasks}  # fmt: skip
    finals = {t: [with_deltas(base, mean_delta(run[-1:])) for run in runs[t]] for t in tasks}  # each run's last
    own_accuracy = {t: float(np.mean([net_accuracy(n, split[(t, "test")]) for n in finals[t]])) for t in tasks}
    if save:
        (save / "library.yaml").write_text("experts:\n" + "".join(
            f"  - name: {t}\n    description: {DESCRIPTIONS[t]}\n    adapters: [{t}/run*/epoch*]\n" for t in tasks))  # fmt: skip
    out: dict[str, float] = {}
    for held in tasks:
        test = split[(held, "test")]
        library = [t for t in tasks if t != held]
        experts = [Expert(t, DESCRIPTIONS[t], [c for run in runs[t] for c in run]) for t in library]
        t0 = time.perf_counter()
        gen = LoRAGenerator.fit(experts, "wordllama", GeneratorConfig(seed=seed))
        out[f"fit s|{held}"] = time.perf_counter() - t0
        cond, weights = gen.condition(DESCRIPTIONS[held])
        deltas = {t: mean_delta(e.checkpoints) for t, e in zip(library, experts, strict=True)}

        def score(name: str, delta: dict[str, torch.Tensor] | None, held: str = held, test=test) -> None:
            out[f"{name}|{held}"] = net_accuracy(base if delta is None else with_deltas(base, delta), test)

        score("base (no adapter)", None)
        nearest = max(weights, key=weights.get)
        out[f"nearest|{held}"] = float(library.index(nearest))
        out[f"weight of nearest|{held}"] = weights[nearest]
        out[f"top-1 expert by description|{held}"] = float(np.mean([net_accuracy(n, test) for n in finals[nearest]]))
        layers = list(deltas[library[0]])
        score("uniform merge of experts", {n: sum(d[n] for d in deltas.values()) / len(deltas) for n in layers})
        score(
            "weighted merge (semantic weights)", {n: sum(weights[t] * deltas[t][n] for t in library) for n in layers}
        )
        score("generated, z = 0", mean_delta(gen.generate_from(cond)))
        sampled = [net_accuracy(with_deltas(base, mean_delta([f])), test) for f in gen.generate_from(cond, 5, seed)]
        out[f"generated, 5 samples (mean)|{held}"] = float(np.mean(sampled))
        # fidelity: the generator asked for a task it was fitted on, scored on that task, against the expert
        out[f"in-library: generated for the expert's own description|{held}"] = float(np.mean(
            [net_accuracy(with_deltas(base, mean_delta(gen.generate(DESCRIPTIONS[t]))), split[(t, "test")])
             for t in library]))  # fmt: skip
        out[f"in-library: the expert itself|{held}"] = float(np.mean([own_accuracy[t] for t in library]))
        out[f"oracle (own data)|{held}"] = own_accuracy[held]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--manifest", type=Path, default=ROOT / "runs" / "three_task_bags" / "bags.csv")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--snapshots", type=int, default=3, help="checkpoints kept per run: the last N epochs")
    p.add_argument("--runs", type=int, default=3, help="runs (data orders) per expert")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--save-library", type=Path, help="save the first seed's expert checkpoints (PEFT folders) and "
                   "their library.yaml here, for `pathopeft adapters generator-fit`")  # fmt: skip
    args = p.parse_args(argv)
    tasks = list(DESCRIPTIONS)
    records = [r for r in read_bag_manifest(args.manifest) if r.task in tasks]
    kept, _, in_dim = validate_bags(records, CLASSES)
    data = PreparedBags(kept, [], in_dim, CLASSES)
    t0 = time.perf_counter()
    rows = [run_seed(data, tasks, args, s) for s in args.seeds]
    methods = [k.split("|")[0] for k in rows[0] if k.endswith(f"|{tasks[0]}")]
    methods = [m for m in methods if m not in ("fit s", "nearest", "weight of nearest")]
    print(f"seeds {args.seeds}; GDAT width {args.width}, LoRA rank {args.rank}, {args.epochs} epochs, "
          f"{args.runs} runs × {args.snapshots} checkpoints per expert; "
          f"{(time.perf_counter() - t0) / len(rows):.0f} s per seed; generator fit "
          f"{np.mean([r[f'fit s|{t}'] for r in rows for t in tasks]):.1f} s")  # fmt: skip
    for t in tasks:
        lib = [x for x in tasks if x != t]
        near = [lib[int(r[f"nearest|{t}"])] for r in rows]
        print(
            f"held out {t!r}: nearest expert {near[0]} (weight {np.mean([r[f'weight of nearest|{t}'] for r in rows]):.3f})"
        )
    print("\n| held-out task → | " + " | ".join(tasks) + " | mean |")
    print("|---|" + "---:|" * (len(tasks) + 1))
    for m in methods:
        cells = []
        for t in tasks:
            v = [r[f"{m}|{t}"] for r in rows]
            cells.append(f"{np.mean(v):.3f} ± {np.std(v):.3f}")
        cells.append(f"{np.mean([r[f'{m}|{t}'] for r in rows for t in tasks]):.3f}")
        print(f"| {m} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
