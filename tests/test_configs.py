"""Every shipped YAML in configs/ parses into the settings it is for, from any working directory, without the data.

wsi → BatchConfig, seg compare → CompareConfig, mil → ContinualConfig, pipelines/<name> → the config dataclass of
pipelines/<name>.py (all through pathopeft.config.load_config: types and unknown keys checked), seg fit →
LightningCLI's own parser (``--print_config``: parsed, nothing built).
Input paths are relative to the config file, outputs to the working directory; the tests run from an empty
folder so a config that only works from the repository root fails here.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from pathopeft.cli import main
from pathopeft.config import load_config
from pathopeft.seg.compare import CompareConfig, load_compare_config
from pathopeft.wsi.config import BatchConfig, ExtractConfig, TilingConfig, load_batch_config

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
SHARED_BESIDE_REPO = REPO.parent / "shared"  # where the shipped configs point (relative to themselves)
WSI = sorted((CONFIGS / "wsi").glob("*.yaml"))
SEG_COMPARE = sorted((CONFIGS / "seg").glob("compare_*.yaml"))
SEG_FIT = sorted(p for p in (CONFIGS / "seg").glob("*.yaml") if not p.name.startswith("compare_"))
MIL = sorted((CONFIGS / "mil").glob("*.yaml"))
FED = sorted((CONFIGS / "fed").glob("*.yaml"))
UNLEARN = sorted((CONFIGS / "unlearn").glob("*.yaml"))
PIPELINES = sorted((CONFIGS / "pipelines").glob("*.yaml"))  # configs/pipelines/<name>.yaml: pipelines/<name>.py
ADAPTER_LIBRARIES = sorted((CONFIGS / "adapters").glob("*.yaml"))  # adapters generator-fit


def _name(path: Path) -> str:
    return f"{path.parent.name}/{path.name}"


@pytest.fixture(autouse=True)
def _elsewhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run from an empty folder: what a config means must not depend on the working directory."""
    monkeypatch.chdir(tmp_path)


def _check_input(path: str | None) -> None:
    """An input path of a shipped config: absolute after loading; it exists, unless it is in an absent ../shared."""
    if not path:
        return
    p = Path(path)
    assert p.is_absolute(), path
    if p.is_relative_to(SHARED_BESIDE_REPO) and not SHARED_BESIDE_REPO.is_dir():
        return  # the real data are not here; parsing is what this test checks
    assert p.exists(), f"{path} (resolved against its config file) does not exist"


def test_every_shipped_config_is_checked() -> None:
    every = set(CONFIGS.rglob("*.yaml")) | set(CONFIGS.rglob("*.yml"))
    assert every == {*WSI, *SEG_COMPARE, *SEG_FIT, *MIL, *FED, *UNLEARN, *PIPELINES, *ADAPTER_LIBRARIES}, (
        "a config in configs/ that no test parses"
    )
    assert all((WSI, SEG_COMPARE, SEG_FIT, MIL, FED, UNLEARN, ADAPTER_LIBRARIES))


@pytest.mark.parametrize("path", ADAPTER_LIBRARIES, ids=_name)
def test_adapter_library_is_a_generator_library(path: Path) -> None:
    from pathopeft.adapters.lora_generation import library_spec

    experts = library_spec(path)
    assert len({name for name, _, _ in experts}) == len(experts) >= 2
    assert all(pats and not Path(p).is_absolute() for _, _, pats in experts for p in pats)
    header = "".join(line for line in path.read_text().splitlines(keepends=True) if line.startswith("#"))
    assert "relative to this file" in header
    assert "working directory" in header


@pytest.mark.parametrize("path", [*WSI, *SEG_COMPARE, *SEG_FIT], ids=_name)
def test_header_states_the_path_rule(path: Path) -> None:
    header = "".join(line for line in path.read_text().splitlines(keepends=True) if line.startswith("#"))
    assert "relative to this file" in header
    assert "working directory" in header


