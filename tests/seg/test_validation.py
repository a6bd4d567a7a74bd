"""Bad segmentation inputs end in one line naming the file (and manifest line) before any training step.

Issue 9: a colour mask or a truncated PNG used to fail only when first sampled (hours into training, or never
for a test-split row), and a missing ``--config`` was buried under LightningCLI's usage dump.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from PIL import Image

from pathopeft.cli import main
from pathopeft.seg.data import SegDataError, SegDataModule
from pathopeft.seg.module import SegModule
from tests.seg.test_data import red_is_mask, squares_mask, write_csv, write_pair

HERE = Path(__file__).parent
TINY_MODEL = {
    "encoder": "vit_tiny_patch16_224",
    "n_classes": 2,
    "img_size": 32,
    "encoder_kwargs": {"depth": 1, "embed_dim": 32, "num_heads": 2},
}


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny models on a busy 2-core machine: intra-op threads only spin."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _quiet_random_init(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="pathopeft.seg.model")


# ------------------------------------------------------------------------------------------ bad files


def _good_set(tmp_path: Path, n: int = 4) -> list[dict[str, str]]:
    """``n`` train pairs (40×48, mask {0, 1}: valid in binary and index mode) under ``tmp_path/data``."""
    rows = []
    for i in range(n):
        mask = squares_mask(40, 48, seed=i)
        write_pair(tmp_path / "data", f"im{i}", red_is_mask(mask), mask)
        rows.append({"id": f"r{i}", "image": f"data/im{i}.png", "mask": f"data/im{i}_mask.png", "split": "train"})
    return rows


def _colour_mask(path: Path) -> str:
    rgb = np.zeros((40, 48, 3), np.uint8)
    rgb[..., 0] = 255
    rgb[5:15, 5:15, 1] = 255  # red background, yellow square: a colour-coded label image
    Image.fromarray(rgb).save(path)
    return "mask"


def _truncated_png(path: Path) -> str:
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # the header still reads: only decoding finds it
    return "image"


def _text_png(path: Path) -> str:
    path.write_text("not a picture")
    return "image"


def _values_outside_classes(path: Path) -> str:
    mask = np.zeros((40, 48), np.uint8)
    mask[:4] = 7
    Image.fromarray(mask).save(path)
    return "mask"


def _wrong_size_mask(path: Path) -> str:
    Image.fromarray(np.zeros((40, 30), np.uint8)).save(path)
    return "mask"


BAD = {
    "colour mask": (_colour_mask, r"colour mask"),
    "truncated png": (_truncated_png, r"not a readable image \(image file is truncated\)"),
    "text file named .png": (_text_png, r"not a readable image"),
    "mask values outside classes": (_values_outside_classes, r"mask values \[7\] .* outside the 2 classes"),
    "mask size != image size": (_wrong_size_mask, r"is 40×48 \(H×W\) but mask .* is 40×30"),
}


def _bad_manifest(tmp_path: Path, case: str, split: str) -> tuple[Path, Path]:
    """Four good pairs plus one bad file (``case``) in a fifth row (manifest line 6) of split ``split``."""
    rows = _good_set(tmp_path)
    make, _ = BAD[case]
    bad = tmp_path / "data" / "bad.png"
    kind = make(bad)
    row = {"image": "data/im0.png", "mask": "data/im0_mask.png", "split": split, "id": "bad"}
    row[kind] = "data/bad.png"
    return write_csv(tmp_path / "seg.csv", [*rows, row]), bad


@pytest.mark.parametrize("case", list(BAD))
def test_setup_decodes_every_record_and_names_manifest_line(tmp_path: Path, case: str) -> None:
    """A bad train row fails in setup, before the first batch, with manifest line and file in the message."""
    csv_path, bad = _bad_manifest(tmp_path, case, "train")
    mode = "index" if case == "mask values outside classes" else "binary"
    dm = SegDataModule(str(csv_path), crop=32, batch_size=2, val_fraction=0.0, mask_mode=mode)
    with pytest.raises(SegDataError, match=BAD[case][1]) as info:
        dm.setup("fit")
    assert str(info.value).startswith(f"{csv_path}:6: ")
    assert str(bad) in str(info.value)


def test_setup_keeps_the_decoded_pixels_it_checked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Validation reuses the cache: every file of the fit splits is decoded exactly once in setup + an epoch."""
    csv_path = write_csv(tmp_path / "seg.csv", _good_set(tmp_path, 5))
    from pathopeft.seg import data

    decoded: list[Path] = []
    real = data.read_image
    monkeypatch.setattr(data, "read_image", lambda p: decoded.append(Path(p)) or real(p))
    dm = SegDataModule(str(csv_path), crop=32, batch_size=2, val_fraction=0.2, samples_per_epoch=10)
    dm.setup("fit")
    assert len(decoded) == 5
    for _ in dm.train_dataloader():
        pass
    for _ in dm.val_dataloader():
        pass
    assert len(decoded) == len(set(decoded)) == 5


