"""Typed YAML configs: types checked, unknown keys refused, input paths resolved against the config file."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from pathopeft.config import ConfigError, load_config, read_yaml


@dataclass
class Inner:
    size: int = 224


@dataclass
class Job:
    manifest: str
    out_dir: str = "runs/x"
    epochs: int = 1
    inner: Inner = field(default_factory=Inner)
    weights: str | None = None


def test_types_overrides_and_paths(tmp_path, monkeypatch):
    cfg_dir = tmp_path / "configs"
    cfg_dir.mkdir()
    (cfg_dir / "job.yaml").write_text("manifest: ../data/m.csv\nepochs: 3\ninner: {size: 256}\nweights: ${W}/w.pt\n")
    monkeypatch.setenv("W", "/models")
    monkeypatch.chdir(tmp_path / "configs")
    job = load_config(Job, cfg_dir / "job.yaml", {"epochs": 5, "inner.size": None}, ("manifest", "weights"))
    assert job.manifest == str(tmp_path / "data" / "m.csv")  # against the config file, not the cwd
    assert job.weights == "/models/w.pt"
    assert job.out_dir == "runs/x"  # outputs are not paths of the config
    assert job.epochs == 5
    assert isinstance(job.inner, Inner)
    assert job.inner.size == 256


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("manifest: m.csv\nepochz: 3\n", "unknown key 'epochz'"),
        ("manifest: m.csv\nepochs: many\n", "Parser key \"epochs\": Expected a <class 'int'>"),
        ("manifest: [unclosed\n", "not valid YAML (line 2"),
        ("- a\n- b\n", "expected a mapping of settings"),
        ("manifest: ${NOPE_NOT_SET}/m.csv\n", "environment variable not set"),
    ],
)
def test_errors_name_the_file_and_the_key(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(Job, path, path_fields=("manifest",))
    assert str(path) in str(info.value)
    assert message in str(info.value)


def test_missing_config_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"nope\.yaml: config not found"):
        read_yaml(tmp_path / "nope.yaml")
