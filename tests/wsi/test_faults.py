"""Fault injection for the WSI batch: bad files, bad options, a full disk, concurrent jobs, kill -9.

Each case ends either in a per-slide record with a reason/error naming the problem (the batch goes on) or,
for faults of the whole job, in one line on stderr with exit code 2 — never a traceback, never a lost result.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pathopeft import io
from pathopeft.cli import main
from pathopeft.errors import DiskFullError
from pathopeft.wsi import BatchConfig, ExtractConfig, TilingConfig, batch, claims
from pathopeft.wsi.config import SlideEntry
from pathopeft.wsi.pyramid import write_pyramid
from tests._tiny import TINY_VIT, blob_image

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    root = tmp_path_factory.mktemp("fault_slides")
    entries = []
    for k in range(4):
        img = blob_image(768, 1024, ((380, 400 + 50 * k, 260),))
        entries.append(SlideEntry(f"s{k}", write_pyramid(img, root / f"s{k}.tiff", mpp=0.5, levels=2, tile=128)))
    return entries


def _cfg(out, **kw):
    tiny = dict(TINY_VIT)
    name = tiny.pop("name")
    extract = ExtractConfig(backbone=name, backbone_kwargs=tiny, num_workers=0, batch_size=8)
    return BatchConfig(out_dir=str(out), tiling=TilingConfig(target_mpp=1.0, tile_px=32), extract=extract,
                       progress=False, **kw)  # fmt: skip


def _status(out: Path, sid: str) -> dict:
    return json.loads((out / "status" / f"{sid}.json").read_text())


def _no_temporaries(out: Path) -> bool:
    return not [p for p in out.rglob(".*.tmp*")]


# --------------------------------------------------------------------------------------------- bad files


def test_implausible_resolution_is_skipped_with_its_source_and_the_manifest_overrides_it(slides_dir, tmp_path):
    """openslide-python-boxes.tiff says 352.78 µm/px (a 72-dpi tag): skip, name the field; manifest mpp wins."""
    boxes = slides_dir / "openslide-python-boxes.tiff"
    cfg = _cfg(tmp_path / "a")
    (rec,) = batch.run_batch([SlideEntry("boxes", boxes)], cfg)
    assert rec["status"] == "skipped"
    assert rec["reason"].startswith("implausible resolution 352.8 µm/px from openslide.mpp-x")
    assert not (tmp_path / "a" / "patches" / "boxes.h5").exists()
    (rec,) = batch.run_batch([SlideEntry("boxes", boxes, mpp=0.5)], _cfg(tmp_path / "b"))
    assert rec["status"] == "done", rec
    assert (rec["mpp_source"], rec["level0_mpp"]) == ("manifest", 0.5)
    assert rec["mpp_rejected"].startswith("352.8 µm/px from openslide.mpp-x")
    assert rec["n_tiles"] < 200  # not 366,381 one-pixel tiles


def test_a_target_far_finer_than_level0_is_skipped(slides, tmp_path):
    cfg = _cfg(tmp_path / "run")
    cfg.tiling.target_mpp = 0.1  # 5x finer than the 0.5 µm/px slides
    (rec,) = batch.run_batch(slides[:1], cfg)
    assert rec["status"] == "skipped"
    assert "5.0× finer than the slide's level 0 (0.5 µm/px from openslide.mpp-x)" in rec["reason"]


def test_tile_size_far_from_the_model_input_is_warned(slides, tmp_path, caplog):
    cfg = _cfg(tmp_path / "run")
    cfg.tiling.tile_px = 7
    batch.run_batch(slides[:1], cfg)
    warnings = json.loads((tmp_path / "run" / "config.json").read_text())["warnings"]
    assert warnings
    assert "tile_px 7 is far from vit_tiny_patch16_224's input size 32" in warnings[0]
    assert "tile_px 7 is far from" in caplog.text


@pytest.fixture(scope="module")
def corrupt_single_level(tmp_path_factory):
    """A single-level tiled JPEG TIFF with one corrupt tile at x 384–512, y 256–384 (level-0 px)."""
    import tifffile

    path = tmp_path_factory.mktemp("corrupt") / "one_bad_tile.tiff"
    img = blob_image(768, 1024, ((384, 512, 300),))
    tifffile.imwrite(path, img, tile=(128, 128), compression="jpeg", photometric="rgb",
                     resolution=(2e4, 2e4), resolutionunit="CENTIMETER")  # fmt: skip
    with tifffile.TiffFile(path) as t:
        offset = t.pages[0].dataoffsets[2 * 8 + 3]  # tile row 2, column 3
    with open(path, "r+b") as f:
        f.seek(offset + 4)
        f.write(b"\x00\x01")  # a bogus segment length right after the JPEG SOI marker
    return path


def test_single_level_slide_with_one_corrupt_tile(corrupt_single_level, tmp_path):
    entry = SlideEntry("bad", corrupt_single_level)
    (rec,) = batch.run_batch([entry], _cfg(tmp_path / "strict"))
    assert rec["status"] == "failed"
    # the error names the real place, not the origin of a 4096-px strip
    assert "unreadable region x 256–512, y 256–512 (level-0 px, read at level 0)" in rec["error"]
    assert "--skip-bad-tiles" in rec["error"]
    cfg = _cfg(tmp_path / "lenient")
    cfg.extract.skip_bad_tiles = True
    (rec,) = batch.run_batch([entry], cfg)
    assert rec["status"] == "done", rec
    assert len(rec["bad_regions"]) == 1
    assert rec["n_features"] >= 1
    assert (tmp_path / "lenient" / "qc" / "bad.png").is_file()


# --------------------------------------------------------------------------------------------- bad options


def _cli(capsys, *argv) -> tuple[int, str]:
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return rc, err


def test_qc_of_a_missing_folder_is_an_error_and_creates_nothing(tmp_path, capsys):
    rc, err = _cli(capsys, "wsi", "qc", tmp_path / "nope")
    assert rc == 2
    assert f"{tmp_path / 'nope'}: no such folder" in err
    assert not (tmp_path / "nope").exists()
    (tmp_path / "plain").mkdir()
    rc, err = _cli(capsys, "wsi", "qc", tmp_path / "plain")
    assert rc == 2
    assert "not a pathopeft WSI run folder" in err


def test_other_parameters_into_one_out_is_one_line_from_the_cli(slides, tmp_path, capsys):
    out = tmp_path / "run"
    base = ["wsi", "tile", "--slides", slides[0].path, "--out", out, "--no-progress", "--no-qc"]
    assert _cli(capsys, *base, "--mpp", "1.0")[0] == 0
    rc, err = _cli(capsys, *base, "--mpp", "2.0")
    assert rc == 2
    assert "holds tiles made with other tiling parameters (target_mpp 1.0 → 2.0)" in err
    assert len(err.strip().splitlines()) == 1
    assert _cli(capsys, *base, "--mpp", "2.0", "--overwrite")[0] == 0


# --------------------------------------------------------------------------------------------- disk full


@pytest.mark.parametrize("victim", ["qc/s1.png", "features_vit_tiny_patch16_224/s1.h5", "status/s1.json"])
def test_disk_full_ends_the_batch_cleanly_and_a_rerun_finishes(slides, tmp_path, monkeypatch, capsys, victim):
    out = tmp_path / "run"
    real = io._write_all

    def fill_up(tmp, data):
        if tmp.parent.name == Path(victim).parent.name and tmp.name.startswith(f".{Path(victim).name}."):
            tmp.write_bytes(data[: len(data) // 3])
            raise OSError(errno.ENOSPC, "No space left on device")
        real(tmp, data)

    monkeypatch.setattr(io, "_write_all", fill_up)
    with pytest.raises(DiskFullError) as info:
        batch.run_batch(slides[:3], _cfg(out))
    msg = str(info.value)
    assert f"{out / victim}: disk full" in msg
    assert "while processing slide s1; the 1 slides finished in this run are intact, 2 left" in msg
    assert _no_temporaries(out)
    assert _status(out, "s0")["status"] == "done"
    assert not (out / "status" / "s1.json").exists()
    assert not list((out / "claims").glob("*.claim"))
    done_at = _status(out, "s0")["finished_at"]

    monkeypatch.setattr(io, "_write_all", real)  # space freed
    records = batch.run_batch(slides[:3], _cfg(out))
    assert [r["slide_id"] for r in records] == ["s1", "s2"]
    assert _status(out, "s0")["finished_at"] == done_at


def test_disk_full_from_the_cli_is_one_line(slides, tmp_path, monkeypatch, capsys):
    def full(tmp, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(io, "_write_all", full)
    rc, err = _cli(capsys, "wsi", "tile", "--slides", slides[0].path, "--out", tmp_path / "run", "--no-progress")
    assert rc == 2
    assert err.startswith("error: ")
    assert "disk full" in err
    assert len(err.strip().splitlines()) == 1


@pytest.fixture
def small_tmpfs(tmp_path):
    """A real 4 MiB tmpfs (needs root and mount rights; skipped elsewhere)."""
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    if subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True, check=False
    ).returncode:
        pytest.skip("cannot mount a tmpfs here (not root or no mount rights)")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_real_full_disk(slides, small_tmpfs):
    out = small_tmpfs / "run"
    assert batch.run_batch(slides[:1], _cfg(out))[0]["status"] == "done"
    free = os.statvfs(small_tmpfs)
    filler = small_tmpfs / "filler"
    with open(filler, "wb") as f:  # leave ~8 KiB: not enough for the next slide's outputs
        f.write(b"\0" * max(0, free.f_bavail * free.f_frsize - 8192))
    with pytest.raises(DiskFullError, match="disk full"):
        batch.run_batch(slides[:3], _cfg(out))
    assert _no_temporaries(out)
    assert _status(out, "s0")["status"] == "done"
    filler.unlink()
    records = batch.run_batch(slides[:3], _cfg(out))
    assert [r["slide_id"] for r in records] == ["s1", "s2"]
    assert all(_status(out, s)["status"] == "done" for s in ("s0", "s1", "s2"))


# --------------------------------------------------------------------------------------------- concurrency


def test_live_claims_are_respected_and_stale_ones_taken_over(slides, tmp_path):
    out = tmp_path / "run"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        path = claims.claim_path(out, "s0")
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps({"host": io.HOST, "pid": sleeper.pid}))
        # a live job's in-flight temporary must survive another job's start-up
        (out / "patches").mkdir()
        live_tmp = out / "patches" / f".s0.h5.{io.HOST}.{sleeper.pid}.tmp"
        live_tmp.write_bytes(b"in flight")
        dead_tmp = out / "patches" / f".s1.h5.{io.HOST}.999999999.tmp"
        dead_tmp.write_bytes(b"left by a killed job")
        records = batch.run_batch(slides[:2], _cfg(out))
        assert [r["slide_id"] for r in records] == ["s1"]  # s0 is left to its live owner
        assert live_tmp.exists()
        assert not dead_tmp.exists()
    finally:
        sleeper.kill()
        sleeper.wait()
    records = batch.run_batch(slides[:2], _cfg(out))  # the owner died: its claim is stale
    assert [r["slide_id"] for r in records] == ["s0"]


_JOB = """
import json, sys
from pathopeft.wsi import BatchConfig, ExtractConfig, TilingConfig, run_batch
from pathopeft.wsi.config import SlideEntry
slides = [SlideEntry(f"s{k}", p) for k, p in enumerate(json.loads(sys.argv[2]))]
cfg = BatchConfig(out_dir=sys.argv[1], tiling=TilingConfig(target_mpp=1.0, tile_px=32),
                  extract=ExtractConfig(backbone=None), progress=False)
