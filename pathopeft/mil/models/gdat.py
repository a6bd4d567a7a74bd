"""GDAT, CoMEL's Grouped Double Attention Transformer (Lee et al., "Continual Multiple Instance Learning with
Enhanced Localization for Histopathological Whole Slide Image Analysis", ICCV 2025, arXiv 2507.02395).

Two registered models live here:

* ``gdat`` (:class:`GDAT`): the **official** encoder, re-implemented from the authors' code (``Hyun1A/CoMEL``,
  commit 9fd6679, ``continual/modules/cl_modules/cdatmil_owlora.py``: ``CDATMIL``, ``CDATBlock``,
  ``CDATAttention``; the code carries no licence, so nothing of it is copied, only its behaviour and numbers).
  ``tests/mil/test_cdat.py`` checks it against the official module's outputs to 1e-5.
* ``gdat-grid`` (:class:`GridGDAT`): pathopeft's own earlier design (coordinate-grid group tokens carried as a
  latent stream), written from the abstract before the code was public; kept as a separate model.

Official GDAT, with the line numbers of ``cdatmil_owlora.py`` it follows:

O1. Encoder (L234–243): Linear(D→H) + ReLU (``act``), then Dropout 0.25 (``dropout``). H = 512.
O2. Layout (``padding``, L94–126, used at L152–153): the N instances, **in storage order**, fill row by row a
    side×side square, side = ⌈√N⌉ rounded up to a multiple of the region size 16 (L246, passed as
    ``agent_num`` at L258 and read as ``region_size`` at L72); the square's tail is zero rows. Bags of fewer
    than 10 instances (``min_region_num``, L75, L115) use one region instead: side = ⌈√N⌉ rounded up to even,
    region = side. (The other condition of L115, padding > N/10⁻⁴, cannot hold for N ≥ 1.)
O3. Agents (L154–155): the square is cut into (side/r)² regions of r×r (``region_partition``, L129–140) and
    agent j (j = row·r + column inside the region) is the mean over **all** regions of the token at offset j,
    padding rows included. So r² = 256 agents, each a strided sample of the whole bag, not a neighbourhood.
    They are re-pooled from each layer's (normalised) input, in every layer.
O4. One shared ``qkv`` (L64, L162, L166) projects the padded instances (q, k, v) and the agents (agent queries,
    agent keys); heads are contiguous channel slices (L169–174); scale = head_dim^-½ (L63). ``qkv_bias``:
    the class default is True (L229), but the reference run (``shell_scripts/continual_instance/
    run_cdatmil_ppl_owlora.sh``) does not pass the store-true flag ``--qkv_bias`` (``configs.py`` L59), so the
    authors ran **without** it; that is the default here.
O5. Attention 1 (L176–179): agent_v = softmax(Q_agent K_instᵀ·scale + an_bias) V_inst, over all side²
    positions (padding included, unmasked, as in the official code).
O6. Attention 2 (L181–184): out = softmax(Q_inst K_agentᵀ·scale + na_bias) agent_v, over the agents.
    an_bias and na_bias (L79–83) are one learned scalar per head, N(0, 0.02²) truncated, broadcast over the
    whole score matrix (L176, L181), so they shift every score of a softmax row by the same amount and
    cancel exactly: they have no effect on the output and zero gradient. They are kept as buffers
    ``agent_bias`` / ``instance_bias`` (so official weights load and the formula is visible) and left out of
    the arithmetic, which lets both attentions run in ``scaled_dot_product_attention``'s fused kernels.
O7. Value residual (L186–188): out ← out + 0.1·V_inst, with V_inst the value slice of the shared ``qkv``
    (heads merged back), before the padding is cut (L190–191) and ``proj`` + Dropout (L193–194). The
    ``v_proj`` of L65 is never used by the forward; it is not built here (its weights are dropped on load).
O8. Block (L199–221): pre-norm, x ← x + attn(LN x); x ← x + MLP(LN x), LayerNorm eps 1e-6 (L252),
    MLP = fc1 (H→4H) + GELU + Dropout + fc2 + Dropout (L32–50, L211–212, ratio 4), Dropout 0.1
    (``trans_dropout``: ``proj_drop`` and the MLP's, L206, L256). Drop-path 0 and attention dropout 0
    (L257), so neither is offered. 2 blocks (L254–258), 8 heads. No final norm.
O9. Pooling (L262, ``datten.py`` L5–38, L85–101): **non-gated** attention, score = w₂ᵀ act(W₁ h), 256 hidden
    units, no biases (``da_bias`` False), no dropout; softmax over the N instances; ``act`` = tanh in the
    reference run (``--da_act=tanh``; the class default is relu). L265, L400–410: a linear classifier.
O10. Initialisation (L14–28, applied at L88, L214, L269): Xavier-normal weights and zero biases for every
    Linear, LayerNorm weight 1 / bias 0.

The official forward takes one bag (B = 1: L155 averages over the batch too); so does this one. Cost: O(N·H²)
for the per-instance layers and O(256·side²·H) for the attentions, with side² < N + 2·16·√N + 256; no N×N
tensor is built.

pathopeft's ``gdat-grid`` (:class:`GridGDAT`), our own design; each choice is ours, not the paper's:

A1. Encoder: ``Linear(D→H) + GELU + Dropout`` per instance (as ABMIL/TransMIL, GELU to match the transformer).
A2. Grouping with ``coords``: a G×G grid, G = ⌈√m⌉, over the bag's coordinate bounding box (cells are
    rectangles when the box is not square; an axis of zero extent puts everything in its first cell). Each
    instance falls into one cell; a group token is the mean of its members' embeddings; empty cells are
    dropped, so a bag has m' ≤ G² groups (tissue rarely fills its box, so m' < G² is typical), ordered by
    cell index, which makes the grouping independent of the instance order. Vectorised with
    ``torch.unique`` + ``index_add`` (no Python loop over instances).
A3. Grouping without coords: min(m, N) contiguous, near-equal chunks of the instance order (the bag order
    of a tiler is raster order, so chunks are still roughly spatial); this is *not* permutation invariant.
A4. Group tokens are pooled once, from the encoder output, then carried through the layers (a latent stream
    in the Perceiver sense); they are not re-pooled after every layer.
A5. Each of L layers (default 2), post-norm:
      (a) group → instance cross-attention, Q = groups, K/V = instances:  g ← LN(g + MHA(g, h, h));
      (b) instance → group cross-attention, Q = instances, K/V = groups:  h ← LN(h + MHA(h, g, g));
          then h ← LN(h + MLP(h)), MLP = Linear(H→rH) + GELU + Dropout + Linear(rH→H) (r = ``mlp_ratio``).
    The residual in (b) is what keeps each instance's own detail; (a) then (b) is the "double attention".
    Both attentions use ``scaled_dot_product_attention`` on (heads, m', N)-sized scores: O(m'·N·H) time and
    O(m'·N) memory, never N×N. Dropout acts on the attention outputs, not on the attention weights.
A6. Read-out: gated-attention pooling (Ilse et al. 2018, eq. 9) over the final instance embeddings; its
    softmax weights are ``attention`` and the weighted sum is the bag feature fed to ``classifier``.
A7. Defaults: H = 256, m = 64, L = 2, 8 heads, r = 2 (a lighter MLP than the usual 4, since it runs on all
    N instances), dropout 0.1, gated-attention size 128.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from pathopeft.mil.models.abmil import GatedAttention
from pathopeft.mil.models.base import MILModel, MILOutput, check_bag, register_mil_model

REGION = 16  # O2: region side r, so r² = 256 agents
MIN_REGION_INSTANCES = 10  # O2: smaller bags form one region


def assign_groups(
    n: int, n_groups: int, coords: torch.Tensor | None = None, device: torch.device | None = None
) -> tuple[torch.Tensor, int]:
    """Group index (N,) in 0..m'-1 of every instance, and m' (see the module docstring, A2/A3).

    With ``coords`` (N, 2): the non-empty cells of a ⌈√m⌉² grid over the coordinate bounding box, numbered in
    cell order; without: ``min(m, N)`` contiguous chunks of the instance order."""
    if coords is None:
        m = min(n_groups, n)
        return torch.arange(n, device=device) * m // n, m
    side = math.isqrt(n_groups - 1) + 1  # G = ceil(sqrt(m))
    c = coords.to(device=device, dtype=torch.float32)
    lo, hi = c.amin(dim=0), c.amax(dim=0)
    span = torch.where(hi > lo, hi - lo, torch.ones_like(hi))
    cell_xy = ((c - lo) / span * side).floor().long().clamp_(0, side - 1)
    cell = cell_xy[:, 1] * side + cell_xy[:, 0]  # row-major over (y, x)
    cells, ids = torch.unique(cell, sorted=True, return_inverse=True)
    return ids, cells.numel()


def group_means(h: torch.Tensor, ids: torch.Tensor, n_groups: int) -> torch.Tensor:
    """Mean embedding (m', H) of each group's members; every group must be non-empty."""
    counts = torch.bincount(ids, minlength=n_groups).to(h.dtype)
    sums = h.new_zeros(n_groups, h.shape[-1]).index_add(0, ids, h)
    return sums / counts.unsqueeze(-1)


class CrossAttention(nn.Module):
    """Multi-head attention of one token set (queries) to another (keys/values), via SDPA.

    Linear in each set's size: the only score tensor is (heads, N_q, N_kv), and one of the two is m'. No
    dropout on the attention weights: it makes SDPA fall back to its unfused path on CPU, which keeps the
    (heads, N, m') weights and mask of every attention for backward (GDAT's training peak at N = 10^4,
    D = 512 was 839 instead of 482 MiB); dropout acts on the attention output instead."""

    def __init__(self, dim: int, heads: int = 8) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, queries: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """(N_q, dim), (N_kv, dim) → (N_q, dim)."""
        (nq, dim), nk = queries.shape, context.shape[0]
        dh = dim // self.heads
        q = self.q(queries).view(nq, self.heads, dh).transpose(0, 1)  # (h, N_q, dh)
        k, v = self.kv(context).view(nk, 2, self.heads, dh).permute(1, 2, 0, 3)  # each (h, N_kv, dh)
        o = F.scaled_dot_product_attention(q, k, v)  # no dropout on the weights: keeps SDPA's fused kernels
        return self.out(o.transpose(0, 1).reshape(nq, dim))


class GDATLayer(nn.Module):
    """One double-attention layer (A5): groups read all instances, then every instance reads the groups."""

    def __init__(self, dim: int, heads: int = 8, mlp_ratio: float = 2.0, dropout: float = 0.1) -> None:
        super().__init__()
        hidden = round(dim * mlp_ratio)
        self.group_attn = CrossAttention(dim, heads)
        self.group_norm = nn.LayerNorm(dim)
        self.instance_attn = CrossAttention(dim, heads)
        self.instance_norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim), nn.Dropout(dropout)
        )
        self.mlp_norm = nn.LayerNorm(dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, h: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Instances ``h`` (N, H) and group tokens ``g`` (m', H) → refined (h, g)."""
        g = self.group_norm(g + self.drop(self.group_attn(g, h)))
        h = self.instance_norm(h + self.drop(self.instance_attn(h, g)))
        h = self.mlp_norm(h + self.mlp(h))
        return h, g


@register_mil_model("gdat-grid")
class GridGDAT(MILModel):
    """pathopeft's own grid-grouped double attention (not the official GDAT); assumptions A1–A7 in the module doc.

    Args:
        in_dim: instance feature size D.
        n_classes: bag classes C.
        hidden_dim: token size H (divisible by ``heads``).
        n_groups: target number of group tokens m (64); with coords the grid is ⌈√m⌉² cells.
        n_layers: double-attention layers L (2).
        heads: attention heads (8).
        mlp_ratio: MLP width / H in each layer (2.0).
        attn_dim: hidden size of the gated-attention pooling (128).
        dropout: encoder, attention-output and MLP dropout (0.1).
        checkpoint: recompute each layer's forward in backward (activation checkpointing) instead of keeping
            its activations: at L = 2, N = 10^4, D = 512 the training peak went from 482 to 351 MiB on CPU;
            the saving grows with L. Off by default (it costs one more forward of the layers).

    ``coords`` (N, 2), when given, drives the spatial grouping; then bag logits are invariant to permuting
    instances together with their coords. Cost O(m'·N·H) time and memory.
    """

    def __init__(
        self,
        in_dim: int,
        n_classes: int,
        hidden_dim: int = 256,
        n_groups: int = 64,
        n_layers: int = 2,
        heads: int = 8,
        mlp_ratio: float = 2.0,
        attn_dim: int = 128,
        dropout: float = 0.1,
        checkpoint: bool = False,
    ) -> None:
        super().__init__(in_dim, n_classes, hidden_dim)
        if n_groups < 1 or n_layers < 1:
            raise ValueError(f"n_groups and n_layers must be ≥ 1, got {n_groups} and {n_layers}")
        self.n_groups, self.checkpoint = n_groups, checkpoint
        self.encoder = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Dropout(dropout))
        self.layers = nn.ModuleList(GDATLayer(hidden_dim, heads, mlp_ratio, dropout) for _ in range(n_layers))
        self.attention_net = GatedAttention(hidden_dim, attn_dim)
        self.classifier = nn.Linear(hidden_dim, n_classes)

    def forward(self, x: torch.Tensor, coords: torch.Tensor | None = None) -> MILOutput:
        x = check_bag(x, coords, self.in_dim)
        h = self.encoder(x)
        ids, m = assign_groups(h.shape[0], self.n_groups, coords, h.device)
        g = group_means(h, ids, m)
        for layer in self.layers:
            if self.checkpoint and torch.is_grad_enabled():
                h, g = checkpoint(layer, h, g, use_reentrant=False)  # dropout masks replayed (RNG state kept)
            else:
                h, g = layer(h, g)
        a = torch.softmax(self.attention_net(h).float(), dim=0)
        z = a.to(h.dtype) @ h
        return MILOutput(bag_logits=self.classifier(z), attention=a, instance_features=h, bag_feature=z)


