"""The continual runner's YAML: every shipped config parses into ContinualConfig, the manifest is resolved
against the YAML's folder, out_dir stays relative, overrides win, and a bad key or value is one error line."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pathopeft.config import ConfigError
from pathopeft.mil.config import ContinualConfig, load_config
from pathopeft.mil.strategies import STRATEGIES
from tests.mil.test_validation import _cli_fails

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs" / "mil").glob("*.yaml"))


def test_there_are_mil_configs():
    assert len(CONFIGS) >= 3


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_mil_config_parses_and_means_the_same_from_any_folder(path, tmp_path, monkeypatch):
    cfg = load_config(path)
    assert isinstance(cfg, ContinualConfig)
    assert cfg.strategy in STRATEGIES
    manifest = Path(cfg.manifest)
    assert manifest.is_absolute()
    assert manifest.is_relative_to(ROOT / "runs")  # where pipelines/lc25000_bags.py writes its bags.csv
    raw = yaml.safe_load(path.read_text())
    assert cfg.out_dir == raw["out_dir"]
    assert not Path(cfg.out_dir).is_absolute()  # an output: relative to the working directory
    monkeypatch.chdir(tmp_path)
    assert load_config(path) == cfg


def test_manifest_is_resolved_against_the_yaml_folder_and_overrides_against_the_cwd(tmp_path):
    sub = tmp_path / "configs"
    sub.mkdir()
    path = sub / "run.yaml"
    path.write_text("manifest: ../bags/bags.csv\nout_dir: out\nstrategy: finetune\n")
    cfg = load_config(path)
    assert cfg.manifest == str(tmp_path / "bags" / "bags.csv")
    assert cfg.out_dir == "out"
    over = load_config(
        path, manifest="other/bags.csv", out_dir="elsewhere", strategy="ewc", setting="task", epochs=2, seed=3
    )
    assert (over.manifest, over.out_dir, over.strategy, over.setting, over.epochs, over.seed) == (
        "other/bags.csv", "elsewhere", "ewc", "task", 2, 3,
    )  # fmt: skip
    assert load_config(path, epochs=None).epochs == cfg.epochs  # None: not given on the command line


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("epoch: 3\n", r"unknown key 'epoch'"),
        ("epochs: ten\n", r'"epochs".*ten'),
        ("setting: sometimes\n", r"setting must be 'class' or 'task'"),
        ("strategy: ewcc\n", r"strategy: unknown continual strategy 'ewcc'; did you mean 'ewc'"),
    ],
    ids=["unknown_key", "wrong_type", "bad_value", "unknown_strategy"],
)
def test_bad_key_or_value_is_one_config_error(tmp_path, text, expected):
    path = tmp_path / "cfg.yaml"
    path.write_text("manifest: bags.csv\nout_dir: out\n" + text)
    with pytest.raises(ConfigError, match=rf"cfg\.yaml: .*{expected}") as e:
        load_config(path)
    assert "\n" not in str(e.value)


def test_unknown_strategy_lists_every_registered_one(tmp_path):
    with pytest.raises(ValueError, match="did you mean") as e:
        ContinualConfig(manifest="m.csv", out_dir="o", strategy="replayy")
    for name in STRATEGIES.names():
        assert name in str(e.value)


@pytest.mark.parametrize(
    ("yaml_text", "argv", "expected"),
    [
        ("epoch: 3\n", [], "unknown key 'epoch'"),
        ("", ["--strategy", "nope"], "unknown continual strategy 'nope'"),
        ("epochs: ten\n", [], '"epochs"'),
    ],
    ids=["yaml_key", "cli_strategy", "yaml_type"],
)
def test_cli_reports_a_bad_config_in_one_line(tmp_path, capsys, yaml_text, argv, expected):
    path = tmp_path / "cfg.yaml"
    path.write_text("manifest: bags.csv\nout_dir: out\n" + yaml_text)
    msg = _cli_fails(capsys, "mil", "run", "--config", str(path), *argv)
    assert "cfg.yaml" in msg
    assert expected in msg
    assert not (tmp_path / "out").exists()