print(json.dumps([r["slide_id"] for r in run_batch(slides, cfg)]))
"""


@pytest.mark.slow
def _job_slides(folder: Path, n: int) -> list[str]:
    """``n`` generated pyramids for the subprocess jobs (big enough that a job takes a moment per slide)."""
    folder.mkdir()
    img = blob_image(1024, 1280, ((500, 600, 420),))
    return [str(write_pyramid(img, folder / f"s{k}.tiff", mpp=0.5, levels=2, tile=128)) for k in range(n)]


def test_two_concurrent_jobs_share_the_slides(tmp_path):
    paths = _job_slides(tmp_path / "slides", 8)
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    jobs = [
        subprocess.Popen(
            [sys.executable, "-c", _JOB, str(out), json.dumps(paths)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=ROOT,
        )
        for _ in range(2)
    ]
    results = [j.communicate(timeout=300) for j in jobs]
    assert all(j.returncode == 0 for j in jobs), [r[1][-2000:] for r in results]
    done = [json.loads(r[0].strip().splitlines()[-1]) for r in results]
    everything = done[0] + done[1]
    assert sorted(everything) == sorted(f"s{k}" for k in range(8))  # each slide by exactly one job
    assert all(_status(out, f"s{k}")["status"] == "done" for k in range(8))
    assert _no_temporaries(out)


@pytest.mark.slow
def test_kill_9_at_any_moment_then_a_rerun_finishes_every_slide_once(tmp_path):
    paths = _job_slides(tmp_path / "slides", 6)
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-c", _JOB, str(out), json.dumps(paths)]
    rng = np.random.default_rng(0)
    finished: dict[str, float] = {}
    for _trial in range(3):
        job = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=ROOT)
        deadline = time.time() + 120
        target = len(finished) + 1
        while time.time() < deadline and job.poll() is None:  # wait for one more slide, then a random moment
            if len(list((out / "status").glob("*.json")) if (out / "status").is_dir() else []) >= target:
                break
            time.sleep(0.05)
        time.sleep(float(rng.uniform(0, 0.4)))
        job.send_signal(signal.SIGKILL)
        job.wait()
        for f in (out / "status").glob("*.json"):  # what was finished stays finished, untouched
            rec = json.loads(f.read_text())
            assert finished.setdefault(rec["slide_id"], rec["finished_at"]) == rec["finished_at"]
    rerun = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300, check=False)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    redone = json.loads(rerun.stdout.strip().splitlines()[-1])
    assert sorted(redone + list(finished)) == sorted(f"s{k}" for k in range(6))  # exactly once in all
    assert all(_status(out, f"s{k}")["status"] == "done" for k in range(6))
    assert _no_temporaries(out)


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("unknown-backbone", "unknown timm architecture 'vit_smol'; did you mean"),
        ("missing-weights", "nope.safetensors not found (pathopeft never downloads weights"),
        ("garbage-safetensors", "garbage.safetensors: not a readable safetensors file"),
        ("garbage-pth", "garbage.pth: not a readable PyTorch checkpoint file"),
        ("wrong-architecture", "other.safetensors: weights do not fit VisionTransformer"),
        ("missing-adapter", "no_adapter: adapter folder not found"),
        ("hf-hub-not-cached", "not in the local Hugging Face cache"),
    ],
)
def test_bad_encoder_options_are_one_line_before_any_slide(slides, tmp_path, capsys, monkeypatch, case, expected):
    from safetensors.torch import save_file

    from pathopeft.backbones import create_backbone

    tiny = json.dumps({k: v for k, v in TINY_VIT.items() if k != "name"})
    args = ["--backbone", "vit_tiny_patch16_224", "--backbone-kwargs", tiny]
    if case == "unknown-backbone":
        args = ["--backbone", "vit_smol"]
    elif case == "missing-weights":
        args += ["--weights", tmp_path / "nope.safetensors"]
    elif case == "garbage-safetensors":
        (tmp_path / "garbage.safetensors").write_bytes(b"\x00" * 64)
        args += ["--weights", tmp_path / "garbage.safetensors"]
    elif case == "garbage-pth":
        (tmp_path / "garbage.pth").write_bytes(b"not a pickle at all")
        args += ["--weights", tmp_path / "garbage.pth"]
    elif case == "wrong-architecture":
        other = create_backbone("vit_tiny_patch16_224", img_size=32, patch_size=16, depth=1, embed_dim=48, num_heads=2)
        save_file(other.model.state_dict(), tmp_path / "other.safetensors")
        args += ["--weights", tmp_path / "other.safetensors"]
    elif case == "missing-adapter":
        args += ["--adapter", tmp_path / "no_adapter"]
    elif case == "hf-hub-not-cached":
        monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty_cache"))
        import huggingface_hub.constants

        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))
        args = ["--backbone", "hf-hub:testorg/absent"]
    out = tmp_path / "run"
    rc, err = _cli(capsys, "wsi", "process", "--slides", slides[0].path, "--out", out, "--no-progress", *args)
    assert rc == 2
    assert expected in err
    assert len(err.strip().splitlines()) == 1
    assert not (out / "status").exists()  # refused before any slide was touched