# --- official GDAT (O1–O10) -------------------------------------------------------------------------------------


def cdat_layout(n: int, region: int = REGION) -> tuple[int, int]:
    """(side, r) of the official square layout of ``n`` instances (O2): side² ≥ n positions, r×r regions."""
    if n < 1:
        raise ValueError(f"need at least one instance, got {n}")
    side = math.isqrt(n - 1) + 1  # ⌈√n⌉
    if n < MIN_REGION_INSTANCES:
        side += side % 2
        return side, side
    return side + (-side % region), region


def cdat_agents(x: torch.Tensor, side: int, region: int) -> torch.Tensor:
    """Agents (r², C) of a zero-padded square ``x`` (side², C) (O3): agent j = mean over all regions of the token
    at in-region offset j = row·r + column."""
    c = x.shape[-1]
    g = side // region
    return x.view(g, region, g, region, c).mean(dim=(0, 2)).reshape(region * region, c)


def _init_official(module: nn.Module) -> None:
    """O10: Xavier-normal Linear weights, zero biases; LayerNorm 1 / 0."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_normal_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class CDATAttention(nn.Module):
    """Agent attention with region-offset agents, shared qkv and a 0.1·V residual (O2–O7), on one bag (N, C)."""

    def __init__(
        self, dim: int, heads: int = 8, qkv_bias: bool = False, dropout: float = 0.1, region: int = REGION
    ) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads, self.region = heads, region
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.drop = nn.Dropout(dropout)
        # O6: one scalar per head added to every score of attention 1 / 2; softmax-invariant, hence buffers
        self.register_buffer("agent_bias", nn.init.trunc_normal_(torch.empty(heads), std=0.02))
        self.register_buffer("instance_bias", nn.init.trunc_normal_(torch.empty(heads), std=0.02))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C) → (N, C)."""
        n, c = x.shape
        side, region = cdat_layout(n, self.region)
        xp = torch.cat([x, x.new_zeros(side * side - n, c)]) if side * side > n else x
        agents = cdat_agents(xp, side, region)
        h, dh = self.heads, c // self.heads
        q, k, v = self.qkv(xp).view(-1, 3, h, dh).permute(1, 2, 0, 3)  # each (h, side², dh)
        qa, ka, _ = self.qkv(agents).view(-1, 3, h, dh).permute(1, 2, 0, 3)  # each (h, r², dh)
        # the per-head biases shift whole softmax rows and cancel (O6); scale = dh^-1/2, SDPA's default
        agent_v = F.scaled_dot_product_attention(qa, k, v)  # O5, (h, r², dh)
        out = F.scaled_dot_product_attention(q, ka, agent_v)  # O6, (h, side², dh)
        out = (out + 0.1 * v).transpose(0, 1).reshape(-1, c)[:n]  # O7: value residual, then cut the padding
        return self.drop(self.proj(out))


