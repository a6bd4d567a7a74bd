"""Text-guided LoRA generation: the semantic guidance, the CVAE's recovery of each expert, seeded sampling, the
saved generator and the ``adapters generator-fit|generate`` commands, and the offline text encoders."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pathopeft import adapters
from pathopeft.adapters.lora_generation import (
    Expert,
    GeneratorConfig,
    LoRAGenerator,
    LoRALayout,
    expert_weights,
    semantic_condition,
)
from pathopeft.text_encoders import TEXT_ENCODERS, text_encoder


class _TableEncoder:
    """A text encoder for tests: fixed unit vectors per description."""

    name, dim = "table", 8

    def __init__(self, table: dict[str, torch.Tensor]) -> None:
        self.table = table

    def embed(self, texts):
        return F.normalize(torch.stack([self.table[t] for t in texts]), dim=1)


def _library(n_experts: int = 3, checkpoints: int = 6, seed: int = 0):
    """Experts with distinct LoRAs (checkpoints = the expert's LoRA + 2 % noise) and orthogonal descriptions."""
    g = torch.Generator().manual_seed(seed)
    experts, table = [], {}
    for i in range(n_experts):
        centre = {"l1": (torch.randn(6, 2, generator=g), torch.randn(2, 5, generator=g)),
                  "l2": (torch.randn(4, 2, generator=g), torch.randn(2, 7, generator=g))}  # fmt: skip
        ckpts = [{n: tuple(t + 0.02 * torch.randn(t.shape, generator=g) for t in f) for n, f in centre.items()}
                 for _ in range(checkpoints)]  # fmt: skip
        text = f"task {i}"
        table[text] = torch.eye(8)[i]
        experts.append(Expert(f"t{i}", text, ckpts))
    return experts, _TableEncoder(table)


def _mean_flat(layout: LoRALayout, expert: Expert) -> torch.Tensor:
    return torch.stack([layout.flatten(c) for c in expert.checkpoints]).mean(0)


def test_expert_weights_are_a_softmax_over_the_top_k_cosines_and_zero_elsewhere():
    g = torch.Generator().manual_seed(1)
    experts, query = torch.randn(6, 10, generator=g), torch.randn(10, generator=g)
    w = expert_weights(query, experts, top_k=3, temperature=0.2)
    cos = F.normalize(experts, dim=1) @ F.normalize(query, dim=0)
    top = cos.topk(3).indices
    assert int((w > 0).sum()) == 3
    assert set(top.tolist()) == set(torch.nonzero(w).flatten().tolist())
    torch.testing.assert_close(w[top], (cos[top] / 0.2).softmax(0))
    assert float(w.sum()) == pytest.approx(1.0)
    assert int((expert_weights(query, experts, top_k=99, temperature=0.2) > 0).sum()) == 6  # k capped at n
    cond, w2 = semantic_condition(query, experts, 3, 0.2)
    torch.testing.assert_close(cond, w2 @ experts)
    cold, _ = semantic_condition(query, experts, 3, 1e-4)  # τ → 0: the nearest expert's embedding alone
    torch.testing.assert_close(cold, experts[int(cos.argmax())])
    with pytest.raises(ValueError, match="temperature"):
        expert_weights(query, experts, 3, 0.0)


def test_layout_round_trips_and_refuses_another_rank():
    experts, _ = _library(1, 1)
    lora = experts[0].checkpoints[0]
    layout = LoRALayout.of(lora)
    assert layout.size == 6 * 2 + 2 * 5 + 4 * 2 + 2 * 7
    back = layout.unflatten(layout.flatten(lora))
    for n in lora:
        torch.testing.assert_close(back[n][0], lora[n][0])
        torch.testing.assert_close(back[n][1], lora[n][1])
    with pytest.raises(ValueError, match="other layers or ranks"):
        layout.flatten({**lora, "l1": (torch.randn(6, 3), torch.randn(3, 5))})


@pytest.fixture(scope="module")
def fitted():
    experts, enc = _library()
    return LoRAGenerator.fit(experts, enc, GeneratorConfig(steps=600, top_k=2, temperature=0.1, seed=0)), experts, enc


def test_generator_recovers_each_expert_from_its_own_description(fitted):
    gen, experts, enc = fitted
    rec_start, rec_end = gen.history[0][0], gen.history[-1][0]
    assert rec_end < 0.1 * rec_start
    for i, e in enumerate(experts):
        got = gen.layout.flatten(gen.generate_from(gen.condition_of(enc.embed([e.description])[0])[0])[0])
        errors = [float((got - _mean_flat(gen.layout, o)).norm() / _mean_flat(gen.layout, o).norm()) for o in experts]
        assert errors[i] < 0.05, errors
        assert errors[i] == min(errors)


def test_an_unseen_description_is_guided_by_its_nearest_experts(fitted):
    gen, _, _ = fitted
    query = F.normalize(torch.eye(8)[0] + 0.5 * torch.eye(8)[1] + 0.2 * torch.eye(8)[2], dim=0)
    cond, weights = gen.condition_of(query)
    assert weights["t2"] == 0.0  # outside the top 2
    assert weights["t0"] > weights["t1"] > 0
    torch.testing.assert_close(cond, weights["t0"] * gen.embeddings[0] + weights["t1"] * gen.embeddings[1])


def test_sampling_is_seeded_and_diverse(fitted):
    gen, _, enc = fitted
    cond = gen.condition_of(enc.embed(["task 1"])[0])[0]
    a = [gen.layout.flatten(f) for f in gen.generate_from(cond, samples=3, seed=5)]
    b = [gen.layout.flatten(f) for f in gen.generate_from(cond, samples=3, seed=5)]
    c = [gen.layout.flatten(f) for f in gen.generate_from(cond, samples=3, seed=6)]
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y)
    assert float((a[0] - c[0]).abs().max()) > 0
    assert float((a[0] - a[1]).abs().max()) > 0


