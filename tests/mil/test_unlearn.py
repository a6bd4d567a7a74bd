"""``pathopeft mil unlearn`` (issue 17): LoKU forgets one class of a trained MIL net and keeps the others."""

from __future__ import annotations

import json

import pytest
import torch

from pathopeft.mil.unlearn import UnlearnConfig

TINY = {"hidden_dim": 16, "attn_dim": 8}


def test_unlearn_config_needs_exactly_one_target_that_exists():
    with pytest.raises(ValueError, match="exactly one"):
        UnlearnConfig(manifest="m.csv", out_dir=".")
    with pytest.raises(ValueError, match="exactly one"):
        UnlearnConfig(manifest="m.csv", out_dir=".", forget="scc", forget_site="A")
    with pytest.raises(ValueError, match="'lusc' is not one of the classes"):
        UnlearnConfig(manifest="m.csv", out_dir=".", forget="lusc")
    assert UnlearnConfig(manifest="m.csv", out_dir=".", forget="", forget_site="A").forget is None


@pytest.mark.slow
def test_mil_unlearn_drops_the_forgotten_class_to_chance_and_keeps_the_rest(manifest, tmp_path, capsys):
    from pathopeft.cli import main

    cfg = tmp_path / "unlearn.yaml"
    cfg.write_text(json.dumps({
        "manifest": str(manifest), "out_dir": str(tmp_path / "out"), "forget": "scc", "model_kwargs": TINY,
        "pretrain_epochs": 15, "pretrain_lr": 3e-3, "rank": 4, "steps": 300, "lr": 3e-3, "check_every": 5,
    }))  # fmt: skip
    assert main(["mil", "unlearn", "--config", str(cfg)]) == 0
    assert "unlearned scc in" in capsys.readouterr().out
    r = json.loads((tmp_path / "out" / "results_unlearn.json").read_text())
    assert r["test_forget_acc"]["before"] >= 0.99  # the trained net knew the class
    assert r["test_forget_acc"]["after"] <= r["chance"]  # and now it does not
    assert r["test_retain_acc"]["after"] >= r["test_retain_acc"]["before"] - 0.2  # stated tolerance: 20 points
    assert r["steps"] < 300  # stopped as soon as the forget bags were at chance
    assert (tmp_path / "out" / "net_unlearned.safetensors").is_file()
    assert main(["mil", "unlearn", "--config", str(cfg), "--forget-site", "nowhere"]) == 2
    err = capsys.readouterr().err
    assert "site 'nowhere' leaves 0 bags to forget" in err
    assert len(err.strip().splitlines()) == 1


def test_a_continual_runs_net_file_loads_as_the_starting_net_and_a_wrong_one_is_named(tmp_path):
    from safetensors.torch import save_file

    from pathopeft.mil.models import MILWeightsError, create_mil_model, load_mil_weights
    from pathopeft.mil.module import MILNet

    run_net = MILNet("abmil", 8, 3, **TINY)  # what the continual runner saves as task_<t>/net.safetensors
    save_file({k: v.contiguous() for k, v in run_net.state_dict().items()}, tmp_path / "net.safetensors")
    plain = create_mil_model("abmil", 8, 3, **TINY)
    load_mil_weights(plain, tmp_path / "net.safetensors")
    for k, v in plain.state_dict().items():
        assert torch.equal(v, run_net.mil.state_dict()[k])
    wider = create_mil_model("abmil", 8, 3, hidden_dim=32, attn_dim=8)
    with pytest.raises(MILWeightsError, match=r"net\.safetensors: tensor shapes do not fit the configured ABMIL"):
        load_mil_weights(wider, tmp_path / "net.safetensors")
