"""Reversible Model Merging: exact recovery at K = n, PCA-optimal error below it, and the revert command."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pathopeft import adapters
from pathopeft.adapters.rmm import discarded_energy, rmm_fit, rmm_revert


def _loras(n: int = 4, r: int = 3, seed: int = 0) -> list[dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    g = torch.Generator().manual_seed(seed)
    return [{"l1": (torch.randn(6, r, generator=g), torch.randn(r, 5, generator=g)),
             "l2": (torch.randn(4, r, generator=g), torch.randn(r, 7, generator=g))} for _ in range(n)]  # fmt: skip


def _error(loras, rmm) -> float:
    return sum(float((rmm_revert(rmm, i)[n][j].double() - f[n][j].double()).pow(2).sum())
               for i, f in enumerate(loras) for n in f for j in (0, 1))  # fmt: skip


def test_rmm_with_a_full_basis_recovers_every_task_exactly():
    loras = _loras()
    rmm = rmm_fit(loras, k=4, tasks=["luad", "lusc", "brca", "coad"])
    for i, f in enumerate(loras):
        back = rmm_revert(rmm, rmm.tasks[i])
        for n in f:
            torch.testing.assert_close(back[n][0], f[n][0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(back[n][1], f[n][1], atol=1e-5, rtol=1e-5)
    assert discarded_energy(rmm) == pytest.approx(0.0, abs=1e-8)


def test_rmm_below_full_basis_loses_exactly_the_discarded_eigenvalues_and_no_rank_k_basis_does_better():
    loras = _loras(n=5)
    for k in (1, 2, 3):
        rmm = rmm_fit(loras, k=k)
        assert _error(loras, rmm) == pytest.approx(discarded_energy(rmm), rel=1e-6)
        assert discarded_energy(rmm) > 0
        # any other K-dimensional basis of task combinations (here: K of the tasks themselves) is no better
        for layer in rmm.basis:
            x = torch.stack([f[layer][1].reshape(-1) for f in loras], 1).double()
            q, _ = torch.linalg.qr(x[:, :k])
            other = float((x - q @ (q.T @ x)).pow(2).sum())
            assert other >= float(rmm.eigenvalues[layer][1][k:].sum()) - 1e-6
    assert discarded_energy(rmm_fit(loras, 1)) > discarded_energy(rmm_fit(loras, 3))


def test_rmm_refuses_mismatched_ranks_and_bad_basis_sizes():
    loras = _loras(n=2)
    with pytest.raises(ValueError, match="basis size"):
        rmm_fit(loras, k=3)
    loras[1]["l1"] = (torch.randn(6, 2), torch.randn(2, 5))
    with pytest.raises(ValueError, match="'l1' has different ranks"):
        rmm_fit(loras, k=2)


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(24, 16), nn.ReLU(), nn.Linear(16, 8))


def test_adapters_merge_rmm_and_revert_commands_rebuild_each_task(tmp_path, capsys):
    from pathopeft.cli import main

    for i in range(3):
        base = _mlp()
        torch.manual_seed(20 + i)  # after the base's fixed seed, so the tasks differ
        model = adapters.create("lora", base, rank=2, targets=["0", "2"], alpha=4)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_()
        adapters.save(model, tmp_path / f"task{i}")
    dirs = [str(tmp_path / f"task{i}") for i in range(3)]
    assert main(["adapters", "merge", *dirs, "--method", "rmm", "--k", "3", "--out", str(tmp_path / "rmm")]) == 0
    assert "100.00 % of the factors' energy kept" in capsys.readouterr().out
    x = torch.randn(5, 24)
    for i in range(3):
        out = tmp_path / f"back{i}"
        assert main(["adapters", "revert", str(tmp_path / "rmm"), "--task", f"task{i}", "--out", str(out)]) == 0
        with torch.no_grad():
            expected = adapters.load(_mlp(), dirs[i]).merge_and_unload()(x)
            got = adapters.load(_mlp(), out).merge_and_unload()(x)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert main(["adapters", "merge", *dirs, "--method", "rmm", "--k", "1", "--out", str(tmp_path / "rmm1")]) == 0
    kept = float(capsys.readouterr().out.split("(")[1].split(" %")[0])
    assert 0 < kept < 100
    assert main(["adapters", "revert", str(tmp_path / "rmm"), "--task", "nope", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "rmm.json: RMM: no task 'nope'" in err
    assert len(err.strip().splitlines()) == 1