def test_check_files_false_skips_pixel_validation(tmp_path: Path) -> None:
    csv_path, _ = _bad_manifest(tmp_path, "colour mask", "test")
    dm = SegDataModule(str(csv_path), crop=32, batch_size=2, val_fraction=0.0, check_files=False)
    dm.setup("fit")  # headers agree; the colour mask would only fail when the test split is read
    assert dm.test_set is not None
    with pytest.raises(SegDataError, match=r"seg\.csv:6: .*bad\.png: colour mask"):
        dm.test_set[0]


# ------------------------------------------------------------------------------------------ through the CLI


def _fit_argv(tmp_path: Path, manifest: Path, *extra: str) -> list[str]:
    cfg = (HERE / "conf" / "tiny_fit.yaml").read_text().replace("MANIFEST", str(manifest))
    (tmp_path / "fit.yaml").write_text(cfg)
    return ["seg", "fit", "--config", str(tmp_path / "fit.yaml"), f"--trainer.default_root_dir={tmp_path}", *extra]


def _one_line_error(capsys: pytest.CaptureFixture[str], rc: int) -> str:
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    assert "usage:" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize("case", list(BAD))
def test_fit_fails_before_training_on_a_bad_test_row(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str
) -> None:
    """A bad row in the *test* split is never sampled by fit: it used to train to the end and exit 0."""
    csv_path, bad = _bad_manifest(tmp_path, case, "test")
    extra = ["--data.mask_mode=index"] if case == "mask values outside classes" else []
    line = _one_line_error(capsys, main(_fit_argv(tmp_path, csv_path, *extra)))
    assert line.startswith(f"error: {csv_path}:6: ")
    assert str(bad) in line
    assert not list(tmp_path.rglob("*.ckpt")), "training ran before the data were checked"


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        ({"image": "data/nope.png"}, r"seg\.csv:6: image file .*nope\.png not found"),
        ({"mask": "data/nope_mask.png"}, r"seg\.csv:6: mask file .*nope_mask\.png not found"),
        ({"split": "holdout"}, r"seg\.csv:6: split 'holdout' is not one of"),
    ],
    ids=["missing image", "missing mask", "unknown split"],
)
def test_fit_manifest_errors_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], edit: dict[str, str], expected: str
) -> None:
    rows = _good_set(tmp_path)
    csv_path = write_csv(tmp_path / "seg.csv", [*rows, {**rows[0], "id": "extra", **edit}])
    line = _one_line_error(capsys, main(_fit_argv(tmp_path, csv_path)))
    assert re.search(expected, line), line


def test_fit_missing_config_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "missing.yaml"
    rc = main(["seg", "fit", "--config", str(missing)])
    assert _one_line_error(capsys, rc) == f"error: {missing}: config not found"


