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


def _toy_bags(n: int = 5, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [
        {"features": torch.randn(6, 8, generator=g), "coords": torch.zeros(6, 2), "label": i % 3} for i in range(n)
    ]


def _model(seed: int = 0):
    cfg = FederatedConfig(manifest="unused.csv", out_dir=".", model_kwargs={**TINY, "dropout": 0.0}, rank=2, seed=seed)
    return build_model(cfg, 8)


def test_dp_sgd_without_noise_and_clipping_is_sgd_on_the_mean_bag_gradient():
    from pathopeft.mil.federated import dp_local_train

    bags = _toy_bags()
    ref, dp = _model(), _model()
    params = [p for p in ref.parameters() if p.requires_grad]
    loss = sum(torch.nn.functional.cross_entropy(ref(b["features"], b["coords"]).bag_logits[None],
                                                 torch.as_tensor([b["label"]])) for b in bags) / len(bags)  # fmt: skip
    grads = torch.autograd.grad(loss, params)
    cfg = FederatedConfig(manifest="unused.csv", out_dir=".", lr=0.1, noise_multiplier=0.0, max_grad_norm=1e6,
                          dp_batch=len(bags))  # sampling rate 1: every bag in the one step  # fmt: skip
    dp_local_train(dp, bags, 1, cfg, seed=0)
    after = [p for p in dp.parameters() if p.requires_grad]
    for p0, g, p1 in zip(params, grads, after, strict=True):
        torch.testing.assert_close(p1.detach(), p0.detach() - 0.1 * g, atol=1e-5, rtol=1e-4)


def test_dp_sgd_clips_each_bag_and_the_accountant_reports_epsilon():
    from pathopeft.mil.federated import dp_epsilon, dp_local_train

    bags = _toy_bags()
    before = _model()
    dp = _model()
    cfg = FederatedConfig(manifest="unused.csv", out_dir=".", lr=1.0, noise_multiplier=0.0, max_grad_norm=1e-3,
                          dp_batch=len(bags))  # fmt: skip
    dp_local_train(dp, bags, 1, cfg, seed=0)
    moved = torch.cat([(p1 - p0).reshape(-1) for p0, p1 in zip(before.parameters(), dp.parameters(), strict=True)])
    assert 0 < moved.norm() <= 1e-3 + 1e-7  # the mean of bag gradients each clipped to 1e-3
    cfg = FederatedConfig(manifest="m.csv", out_dir=".", rounds=5, local_steps=10, noise_multiplier=1.0, dp_batch=4)
    eps = dp_epsilon(cfg, [40, 20])
    cfg_more_noise = FederatedConfig(manifest="m.csv", out_dir=".", rounds=5, local_steps=10, noise_multiplier=2.0,
                                     dp_batch=4)  # fmt: skip
    assert 0 < dp_epsilon(cfg_more_noise, [40, 20]) < eps < float("inf")
    assert dp_epsilon(cfg, [20]) == eps  # the smallest client (highest sampling rate) sets the run's ε
    with pytest.raises(ValueError, match="DP-SGD is for the federated clients"):
        FederatedConfig(manifest="m.csv", out_dir=".", method="central", noise_multiplier=1.0)


@pytest.mark.slow
def test_a_fedsvd_simulation_with_dp_sgd_reports_epsilon(manifest, tmp_path):
    kw = {"manifest": str(manifest), "out_dir": str(tmp_path), "model_kwargs": TINY, "rank": 4, "clients": 3,
          "rounds": 3, "local_steps": 8, "lr": 0.3, "noise_multiplier": 0.8, "dp_batch": 3}  # fmt: skip
    fed = run_federated(FederatedConfig(method="fedsvd", **kw))
    assert len(fed["history"]) == 3
    assert 0 < fed["dp"]["epsilon"] < float("inf")
    assert (tmp_path / "results_fedsvd_dp0.8.json").is_file()
