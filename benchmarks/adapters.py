"""Adapter cost benchmark (issue 3): train-step time and peak memory against PEFT's LoRA, merged inference.

For a timm ViT (default ViT-S/16, 224 px, random init: cost does not depend on the weights) and every method
of ``pathopeft.adapters.list_methods()`` at the same rank and targets, this prints a Markdown table of

* trainable parameters (count and % of the base model);
* train-step time (forward + backward + AdamW step), best of N and median, and its ratio to LoRA's at the
  same rank, all models timed in interleaved rounds in one process so drift hits them alike;
* peak extra memory of a train step, measured in a fresh subprocess per method: the process's resident-set
  high-water mark (``VmHWM``, reset through ``/proc/self/clear_refs`` after a warm-up step) minus its RSS
  before the measured steps; on CUDA ``torch.cuda.max_memory_allocated`` instead;
* merged inference time (``merge_and_unload``) relative to the bare base model.

Extra rows put the methods in context: ``wara (2r)`` has LoRA-r's parameter count (the paper's WaRA has
half of LoRA's parameters at the same r), so does ``wara-subband (r/2)`` (pathopeft's per-subband design has
twice LoRA's), and ``dense-masked`` is a sparse-tuning baseline in the SPT/GPS style
(a dense trainable ΔW per layer with a fixed mask at SNELLA's sparsity), the kind of method SNELLA's
memory claim (31–40 % less) is made against.

Usage::

    python benchmarks/adapters.py                          # ViT-S/16, batch 8, attn, rank 8 (CPU: ~5 min)
    python benchmarks/adapters.py --quick                  # tiny ViT, seconds
    python benchmarks/adapters.py --model vit_base_patch16_224 --batch 64 --device cuda --bf16   # GPU
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import timm
import torch
from torch import nn

from pathopeft import adapters
from pathopeft.adapters.core import AdapterConfig, Delta
from pathopeft.memory import peak_mib, start_peak

# --- a sparse-tuning baseline for SNELLA's memory claim ---------------------------------------------------------


@dataclass
class DenseMaskedConfig(AdapterConfig):
    adapter_type: ClassVar[str] = "dense-masked"
    sparsity: float = 0.9


class DenseMaskedDelta(Delta):
    """SPT/GPS-style sparse tuning: a dense trainable ΔW (and its optimizer state) with a fixed mask."""

    def __init__(self, base: nn.Module, config: DenseMaskedConfig) -> None:
        super().__init__(base, config)
        self.dw = nn.Parameter(torch.zeros(self.out_features, self.in_features))
        self.register_buffer("mask", (torch.rand(self.out_features, self.in_features) >= config.sparsity).float())

    def delta_weight(self, base: nn.Module) -> torch.Tensor:
        return self.dw * self.mask

    @staticmethod
    def expected_trainable(out_features: int, in_features: int, config: DenseMaskedConfig) -> int:
        return out_features * in_features


adapters.register("dense-masked", DenseMaskedConfig, DenseMaskedDelta)


# --- runs ---------------------------------------------------------------------------------------------------------
def variants(rank: int) -> list[tuple[str, str, dict]]:
    """(label, method, kwargs) in table order; LoRA first (the reference)."""
    out = [("lora", "lora", {"rank": rank}), ("dora", "dora", {"rank": rank}), ("pissa", "pissa", {"rank": rank})]
    out += [
        ("salt", "salt", {"rank": rank, "r_lora": rank}),
        (
            "salt (ReLU on singular values, factored)",
            "salt",
            {"rank": rank, "r_lora": rank, "relu": "singular_values"},
        ),
        ("wara", "wara", {"rank": rank}),
        (f"wara (r={2 * rank}, LoRA's params)", "wara", {"rank": 2 * rank}),
        (f"wara-subband (r={max(1, rank // 2)}, LoRA's params)", "wara-subband", {"rank": max(1, rank // 2)}),
        ("snella", "snella", {"rank": rank}),
        ("snella (no checkpoint)", "snella", {"rank": rank, "checkpoint": False}),
        ("dense-masked (sparse-tuning baseline)", "dense-masked", {}),
    ]
    from pathopeft.adapters import ADAPTERS, list_methods

    listed = {m for _, m, _ in out}
    out += [
        (name, name, {"rank": rank})
        for name in list_methods()
        if name not in listed and not ADAPTERS.entry(name).caps["needs_data"]
    ]  # every other registered method
    return out


def build_model(args: argparse.Namespace) -> nn.Module:
    kw = json.loads(args.model_kwargs) if args.model_kwargs else {}
    return timm.create_model(args.model, num_classes=10, **kw)


def make(args: argparse.Namespace, method: str | None, kwargs: dict) -> nn.Module:
    torch.manual_seed(0)
    model = build_model(args)
    if method is not None:
        model = adapters.create(method, model, targets=args.targets, **kwargs)
    else:  # the floor: a frozen backbone with a trainable classifier head
        for n, p in model.named_parameters():
            p.requires_grad_(n.startswith("head"))
    return model.to(args.device)


def batch(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, args.img, args.img, generator=g)
    y = torch.randint(0, 10, (args.batch,), generator=g)
    return x.to(args.device), y.to(args.device)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def make_step(model: nn.Module, args: argparse.Namespace):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    x, y = batch(args)

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=args.bf16 and args.device.startswith("cuda")):
            loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def timed(fn, device: str) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


# glibc serves every allocation above 64 KiB with its own mmap and returns it on free, so the resident set
# follows live tensors instead of the allocator's retained pools: VmHWM then measures the real peak.
MALLOC_ENV = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0", "MALLOC_ARENA_MAX": "1"}


def measure_memory(args: argparse.Namespace, method: str | None, kwargs: dict) -> float:
    """Peak extra MiB over the model at rest during ``args.mem_steps`` train steps (run in a fresh process).

    Counted from before the first step, so optimizer state and activations are both in it."""
    model = make(args, method, kwargs).train()
    step = make_step(model, args)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        for _ in range(args.mem_steps):
            step()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    before = start_peak()  # the model at rest, before any step: optimizer state counts as the method's
    for _ in range(args.mem_steps):
        step()
    return peak_mib(before)


def memory_in_subprocess(args: argparse.Namespace, label: str, method: str | None, kwargs: dict) -> float:
    cmd = [sys.executable, __file__, "--_memory", json.dumps([method, kwargs]), *args.passthrough]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False, env=MALLOC_ENV)
    if out.returncode != 0:
        print(f"memory run for {label} failed:\n{out.stderr[-2000:]}", file=sys.stderr)
        return float("nan")
    return float(out.stdout.strip().splitlines()[-1])


def n_params(model: nn.Module) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for n, p in model.named_parameters() if not p.requires_grad)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vit_small_patch16_224")
    p.add_argument("--model-kwargs", default="", help="JSON kwargs for timm.create_model")
    p.add_argument("--img", type=int, default=224)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--targets", default="attn")
    p.add_argument("--device", default="cpu")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (CUDA only)")
    p.add_argument("--rounds", type=int, default=5, help="timed steps per method (interleaved rounds)")
    p.add_argument("--mem-steps", type=int, default=2)
    p.add_argument("--infer-rounds", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="tiny ViT, for a smoke run")
    p.add_argument("--only", nargs="+", help="these methods' rows only (LoRA's is always kept as the reference)")
    p.add_argument("--out", help="also write the Markdown to this file")
    p.add_argument("--_memory", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.model, args.img, args.batch, args.rounds, args.infer_rounds = "vit_tiny_patch16_224", 64, 4, 3, 3
        args.model_kwargs = args.model_kwargs or json.dumps({"img_size": 64, "depth": 2})
    pairs = {"--model": args.model, "--model-kwargs": args.model_kwargs, "--img": args.img, "--batch": args.batch,
             "--targets": args.targets, "--device": args.device, "--mem-steps": args.mem_steps}  # fmt: skip
    args.passthrough = [a for k, v in pairs.items() for a in (k, str(v))] + (["--bf16"] if args.bf16 else [])
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args._memory:
        method, kwargs = json.loads(args._memory)
        print(measure_memory(args, method, kwargs))
        return 0

    t_start = time.perf_counter()
    runs = variants(args.rank)
    if args.only:
        runs = [r for r in runs if r[0] == "lora" or r[1] in args.only]
    models = {label: make(args, m, kw).train() for label, m, kw in runs}
    counts = {label: n_params(m) for label, m in models.items()}
    steps = {label: make_step(m, args) for label, m in models.items()}
    for s in steps.values():  # warm-up (lazy SVDs, allocator pools, first-call overheads)
        s()
    times: dict[str, list[float]] = {label: [] for label in models}
    for _ in range(args.rounds):
        for label, s in steps.items():
            times[label].append(timed(s, args.device))
        print(".", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)

    base = make(args, None, {}).eval()
    x, _ = batch(args)
    merged = {}
    for label, m in models.items():
        m.eval()
        merged[label] = m.merge_and_unload().eval()
    infer: dict[str, list[float]] = {"base": [], **{label: [] for label in merged}}
    with torch.inference_mode():
        for mdl in [base, *merged.values()]:
            mdl(x)
        for _ in range(args.infer_rounds):
            infer["base"].append(timed(lambda: base(x), args.device))
            for label, mdl in merged.items():
                infer[label].append(timed(lambda mdl=mdl: mdl(x), args.device))
    del models, merged, steps

    mem = {"none (frozen base, no adapter)": measure_memory_baseline(args)}
    for label, m, kw in runs:
        mem[label] = memory_in_subprocess(args, label, m, kw)
        print(f"memory {label}: {mem[label]:.1f} MiB", file=sys.stderr)

    ref_t, ref_m = min(times["lora"]), mem["lora"]
    base_inf = min(infer["base"])
    lines = [
        (
            f"Model `{args.model}` {args.model_kwargs or ''} at {args.img} px, batch {args.batch}, targets "
            f"`{args.targets}`, rank {args.rank}, AdamW, device {args.device}{' bf16 autocast' if args.bf16 else ''}; "
            f"torch {torch.__version__}, timm {timm.__version__}, {platform.processor() or platform.machine()}, "
            f"{os.cpu_count()} CPU threads; load average {' / '.join(f'{v:.2f}' for v in os.getloadavg())}."
        ),
        (
            f"Step time: best of {args.rounds} interleaved rounds (median in brackets). Peak memory: extra MiB "
            f"over the model at rest (before the first step: activations, gradients, optimizer state) during "
            f"{args.mem_steps} train steps, each method in its own process."
        ),
        "",
        "| method | trainable | % of base | step ms | × LoRA step | peak MiB | × LoRA mem | merged inference × base |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, _, _ in runs:
        t, total = counts[label]
        best, med = min(times[label]), statistics.median(times[label])
        lines.append(
            f"| {label} | {t:,} | {100 * t / total:.3f} | {1000 * best:.0f} ({1000 * med:.0f}) | "
            f"{best / ref_t:.2f} | {mem[label]:.0f} | {mem[label] / ref_m:.2f} | {min(infer[label]) / base_inf:.2f} |"
        )
    lines.append(
        f"\nFrozen base model without adapter, same batch (forward+backward to the input-side, no optimizer): "
        f"peak {mem['none (frozen base, no adapter)']:.0f} MiB. Base inference {1000 * base_inf:.0f} ms per batch. "
        f"Total benchmark time {time.perf_counter() - t_start:.0f} s."
    )
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


def measure_memory_baseline(args: argparse.Namespace) -> float:
    """A frozen model with only the classifier head trainable: the floor every method adds to."""
    cmd = [sys.executable, __file__, "--_memory", json.dumps([None, {}]), *args.passthrough]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False, env=MALLOC_ENV)
    try:
        return float(out.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        return float("nan")


if __name__ == "__main__":
    raise SystemExit(main())
