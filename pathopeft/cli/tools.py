"""``pathopeft adapters list|count|info|merge|revert|generator-fit|generate``, ``pathopeft data sample`` and ``pathopeft doctor``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def cmd_data_sample(args: argparse.Namespace) -> int:
    from pathopeft.data import SampleDataError, sample_slide

    try:
        print(sample_slide(args.cache_dir))
    except SampleDataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    import platform

    import torch

    from pathopeft import __version__

    lines = [f"pathopeft {__version__}", f"python {platform.python_version()}", f"torch {torch.__version__}"]
    lines.append(
        f"cuda available: {torch.cuda.is_available()}"
        + (f" ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else "")
    )
    for mod in ("timm", "lightning", "monai", "peft", "h5py", "skimage", "albumentations", "tifffile", "wordllama"):
        try:
            m = __import__(mod)
            lines.append(f"{mod} {getattr(m, '__version__', '?')}")
        except ImportError as e:
            lines.append(f"{mod} MISSING ({e})")
    try:
        import openslide

        lines.append(f"openslide-python {openslide.__version__}, OpenSlide library {openslide.__library_version__}")
    except Exception as e:  # noqa: BLE001 - report any failure of the C library, never crash doctor
        lines.append(f"openslide MISSING ({e})")
    print("\n".join(lines))
    return 0


def cmd_adapters_list(args: argparse.Namespace) -> int:
    """Every entry of ``ADAPTERS`` with its backend and capabilities: the list is the registry, never typed here."""
    from pathopeft.adapters import ADAPTERS

    width = max(len(n) for n in ADAPTERS)
    for name in ADAPTERS:
        entry = ADAPTERS.entry(name)
        caps = entry.caps
        callback = caps["callback"]
        notes = [f"callback {getattr(callback, '__name__', callback)}"] if callback is not None else []
        notes += ["needs data before each task"] if caps["needs_data"] else []
        notes += [] if caps["identity_at_init"] else ["not identity at init"]
        layers = "linear+conv" if caps["conv"] else "linear only"
        extra = f" [{'; '.join(notes)}]" if notes else ""
        print(f"{name:{width}s} {caps['backend']:10s} {layers:11s}  {entry.obj.summary}{extra}")
    print("other PEFT methods by their PEFT name (waveft, miss, randlora, vera, ia3, …) with their own keywords")
    return 0


def cmd_adapters_count(args: argparse.Namespace) -> int:
    """Trainable parameters of a method on a timm architecture (random init, nothing downloaded)."""
    import timm

    from pathopeft import adapters

    try:
        model = timm.create_model(args.model, pretrained=False, **(args.model_kwargs or {}))
    except (RuntimeError, TypeError) as e:  # timm: "Unknown model (...)"; a bad keyword
        print(f"error: --model {args.model}: {e}", file=sys.stderr)
        return 2
    total = sum(p.numel() for p in model.parameters())
    extra = args.method_kwargs or {}
    try:
        wrapped = adapters.create(args.method, model, rank=args.rank, targets=args.targets, **extra)
    except (ValueError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    trainable = sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
    n_layers = len(adapters.resolve_targets(model, args.targets))
    print(
        f"{args.method} rank {args.rank} on {args.model} ({args.targets}: {n_layers} layers): "
        f"{trainable:,} trainable of {total:,} base parameters ({100 * trainable / total:.3f} %)"
    )
    return 0


def cmd_adapters_info(args: argparse.Namespace) -> int:
    from pathopeft.adapters.serialization import adapter_config_path, read_json

    print(json.dumps(read_json(adapter_config_path(args.adapter_dir)), indent=2))  # AdapterLoadError names the file
    base = args.adapter_dir / "pathopeft_base.json"
    if base.is_file():
        print(json.dumps(read_json(base), indent=2))
    return 0


def cmd_adapters_merge(args: argparse.Namespace) -> int:
    from pathopeft.adapters.merging import merge_lora_dirs
    from pathopeft.adapters.rmm import rmm_merge_dirs
    from pathopeft.adapters.serialization import AdapterLoadError

    if args.method == "rmm":
        if not args.k:
            raise AdapterLoadError("adapters merge --method rmm needs --k (the basis size)")
        out, meta = rmm_merge_dirs(args.adapter_dirs, args.out, args.k)
        print(f"RMM basis of {args.k} for {len(args.adapter_dirs)} LoRA adapters in {out} "
              f"({100 * meta['energy_kept']:.2f} % of the factors' energy kept); "
              f"`pathopeft adapters revert {out} --task NAME --out DIR` rebuilds one of {meta['tasks']}")  # fmt: skip
        return 0
    out = merge_lora_dirs(args.adapter_dirs, args.out, args.method, args.k, args.weights, args.seed)
    print(f"merged {len(args.adapter_dirs)} LoRA adapters ({args.method}) into {out}")
    return 0


def cmd_adapters_revert(args: argparse.Namespace) -> int:
    from pathopeft.adapters.rmm import revert_dir

    out = revert_dir(args.rmm_dir, args.task, args.out)
    print(f"task {args.task!r} reverted from {args.rmm_dir} into the LoRA folder {out}")
    return 0


def cmd_adapters_generator_fit(args: argparse.Namespace) -> int:
    from pathopeft.adapters.lora_generation import GeneratorConfig, fit_library

    config = GeneratorConfig(top_k=args.top_k, temperature=args.temperature, steps=args.steps, seed=args.seed)
    out, gen = fit_library(args.library, args.out, config)
    rec, kl = gen.history[-1]
    print(f"LoRA generator for {len(gen.names)} experts ({', '.join(gen.names)}) in {out}: final reconstruction "
          f"{rec:.4f}, KL {kl:.2f}; `pathopeft adapters generate {out} --description TEXT --out DIR`")  # fmt: skip
    return 0


def cmd_adapters_generate(args: argparse.Namespace) -> int:
    from pathopeft.adapters.lora_generation import generate_dir

    dirs, weights = generate_dir(args.generator_dir, args.description, args.out, args.samples, args.seed)
    guide = ", ".join(f"{n} {w:.2f}" for n, w in sorted(weights.items(), key=lambda x: -x[1]) if w > 0)
    print(f"{len(dirs)} LoRA folder(s) generated in {args.out} (expert weights: {guide})")
    return 0


def add_commands(sub: Any) -> None:
    """Register this group's sub-commands on the top-level sub-parsers."""
    data = sub.add_parser("data", help="sample data").add_subparsers(dest="cmd", required=True)
    p = data.add_parser("sample", help="download CMU-1-Small-Region.svs (CC0) into the cache and print its path")
    p.add_argument("--cache-dir", type=Path)
    p.set_defaults(func=cmd_data_sample)

    ad = sub.add_parser("adapters", help="parameter-efficient adapters: list, count, inspect").add_subparsers(
        dest="cmd", required=True
    )
    p = ad.add_parser("list", help="registered methods (ours and PEFT's)")
    p.set_defaults(func=cmd_adapters_list)
    p = ad.add_parser("count", help="trainable parameters of a method on a timm model (random init)")
    p.add_argument("method", help="a method of `pathopeft adapters list`, or any PEFT method name")
    p.add_argument("--model", default="vit_small_patch16_224", help="timm architecture")
    p.add_argument("--model-kwargs", type=json.loads, help="JSON kwargs for timm.create_model")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--targets", default="attn", help="attn | attn+mlp | all-linear | all-conv | all | regex")
    p.add_argument("--method-kwargs", type=json.loads, help="JSON config keywords, e.g. '{\"r_lora\": 4}'")
    p.set_defaults(func=cmd_adapters_count)
    p = ad.add_parser("info", help="print an adapter folder's config and base-model fingerprint")
    p.add_argument("adapter_dir", type=Path)
    p.set_defaults(func=cmd_adapters_info)
    p = ad.add_parser("merge", help="merge saved PEFT LoRA folders of one base model into one LoRA (cat | lego)")
    p.add_argument("adapter_dirs", type=Path, nargs="+")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--method", choices=["cat", "lego", "rmm"], default="cat",
                   help="cat: the exact sum (ranks concatenated); lego: LoRA-LEGO's rank-wise clustering to --k; "
                        "rmm: Reversible Model Merging, a basis of --k LoRAs from which each task is reverted")  # fmt: skip
    p.add_argument("--k", type=int, help="merged rank for lego; basis size for rmm")
    p.add_argument("--weights", type=float, nargs="+", help="one weight per adapter (default 1 each)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_adapters_merge)
    p = ad.add_parser("revert", help="rebuild one task's LoRA folder from an RMM basis (adapters merge --method rmm)")
    p.add_argument("rmm_dir", type=Path)
    p.add_argument("--task", required=True, help="the task's name (its adapter folder's name) or index")
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(func=cmd_adapters_revert)
    p = ad.add_parser("generator-fit", help="fit a text-guided LoRA generator on a library of described LoRAs")
    p.add_argument("library", type=Path, help="YAML: experts: [{name, description, adapters: [folder or glob]}]")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--top-k", type=int, default=4, help="experts that guide a description (default 4)")
    p.add_argument("--temperature", type=float, default=0.1, help="softmax temperature over cosines (default 0.1)")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_adapters_generator_fit)
    p = ad.add_parser("generate", help="a PEFT LoRA for a task described in words, from a fitted generator")
    p.add_argument("generator_dir", type=Path)
    p.add_argument("--description", required=True, help='e.g. "lung adenocarcinoma versus benign lung tissue"')
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--samples", type=int, default=0, help="N sampled LoRAs (default 0: the one at z = 0)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_adapters_generate)

    p = sub.add_parser("doctor", help="report versions and hardware")
    p.set_defaults(func=cmd_doctor)
