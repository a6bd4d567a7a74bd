"""MIL model scaling benchmark: forward+backward time and peak memory of ABMIL, TransMIL and GDAT against the
bag size N, to show that all three are linear in N (no N×N attention) and what each costs per slide.

For every (model, N) a fresh subprocess builds the model (``hidden_dim`` H, random init: cost does not depend
on the weights) and a random bag of N instances with D-dim features and coordinates on a square tile grid,
then runs one warm-up pass and

* peak memory of one forward + backward (cross-entropy on the bag logits): on CPU the resident-set
  high-water mark (``VmHWM``, reset by writing ``5`` to ``/proc/self/clear_refs``) minus the RSS before the
  pass, i.e. activations and gradients over the model and the bag at rest; on CUDA
  ``torch.cuda.max_memory_allocated`` minus the memory allocated before the pass;
* forward + backward time, best of ``--rounds``;

and the table adds t(N) / t(N/10) per model: ≈ 10 is linear scaling, ≈ 100 would be quadratic (at small N
fixed costs, e.g. TransMIL's m×m pseudo-inverse, make it smaller). A pass slower than ``--max-pass-s`` is
timed once and flagged in the table instead of repeated.

Usage::

    python benchmarks/mil_scaling.py                               # CPU, N = 1e3, 1e4, 1e5, D = 512 (minutes)
    python benchmarks/mil_scaling.py --sizes 1000,10000 --dim 64   # quick
    python benchmarks/mil_scaling.py --device cuda --out /tmp/mil_scaling.md
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Sequence

import torch

from pathopeft.memory import peak_mib, start_peak
from pathopeft.mil.models import create_mil_model

MODELS = ("abmil", "transmil", "gdat", "gdat-grid")  # gdat = the official CDAT; gdat-grid = pathopeft's own


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def make_bag(n: int, dim: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Random features and level-0 coordinates of n tiles laid out row-major on a square 256-px grid."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, dim, generator=g)
    side = math.isqrt(n - 1) + 1
    idx = torch.arange(n)
    coords = torch.stack([idx % side, idx // side], dim=1) * 256
    return x.to(device), coords.to(device)


def run_one(name: str, n: int, args: argparse.Namespace) -> dict:
    """Memory and timing of one (model, N) in this process (called in a fresh subprocess)."""
    torch.manual_seed(0)
    model = create_mil_model(name, in_dim=args.dim, n_classes=2, hidden_dim=args.hidden).to(args.device).train()
    x, coords = make_bag(n, args.dim, args.device)
    y = torch.tensor([1], device=args.device)

    def step() -> None:
        model.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(x, coords).bag_logits[None], y)
        loss.backward()

    def timed() -> float:
        _sync(args.device)
        t0 = time.perf_counter()
        step()
        _sync(args.device)
        return time.perf_counter() - t0

    warm = timed()
    model.zero_grad(set_to_none=True)
    gc.collect()
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        first = timed()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        before = start_peak()
        first = timed()
        peak = peak_mib(before)
    times = [first]
    slow = max(warm, first) > args.max_pass_s
    if not slow:
        times += [timed() for _ in range(args.rounds - 1)]
    n_params = sum(p.numel() for p in model.parameters())
    return {"times": times, "warmup": warm, "peak_mib": peak, "slow": slow, "params": n_params}


def run_in_subprocess(name: str, n: int, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--_one", json.dumps([name, n]), *args.passthrough]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        tail = out.stderr.strip().splitlines()[-1:] or [f"exit code {out.returncode}"]
        print(f"{name} N={n} failed:\n{out.stderr[-2000:]}", file=sys.stderr)
        return {"error": tail[0][:80]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--sizes", default="1000,10000,100000", help="comma-separated bag sizes N")
    p.add_argument("--dim", type=int, default=512, help="instance feature size D")
    p.add_argument("--hidden", type=int, default=256, help="hidden size H of every model")
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--rounds", type=int, default=3, help="timed passes (best is reported)")
    p.add_argument("--max-pass-s", type=float, default=60.0, help="time a slower pass only once and flag it")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--out", help="also write the Markdown to this file")
    p.add_argument("--_one", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.size_list = [int(float(s)) for s in args.sizes.split(",") if s.strip()]
    args.model_list = [m.strip() for m in args.models.split(",") if m.strip()]
    pairs = {"--device": args.device, "--dim": args.dim, "--hidden": args.hidden, "--rounds": args.rounds,
             "--max-pass-s": args.max_pass_s, "--threads": args.threads}  # fmt: skip
    args.passthrough = [a for k, v in pairs.items() for a in (k, str(v))]
    return args


def _device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads"


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args._one:
        name, n = json.loads(args._one)
        print(json.dumps(run_one(name, n, args)))
        return 0

    t_start = time.perf_counter()
    load_before = os.getloadavg()
    results: dict[tuple[str, int], dict] = {}
    for name in args.model_list:
        for n in args.size_list:
            r = results[name, n] = run_in_subprocess(name, n, args)
            msg = r.get("error") or f"{1000 * min(r['times']):.0f} ms, {r['peak_mib']:.0f} MiB"
            print(f"{name} N={n}: {msg}", file=sys.stderr)

    mem_what = "max_memory_allocated" if args.device.startswith("cuda") else "VmHWM − RSS"
    lines = [
        (
            f"Bag of N instances, D = {args.dim}, H = {args.hidden}, 2 classes, train mode, forward + backward "
            f"(cross-entropy on the bag logits), fp32, device {args.device} ({_device_name(args.device)}); "
            f"torch {torch.__version__}, {os.cpu_count()} CPUs; load average before/after "
            f"{load_before[0]:.2f} / {os.getloadavg()[0]:.2f}."
        ),
        (
            f"Time: best of {args.rounds} passes after one warm-up. Peak: extra MiB of one pass over the model and "
            f"bag at rest ({mem_what}), each (model, N) in a fresh process. × t(N/10): time ratio to the size "
            f"ten times smaller (≈ 10 = linear)."
        ),
        "",
        "| model | params | N | fwd+bwd ms | × t(N/10) | peak MiB | MiB per 1k instances |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name in args.model_list:
        for n in args.size_list:
            r = results[name, n]
            if "error" in r:
                lines.append(f"| {name} | | {n:,} | failed: {r['error']} | | | |")
                continue
            best = min(r["times"])
            t_ms = f"{1000 * best:,.1f}" if best < 0.1 else f"{1000 * best:,.0f}"
            if r["slow"]:
                t_ms += f" (1 pass only: > {args.max_pass_s:.0f} s per pass)"
            prev = results.get((name, n // 10))
            ratio = f"{best / min(prev['times']):.1f}" if prev and "times" in prev and n % 10 == 0 else "—"
            lines.append(
                f"| {name} | {r['params']:,} | {n:,} | {t_ms} | {ratio} | {r['peak_mib']:,.0f} | "
                f"{1000 * r['peak_mib'] / n:.2f} |"
            )
    lines.append(f"\nTotal benchmark time {time.perf_counter() - t_start:.0f} s.")
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
