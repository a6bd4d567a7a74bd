"""CoMEL's BPPL (:mod:`pathopeft.mil.bppl`, variant ``comel``): hand-computable cases and parity with the code.

``fixtures/comel_bppl_parity.npz`` was made once, outside the repository, like this: the official trainer
``continual/main/continual_instance/cdatmil_ppl_owlora_trainer.py`` of Hyun1A/CoMEL @ 9fd6679 was taken from
``git show``; a scratch script (not committed; the repository has no licence, so none of its code is here) cut
its ``CDATMIL_PPL_OWLoRA_Trainer.train_loop`` lines 171–177 (min-max normalised attention), 188–193 (bag
confidence and ``quality``), 204–238 (the PPL branch: gate, prototypes, pseudo-labels, selection, loss) and 352
(the τ₂ update), dedented them and ``exec``-ed them verbatim in float64 on six seeded bags (N = 12, d = 8,
numpy ``default_rng(0)``), with ``self`` a stub holding T = 1, τ₁ = 0.95, τ = 0.5 (``cdatmil_ppl_ft_trainer.py``
L41–44) and the bag's τ₂, ``train_patch_attn = softmax(z)[None]``, ``feat_inst = h[None]`` and ``feat_bag =
softmax(z) @ h`` (the ABMIL bag feature), batch size 1. It stored z, h, the bag logits, label, τ₂, the
official loss, its gradient with respect to z, ``quality`` and the τ₂ that line 352 gives after that one bag.
Only these numbers come from the official code.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pathopeft.mil.bppl import (
    BPPLConfig,
    attention_scores,
    bag_quality,
    comel_instance_loss,
    comel_pseudo_labels,
    next_tau2,
    prototypes,
)

FIXTURE = Path(__file__).parent / "fixtures" / "comel_bppl_parity.npz"


def _tumour_bag(n: int = 8, d: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g) * 0.1
    h[:, 0] -= 1.0
    h[:2, 0] += 2.0  # two tumour instances
    z = torch.zeros(n)
    z[:2] = 3.0
    return h, z


def test_official_defaults():
    cfg = BPPLConfig()
    assert (cfg.variant, cfg.temperature, cfg.tau1, cfg.tau, cfg.tau2_init) == ("comel", 1.0, 0.95, 0.5, 0.5)
    assert (cfg.weight, cfg.warmup_epochs) == (1.0, 0)  # --seg_coef 1.0, --train_patch_epoch=0
    with pytest.raises(ValueError, match="variant"):
        BPPLConfig(variant="nope")


def test_instance_score_is_min_max_normalised_attention():
    a = torch.tensor([0.1, 0.2, 0.3, 0.4])
    # the code's form: (a − min) / (max + 1e-10)  — the denominator is max a, not max a − min a
    assert torch.allclose(attention_scores(a), torch.tensor([0.0, 0.25, 0.5, 0.75]), atol=1e-7)
    assert float(attention_scores(a).min()) == 0.0


@pytest.mark.parametrize(
    ("label", "logits", "why"), [(0, [3.0, -3.0], "negative bag"), (1, [3.0, -3.0], "misclassified tumour bag")]
)
def test_negative_or_misclassified_bag_gives_exactly_zero(label, logits, why):
    h, z = _tumour_bag()
    z.requires_grad_(True)
    a = torch.softmax(z, 0)
    loss, n_kept = comel_instance_loss(a, h, torch.tensor(logits), label, label == 1, 0.5, BPPLConfig())
    assert n_kept == 0, why
    assert float(loss) == 0.0, why
    loss.backward()  # attached to the graph, with a zero gradient
    assert torch.equal(z.grad, torch.zeros_like(z))


def test_unconfident_bag_gives_zero_and_a_confident_one_trains_the_attention():
    h, z = _tumour_bag()
    z.requires_grad_(True)
    a = torch.softmax(z, 0)
    cfg = BPPLConfig()
    low, n_low = comel_instance_loss(a, h, torch.tensor([-0.5, 0.5]), 1, True, 0.5, cfg)  # p = 0.73 < τ₁
    assert n_low == 0
    assert float(low) == 0.0
    loss, n_kept = comel_instance_loss(a, h, torch.tensor([-3.0, 3.0]), 1, True, 0.5, cfg)
    assert n_kept > 0
    assert float(loss) > 0
    loss.backward()
    assert z.grad.abs().sum() > 0  # the instance loss reaches the attention
    labels, _ = comel_pseudo_labels(h, a.detach())
    assert labels[:2].tolist() == [1, 1]
    assert (labels[2:] == 0).all()


def test_kept_fraction_scales_the_loss():
    # one instance kept of N: loss = (1/N) · −log s  (and 0-labelled: −log(1 − s))
    a = torch.tensor([0.5, 0.3, 0.2])
    h = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.7, 0.7]])
    labels, conf = comel_pseudo_labels(h, a)
    tau2 = float(conf.sort().values[-2])  # keep only the most confident instance
    loss, n_kept = comel_instance_loss(a, h, torch.tensor([-5.0, 5.0]), 1, True, tau2, BPPLConfig())
    i = int(conf.argmax())
    s = attention_scores(a)[i]
    p = s if int(labels[i]) == 1 else 1 - s
    assert n_kept == 1
    assert float(loss) == pytest.approx(float(-torch.log(p + 1e-10)) / 3, rel=1e-6)


def test_negative_prototype_is_one_minus_attention_not_inverse_attention():
    h = torch.eye(4)  # p = its own weights
    a = torch.tensor([0.85, 0.1, 0.04, 0.01])  # one dominant instance
    w = (1 - a) / (1 - a).sum()  # [0.15, 0.9, 0.96, 0.99] / 3: nearly uniform off the dominant instance
    assert torch.allclose(w, torch.tensor([0.05, 0.30, 0.32, 0.33]), atol=1e-6)
    inv = prototypes(h, a)[1]  # the legacy ∝ 1/a prototype: [1/0.85, 10, 25, 100] / 136.18, the least attended wins
    assert torch.allclose(inv, torch.tensor([1 / 0.85, 10.0, 25.0, 100.0]) / (1 / 0.85 + 135), atol=1e-6)
    assert (w - inv).abs().max() > 0.3
    # the pseudo-labels use exactly the (1 − a) prototype: cos(e_i, p) = p_i / ‖p‖
    labels, conf = comel_pseudo_labels(h, a)
    cos_neg, cos_pos = w / w.norm(), a / a.norm()
    want = torch.softmax(torch.stack([cos_neg, cos_pos], 1), 1)
    assert torch.equal(labels, want.argmax(1))
    assert torch.allclose(conf, want.max(1).values, atol=1e-6)
    assert labels.tolist() == [1, 0, 0, 0]


def test_tau2_is_re_estimated_from_the_epochs_bags():
    right = bag_quality(torch.tensor([0.0, torch.log(torch.tensor(3.0))]), 1)  # p = 0.75, correct
    wrong = bag_quality(torch.tensor([0.0, torch.log(torch.tensor(3.0))]), 0)  # incorrect: 0
    assert right == pytest.approx(0.75)
    assert wrong == 0.0
    assert next_tau2(0.5, right + wrong, 2) == pytest.approx(0.5 * (1 + 0.5 * 0.375))
    assert next_tau2(0.5, 0.0, 0) == 0.5
    assert next_tau2(0.5, 4.0, 4) == 0.75


def test_tau2_carries_from_epoch_to_epoch_in_the_module():
    from pathopeft.mil.module import ContinualMILModule, MILNet

    torch.manual_seed(0)
    net = MILNet("abmil", in_dim=4, n_classes=2, hidden_dim=8)
    mod = ContinualMILModule(net, [0, 1], benign_class=0, use_bppl=True)
    assert mod.tau2 == 0.5
    bags = [{"features": torch.randn(6, 4), "coords": torch.zeros(6, 2), "label": lbl} for lbl in (0, 1, 1)]
    mod.on_train_epoch_start()  # it puts the net in training mode
    assert net.training
    net.eval()  # no dropout, so the bag logits recomputed below are the ones the module saw
    want = 0.0
    for b in bags:
        mod._losses(b)
        with torch.no_grad():
            want += bag_quality(net(b["features"], b["coords"])[0].bag_logits, b["label"])
    mod.on_train_epoch_end()
    assert mod.tau2 == pytest.approx(0.5 * (1 + 0.5 * want / 3), rel=1e-6)
    assert ContinualMILModule(net, [0, 1], use_bppl=True).tau2 == mod.tau2  # the next task starts from it
    assert float(net.state_dict()["bppl_tau2"]) == mod.tau2  # and so does a resume from the state dict


def test_parity_with_the_official_code():
    fx = np.load(FIXTURE)
    assert str(fx["provenance_repository"]) == "Hyun1A/CoMEL"
    assert str(fx["provenance_commit"]).startswith("9fd6679")
    cfg = BPPLConfig(temperature=float(fx["T"]), tau1=float(fx["tau1"]), tau=float(fx["tau"]))
    worst, partial = 0.0, 0
    for c in range(len(fx["loss"])):
        z = torch.tensor(fx["z"][c], dtype=torch.float32, requires_grad=True)
        a = torch.softmax(z, 0)
        h = torch.tensor(fx["h"][c], dtype=torch.float32)
        logits, label = torch.tensor(fx["logits"][c], dtype=torch.float32), int(fx["label"][c])
        loss, n_kept = comel_instance_loss(a, h, logits, label, label % 2 == 1, float(fx["tau2"][c]), cfg)
        partial += 0 < n_kept < len(z)
        (grad,) = torch.autograd.grad(loss, z, allow_unused=True)
        grad = torch.zeros_like(z) if grad is None else grad
        worst = max(
            worst, abs(float(loss) - float(fx["loss"][c])), float(np.abs(grad.numpy() - fx["grad_z"][c]).max())
        )
        q = bag_quality(logits, label)
        assert q == pytest.approx(float(fx["quality"][c]), abs=1e-5)
        assert next_tau2(cfg.tau, q, 1) == pytest.approx(float(fx["tau2_next"][c]), abs=1e-5)
    assert (fx["loss"] > 0).sum() >= 3
    assert (fx["loss"] == 0).sum() >= 2
    assert partial >= 1  # and a τ₂ that keeps only some of a bag's instances
    assert worst < 1e-5
