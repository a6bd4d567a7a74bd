"""The strategy registry is the one place strategies are named: the runner holds no names, the config, the
CLI and the test matrix read the registry, and a new strategy is one registered class."""

from __future__ import annotations

import ast
import dataclasses
import inspect
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pathopeft.cli import build_parser
from pathopeft.mil import continual
from pathopeft.mil.config import ContinualConfig
from pathopeft.mil.continual import compare, run_continual
from pathopeft.mil.strategies import STRATEGIES, Strategy
from pathopeft.registry import UnknownPluginError
from tests.mil.test_continual import _cfg


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch):
    """STRATEGIES with its entries restored after the test, so a test may register a throwaway strategy."""
    monkeypatch.setattr(STRATEGIES, "_entries", dict(STRATEGIES._entries))
    return STRATEGIES


def test_the_registry_holds_every_strategy_with_its_capabilities():
    assert STRATEGIES.names() == [
        "comel",
        "owlora",
        "lora",
        "finetune",
        "ewc",
        "replay",
        "erace",
        "derpp",
        "lwf",
        "agem",
        "inflora",
        "codyra",
        "orthoadapt",
        "joint",
    ]
    assert STRATEGIES.names(bppl=True) == ["comel"]
    assert STRATEGIES.names(adapters=True) == ["comel", "owlora", "lora", "codyra", "orthoadapt"]
    assert STRATEGIES.names(ablation=True) == ["owlora"]
    assert STRATEGIES.names(all_tasks_at_once=True) == ["joint"]
    for name in STRATEGIES.names():
        assert issubclass(STRATEGIES.get(name), Strategy)


def test_the_runner_names_no_strategy():
    """No strategy name as a string or identifier in mil/continual.py: every difference is a hook."""
    tree = ast.parse(Path(inspect.getfile(continual)).read_text())
    names = set(STRATEGIES.names())
    strings = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
    idents = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    idents |= {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    assert not names & strings
    assert not names & idents


@pytest.mark.parametrize("name", STRATEGIES.names())
def test_bppl_default_comes_from_the_capability(name):
    cfg = ContinualConfig(manifest="m.csv", out_dir="o", strategy=name)
    assert cfg.bppl_on == STRATEGIES.entry(name).caps["bppl"]
    assert ContinualConfig(manifest="m.csv", out_dir="o", strategy=name, use_bppl=False).bppl_on is False


def test_config_takes_the_registered_spelling():
    assert ContinualConfig(manifest="m.csv", out_dir="o", strategy="CoMEL").strategy == "comel"


def test_compare_refuses_an_unknown_strategy_before_training(tmp_path):
    cfg = ContinualConfig(manifest=str(tmp_path / "missing.csv"), out_dir=str(tmp_path / "out"))
    with pytest.raises(UnknownPluginError, match=r"unknown continual strategy 'ewcc'.*known: comel"):
        compare(cfg, ["finetune", "ewcc"])
    assert not (tmp_path / "out").exists()


def test_cli_help_and_compare_default_come_from_the_registry(registry, capsys):
    registry.add("probe", type("Probe", (Strategy,), {}), ablation=True)
    parser = build_parser()
    args = parser.parse_args(["mil", "compare", "--config", "x.yaml"])
    assert (
        args.strategies
        == STRATEGIES.names(ablation=False)
        == [
            "comel",
            "lora",
            "finetune",
            "ewc",
            "replay",
            "erace",
            "derpp",
            "lwf",
            "agem",
            "inflora",
            "codyra",
            "orthoadapt",
            "joint",
        ]
    )
    with pytest.raises(SystemExit):
        parser.parse_args(["mil", "run", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert " | ".join(STRATEGIES.names()) in help_text
    assert "probe" in help_text


def test_a_new_strategy_is_one_registered_class(registry, manifest, tmp_path):
    """A strategy the runner has never heard of: after task 0 only the classifier heads train."""

    class HeadsOnly(Strategy):
        def before_task(self, net: torch.nn.Module, t: int) -> torch.nn.Module:
            if t > 0:
                for name, p in net.named_parameters():
                    p.requires_grad_(name.startswith(("instance_head", "mil.classifier")))
            return net

    registry.add("heads_only", HeadsOnly)
    state = run_continual(_cfg(manifest, tmp_path, strategy="heads_only", epochs=2))
    assert state["done"] == 2
    before = load_file(tmp_path / "heads_only-class" / "task_0" / "net.safetensors")
    after = load_file(tmp_path / "heads_only-class" / "task_1" / "net.safetensors")
    heads = [k for k in before if k.startswith(("instance_head", "mil.classifier"))]
    assert heads
    assert any(not torch.equal(before[k], after[k]) for k in heads)
    assert all(torch.equal(before[k], after[k]) for k in before if k not in heads)


def test_strategies_are_stateful_per_run(manifest, tmp_path):
    """One instance per run: a second run of replay starts with an empty buffer."""
    cfg = _cfg(manifest, tmp_path, strategy="replay", epochs=1, heatmaps=0)
    a = continual.ContinualRunner(cfg)
    b = continual.ContinualRunner(dataclasses.replace(cfg, out_dir=str(tmp_path / "b")))
    assert a.strategy is not b.strategy
    a.strategy.before_task(torch.nn.Linear(1, 1), 1)
    assert len(a.strategy.replay_bags(1)) == cfg.replay_per_task
    assert b.strategy.replay_bags(1) == []