@pytest.mark.parametrize("path", WSI, ids=_name)
def test_wsi_config_is_a_batch_config(path: Path) -> None:
    cfg = load_batch_config(path, {"out_dir": "run"})
    assert isinstance(cfg, BatchConfig)
    assert isinstance(cfg.tiling, TilingConfig)
    assert isinstance(cfg.extract, ExtractConfig)
    assert cfg.out_dir == "run"  # outputs stay relative to the working directory
    _check_input(cfg.extract.weights)
    _check_input(cfg.extract.adapter)


@pytest.mark.parametrize("path", SEG_COMPARE, ids=_name)
def test_seg_compare_config_is_a_compare_config(path: Path) -> None:
    cfg = load_compare_config(path)
    assert isinstance(cfg, CompareConfig)
    assert not Path(cfg.out_dir).is_absolute()
    _check_input(cfg.manifest)
    _check_input(cfg.weights)
    from pathopeft import adapters
    from pathopeft.seg.compare import _adapter

    for method in cfg.methods:  # every method's options are its config's: a typo fails here, not an hour into a run
        name = _adapter(method)[0]
        if name not in (None, "full"):
            conv = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3))
            adapters.create(name, conv, **{"rank": cfg.rank, **cfg.method_kwargs.get(method, {})}, targets=["0", "2"])


@pytest.mark.parametrize("path", SEG_FIT, ids=_name)
def test_seg_fit_config_parses_in_lightning_cli(path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["seg", "fit", "--config", str(path), "--print_config"])
    assert info.value.code in (0, None), capsys.readouterr().err
    printed = yaml.safe_load(capsys.readouterr().out)
    _check_input(printed["model"]["model"]["init_args"]["weights"])
    _check_input(printed["data"]["manifest"])
    assert not Path(printed["trainer"]["default_root_dir"]).is_absolute()
    stoppers = [c for c in printed["trainer"]["callbacks"] if c["class_path"].endswith(".EarlyStopping")]
    assert all(c["init_args"]["check_on_train_epoch_end"] is False for c in stoppers), "--ckpt_path resume crashes"


@pytest.mark.parametrize("path", MIL, ids=_name)
def test_mil_config_is_a_continual_config(path: Path) -> None:
    from pathopeft.mil.continual import ContinualConfig

    assert isinstance(load_config(ContinualConfig, path), ContinualConfig)


@pytest.mark.parametrize("path", FED, ids=_name)
def test_fed_config_is_a_federated_config(path: Path) -> None:
    from pathopeft.mil.federated import FederatedConfig

    cfg = load_config(FederatedConfig, path, path_fields=("manifest", "init"))
    assert Path(cfg.manifest).is_absolute()
    header = "".join(line for line in path.read_text().splitlines(keepends=True) if line.startswith("#"))
    assert "relative to this file" in header
    assert "working directory" in header


@pytest.mark.parametrize("path", UNLEARN, ids=_name)
def test_unlearn_config_is_an_unlearn_config(path: Path) -> None:
    from pathopeft.mil.unlearn import UnlearnConfig

    cfg = load_config(UnlearnConfig, path, path_fields=("manifest", "init"))
    assert Path(cfg.manifest).is_absolute()
    assert cfg.forget in cfg.classes
    header = "".join(line for line in path.read_text().splitlines(keepends=True) if line.startswith("#"))
    assert "relative to this file" in header
    assert "working directory" in header


@pytest.mark.parametrize("path", PIPELINES, ids=_name)
def test_pipeline_config_is_its_scripts_config(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import dataclasses
    import importlib.util

    script = REPO / "pipelines" / f"{path.stem}.py"
    assert script.is_file(), f"{path}: no pipeline script {script}"
    spec = importlib.util.spec_from_file_location(f"_pipeline_{path.stem}", script)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, module.__name__, module)  # dataclass annotations resolve through it
    spec.loader.exec_module(module)
    (cls,) = [
        c for name, c in vars(module).items()
        if name.endswith("Config") and dataclasses.is_dataclass(c) and c.__module__ == module.__name__
    ]  # fmt: skip
    fields = getattr(module, "PATH_FIELDS", ())
    cfg = load_config(cls, path, path_fields=fields)
    for dotted in fields:
        value: Any = cfg
        for key in dotted.split("."):
            value = getattr(value, key, None)
        _check_input(value)
