"""Multi-hospital training of a MIL slide classifier with LoRA on Flower: FedSVD, FedAvg-LoRA, centralised.

FedSVD (arXiv 2505.12805; code sw-programmer/FedSVD @ 480898d: ``misc/utils.py`` ``freeze_target_layers`` and
``reinit_lora``, ``fedmm/fedavg/server.py``). Every hospital (a Flower client) trains only the LoRA B factors
(and the bag classifier) with A frozen; the server averages B weighted by the clients' bag counts, forms B̄A
for every layer and re-factorises it by SVD, B̄A = U Σ Vᵀ: A_new = the top-r rows of Vᵀ (orthonormal), B_new =
U_r Σ_r, so B_new A_new = B̄A exactly; every round (the README's period 1), and the clients start the next round
from both. FedAvg-LoRA averages A and B separately (the baseline whose product of averages is not the average of
products); ``central`` trains the same adapters on the pooled bags for the same number of steps. Flower's
simulation engine runs the clients (``flwr.simulation.run_simulation``: one ServerApp, ``clients`` ClientApps);
nothing here talks to a network.

Set-up chosen here: the frozen MIL net is the configured model built from ``seed`` (the same everywhere: the
"pretrained" weights; ``init`` loads a trained one from a ``.safetensors`` state dict), PEFT LoRA of rank ``rank`` on the layers the official
OWLoRA recipe adapts, the bag classifier trained and averaged; clients are the manifest's ``site`` column when it
has one, else the training slides dealt round-robin; local training is plain SGD over ``local_steps`` bags per
round (the code's optimiser for ViT/RoBERTa); the server evaluates accuracy on every test bag after each round.
Differential privacy (``noise_multiplier`` set): each client runs DP-SGD with Opacus's ``DPOptimizer`` and the
privacy unit is a **bag** (a slide, i.e. a patient's sample). Opacus's per-layer hooks would take the tiles of one
bag for samples, so the per-sample gradients are made by micro-batching instead (one backward per bag, stacked
into each parameter's ``grad_sample``); Opacus then clips each bag's gradient to ``max_grad_norm``, adds Gaussian
noise and averages, and its RDP accountant gives ε at ``delta`` for every client from its Poisson sampling rate
(``dp_batch`` / its bag count) and its number of local steps over all rounds (the run reports the largest ε).
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pathopeft.io import atomic_write_text
from pathopeft.mil.models import bag_accuracy, bag_logits

METHODS = ("fedsvd", "fedavg", "central")


@dataclass
class FederatedConfig:
    """One federated (or centralised) run: bags, model, adapters, clients, rounds."""

    manifest: str
    out_dir: str
    classes: list[str] = field(default_factory=lambda: ["benign", "aca", "scc"])
    tasks: list[str] = field(default_factory=lambda: ["aca", "scc"])  # bags of these tasks, one label space
    method: str = "fedsvd"
    model: str = "abmil"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    init: str | None = None  # a .safetensors state dict of the MIL net to start from (None: built from seed)
    rank: int = 4
    clients: int = 3
    rounds: int = 5
    local_steps: int = 10  # bags per client per round
    lr: float = 0.05
    seed: int = 0
    noise_multiplier: float | None = None  # DP-SGD on the clients (None: no DP)
    max_grad_norm: float = 1.0  # per-bag clipping norm of DP-SGD
    dp_batch: int = 4  # expected bags per DP-SGD step (Poisson sampling)
    delta: float = 1e-3  # the δ of the reported (ε, δ)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.noise_multiplier is not None and self.method == "central":
            raise ValueError("noise_multiplier: DP-SGD is for the federated clients (fedsvd | fedavg)")
        if self.noise_multiplier is not None and (self.noise_multiplier < 0 or self.max_grad_norm <= 0):
            raise ValueError("noise_multiplier must be >= 0 and max_grad_norm > 0")
        if self.clients < 1 or self.rounds < 1 or self.local_steps < 1:
            raise ValueError("clients, rounds and local_steps must be at least 1")


# --- the model and its trainable state ------------------------------------------------------------------------
def build_model(cfg: FederatedConfig, in_dim: int) -> nn.Module:
    """The frozen MIL net with PEFT LoRA on the OWLoRA-recipe layers; trainable: LoRA (B only for FedSVD) and the
    bag classifier."""
    import peft

    from pathopeft.mil.models import create_mil_model
    from pathopeft.mil.strategies.adapter import adapted_layers

    torch.manual_seed(cfg.seed)
    net = create_mil_model(cfg.model, in_dim, len(cfg.classes), **cfg.model_kwargs)
    if cfg.init:  # a plain net's state dict, or a continual run's task_<t>/net.safetensors
        from pathopeft.mil.models import load_mil_weights

        load_mil_weights(net, cfg.init)
    lora = peft.LoraConfig(r=cfg.rank, lora_alpha=cfg.rank, target_modules=adapted_layers(net),
                           modules_to_save=None, lora_dropout=0.0)  # fmt: skip
    model = peft.get_peft_model(net, lora)
    for n, p in model.named_parameters():
        p.requires_grad_(("lora_B" in n) or ("lora_A" in n and cfg.method != "fedsvd") or ".classifier." in n)
    return model


def shared_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """What travels between server and clients: every LoRA factor (A too: FedSVD's server changes it) and the
    bag classifier."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n or ".classifier." in n}


def load_shared(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, v in state.items():
            params[n].copy_(v)


@torch.no_grad()
def svd_refactor(b_bar: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """FedSVD's server step: (B_new, A_new) with A_new orthonormal rows and B_new A_new = B̄ A."""
    r = a.shape[0]
    u, s, vh = torch.linalg.svd((b_bar.double() @ a.double()), full_matrices=False)
    return (u[:, :r] * s[:r]).to(b_bar.dtype), vh[:r].to(a.dtype).contiguous()


def refactor_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Apply :func:`svd_refactor` to every (lora_A, lora_B) pair of an aggregated state."""
    out = dict(state)
    for name, a in state.items():
        if ".lora_A." in name:
            b_name = name.replace(".lora_A.", ".lora_B.")
            out[b_name], out[name] = svd_refactor(state[b_name], a)
    return out


# --- data -----------------------------------------------------------------------------------------------------
def partitions(records: list[Any], clients: int) -> list[list[Any]]:
    """Training bags per client: by the manifest's ``site`` column when present, else dealt round-robin."""
    sites = sorted({r.extra.get("site") for r in records if r.extra.get("site")})
    if sites:
        if len(sites) != clients:
            raise ValueError(f"the manifest has {len(sites)} sites {sites}, the config asks for {clients} clients")
        return [[r for r in records if r.extra.get("site") == s] for s in sites]
    ordered = sorted(records, key=lambda r: r.slide_id)
    return [ordered[k::clients] for k in range(clients)]


def _prepare(cfg: FederatedConfig) -> Any:
    from pathopeft.mil.data import PreparedBags, read_bag_manifest, validate_bags

    records = [r for r in read_bag_manifest(Path(cfg.manifest), extra_columns=()) if r.task in cfg.tasks]
    kept, skipped, in_dim = validate_bags(records, cfg.classes)
    return PreparedBags(kept, skipped, in_dim, list(cfg.classes))


def local_train(model: nn.Module, bags: list[dict[str, Any]], steps: int, lr: float, seed: int) -> float:
    """``steps`` SGD steps, one bag each, over a seeded shuffle of ``bags``; returns the mean loss."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr)
    order = list(range(len(bags)))
    random.Random(seed).shuffle(order)
    model.train()
    total = 0.0
    for i in range(steps):
        bag = bags[order[i % len(order)]]
        opt.zero_grad()
        loss = F.cross_entropy(bag_logits(model, bag)[None], torch.as_tensor([bag["label"]]))
        loss.backward()
        opt.step()
        total += float(loss.detach())
    return total / steps


def dp_local_train(model: nn.Module, bags: list[dict[str, Any]], steps: int, cfg: FederatedConfig, seed: int) -> float:
    """``steps`` DP-SGD steps with Opacus's optimizer: Poisson-sampled bags (rate ``dp_batch / len(bags)``), one
    gradient per bag (micro-batches), clipped, noised and averaged by ``DPOptimizer``; returns the mean loss."""
    from opacus.optimizers import DPOptimizer

    params = [p for p in model.parameters() if p.requires_grad]
    opt = DPOptimizer(torch.optim.SGD(params, lr=cfg.lr), noise_multiplier=float(cfg.noise_multiplier),
                      max_grad_norm=cfg.max_grad_norm, expected_batch_size=cfg.dp_batch,
                      generator=torch.Generator().manual_seed(seed))  # fmt: skip
    rate = min(1.0, cfg.dp_batch / len(bags))
    g = torch.Generator().manual_seed(seed)
    model.train()
    total, seen = 0.0, 0
    for _ in range(steps):
        batch = [b for b, keep in zip(bags, torch.rand(len(bags), generator=g) < rate, strict=True) if keep]
        per_bag: list[list[torch.Tensor]] = []
        for bag in batch:
            for p in params:
                p.grad = None
            loss = F.cross_entropy(bag_logits(model, bag)[None], torch.as_tensor([bag["label"]]))
            loss.backward()
            per_bag.append([p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in params])
            total, seen = total + float(loss.detach()), seen + 1
        for i, p in enumerate(params):
            p.grad = None
            p.grad_sample = torch.stack([g_[i] for g_ in per_bag]) if per_bag else p.new_zeros((0, *p.shape))
        opt.step()
        opt.zero_grad()
    return total / max(seen, 1)


def dp_epsilon(cfg: FederatedConfig, bags_per_client: list[int]) -> float:
    """The largest ε over the clients at ``cfg.delta`` (Opacus's RDP accountant) after ``rounds × local_steps``
    steps each at sampling rate ``dp_batch / bags``."""
    from opacus.accountants import RDPAccountant

    if not cfg.noise_multiplier:
        return float("inf")  # clipping without noise is no privacy
    eps = []
    for n in bags_per_client:
        acc = RDPAccountant()
        acc.history = [(float(cfg.noise_multiplier), min(1.0, cfg.dp_batch / n), cfg.rounds * cfg.local_steps)]
        eps.append(acc.get_epsilon(delta=cfg.delta))
    return max(eps)


# --- runs -----------------------------------------------------------------------------------------------------
def run_federated(cfg: FederatedConfig) -> dict[str, Any]:
    """Train with ``cfg.method`` and write ``results.json`` (test accuracy after every round) into ``out_dir``."""
    data = _prepare(cfg)
    train = [r for r in data.records if r.split == "train"]
    test = data.loaded([r for r in data.records if r.split == "test"])
    parts = partitions(train, cfg.clients)
    model = build_model(cfg, data.in_dim)
    history: list[dict[str, float]] = []
    if cfg.method == "central":
        pooled = data.loaded(train)
        for rnd in range(cfg.rounds):
            local_train(model, pooled, cfg.local_steps * cfg.clients, cfg.lr, cfg.seed + rnd)
            history.append({"round": rnd + 1, "test_acc": bag_accuracy(model, test)})
    else:
        history = _simulate(cfg, data, parts, model, test)
    result = {"config": asdict(cfg), "history": history, "final_test_acc": history[-1]["test_acc"],
              "clients": [len(p) for p in parts]}  # fmt: skip
    if cfg.noise_multiplier is not None:
        result["dp"] = {"epsilon": dp_epsilon(cfg, result["clients"]), "delta": cfg.delta,
                        "noise_multiplier": cfg.noise_multiplier, "max_grad_norm": cfg.max_grad_norm}  # fmt: skip
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tag = cfg.method if cfg.noise_multiplier is None else f"{cfg.method}_dp{cfg.noise_multiplier:g}"
    atomic_write_text(out / f"results_{tag}.json", json.dumps(result, indent=2) + "\n")
    return result


def _simulate(cfg: FederatedConfig, data: Any, parts: list[list[Any]], model: nn.Module, test: list) -> list:
    """The Flower simulation: a ServerApp running FedAvg (+ FedSVD's refactoring) and one ClientApp per site."""
    from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg
    from flwr.simulation import run_simulation

    in_dim = data.in_dim
    client_app = ClientApp()

    @client_app.train()
    def train(msg: Message, context: Context) -> Message:
        pid = int(context.node_config["partition-id"])
        local = build_model(cfg, in_dim)
        load_shared(local, msg.content["arrays"].to_torch_state_dict())
        bags = data.loaded(parts[pid])
        rnd = int(msg.content["config"]["server-round"])
        seed = cfg.seed * 1000 + rnd * 100 + pid
        if cfg.noise_multiplier is None:
            loss = local_train(local, bags, cfg.local_steps, cfg.lr, seed)
        else:
            loss = dp_local_train(local, bags, cfg.local_steps, cfg, seed)
        content = RecordDict({"arrays": ArrayRecord(shared_state(local)),
                              "metrics": MetricRecord({"num-examples": len(bags), "train_loss": loss})})  # fmt: skip
        return Message(content=content, reply_to=msg)

    class FedSVD(FedAvg):
        """FedAvg's weighted average, then the SVD re-factorisation of every LoRA pair (FedSVD's server)."""

        def aggregate_train(self, server_round: int, replies: Any) -> Any:
            arrays, metrics = super().aggregate_train(server_round, replies)
            if arrays is not None:
                arrays = ArrayRecord(refactor_state(arrays.to_torch_state_dict()))
            return arrays, metrics

    history: list[dict[str, float]] = []

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        if server_round > 0:
            load_shared(model, arrays.to_torch_state_dict())
            history.append({"round": server_round, "test_acc": bag_accuracy(model, test)})
        return MetricRecord({"test_acc": history[-1]["test_acc"] if history else 0.0})

    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        kind = FedSVD if cfg.method == "fedsvd" else FedAvg
        strategy = kind(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=cfg.clients,
                        min_available_nodes=cfg.clients)  # fmt: skip
        strategy.start(grid=grid, initial_arrays=ArrayRecord(shared_state(model)), num_rounds=cfg.rounds,
                       evaluate_fn=evaluate)  # fmt: skip

    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=cfg.clients,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                   "init_args": {"num_cpus": max(1, min(cfg.clients, 2)), "include_dashboard": False}})  # fmt: skip
    if len(history) != cfg.rounds:
        raise RuntimeError(f"the Flower simulation ended after {len(history)} of {cfg.rounds} rounds")
    return history


__all__ = [
    "FederatedConfig",
    "build_model",
    "dp_epsilon",
    "dp_local_train",
    "partitions",
    "refactor_state",
    "run_federated",
    "svd_refactor",
]