def test_fit_config_that_is_not_yaml(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\ndata: {")
    line = _one_line_error(capsys, main(["seg", "fit", "--config", str(bad)]))
    assert line.startswith(f"error: {bad}: not valid YAML")
    listed = tmp_path / "list.yaml"
    listed.write_text("- model\n- data\n")
    line = _one_line_error(capsys, main(["seg", "fit", "--config", str(listed)]))
    assert line.startswith(f"error: {listed}: ")
    assert "mapping" in line


def test_fit_unknown_option_in_config_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """LightningCLI's own parse errors (a typo in the YAML, a bad value) no longer dump the usage text."""
    csv_path = write_csv(tmp_path / "seg.csv", _good_set(tmp_path))
    argv = _fit_argv(tmp_path, csv_path)
    cfg = tmp_path / "fit.yaml"
    cfg.write_text(cfg.read_text().replace("  crop: 32", "  crp: 32"))
    line = _one_line_error(capsys, main(argv))
    assert line.startswith(f"error: {cfg}: ")
    assert "data.crp" in line
    cfg.write_text(cfg.read_text().replace("  crp: 32", "  crop: big"))
    line = _one_line_error(capsys, main(argv))
    assert "data.crop" in line
    assert "big" in line


def test_compare_missing_or_broken_config_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "missing.yaml"
    assert _one_line_error(capsys, main(["seg", "compare", "--config", str(missing)])) == (
        f"error: {missing}: config not found"
    )
    bad = tmp_path / "bad.yaml"
    bad.write_text("manifest: [unclosed\n")
    assert _one_line_error(capsys, main(["seg", "compare", "--config", str(bad)])).startswith(
        f"error: {bad}: not valid YAML"
    )


def test_compare_checks_every_record_before_training(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from pathopeft.seg import compare

    monkeypatch.setattr(compare, "fit_one", lambda *a: pytest.fail("trained before the data were checked"))
    csv_path, bad = _bad_manifest(tmp_path, "truncated png", "test")
    cfg = tmp_path / "cmp.yaml"
    cfg.write_text(
        f"manifest: {csv_path}\nout_dir: {tmp_path / 'cmp'}\nencoder: vit_tiny_patch16_224\nimg_size: 32\n"
        "encoder_kwargs: {depth: 1, embed_dim: 32, num_heads: 2}\ncrop: 32\nbatch_size: 2\nmethods: [frozen]\n"
        "lrs: [0.001]\nmax_steps: 1\n"
    )
    line = _one_line_error(capsys, main(["seg", "compare", "--config", str(cfg)]))
    assert line.startswith(f"error: {csv_path}:6: {bad}: not a readable image")


# ------------------------------------------------------------------------------------------ predict


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    """A real (tiny) ``seg fit`` checkpoint, written without training."""
    module = SegModule(TINY_MODEL)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.strategy.connect(module)
    path = tmp_path / "tiny.ckpt"
    trainer.save_checkpoint(path)
    return path


def _predict_argv(tmp_path: Path, ckpt: Path, *images: Path) -> list[str]:
    return ["seg", "predict", "--ckpt", str(ckpt), "--out", str(tmp_path / "pred"), "--crop", "32", *map(str, images)]


@pytest.mark.parametrize("kind", ["text", "truncated", "not a seg checkpoint", "empty"])
def test_predict_corrupt_checkpoint_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], checkpoint: Path, kind: str
) -> None:
    image = tmp_path / "data" / "im0.png"
    _good_set(tmp_path, 1)
    bad = tmp_path / "bad.ckpt"
    if kind == "text":
        bad.write_text("junk")
    elif kind == "truncated":
        data = checkpoint.read_bytes()
        bad.write_bytes(data[: len(data) // 2])
    elif kind == "not a seg checkpoint":
        torch.save({"weights": torch.zeros(3)}, bad)
    else:
        bad.write_bytes(b"")
    line = _one_line_error(capsys, main(_predict_argv(tmp_path, bad, image)))
    assert line.startswith(f"error: {bad}: ")
    assert "checkpoint" in line


def test_predict_checks_every_image_before_writing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], checkpoint: Path
) -> None:
    _good_set(tmp_path, 1)
    good, missing = tmp_path / "data" / "im0.png", tmp_path / "data" / "nope.png"
    line = _one_line_error(capsys, main(_predict_argv(tmp_path, checkpoint, good, missing)))
    assert line == f"error: {missing}: file not found"
    assert not (tmp_path / "pred").exists() or not any((tmp_path / "pred").iterdir()), "wrote masks, then failed"
    assert main(_predict_argv(tmp_path, checkpoint, good)) == 0  # the fixture checkpoint itself is fine
    assert (tmp_path / "pred" / "im0_mask.png").is_file()
