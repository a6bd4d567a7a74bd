"""Routing over a library of task adapters (issue 17): a bag of a known task gets that task's adapter."""

from __future__ import annotations

import pytest
import torch

from pathopeft.mil.routing import TaskRouter


def _bags(task: int, n: int, seed: int, dim: int = 12) -> list[dict]:
    """Bags whose tiles share a task-specific tissue background (axis 3·task), plus noise and a few tumour tiles."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        f = 0.5 * torch.randn(16, dim, generator=g)
        f[:, 3 * task] += 1.5
        f[:4, 3 * task + 1] += 3.0 * float(torch.rand(1, generator=g) > 0.5)
        out.append({"features": f, "coords": torch.zeros(16, 2), "label": 0})
    return out


def test_the_router_picks_the_adapter_of_the_bags_task():
    tasks = ["lung", "oral", "colon"]
    router = TaskRouter.fit([_bags(t, 8, seed=t) for t in range(3)], tasks)
    for t in range(3):
        for bag in _bags(t, 10, seed=100 + t):  # unseen bags
            assert router.route(bag) == t
            assert router.probs(bag)[t] > 0.9
    again = TaskRouter.from_state(router.state())
    torch.testing.assert_close(again.prototypes, router.prototypes)


def test_pick_uses_one_adapter_and_mix_weights_every_adapter_by_the_routing_probabilities():
    import peft

    from pathopeft.mil.models import create_mil_model
    from pathopeft.mil.strategies.adapter import adapted_layers

    torch.manual_seed(0)
    net = create_mil_model("abmil", 12, 3, hidden_dim=16, attn_dim=8)
    layers = adapted_layers(net)
    model = peft.get_peft_model(net, peft.LoraConfig(r=2, target_modules=layers), adapter_name="t0")
    for t in (1, 2):
        model.add_adapter(f"t{t}", peft.LoraConfig(r=2, target_modules=layers))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    model.eval()

    @torch.no_grad()
    def predict_with(t: int, bag: dict) -> torch.Tensor:
        model.set_adapter(f"t{t}")
        return model(bag["features"], bag["coords"]).bag_logits.softmax(-1)

    router = TaskRouter.fit([_bags(t, 6, seed=t) for t in range(3)], ["a", "b", "c"], temperature=0.5)
    bag = _bags(1, 1, seed=7)[0]
    picked, w = router.predict(bag, predict_with, "pick")
    assert int(w.argmax()) == 1
    torch.testing.assert_close(picked, predict_with(1, bag))
    mixed, w = router.predict(bag, predict_with, "mix")
    torch.testing.assert_close(mixed, sum(w[t] * predict_with(t, bag) for t in range(3)))
    assert not torch.allclose(predict_with(0, bag), predict_with(1, bag))  # the adapters differ
    with pytest.raises(ValueError, match="mode must be"):
        router.predict(bag, predict_with, "vote")
    with pytest.raises(ValueError, match="no training bags for task"):
        TaskRouter.fit([_bags(0, 2, 0), []], ["a", "b"])
