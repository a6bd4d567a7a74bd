"""Text-guided LoRA generation: an adapter for a task nobody trained on, from its description and a library.

Why: a user holding one adapter per cancer type meets a type with no labelled slides yet. Routing
(:mod:`pathopeft.mil.routing`) can only pick an adapter that exists; merging gives one fixed blend. This
generates a new LoRA from a sentence ("lung adenocarcinoma versus benign lung tissue"), using what the
library's experts learned, with no data of the new task.

Whose method: the outline published for SG-LoRA (Li et al., "Semantic-guided LoRA Parameters Generation",
arXiv 2509.10535, CVPR 2026). Its code (keepgoingjkg/SG-LoRA) could not be fetched and its method section could
not be read here, so this is *our* method under its own name, built on that outline:

1. Semantic guidance (outline). A text encoder (:mod:`pathopeft.text_encoders`) embeds every expert's
   description and the new one. The new task's proximity to an expert is their cosine similarity; the top-k
   experts get ``softmax(cos / τ)`` weights, the rest 0, and the condition is the weighted sum of those
   experts' embeddings (:func:`semantic_condition`).
2. Generation (outline: a conditional VAE models the target LoRA's distribution given that semantics). Ours:
   a LoRA is one flat vector θ (every layer's B, then A, PEFT's scale folded into B), standardised per
   coordinate over the training checkpoints; the encoder q(z | θ, c) and the decoder p(θ | z, c) are
   two-layer MLPs; the loss is the mean squared reconstruction error plus β·KL(q ‖ N(0, I)). Each checkpoint of
   expert i is paired with the condition step 1 computes for expert i's *own* description over the whole
   library (itself included), so training and generation build the condition the same way.
3. Sampling: z ~ N(0, I) (seeded), or z = 0 (the prior's mode: one deterministic LoRA), decoded and
   de-standardised into an ordinary PEFT LoRA.

Chosen here, not given by the readable outline: τ, k, the sizes, β, the optimiser and its steps (all in
:class:`GeneratorConfig`), and the training set: several checkpoints per expert (data orders × last epochs),
every expert grown from *one* LoRA initialisation so that factor coordinates mean the same across experts (a
LoRA's factors are only defined up to an invertible r × r map; independent initialisations would make the
CVAE average incomparable coordinates).
"""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pathopeft.adapters.merging import Factors
from pathopeft.text_encoders import TextEncoder, text_encoder

_FILE, _META, _METHOD = "generator.safetensors", "generator.json", "text-guided-lora-generation"


@dataclass(frozen=True)
class GeneratorConfig:
    """The generator's settings (ours; the readable outline fixes none of them)."""

    top_k: int = 4  # experts that guide a description
    temperature: float = 0.1  # softmax temperature over the top-k cosines
    latent_dim: int = 16
    hidden: int = 128
    kl_weight: float = 0.1  # β, against the per-coordinate MSE of standardised θ (1e-3 let z carry the expert)
    steps: int = 1000
    lr: float = 1e-3
    batch_size: int = 32
    seed: int = 0


@dataclass
class Expert:
    """One library task: its name, its description and its LoRA checkpoints (``{layer: (B, A)}`` each)."""

    name: str
    description: str
    checkpoints: list[Factors] = field(default_factory=list)


def expert_weights(query: torch.Tensor, experts: torch.Tensor, top_k: int, temperature: float) -> torch.Tensor:
    """Weights over the experts (rows of ``experts``) for the embedding ``query``: ``softmax(cos / τ)`` over the
    ``top_k`` most similar, 0 elsewhere."""
    if temperature <= 0 or top_k < 1:
        raise ValueError(f"expert weights: need temperature > 0 and top_k ≥ 1, got {temperature}, {top_k}")
    cos = F.normalize(experts.float(), dim=1) @ F.normalize(query.float(), dim=0)
    top = cos.topk(min(top_k, len(cos)))
    weights = torch.zeros_like(cos)
    weights[top.indices] = (top.values / temperature).softmax(0)
    return weights


