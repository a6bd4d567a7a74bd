"""Combining per-task adapters (issue 17): Orthogonal Adaptation and LoRA-LEGO, each by its defining property."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pathopeft import adapters
from pathopeft.adapters.core import AdaptedLayer
from pathopeft.adapters.orthoadapt import OrthoAdaptConfig, merge_tasks


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(24, 16), nn.ReLU(), nn.Linear(16, 10))


def _ortho_model(tasks: int = 3, r: int = 4) -> nn.Module:
    model = adapters.create("orthoadapt", _mlp(), rank=r, targets=["0"], task=0)
    for t in range(1, tasks):
        model.add_adapter(f"task{t}", OrthoAdaptConfig(r=r, task=t, target_modules=["0"]))
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(".B"):
                p.normal_()
    return model


def test_orthogonal_adaptation_down_projections_are_orthogonal_and_summed_adapters_act_on_each_task_alone():
    model = _ortho_model()
    layer = model.base_model[0]
    assert isinstance(layer, AdaptedLayer)
    names = ["default", "task1", "task2"]
    A = [layer.deltas[n].A for n in names]
    for i in range(3):
        torch.testing.assert_close(A[i] @ A[i].T, torch.eye(4), atol=1e-5, rtol=0)
        for j in range(3):
            if i != j:
                torch.testing.assert_close(A[i] @ A[j].T, torch.zeros(4, 4), atol=1e-5, rtol=0)
    assert sum(p.numel() for p in layer.deltas["task2"].parameters()) == 16 * 4  # only B trains
    base = layer.base_layer
    x1 = torch.randn(5, 4) @ A[1]  # inputs in task 1's subspace
    alone = base(x1) + x1 @ layer.deltas["task1"].delta_weight(base).T
    w0 = base.weight.detach().clone()
    merged = merge_tasks(model, names, 1.0)
    torch.testing.assert_close(merged[0](x1), alone, atol=1e-5, rtol=1e-5)  # the other tasks add nothing there
    assert isinstance(merged[0], nn.Linear)  # no inference cost
    assert not torch.allclose(merged[0].weight, w0)


def test_orthogonal_adaptation_refuses_more_tasks_than_orthogonal_directions():
    with pytest.raises(ValueError, match="needs 28 orthogonal directions"):
        adapters.create("orthoadapt", _mlp(), rank=4, targets=["0"], task=6)


def test_orthoadapt_tasks_trains_one_task_and_sums_every_task_when_all_are_active():
    from pathopeft.adapters.orthoadapt import task_deltas

    model = adapters.create("orthoadapt-tasks", _mlp(), rank=3, targets=["0"], tasks=3)
    (d,) = task_deltas(model)
    for s in range(3):
        for t in range(s):
            torch.testing.assert_close(d.A[s] @ d.A[t].T, torch.zeros(3, 3), atol=1e-6, rtol=0)
    with torch.no_grad():
        for b in d.B:
            b.normal_()
    d.training_task(1)
    assert [b.requires_grad for b in d.B] == [False, True, False]
    base = _mlp()[0]
    torch.testing.assert_close(d.delta_weight(base), d.B[1] @ d.A[1])
    d.active_tasks = None
    torch.testing.assert_close(d.delta_weight(base), sum(d.B[t] @ d.A[t] for t in range(3)))
    with pytest.raises(ValueError, match="needs 48 orthogonal directions"):
        adapters.create("orthoadapt-tasks", _mlp(), rank=16, targets=["0"], tasks=3)


def _two_peft_loras():
    import peft

    torch.manual_seed(0)
    cfg = peft.LoraConfig(r=3, lora_alpha=6, target_modules=["0", "2"])
    model = peft.get_peft_model(_mlp(), cfg, adapter_name="t1")
    model.add_adapter("t2", peft.LoraConfig(r=2, lora_alpha=2, target_modules=["0", "2"]))
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_()
    return model


def test_lora_lego_at_full_rank_is_peft_concatenation_and_unit_order_does_not_matter():
    from pathopeft.adapters.merging import delta_weights, lego_merge, lora_from_factors, peft_lora_factors

    model = _two_peft_loras()
    fa, fb = peft_lora_factors(model, "t1"), peft_lora_factors(model, "t2")
    merged = lego_merge([fa, fb], k=5)
    model.add_weighted_adapter(["t1", "t2"], [1.0, 1.0], "cat", combination_type="cat")  # PEFT's exact reference
    ref = delta_weights(peft_lora_factors(model, "cat"))
    ours = delta_weights(merged)
    for name in ("0", "2"):
        torch.testing.assert_close(ours[name], ref[name], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours[name], delta_weights(fa)[name] + delta_weights(fb)[name], atol=1e-5, rtol=1e-5)
    perm = torch.tensor([2, 0, 1])
    shuffled = {n: (B[:, perm], A[perm]) for n, (B, A) in fa.items()}
    again = delta_weights(lego_merge([shuffled, fb], k=5))
    for name in ours:
        torch.testing.assert_close(again[name], ours[name], atol=1e-5, rtol=1e-5)
    plain = lora_from_factors(_mlp(), merged)  # written back as an ordinary PEFT LoRA of rank 5
    x = torch.randn(4, 24)
    with torch.no_grad():
        expected = nn.functional.linear(x, _mlp()[0].weight + ours["0"], _mlp()[0].bias)
        torch.testing.assert_close(plain.base_model.model[0](x), expected, atol=1e-5, rtol=1e-5)


def test_lora_lego_clusters_units_into_k_reweighted_centroids():
    from pathopeft.adapters.merging import lego_merge

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(1, 8, generator=g), torch.randn(6, 1, generator=g)
    near = [(b * s, a * s + 0.01 * torch.randn(1, 8, generator=g)) for s in (1.0, 2.0, -1.5)]  # one direction
    far = (torch.randn(6, 1, generator=g), torch.randn(1, 8, generator=g))
    lora1 = {"l": (torch.cat([near[0][0], far[0]], 1), torch.cat([near[0][1], far[1]], 0))}
    lora2 = {"l": (torch.cat([near[1][0], near[2][0]], 1), torch.cat([near[1][1], near[2][1]], 0))}
    B, A = lego_merge([lora1, lora2], k=2)["l"]
    assert B.shape == (6, 2) and A.shape == (2, 8)  # noqa: PT018
    units = torch.cat([A, B.T], 1)
    norms = units.norm(dim=1)
    members = [torch.cat([aa, bb.T], 1).norm() for bb, aa in near]  # the three same-direction units
    assert torch.isclose(norms, torch.stack(members).mean(), rtol=1e-4).any()  # rescaled to the members' mean
    cos = torch.nn.functional.cosine_similarity(A, a.expand_as(A), dim=1)
    assert cos.abs().max() > 0.99  # one centroid lies along the shared direction (signs aligned first)


def test_adapters_merge_command_writes_a_lora_that_loads_and_computes_the_sum(tmp_path, capsys):
    from pathopeft.cli import main

    for i, r in enumerate((3, 2)):
        torch.manual_seed(10 + i)
        model = adapters.create("lora", _mlp(), rank=r, targets=["0", "2"], alpha=2 * r)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_()
        adapters.save(model, tmp_path / f"t{i}")
    assert main(["adapters", "merge", str(tmp_path / "t0"), str(tmp_path / "t1"), "--out", str(tmp_path / "m")]) == 0
    merged = adapters.load(_mlp(), tmp_path / "m").merge_and_unload()
    plain = [adapters.load(_mlp(), tmp_path / f"t{i}").merge_and_unload() for i in range(2)]
    base = _mlp()
    for layer in (0, 2):
        expected = base[layer].weight + sum(p[layer].weight - base[layer].weight for p in plain)
        torch.testing.assert_close(merged[layer].weight, expected, atol=1e-5, rtol=1e-5)
    assert main(["adapters", "merge", str(tmp_path / "t0"), str(tmp_path / "t1"), "--method", "lego", "--k", "2",
                 "--out", str(tmp_path / "lego")]) == 0  # fmt: skip
    lego = adapters.load(_mlp(), tmp_path / "lego")
    assert sum(p.numel() for n, p in lego.named_parameters() if "lora_A" in n) == 2 * 24 + 2 * 16  # rank 2
    capsys.readouterr()
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "adapter_config.json").write_text('{"peft_type": "IA3"}')
    assert main(["adapters", "merge", str(tmp_path / "t0"), str(tmp_path / "bad"), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "bad/adapter_config.json: not a PEFT LoRA adapter" in err
    assert len(err.strip().splitlines()) == 1
