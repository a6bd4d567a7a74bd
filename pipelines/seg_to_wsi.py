"""Segmentation fine-tuning → saved encoder adapter → WSI features with that adapted encoder, as one command.

    python pipelines/seg_to_wsi.py --config configs/pipelines/seg_to_wsi.yaml [--out-dir runs/x]

Stage 1 trains ``seg_config`` (a ``pathopeft seg fit`` YAML; ``seg_args`` are extra ``--section.key=value``
flags) into ``<out_dir>/seg/``; stage 2 exports the encoder adapter of the best checkpoint to
``<out_dir>/adapter/`` (:func:`pathopeft.seg.export.export_encoder_adapter`: a folder ``pathopeft wsi process
--adapter`` loads); stage 3 runs the WSI stage on ``slides`` with that encoder (same architecture, base
weights and normalisation as the segmentation encoder, the adapter merged) into ``<out_dir>/wsi/``. A rerun
skips the stages whose outputs exist (delete ``<out_dir>/adapter`` to retrain) and resumes the WSI batch.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a plain script from a checkout
    sys.path.insert(0, str(REPO))

from pathopeft.config import load_config
from pathopeft.errors import UserError
from pathopeft.wsi import BatchConfig, ExtractConfig, TilingConfig, read_manifest, run_batch


@dataclass
class SegToWsiConfig:
    """The pipeline's YAML: which segmentation run, which slides, and how to tile and extract."""

    seg_config: str
    slides: str
    out_dir: str = "runs/seg_to_wsi"
    seg_args: list[str] = field(default_factory=list)
    tiling: TilingConfig = field(default_factory=TilingConfig)
    batch_size: int = 64
    num_workers: int = 2
    device: str | None = None
    progress: bool = True


PATH_FIELDS = ("seg_config", "slides")


def fit(cfg: SegToWsiConfig, root: Path) -> Path:
    """Train the segmentation model; returns its best (or final) checkpoint."""
    from lightning.pytorch.cli import LightningCLI

    from pathopeft.seg.data import SegDataModule
    from pathopeft.seg.module import SegModule

    cli = LightningCLI(
        SegModule, SegDataModule, run=False, seed_everything_default=0, save_config_kwargs={"overwrite": True},
        args=["--config", cfg.seg_config, f"--trainer.default_root_dir={root}", *cfg.seg_args],
    )  # fmt: skip
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    best = getattr(cli.trainer.checkpoint_callback, "best_model_path", "") if cli.trainer.checkpoint_callback else ""
    if best:
        return Path(best)
    final = root / "final.ckpt"
    cli.trainer.save_checkpoint(final)
    return final


def run(cfg: SegToWsiConfig) -> list[dict[str, Any]]:
    from pathopeft.seg.encoder import FEATURES_ONLY_KWARGS
    from pathopeft.seg.export import export_encoder_adapter
    from pathopeft.seg.module import load_checkpoint

    out = Path(cfg.out_dir)
    adapter = out / "adapter"
    ckpt_note = out / "seg" / "checkpoint.txt"
    if not (adapter / "adapter_config.json").is_file():
        ckpt = fit(cfg, out / "seg")
        ckpt_note.parent.mkdir(parents=True, exist_ok=True)
        ckpt_note.write_text(str(ckpt) + "\n")
        export_encoder_adapter(load_checkpoint(ckpt).model, adapter)
    seg = load_checkpoint(Path(ckpt_note.read_text().strip())).model.config
    kwargs = {k: v for k, v in seg["encoder_kwargs"].items() if k not in FEATURES_ONLY_KWARGS}
    extract = ExtractConfig(
        backbone=seg["encoder"], weights=seg["weights"], backbone_kwargs=kwargs,
        mean=tuple(seg["mean"]) if seg["mean"] else None, std=tuple(seg["std"]) if seg["std"] else None,
        adapter=str(adapter), batch_size=cfg.batch_size, num_workers=cfg.num_workers, device=cfg.device,
    )  # fmt: skip
    wsi = BatchConfig(out_dir=str(out / "wsi"), tiling=cfg.tiling, extract=extract, progress=cfg.progress)
    return run_batch(read_manifest(cfg.slides), wsi)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", type=Path, required=True, help="configs/pipelines/seg_to_wsi.yaml")
    p.add_argument("--out-dir", help="output folder (default: the YAML's out_dir)")
    args = p.parse_args(argv)
    try:
        cfg = load_config(SegToWsiConfig, args.config, {"out_dir": args.out_dir}, PATH_FIELDS)
        records = run(cfg)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{len(records)} slides processed now; adapter: {Path(cfg.out_dir) / 'adapter'}; summary: "
          f"{Path(cfg.out_dir) / 'wsi' / 'summary.md'}")  # fmt: skip
    return 1 if any(r.get("status") == "failed" for r in records) else 0


if __name__ == "__main__":
    raise SystemExit(main())
