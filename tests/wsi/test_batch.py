"""Batch semantics on generated slides: resume after a crash, re-run on changed parameters, sharding."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pathopeft.wsi import BatchConfig, ExtractConfig, TilingConfig, batch
from pathopeft.wsi.config import ManifestError, SlideEntry, parse_shard, read_manifest
from pathopeft.wsi.distributed import compose_shard
from pathopeft.wsi.pyramid import write_pyramid
from tests._tiny import TINY_VIT, blob_image


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    """Five small generated pyramids (0.5 µm/px) with tissue blobs in different places."""
    root = tmp_path_factory.mktemp("slides")
    entries = []
    for k in range(5):
        img = blob_image(1024, 1280, ((400 + 40 * k, 500 + 60 * k, 320),))  # tissue disc of radius 160 µm
        path = write_pyramid(img, root / f"s{k}.tiff", mpp=0.5, levels=2, tile=128)
        entries.append(SlideEntry(f"s{k}", path))
    return entries


def _cfg(out, tile_px=64, **kw):
    tiny = dict(TINY_VIT)
    name = tiny.pop("name")
    return BatchConfig(
        out_dir=str(out),
        tiling=TilingConfig(target_mpp=1.0, tile_px=tile_px),
        extract=ExtractConfig(backbone=name, backbone_kwargs=tiny, num_workers=0, batch_size=8),
        progress=False,
        **kw,
    )


class Crash(BaseException):
    """Stands in for a kill: not an Exception, so the batch does not record it as a slide failure."""


def test_resume_after_crash_processes_every_slide_exactly_once(slides, tmp_path, monkeypatch):
    out = tmp_path / "run"
    real = batch.process_slide
    calls: list[str] = []

    def crashing(entry, *a, **k):
        if len(calls) == 2:
            raise Crash
        calls.append(entry.slide_id)
        return real(entry, *a, **k)

    monkeypatch.setattr(batch, "process_slide", crashing)
    with pytest.raises(Crash):
        batch.run_batch(slides, _cfg(out))
    assert calls == ["s0", "s1"]
    first = {s: json.loads((out / "status" / f"{s}.json").read_text()) for s in calls}
    # nothing half-written: only finished slides have files, and no temporaries remain
    assert sorted(p.stem for p in (out / "patches").glob("*.h5")) == ["s0", "s1"]
    assert not list(out.rglob(".*.tmp*"))

    calls.clear()
    monkeypatch.setattr(batch, "process_slide", lambda e, *a, **k: (calls.append(e.slide_id), real(e, *a, **k))[1])
    records = batch.run_batch(slides, _cfg(out))
    assert calls == ["s2", "s3", "s4"]  # the finished ones were not redone
    assert [r["slide_id"] for r in records] == ["s2", "s3", "s4"]
    for s in ("s0", "s1"):  # their records are untouched
        assert json.loads((out / "status" / f"{s}.json").read_text())["finished_at"] == first[s]["finished_at"]
    statuses = [json.loads((out / "status" / f"s{k}.json").read_text())["status"] for k in range(5)]
    assert statuses == ["done"] * 5
    assert "| 5 | 5 | 0 | 0 | 0 |" in (out / "summary.md").read_text()

    calls.clear()
    assert batch.run_batch(slides, _cfg(out)) == []
    assert calls == []


def test_stale_temporary_files_are_removed_and_not_mistaken_for_output(slides, tmp_path):
    out = tmp_path / "run"
    (out / "patches").mkdir(parents=True)
    (out / "patches" / ".s0.h5.tmp999").write_bytes(b"half a file")
    records = batch.run_batch(slides[:1], _cfg(out))
    assert records[0]["status"] == "done"
    assert not list(out.rglob(".*.tmp*"))


def test_other_parameters_are_refused_then_redone_with_overwrite(slides, tmp_path):
    from pathopeft.wsi.outputs import OutputConflictError

    out = tmp_path / "run"
    batch.run_batch(slides[:2], _cfg(out))
    before = (out / "patches" / "s0.h5").read_bytes()
    assert batch.run_batch(slides[:2], _cfg(out)) == []
    with pytest.raises(
        OutputConflictError, match=r"run: holds tiles made with other tiling parameters \(tile_px 64 → 32\)"
    ):
        batch.run_batch(slides[:2], _cfg(out, tile_px=32))
    assert (out / "patches" / "s0.h5").read_bytes() == before  # nothing of the earlier run was touched
    records = batch.run_batch(slides[:2], _cfg(out, tile_px=32, overwrite=True))  # new tile size -> new hash
    assert [r["status"] for r in records] == ["done", "done"]
    n64 = batch.run_batch(slides[:1], _cfg(out, overwrite=True))[0]["n_tiles"]
    n32 = records[0]["n_tiles"]
    assert n32 > n64


def test_other_encoder_weights_into_the_same_features_folder_are_refused(slides, tmp_path):
    from safetensors.torch import save_file

    from pathopeft.backbones import create_backbone
    from pathopeft.wsi.outputs import OutputConflictError

    out = tmp_path / "run"
    batch.run_batch(slides[:1], _cfg(out))
    tiny = dict(TINY_VIT)
    model = create_backbone(tiny.pop("name"), **tiny).model
    save_file(model.state_dict(), tmp_path / "w.safetensors")
    cfg = _cfg(out)
    cfg.extract.weights = str(tmp_path / "w.safetensors")
    with pytest.raises(OutputConflictError, match=r"features_vit_tiny_patch16_224: holds features of another encoder"):
        batch.run_batch(slides[:1], cfg)
    assert batch.run_batch(slides[:1], _cfg(out)) == []  # the original settings: still done, nothing lost


def test_folders_written_before_params_json_are_guarded_by_their_hashes(slides, tmp_path):
    from pathopeft.wsi.outputs import OutputConflictError

    out = tmp_path / "run"
    batch.run_batch(slides[:1], _cfg(out))
    (out / "params.json").unlink()
    with pytest.raises(OutputConflictError, match=r"s0\.h5: made with other tiling parameters"):
        batch.run_batch(slides[:1], _cfg(out, tile_px=32))


def test_an_output_deleted_by_hand_is_regenerated(slides, tmp_path):
    out = tmp_path / "run"
    batch.run_batch(slides[:2], _cfg(out))
    (out / "patches" / "s1.h5").unlink()  # the status still says done
    redone = batch.run_batch(slides[:2], _cfg(out))
    assert [r["slide_id"] for r in redone] == ["s1"]


def test_failed_slides_are_retried(slides, tmp_path):
    out = tmp_path / "run"
    missing = SlideEntry("gone", tmp_path / "gone.svs")
    rec = batch.run_batch([missing], _cfg(out))[0]
    assert rec["status"] == "failed"
    assert "no such file" in rec["error"]
    write_pyramid(blob_image(256, 256), tmp_path / "gone.svs", mpp=0.5, levels=1)
    assert batch.run_batch([missing], _cfg(out))[0]["status"] == "done"


def test_shards_partition_the_manifest(slides, tmp_path):
    out = tmp_path / "run"
    a = batch.run_batch(slides, _cfg(out, shard=(0, 2)))
    b = batch.run_batch(slides, _cfg(out, shard=(1, 2)))
    ids_a, ids_b = [r["slide_id"] for r in a], [r["slide_id"] for r in b]
    assert ids_a == ["s0", "s2", "s4"]
    assert ids_b == ["s1", "s3"]
    assert "| 5 | 5 | 0 | 0 | 0 |" in (out / "summary.md").read_text()  # summary covers all shards


def test_features_match_coords_and_tiles(slides, tmp_path):
    from pathopeft.wsi import h5io

    out = tmp_path / "run"
    rec = batch.run_batch(slides[:1], _cfg(out))[0]
    feats, coords = h5io.read_features(out / "features_vit_tiny_patch16_224" / "s0.h5")
    pcoords, attrs = h5io.read_coords(out / "patches" / "s0.h5")
    np.testing.assert_array_equal(coords, pcoords)
    assert rec["n_tiles"] > 5
    assert feats.shape == (rec["n_tiles"], 32)
    assert attrs["patch_level"] == 1
    assert attrs["patch_size"] == 64


def test_parse_and_compose_shards():
    assert parse_shard("3/8") == (3, 8)
    for bad in ("8/8", "x", "1/0", "-1/2"):
        with pytest.raises(ValueError, match="shard"):
            parse_shard(bad)
    # 2 job-array shards x 4 ranks each cover 8 disjoint global shards
    got = sorted(compose_shard((i, 2), r, 4) for i in range(2) for r in range(4))
    assert got == [(k, 8) for k in range(8)]


def test_manifest_errors_name_file_and_row(tmp_path):
    m = tmp_path / "m.csv"
    m.write_text("slide_id,path,mpp\na,a.svs,0.5\na,b.svs,\n")
    with pytest.raises(ManifestError, match=r"m\.csv:3: duplicate slide_id 'a'"):
        read_manifest(m)
    m.write_text("slide_id,file\na,a.svs\n")
    with pytest.raises(ManifestError, match=r"missing column\(s\) \['path'\]"):
        read_manifest(m)
    m.write_text("slide_id,path,mpp\na,a.svs,fast\n")
    with pytest.raises(ManifestError, match=r"m\.csv:2: mpp 'fast' is not a number"):
        read_manifest(m)
    m.write_text("slide_id,path,mpp,label,task\na,sub/a.svs,0.25,tumour,lung\n")
    (e,) = read_manifest(m)
    assert e.path == (tmp_path / "sub" / "a.svs").resolve()
    assert e.mpp == 0.25
    assert e.label == "tumour"
    with pytest.raises(ManifestError, match="not found"):
        read_manifest(tmp_path / "nope.csv")


@pytest.mark.slow
def test_distributed_two_cpu_processes(slides, tmp_path):
    """Lightning Fabric launches two processes that split the slides between them."""
    from pathopeft.wsi.distributed import run_distributed

    out = tmp_path / "run"
    run_distributed(slides, _cfg(out), accelerator="cpu", devices=2, strategy="ddp_spawn")
    records = [json.loads((out / "status" / f"s{k}.json").read_text()) for k in range(5)]
    assert all(r["status"] == "done" for r in records)
    assert {tuple(r["shard"]) for r in records} == {(0, 2), (1, 2)}
    assert len({r["pid"] for r in records}) == 2
    assert "| 5 | 5 | 0 | 0 | 0 |" in (out / "summary.md").read_text()


@pytest.mark.parametrize(
    ("name", "folder"),
    [
        ("vit_small_patch16_224", "features_vit_small_patch16_224"),
        ("hf-hub:MahmoodLab/UNI", "features_MahmoodLab--UNI"),
        ("hf-hub:org/name@v2", "features_org--name--v2"),
        ("local-dir:/models/uni", "features_uni"),
        ("../../etc", "features_..--..--etc"),  # one harmless component, never a path
    ],
)
def test_feature_folder_names_are_safe(name, folder):
    from pathopeft.wsi.outputs import features_dirname

    assert features_dirname(name) == folder
    assert "/" not in folder
    assert ":" not in folder
