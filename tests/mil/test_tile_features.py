"""Tile → feature extraction for bags: timm features come from Backbone.embed (the one tile → feature path),
both kinds are cached per tile list and written atomically."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pathopeft.backbones import Backbone, create_backbone
from pathopeft.mil import tile_features as tf
from tests._tiny import TINY_VIT


@dataclass(frozen=True)
class Tile:
    path: Path
    rel: str
    sha256: str = ""


@pytest.fixture
def tiles(tmp_path: Path) -> list[Tile]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(3):
        path = tmp_path / "tiles" / f"t{i}.png"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(path)
        out.append(Tile(path, f"tiles/t{i}.png"))
    return out


def test_timm_features_are_backbone_embed_in_batches_and_cached(tiles, tmp_path, monkeypatch):
    kw = dict(TINY_VIT)
    arch = kw.pop("name")
    calls: list[int] = []
    real = Backbone.embed

    def spy(self, x, precision="auto"):
        calls.append(len(x))
        return real(self, x, precision)

    monkeypatch.setattr(Backbone, "embed", spy)
    feats, info = tf.tile_features(tiles, f"timm:{arch}", tmp_path / "cache", model_kwargs=kw, batch_size=2)
    assert calls == [2, 1]
    assert info["random_init"]
    assert info["dim"] == kw["embed_dim"]
    torch.manual_seed(0)  # the extractor's random init is seeded the same way
    ref = create_backbone(arch, **kw)
    x = torch.from_numpy(np.stack([tf.read_rgb(t.path) for t in tiles])).permute(0, 3, 1, 2)
    np.testing.assert_allclose(feats, real(ref, x, precision="fp32").numpy(), rtol=1e-5, atol=1e-6)

    monkeypatch.setattr(Backbone, "embed", lambda *a, **k: pytest.fail("recomputed despite the cache"))
    again, _ = tf.tile_features(tiles, f"timm:{arch}", tmp_path / "cache", model_kwargs=kw, batch_size=2)
    np.testing.assert_array_equal(again, feats)
    cache = list((tmp_path / "cache").iterdir())
    assert len(cache) == 1  # the cache file only: no temporary left behind
    assert cache[0].name.startswith("tile_features_")


def test_colour_features_and_a_custom_reader(tiles, tmp_path):
    seen: list[Path] = []

    def read(path: Path) -> np.ndarray:
        seen.append(path)
        return tf.read_rgb(path)

    feats, info = tf.tile_features(tiles, "colour", tmp_path / "cache", read=read)
    assert feats.shape == (3, tf.COLOUR_DIM)
    assert seen == [t.path for t in tiles]
    np.testing.assert_array_equal(feats[1], tf.colour_features(tf.read_rgb(tiles[1].path)))
    assert info["features"] == "colour"
    assert not info["random_init"]


def test_unknown_feature_kind_is_an_error():
    with pytest.raises(ValueError, match="unknown feature kind 'sift'"):
        tf.parse_feature_kind("sift")
