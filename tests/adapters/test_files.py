"""Adapter files are written through :mod:`pathopeft.io`: no temporaries left, a full disk is one error naming the file."""

from __future__ import annotations

import errno

import pytest
import timm
import torch

from pathopeft import adapters
from pathopeft import io as pio
from pathopeft.adapters.serialization import BASE_INFO_NAME, CONFIG_NAME, WEIGHTS_NAME
from pathopeft.errors import DiskFullError


def tiny() -> torch.nn.Module:
    torch.manual_seed(0)
    kw = {"img_size": 32, "patch_size": 16, "depth": 1, "embed_dim": 32, "num_heads": 2, "num_classes": 0}
    return timm.create_model("vit_tiny_patch16_224", **kw).eval()


def temporaries(folder) -> list[str]:
    return [p.name for p in folder.rglob("*") if p.name.startswith(".") or ".tmp" in p.name]


@pytest.mark.parametrize("method", ["salt", "lora"])
def test_a_save_leaves_only_the_adapter_files(method, tmp_path):
    folder = adapters.save(adapters.create(method, tiny(), rank=2), tmp_path / "adapter")
    names = {p.name for p in folder.iterdir()}
    assert {CONFIG_NAME, WEIGHTS_NAME} <= names
    assert (BASE_INFO_NAME in names) == (method == "lora")  # ours keeps the fingerprint in its config
    assert temporaries(tmp_path) == []
    adapters.load(tiny(), folder)  # and what was written loads


def _disk_full(tmp, data):
    """A write that gets part of the way, then finds the disk full (the temporary exists, half written)."""
    with open(tmp, "wb") as f:
        f.write(data[: len(data) // 2])
    raise OSError(errno.ENOSPC, "No space left on device", str(tmp))


def test_a_full_disk_while_writing_the_weights_is_one_error_and_no_partial_file(tmp_path, monkeypatch):
    model = adapters.create("salt", tiny(), rank=2)
    monkeypatch.setattr(pio, "_write_all", _disk_full)
    folder = tmp_path / "adapter"
    with pytest.raises(DiskFullError, match=rf"{WEIGHTS_NAME}: disk full"):
        adapters.save(model, folder)
    assert not (folder / WEIGHTS_NAME).exists()
    assert not (folder / CONFIG_NAME).exists()  # the config is written after the weights: not one without them
    assert temporaries(tmp_path) == []


def test_a_full_disk_keeps_the_adapter_saved_before(tmp_path, monkeypatch):
    """Overwriting a finished adapter: a failed save leaves the earlier files whole (rename, not rewrite)."""
    model = adapters.create("salt", tiny(), rank=2)
    folder = adapters.save(model, tmp_path / "adapter")
    before = {n: (folder / n).read_bytes() for n in (CONFIG_NAME, WEIGHTS_NAME)}
    with torch.no_grad():
        next(p for p in model.parameters() if p.requires_grad).add_(1.0)
    monkeypatch.setattr(pio, "_write_all", _disk_full)
    with pytest.raises(DiskFullError, match=WEIGHTS_NAME):
        adapters.save(model, folder)
    assert {n: (folder / n).read_bytes() for n in before} == before
    assert temporaries(tmp_path) == []
    monkeypatch.undo()
    adapters.load(tiny(), folder)


def test_a_full_disk_while_writing_a_peft_adapters_base_info_names_it(tmp_path, monkeypatch):
    """PEFT writes its own files; the fingerprint file beside them goes through pathopeft.io."""
    model = adapters.create("lora", tiny(), rank=2)
    monkeypatch.setattr(pio, "_write_all", _disk_full)
    with pytest.raises(DiskFullError, match=rf"{BASE_INFO_NAME}: disk full"):
        adapters.save(model, tmp_path / "adapter")
    assert not (tmp_path / "adapter" / BASE_INFO_NAME).exists()
    assert temporaries(tmp_path) == []