def semantic_condition(
    query: torch.Tensor, experts: torch.Tensor, top_k: int, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(condition = Σ wᵢ eᵢ over the experts' embeddings, the weights w) for the embedding ``query``."""
    w = expert_weights(query, experts, top_k, temperature)
    return w @ experts.float(), w


class LoRALayout:
    """Where each layer's factors sit in a LoRA's flat vector: layer names in order with their (B, A) shapes."""

    def __init__(self, shapes: dict[str, tuple[tuple[int, int], tuple[int, int]]]) -> None:
        self.shapes = {n: (tuple(b), tuple(a)) for n, (b, a) in shapes.items()}
        self.size = sum(b[0] * b[1] + a[0] * a[1] for b, a in self.shapes.values())

    @classmethod
    def of(cls, factors: Factors) -> LoRALayout:
        return cls({n: (tuple(B.shape), tuple(A.shape)) for n, (B, A) in factors.items()})

    def flatten(self, factors: Factors) -> torch.Tensor:
        """The flat vector of ``factors``; other layers or ranks than this layout's are a ValueError."""
        got = {n: (tuple(B.shape), tuple(A.shape)) for n, (B, A) in factors.items()}
        if got != self.shapes:
            diff = sorted(set(got.items()) ^ set(self.shapes.items()))[:1]
            raise ValueError(f"LoRA layout: other layers or ranks than the library's (first difference {diff})")
        return torch.cat([t.reshape(-1).float() for n in self.shapes for t in factors[n]])

    def unflatten(self, vector: torch.Tensor) -> Factors:
        out: Factors = {}
        i = 0
        for n, (b, a) in self.shapes.items():
            B = vector[i : i + b[0] * b[1]].reshape(b)
            i += b[0] * b[1]
            out[n] = (B, vector[i : i + a[0] * a[1]].reshape(a))
            i += a[0] * a[1]
        return out


class LoRACVAE(nn.Module):
    """q(z | θ, c) and p(θ | z, c) as two-layer MLPs over a standardised flat LoRA θ and a condition c."""

    def __init__(self, dim: int, cond_dim: int, latent_dim: int, hidden: int) -> None:
        super().__init__()
        self.latent_dim = latent_dim
        # LayerNorm after the encoder's wide input layer: with tens of thousands of LoRA coordinates in, one Adam
        # step moves its pre-activations by ~lr × dim, which without it blew the posterior up in the first steps.
        self.encoder = nn.Sequential(
            nn.Linear(dim + cond_dim, hidden), nn.LayerNorm(hidden), nn.SiLU(), nn.Linear(hidden, 2 * latent_dim)
        )
        self.decoder = nn.Sequential(nn.Linear(latent_dim + cond_dim, hidden), nn.SiLU(), nn.Linear(hidden, dim))

    def encode(self, theta: torch.Tensor, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.encoder(torch.cat([theta, cond], -1)).chunk(2, -1)
        return mu, logvar.clamp(-10, 10)

    def decode(self, z: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self.decoder(torch.cat([z, cond], -1))

    def loss(self, theta: torch.Tensor, cond: torch.Tensor, kl_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(reconstruction MSE, KL to N(0, I)) of one batch, the latent drawn by the reparameterisation trick."""
        mu, logvar = self.encode(theta, cond)
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()
        rec = F.mse_loss(self.decode(z, cond), theta)
        kl = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(-1).mean()
        return rec, kl


class LoRAGenerator:
    """A fitted generator: the CVAE, the LoRA layout and standardisation, and the library's expert embeddings."""

    def __init__(
        self, cvae: LoRACVAE, layout: LoRALayout, mean: torch.Tensor, std: torch.Tensor, names: list[str],
        descriptions: list[str], embeddings: torch.Tensor, config: GeneratorConfig, encoder: str,
    ) -> None:  # fmt: skip
        self.cvae, self.layout, self.mean, self.std = cvae.eval(), layout, mean, std
        self.names, self.descriptions, self.embeddings = names, descriptions, embeddings
        self.config, self.encoder = config, encoder
        self.history: list[tuple[float, float]] = []  # (reconstruction, KL) per step of the fit

    @classmethod
    def fit(
        cls, experts: Sequence[Expert], encoder: str | TextEncoder = "wordllama", config: GeneratorConfig | None = None,
        progress: bool = False,
    ) -> LoRAGenerator:  # fmt: skip
        """Train the CVAE on every checkpoint of every expert (at least two experts, each with a checkpoint);
        ``progress`` shows a bar with the running losses."""
        from tqdm.auto import tqdm

        config = config or GeneratorConfig()
        if len(experts) < 2 or any(not e.checkpoints for e in experts):
            raise ValueError("LoRA generation: the library needs at least two experts, each with a checkpoint")
        enc = text_encoder(encoder) if isinstance(encoder, str) else encoder
        embeddings = enc.embed([e.description for e in experts])
        layout = LoRALayout.of(experts[0].checkpoints[0])
        thetas, conds = [], []
        for i, e in enumerate(experts):
            cond, _ = semantic_condition(embeddings[i], embeddings, config.top_k, config.temperature)
            for ckpt in e.checkpoints:
                thetas.append(layout.flatten(ckpt))
                conds.append(cond)
        theta, cond = torch.stack(thetas), torch.stack(conds)
        mean, std = theta.mean(0), theta.std(0, unbiased=False)
        std = std.clamp_min(1e-3 * float(std.mean()) + 1e-12)
        theta = (theta - mean) / std
        torch.manual_seed(config.seed)
        cvae = LoRACVAE(layout.size, cond.shape[1], config.latent_dim, config.hidden)
        opt = torch.optim.Adam(cvae.parameters(), lr=config.lr)
        gen = torch.Generator().manual_seed(config.seed)
        out = cls(cvae, layout, mean, std, [e.name for e in experts], [e.description for e in experts], embeddings,
                  config, enc.name)  # fmt: skip
        cvae.train()
        bar = tqdm(range(config.steps), desc="LoRA generator", unit="step", disable=not progress)
        for step in bar:
            idx = torch.randperm(len(theta), generator=gen)[: config.batch_size]
            rec, kl = cvae.loss(theta[idx], cond[idx], config.kl_weight)
            opt.zero_grad()
            (rec + config.kl_weight * kl).backward()
            opt.step()
            out.history.append((rec.item(), kl.item()))
            if step % 50 == 0:
                bar.set_postfix(reconstruction=f"{rec.item():.3f}", kl=f"{kl.item():.2f}")
        cvae.eval()
        return out

    def condition(self, description: str) -> tuple[torch.Tensor, dict[str, float]]:
        """(the condition, the experts' weights by name) for a description."""
        query = text_encoder(self.encoder).embed([description])[0]
        return self.condition_of(query)

    def condition_of(self, query: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        cond, w = semantic_condition(query, self.embeddings, self.config.top_k, self.config.temperature)
        return cond, dict(zip(self.names, map(float, w), strict=True))

    @torch.no_grad()
    def generate_from(self, cond: torch.Tensor, samples: int = 0, seed: int = 0) -> list[Factors]:
        """LoRAs decoded at condition ``cond``: ``samples`` draws z ~ N(0, I) (seeded), or with 0 the one LoRA at
        z = 0."""
        gen = torch.Generator().manual_seed(seed)
        n = max(samples, 1)
        z = torch.randn(n, self.cvae.latent_dim, generator=gen) if samples else torch.zeros(1, self.cvae.latent_dim)
        theta = self.cvae.decode(z, cond.float().expand(n, -1)) * self.std + self.mean
        return [self.layout.unflatten(t) for t in theta]

    def generate(self, description: str, samples: int = 0, seed: int = 0) -> list[Factors]:
        """LoRAs for a task described in words (see :meth:`generate_from`)."""
        return self.generate_from(self.condition(description)[0], samples, seed)

    # --- folders: ``pathopeft adapters generator-fit`` and ``pathopeft adapters generate`` -------------------
    def save(self, out: str | os.PathLike[str], extra: dict | None = None) -> Path:
        """Write ``generator.safetensors`` + ``generator.json`` (``extra``: PEFT config, tensor layouts, base)."""
        from pathopeft.adapters.serialization import write_tensor_folder

        tensors = {f"cvae.{k}": v.contiguous() for k, v in self.cvae.state_dict().items()}
        tensors.update(mean=self.mean.contiguous(), std=self.std.contiguous(), embeddings=self.embeddings.contiguous())
        meta = {"method": _METHOD, "config": asdict(self.config), "encoder": self.encoder,
                "experts": self.names, "descriptions": self.descriptions,
                "layout": {n: [list(b), list(a)] for n, (b, a) in self.layout.shapes.items()}, **(extra or {})}  # fmt: skip
        return write_tensor_folder(out, _FILE, tensors, _META, meta)

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> tuple[LoRAGenerator, dict]:
        """A saved generator and its metadata; anything else is an AdapterLoadError naming the file."""
        from pathopeft.adapters.serialization import AdapterLoadError, read_method_folder

        d = Path(directory)
        meta, t = read_method_folder(d, _FILE, _META, _METHOD, "a LoRA generator")
        try:
            config = GeneratorConfig(**meta["config"])
            layout = LoRALayout({n: (b, a) for n, (b, a) in meta["layout"].items()})
            cvae = LoRACVAE(layout.size, t["embeddings"].shape[1], config.latent_dim, config.hidden)
            cvae.load_state_dict({k.removeprefix("cvae."): v for k, v in t.items() if k.startswith("cvae.")})
            gen = cls(cvae, layout, t["mean"], t["std"], list(meta["experts"]), list(meta["descriptions"]),
                      t["embeddings"], config, meta["encoder"])  # fmt: skip
        except (KeyError, TypeError, RuntimeError) as e:
            raise AdapterLoadError(f"{d / _FILE}: does not match {d / _META} ({e})") from None
        return gen, meta


def library_spec(path: str | os.PathLike[str]) -> list[tuple[str, str, list[str]]]:
    """(name, description, adapter folder patterns) of each expert of a library file (YAML: ``experts: [{name,
    description, adapters: [folder or glob, …]}]``, paths relative to the file); checked, nothing read from the
    folders. Bad input is an AdapterLoadError naming the file."""
    import yaml

    from pathopeft.adapters.serialization import AdapterLoadError

    path = Path(path)
    try:
        spec = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise AdapterLoadError(f"{path}: cannot read the library ({e})") from None
    rows = spec.get("experts") if isinstance(spec, dict) else None
    if not isinstance(rows, list) or len(rows) < 2:
        raise AdapterLoadError(f"{path}: needs 'experts:', a list of at least two {{name, description, adapters}}")
    out = []
    for i, row in enumerate(rows):
        row = row if isinstance(row, dict) else {}
        name, text, pats = row.get("name"), row.get("description"), row.get("adapters")
        if not name or not isinstance(text, str) or not text.strip() or not pats:
            raise AdapterLoadError(f"{path}: expert {i} needs a name, a description and its adapter folders")
        out.append((str(name), text, [pats] if isinstance(pats, str) else [str(q) for q in pats]))
    return out


def read_library(path: str | os.PathLike[str]) -> tuple[list[Expert], dict]:
    """The experts of a library file (:func:`library_spec`) with their checkpoints read from the PEFT LoRA
    folders, and what writing a generated LoRA needs (``peft_config``, ``shapes``, ``base``)."""
    from pathopeft.adapters.merging import read_compatible_loras
    from pathopeft.adapters.serialization import AdapterLoadError

    path = Path(path)
    experts, dirs = [], []
    for name, text, pats in library_spec(path):
        # glob.glob, not Path.glob: a pattern may be absolute (joined to an absolute path, it replaces it)
        found = sorted({Path(q) for pat in pats for q in glob.glob(os.path.join(path.parent, pat))})
        if not found:
            raise AdapterLoadError(f"{path}: expert {name!r}: no adapter folder matches {pats}")
        experts.append(Expert(name, text, []))
        dirs += [(len(experts) - 1, d) for d in found]
    loaded, bases = read_compatible_loras([d for _, d in dirs])
    for (i, _), (factors, _, _) in zip(dirs, loaded, strict=True):
        experts[i].checkpoints.append(factors)
    shapes = {n: [list(a), list(b)] for n, (a, b) in loaded[0][1].items()}
    return experts, {"peft_config": loaded[0][2], "shapes": shapes, "base": bases[0]}


def fit_library(
    library: str | os.PathLike[str], out: str | os.PathLike[str], config: GeneratorConfig | None = None,
    encoder: str = "wordllama", progress: bool = True,
) -> tuple[Path, LoRAGenerator]:  # fmt: skip
    """Fit a generator on a library file (:func:`read_library`) and save it to the folder ``out``."""
    from pathopeft.adapters.serialization import AdapterLoadError

    experts, extra = read_library(library)
    try:
        gen = LoRAGenerator.fit(experts, encoder, config, progress)
    except ValueError as e:
        raise AdapterLoadError(f"{library}: {e}") from None
    return gen.save(out, extra), gen


def generate_dir(
    generator_dir: str | os.PathLike[str], description: str, out: str | os.PathLike[str], samples: int = 0,
    seed: int = 0,
) -> tuple[list[Path], dict[str, float]]:  # fmt: skip
    """Write the LoRA(s) generated for ``description`` as PEFT LoRA folders (``out``, or ``out/sample_<i>`` for
    ``samples`` > 1); returns the folders and the experts' weights."""
    from pathopeft.adapters.merging import write_peft_lora

    gen, meta = LoRAGenerator.load(generator_dir)
    cond, weights = gen.condition(description)
    loras = gen.generate_from(cond, samples, seed)
    shapes = {n: (tuple(a), tuple(b)) for n, (a, b) in meta["shapes"].items()}
    root = Path(out)
    dirs = [root] if len(loras) == 1 else [root / f"sample_{i}" for i in range(len(loras))]
    for d, lora in zip(dirs, loras, strict=True):
        write_peft_lora(d, lora, shapes, meta["peft_config"], meta.get("base"))
    return dirs, weights


__all__ = ["Expert", "GeneratorConfig", "LoRACVAE", "LoRAGenerator", "LoRALayout", "expert_weights", "fit_library",
           "generate_dir", "library_spec", "read_library", "semantic_condition"]  # fmt: skip
