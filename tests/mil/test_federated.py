"""FedSVD on Flower (issue 17): the server's re-factorisation, who trains what, and a toy simulation."""

from __future__ import annotations

import pytest
import torch

from pathopeft.mil.federated import FederatedConfig, build_model, refactor_state, run_federated, svd_refactor

TINY = {"hidden_dim": 16, "attn_dim": 8}


def test_fedsvd_refactor_gives_orthonormal_a_and_keeps_the_product_exactly():
    g = torch.Generator().manual_seed(0)
    b_bar, a = torch.randn(12, 4, generator=g), torch.randn(4, 20, generator=g)
    b_new, a_new = svd_refactor(b_bar, a)
    torch.testing.assert_close(a_new @ a_new.T, torch.eye(4), atol=1e-5, rtol=0)
    torch.testing.assert_close(b_new @ a_new, b_bar @ a, atol=1e-5, rtol=1e-5)
    state = {"x.lora_A.default.weight": a, "x.lora_B.default.weight": b_bar, "classifier.weight": torch.ones(2)}
    out = refactor_state(state)
    torch.testing.assert_close(out["x.lora_B.default.weight"] @ out["x.lora_A.default.weight"], b_bar @ a,
                               atol=1e-5, rtol=1e-5)  # fmt: skip
    assert torch.equal(out["classifier.weight"], state["classifier.weight"])


def test_fedsvd_clients_train_b_and_the_classifier_fedavg_trains_a_too(tmp_path):
    cfg = FederatedConfig(manifest="unused.csv", out_dir=str(tmp_path), model_kwargs=TINY, rank=2)
    names = {n for n, p in build_model(cfg, 8).named_parameters() if p.requires_grad}
    assert names
    assert all("lora_B" in n or ".classifier." in n for n in names)
    cfg.method = "fedavg"
    assert any("lora_A" in n for n, p in build_model(cfg, 8).named_parameters() if p.requires_grad)
    with pytest.raises(ValueError, match="method must be one of"):
        FederatedConfig(manifest="m.csv", out_dir=".", method="fedprox")


@pytest.mark.slow
def test_a_three_hospital_fedsvd_simulation_on_flower_learns(manifest, tmp_path):
    kw = {"manifest": str(manifest), "out_dir": str(tmp_path), "model_kwargs": TINY, "rank": 4, "clients": 3,
          "rounds": 4, "local_steps": 8, "lr": 0.3}  # fmt: skip
    fed = run_federated(FederatedConfig(method="fedsvd", **kw))
    assert [h["round"] for h in fed["history"]] == [1, 2, 3, 4]
    assert sum(fed["clients"]) > 0
    assert len(fed["clients"]) == 3
    central = run_federated(FederatedConfig(method="central", **kw))
    majority = 0.5  # 6 benign of 12 test bags
    assert fed["final_test_acc"] > majority + 0.2  # the hospitals together learn the classes (0.92 seen)
    assert fed["final_test_acc"] > fed["history"][0]["test_acc"]
    assert central["final_test_acc"] > majority + 0.2
    assert (tmp_path / "results_fedsvd.json").is_file()
