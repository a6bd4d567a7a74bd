"""Multi-GPU / multi-node batch processing through Lightning Fabric, sharded by slide.

Each process (one per device, on every node) takes the slides whose index matches its global rank — composed
with any ``--shard i/n`` given for job arrays — and runs :func:`pathopeft.wsi.batch.run_batch` on its share
with its own device. Slides are independent, so there is no gradient sync and no collective except a final
barrier before rank 0 rewrites the batch summary. On SLURM/torchrun the usual environment is picked up by
Lightning, so a cluster user runs the same command with ``--devices``/``--num-nodes``.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from pathopeft.wsi.config import BatchConfig, SlideEntry


def compose_shard(shard: tuple[int, int], rank: int, world_size: int) -> tuple[int, int]:
    """Shard ``i/n`` split ``world_size`` ways: rank r gets global shard ``i*world + r`` of ``n*world``."""
    i, n = shard
    return i * world_size + rank, n * world_size


def _worker(fabric: Any, entries: list[SlideEntry], cfg: BatchConfig) -> None:
    from pathopeft.wsi.batch import run_batch
    from pathopeft.wsi.qc import write_summary

    shard = compose_shard(cfg.shard, fabric.global_rank, fabric.world_size)
    device = str(fabric.device) if fabric.device.type != "cpu" else "cpu"
    local = replace(cfg, shard=shard, progress=cfg.progress and fabric.global_rank == 0)
    local.extract = replace(cfg.extract, device=device)
    run_batch(entries, local)
    fabric.barrier()
    if fabric.global_rank == 0:
        write_summary(cfg.out_dir, [e.slide_id for e in entries])


def run_distributed(
    entries: list[SlideEntry],
    cfg: BatchConfig,
    accelerator: str = "auto",
    devices: int | str = "auto",
    num_nodes: int = 1,
    strategy: str = "ddp",
) -> None:
    """Launch one process per device (and node) with Lightning Fabric and process the batch sharded by slide."""
    from lightning.fabric import Fabric

    fabric = Fabric(accelerator=accelerator, devices=devices, num_nodes=num_nodes, strategy=strategy)
    fabric.launch(_worker, entries, cfg)