class CDATBlock(nn.Module):
    """Pre-norm block (O8): x + attn(LN x), then x + MLP(LN x)."""

    def __init__(
        self, dim: int, heads: int = 8, mlp_ratio: float = 4.0, qkv_bias: bool = False, dropout: float = 0.1
    ) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = CDATAttention(dim, heads, qkv_bias, dropout)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential()
        self.mlp.add_module("fc1", nn.Linear(dim, hidden))
        self.mlp.add_module("act", nn.GELU())
        self.mlp.add_module("drop1", nn.Dropout(dropout))
        self.mlp.add_module("fc2", nn.Linear(hidden, dim))
        self.mlp.add_module("drop2", nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


_ACTS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}


@register_mil_model("gdat")
class GDAT(MILModel):
    """The official CoMEL GDAT (``CDATMIL`` of ``Hyun1A/CoMEL``), behaviour O1–O10 of the module doc.

    Args:
        in_dim: instance feature size D.
        n_classes: bag classes C.
        hidden_dim: token size H (512; divisible by ``heads``).
        n_layers: blocks (2).
        heads: attention heads (8).
        mlp_ratio: MLP width / H (4.0).
        act: encoder activation, ``"relu"`` or ``"gelu"`` (relu).
        dropout: encoder dropout (0.25).
        trans_dropout: dropout after each attention's ``proj`` and in each MLP (0.1).
        qkv_bias: bias of the shared qkv projection (False, as in the reference run; see O4).
        attn_dim: hidden units of the attention pooling (256).
        attn_act: activation of the attention pooling, ``"tanh"``, ``"relu"`` or ``"gelu"`` (tanh).
        checkpoint: recompute each block in backward instead of keeping its activations (off).

    Order-dependent, as the official model: the layout follows the instance order; ``coords`` are checked
    but not used.
    """

    def __init__(
        self,
        in_dim: int,
        n_classes: int,
        hidden_dim: int = 512,
        n_layers: int = 2,
        heads: int = 8,
        mlp_ratio: float = 4.0,
        act: str = "relu",
        dropout: float = 0.25,
        trans_dropout: float = 0.1,
        qkv_bias: bool = False,
        attn_dim: int = 256,
        attn_act: str = "tanh",
        checkpoint: bool = False,
    ) -> None:
        super().__init__(in_dim, n_classes, hidden_dim)
        if n_layers < 1:
            raise ValueError(f"n_layers must be ≥ 1, got {n_layers}")
        if act not in ("relu", "gelu") or attn_act not in _ACTS:
            raise ValueError(f"unknown activation: act={act!r}, attn_act={attn_act!r}")
        self.checkpoint = checkpoint
        self.encoder = nn.Sequential(nn.Linear(in_dim, hidden_dim), _ACTS[act](), nn.Dropout(dropout))
        self.layers = nn.ModuleList(
            CDATBlock(hidden_dim, heads, mlp_ratio, qkv_bias, trans_dropout) for _ in range(n_layers)
        )
        self.attention_net = nn.Sequential(
            nn.Linear(hidden_dim, attn_dim, bias=False), _ACTS[attn_act](), nn.Linear(attn_dim, 1, bias=False)
        )
        self.classifier = nn.Linear(hidden_dim, n_classes)
        _init_official(self)

    def forward(self, x: torch.Tensor, coords: torch.Tensor | None = None) -> MILOutput:
        h = self.encoder(check_bag(x, coords, self.in_dim))
        for layer in self.layers:
            ckpt = self.checkpoint and torch.is_grad_enabled()
            h = checkpoint(layer, h, use_reentrant=False) if ckpt else layer(h)
        a = torch.softmax(self.attention_net(h).squeeze(-1).float(), dim=0)
        z = a.to(h.dtype) @ h
        return MILOutput(bag_logits=self.classifier(z), attention=a, instance_features=h, bag_feature=z)

    def load_official_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load the weights of an official ``CDATMIL`` (strict): names mapped, the unused ``v_proj`` dropped,
        the (1, heads, 1, 1) biases flattened."""
        self.load_state_dict(official_to_gdat(state))


def official_to_gdat(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an official ``CDATMIL`` state dict to :class:`GDAT`'s (see :meth:`GDAT.load_official_state_dict`)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if ".v_proj." in key:
            continue
        new = key.replace("patch_to_emb.", "encoder.").replace("agent_blocks.", "layers.")
        new = new.replace("pool_fn.attention.attention.", "attention_net.").replace("classifier.0.", "classifier.")
        if new.endswith((".an_bias", ".na_bias")):
            new = new[: -len("an_bias")] + ("agent_bias" if new.endswith(".an_bias") else "instance_bias")
            value = value.reshape(-1)
        out[new] = value
    return out