def test_a_saved_generator_generates_the_same_lora(fitted, tmp_path):
    gen, _, _ = fitted
    gen.save(tmp_path / "gen")
    back, meta = LoRAGenerator.load(tmp_path / "gen")
    assert meta["experts"] == ["t0", "t1", "t2"]
    cond = gen.embeddings[1]
    torch.testing.assert_close(back.layout.flatten(back.generate_from(cond, 2, 3)[1]),
                               gen.layout.flatten(gen.generate_from(cond, 2, 3)[1]))  # fmt: skip


def test_fit_refuses_a_library_of_one():
    experts, enc = _library(1)
    with pytest.raises(ValueError, match="at least two experts"):
        LoRAGenerator.fit(experts, enc)


# --- text encoders: a matrix over the registry, and WordLlama's semantics ---------------------------------------
@pytest.mark.parametrize("name", TEXT_ENCODERS.names())
def test_every_text_encoder_embeds_offline_to_unit_vectors(name):
    enc = text_encoder(name)
    e = enc.embed(["lung adenocarcinoma versus benign lung tissue", "oral squamous cell carcinoma"])
    assert e.shape == (2, enc.dim)
    assert e.dtype == torch.float32
    torch.testing.assert_close(e.norm(dim=1), torch.ones(2))
    torch.testing.assert_close(enc.embed(["oral squamous cell carcinoma"])[0], e[1])


def test_wordllama_puts_lung_adenocarcinoma_nearer_lung_scc_than_oral_scc():
    e = text_encoder("wordllama").embed([
        "lung adenocarcinoma versus benign lung tissue",
        "lung squamous cell carcinoma versus benign lung tissue",
        "oral squamous cell carcinoma versus normal oral mucosa",
    ])  # fmt: skip
    assert float(e[0] @ e[1]) > float(e[0] @ e[2]) + 0.2


def test_an_empty_description_is_refused():
    from pathopeft.errors import UserError

    with pytest.raises(UserError, match="empty"):
        text_encoder("wordllama").embed(["  "])


# --- the commands ---------------------------------------------------------------------------------------------
def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(24, 16), nn.ReLU(), nn.Linear(16, 8))


DESCRIPTIONS = ["lung squamous cell carcinoma versus benign lung tissue",
                "oral squamous cell carcinoma versus normal oral mucosa"]  # fmt: skip


def test_generator_fit_and_generate_commands_write_a_peft_lora(tmp_path, capsys):
    from pathopeft.cli import main

    for t in range(2):
        for c in range(3):  # three checkpoints per expert: one shared init, B set per task plus small noise
            base = _mlp()
            torch.manual_seed(1)
            model = adapters.create("lora", base, rank=2, targets=["0", "2"], alpha=4)
            g = torch.Generator().manual_seed(100 * t)
            with torch.no_grad():
                for n, p in model.named_parameters():
                    if "lora_B" in n:
                        p.copy_(torch.randn(p.shape, generator=g) + 0.01 * torch.randn(p.shape))
            adapters.save(model, tmp_path / f"task{t}" / f"ckpt{c}")
    lib = tmp_path / "library.yaml"
    pattern = ["task0/ckpt*", str(tmp_path / "task1" / "ckpt*")]  # relative to the file, and absolute
    lib.write_text("experts:\n" + "".join(f"  - name: task{t}\n    description: {DESCRIPTIONS[t]}\n"
                                          f"    adapters: ['{pattern[t]}']\n" for t in range(2)))  # fmt: skip
    assert main(["adapters", "generator-fit", str(lib), "--out", str(tmp_path / "gen"), "--steps", "800"]) == 0
    assert "LoRA generator for 2 experts (task0, task1)" in capsys.readouterr().out
    out = tmp_path / "generated"
    assert (
        main(["adapters", "generate", str(tmp_path / "gen"), "--description", DESCRIPTIONS[0], "--out", str(out)]) == 0
    )
    assert "expert weights: task0 " in capsys.readouterr().out
    x = torch.randn(5, 24)
    with torch.no_grad():
        expected = adapters.load(_mlp(), tmp_path / "task0" / "ckpt0").merge_and_unload()(x)
        got = adapters.load(_mlp(), out).merge_and_unload()(x)
        other = adapters.load(_mlp(), tmp_path / "task1" / "ckpt0").merge_and_unload()(x)
    assert float((got - expected).norm()) < 0.2 * float((other - expected).norm())
    assert main(["adapters", "generate", str(tmp_path / "gen"), "--description", "lung tumour", "--out",
                 str(tmp_path / "s"), "--samples", "2"]) == 0  # fmt: skip
    assert (tmp_path / "s" / "sample_1" / "adapter_model.safetensors").is_file()


def test_a_bad_library_file_is_one_line_naming_it(tmp_path, capsys):
    from pathopeft.cli import main

    lib = tmp_path / "library.yaml"
    lib.write_text("experts:\n  - name: a\n    adapters: [x]\n  - name: b\n    description: d\n    adapters: [y]\n")
    assert main(["adapters", "generator-fit", str(lib), "--out", str(tmp_path / "gen")]) == 2
    err = capsys.readouterr().err
    assert f"{lib}: expert 0 needs a name, a description" in err
    assert len(err.strip().splitlines()) == 1
    lib.write_text(
        "experts:\n  - {name: a, description: d, adapters: [x*]}\n  - {name: b, description: e, adapters: [y]}\n"
    )
    assert main(["adapters", "generator-fit", str(lib), "--out", str(tmp_path / "gen")]) == 2
    assert "expert 'a': no adapter folder matches" in capsys.readouterr().err
