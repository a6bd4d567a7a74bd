"""timm backbones by name with weights from a local file or the local Hugging Face cache — never a download.

:func:`create_backbone` returns the model together with the input size and normalisation it expects
(TRIDENT's encoder contract), so feature extraction never guesses preprocessing. Every bad name or weights
file ends in a :class:`BackboneError` that names it, which the CLI prints as one line.

Names are resolved by encoder *family*, the entries of :data:`ENCODERS`: a family claims the names that
start with its ``prefix`` (``hf-hub:``, ``local-dir:``), and ``timm`` (no prefix) takes every other name. A
new family (named pathology foundation models, say) is one registered builder.
"""

from __future__ import annotations

import difflib
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pathopeft.errors import UserError
from pathopeft.registry import Entry, Registry

log = logging.getLogger(__name__)

#: Classifier-head parameter prefixes dropped when loading a checkpoint into a headless backbone.
HEAD_PREFIXES = ("head.", "fc.", "classifier.", "head_dist.", "last_linear.")
HF_HUB_PREFIX = "hf-hub:"
LOCAL_DIR_PREFIX = "local-dir:"  # timm's name for a folder with a hub-style config.json + weights
#: Weights files a timm hub snapshot may hold, in the order timm prefers them.
HUB_WEIGHTS_FILES = (
    "model.safetensors",
    "pytorch_model.bin",
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.bin",
)


class BackboneError(UserError, ValueError):
    """A backbone name or weights file that cannot give a model; the message names it and the problem.

    A ``ValueError`` too, so code that caught the ``ValueError``s raised here before keeps working.
    """


class WeightsNotFoundError(BackboneError, FileNotFoundError):
    """The weights file (or Hugging Face cache entry) is not on disk; also a ``FileNotFoundError``."""


def safe_name(name: str) -> str:
    """``name`` as one safe folder component: ``hf-hub:org/name`` → ``org--name``, plain timm names unchanged.

    Mirrors the HF cache's own ``models--org--name``; only ``[A-Za-z0-9._-]`` survive (anything else becomes
    ``_``), and the result is never empty, ``.`` or ``..``, so ``features_<slug>/`` is always one folder.
    """
    if name.startswith(HF_HUB_PREFIX):
        name = name[len(HF_HUB_PREFIX) :].replace("@", "--")
    elif name.startswith(LOCAL_DIR_PREFIX):
        name = Path(name[len(LOCAL_DIR_PREFIX) :]).name
    name = re.sub(r"[^A-Za-z0-9._-]", "_", name.replace("/", "--"))
    return name if name.strip(".") else name.replace(".", "_") or "_"


@dataclass
class Backbone:
    """A feature extractor: ``model(x) -> (B, dim)`` for ``x`` normalised with ``mean``/``std``."""

    model: nn.Module
    name: str
    dim: int
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    weights: str | None  # path of the loaded weights; None = random initialisation
    resize_px: int | None = None  # shorter side before the centre crop to input_size (None: input_size)
    interpolation: str = "bilinear"  # "bilinear" | "bicubic", antialiased

    @property
    def is_random_init(self) -> bool:
        return self.weights is None

    @property
    def slug(self) -> str:
        """The name as a safe folder component (see :func:`safe_name`)."""
        return safe_name(self.name)

    def normalize(self, x_uint8: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, H, W) → float, scaled to [0, 1] then standardised."""
        mean = torch.tensor(self.mean, device=x_uint8.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x_uint8.device).view(1, 3, 1, 1)
        return (x_uint8.float().div_(255.0) - mean) / std

    def preprocess(self, x_uint8: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, H, W) tiles of any size → the model's input: standardised, resized to ``input_size``."""
        x = self.normalize(x_uint8)
        side = self.resize_px or self.input_size
        if x.shape[-2:] != (side, side):  # square tiles: the shorter-side resize is a resize to side × side
            x = torch.nn.functional.interpolate(
                x, size=(side, side), mode=self.interpolation, antialias=True, align_corners=False
            )
        if side > self.input_size:  # the published centre crop (Prov-GigaPath: 256 → 224)
            off = (side - self.input_size) // 2
            x = x[..., off : off + self.input_size, off : off + self.input_size]
        return x

    @torch.inference_mode()
    def embed(self, x_uint8: torch.Tensor, precision: str = "auto") -> torch.Tensor:
        """Features (B, dim) float32 of uint8 (B, 3, H, W) tiles: the one tile → feature path of every stage.

        Runs on the model's device; on CUDA with channels-last and ``precision`` autocast (see
        :func:`autocast_context`).
        """
        device = next(self.model.parameters()).device
        x = self.preprocess(x_uint8.to(device, non_blocking=True))
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast_context(device, precision):
            return self.model(x).float()


def autocast_context(device: torch.device, precision: str) -> object:
    """bf16/fp16 autocast on CUDA when asked (``"auto"`` picks bf16 if supported); fp32 elsewhere."""
    from contextlib import nullcontext

    if device.type != "cuda" or precision == "fp32":
        return nullcontext()
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return torch.autocast("cuda", dtype=dtype)


def _first_line(e: BaseException) -> str:
    """The informative line of a library error (torch's weights-only refusal puts it after a preamble)."""
    text = str(e)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__


def load_state_dict_file(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a ``.safetensors`` or ``.pth``/``.pt``/``.bin`` checkpoint into a flat state dict.

    Raises :class:`WeightsNotFoundError` for a missing file and :class:`BackboneError` for one that is not a
    readable checkpoint or holds no state dict, each naming the file.
    """
    p = Path(path)
    if p.is_dir():
        raise WeightsNotFoundError(f"weights {p} is a folder; pass the weights file in it (.safetensors/.pth)")
    if not p.is_file():
        raise WeightsNotFoundError(
            f"weights file {p} not found (pathopeft never downloads weights: pass a local file)"
        )
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd: Any = load_file(str(p))
        else:
            sd = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # any failure to deserialise a user's file is that file's fault: name it
        kind = "safetensors" if p.suffix == ".safetensors" else "PyTorch checkpoint"
        raise BackboneError(f"{p}: not a readable {kind} file ({_first_line(e)})") from e
    for key in ("state_dict", "model", "module"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    if not isinstance(sd, dict):
        raise BackboneError(f"{p}: expected a state dict, found {type(sd).__name__}")
    not_tensors = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if not sd or not_tensors:
        raise BackboneError(
            f"{p}: expected a state dict (names → tensors), found a dict with keys {list(sd)[:6]}"
            + (f" of which {not_tensors[:4]} are not tensors" if not_tensors else "")
        )
    return {k.removeprefix("module.").removeprefix("model."): v for k, v in sd.items()}


def load_weights(model: nn.Module, path: str | os.PathLike[str]) -> None:
    """Load local weights into ``model``; classifier heads are ignored, any other mismatch is an error."""
    sd = {k: v for k, v in load_state_dict_file(path).items() if not k.startswith(HEAD_PREFIXES)}
    missing, unexpected, wrong = weight_mismatches(model, sd)
    if wrong:  # checked here: torch raises a RuntimeError with every key listed for these
        raise BackboneError(
            f"{path}: weights do not fit {type(model).__name__}: {len(wrong)} tensors of the wrong shape "
            f"(e.g. {wrong[:2]}) — weights of another size or architecture?"
        )
    if missing or unexpected:
        raise BackboneError(
            f"{path}: weights do not fit {type(model).__name__}: "
            f"{len(missing)} missing (e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})"
        )
    model.load_state_dict(sd, strict=False)  # every weight checked above; only BatchNorm counters may be absent


def weight_mismatches(model: nn.Module, sd: dict[str, torch.Tensor]) -> tuple[list[str], list[str], list[str]]:
    """(missing, unexpected, wrong-shape) keys of ``sd`` against ``model``; absent BatchNorm counters
    (``num_batches_tracked``) are not missing weights."""
    own = model.state_dict()
    missing = sorted(k for k in set(own) - set(sd) if not k.endswith("num_batches_tracked"))
    unexpected = sorted(set(sd) - set(own))
    wrong = [f"{k}: file {tuple(v.shape)}, model {tuple(own[k].shape)}" for k, v in sd.items() if k in own and v.shape != own[k].shape]  # fmt: skip
    return missing, unexpected, wrong


def close_names(name: str, names: list[str], n: int = 4) -> list[str]:
    """Names like ``name``, also by prefix (``vit_smol`` → ``vit_small_patch16_224``), for "did you mean"."""
    by_prefix: dict[str, list[str]] = {}
    for c in names:
        by_prefix.setdefault(c[: len(name)], []).append(c)
    hits = difflib.get_close_matches(name, names, n=n, cutoff=0.75)
    for h in difflib.get_close_matches(name, list(by_prefix), n=n, cutoff=0.75):
        hits.extend(sorted(by_prefix[h], key=len)[:2])
    return list(dict.fromkeys(hits))[:n]


def hf_cache_dir() -> Path:
    """The hub cache huggingface_hub uses (``HF_HUB_CACHE``, else ``HF_HOME/hub``, else ``~/.cache/...``)."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def hf_snapshot_folder(name: str, shown: str | None = None) -> Path:
    """The local snapshot folder of ``hf-hub:org/name[@revision]``, from the HF cache only (no network).

    Raises :class:`WeightsNotFoundError` naming the cache folder when the model is not there (``shown``: the
    name the user gave, e.g. an encoder name): pathopeft never downloads.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    repo_id, _, revision = name[len(HF_HUB_PREFIX) :].partition("@")
    cache = hf_cache_dir()
    try:
        return Path(snapshot_download(repo_id, revision=revision or None, cache_dir=cache, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, ValueError) as e:  # ValueError: a malformed repo id
        folder = cache / f"models--{repo_id.replace('/', '--')}"
        what = f"encoder {shown!r} ({repo_id})" if shown else f"backbone {name!r}"
        raise WeightsNotFoundError(
            f"{what}: not in the local Hugging Face cache at {folder} (pathopeft never downloads: "
            f"fetch it beforehand, e.g. `hf download {repo_id}`, or set HF_HUB_CACHE/HF_HOME to the cache "
            f"that has it, or pass --weights FILE)"
        ) from e


def hf_snapshot(name: str) -> Path:
    """:func:`hf_snapshot_folder` of a timm hub model, which must hold its ``config.json``."""
    snap = hf_snapshot_folder(name)
    if not (snap / "config.json").is_file():
        raise WeightsNotFoundError(f"backbone {name!r}: the cached snapshot {snap} has no config.json")
    return snap


def local_dir(name: str) -> Path:
    """The folder of a ``local-dir:/path`` name, which must hold a hub-style ``config.json``."""
    folder = Path(name[len(LOCAL_DIR_PREFIX) :])
    if not (folder / "config.json").is_file():
        raise WeightsNotFoundError(f"backbone {name!r}: {folder / 'config.json'} not found")
    return folder


def model_folder(name: str) -> Path | None:
    """The local folder holding config + weights of a ``hf-hub:``/``local-dir:`` name; ``None`` for plain names."""
    if name.startswith(HF_HUB_PREFIX):
        return hf_snapshot(name)
    if name.startswith(LOCAL_DIR_PREFIX):
        return local_dir(name)
    return None


def _create_timm_model(name: str, pretrained: bool, shown: str | None = None, **model_kwargs: Any) -> nn.Module:
    """``timm.create_model`` with its name and argument errors turned into :class:`BackboneError` naming ``shown``."""
    import timm

    source = name.partition(":")[0] if ":" in name else None
    shown = shown or name
    if source is None and not timm.is_model(name):
        if "/" in name:
            raise BackboneError(f"unknown backbone {name!r}: for a Hugging Face model write 'hf-hub:{name}'")
        hint = close_names(name, timm.list_models())
        raise BackboneError(
            f"unknown timm architecture {name!r}"
            + (f"; did you mean {', '.join(map(repr, hint))}?" if hint else " (see timm.list_models())")
        )
    try:
        return timm.create_model(name, pretrained=pretrained, num_classes=0, **model_kwargs)
    except TypeError as e:  # an argument the architecture does not take (``--backbone-kwargs``)
        raise BackboneError(f"backbone {shown!r}: {e}") from e
    except RuntimeError as e:
        if "Unknown model" in str(e):  # a hub config naming an architecture this timm does not have
            raise BackboneError(f"backbone {shown!r}: unknown timm architecture ({e}); is timm too old?") from e
        raise BackboneError(f"backbone {shown!r}: timm could not load its weights ({_first_line(e)})") from e
    except ValueError as e:  # timm's own name checks ("unknown model source 'foo'" …)
        raise BackboneError(f"backbone {shown!r}: {e}") from e


#: An encoder family builds ``(model, weights path or None)`` from a name it claims; see the module docstring.
EncoderBuilder = Callable[..., tuple[nn.Module, "str | os.PathLike[str] | None"]]
ENCODERS: Registry[EncoderBuilder] = Registry("encoder family", {"prefix": None})


def encoder_family(name: str) -> Entry[EncoderBuilder]:
    """The family that builds ``name``: the first whose ``prefix`` starts it, else the first without a prefix."""
    entries = [ENCODERS.entry(n) for n in ENCODERS]
    claimed = [e for e in entries if e.caps["prefix"] and name.startswith(e.caps["prefix"])]
    return (claimed or [e for e in entries if not e.caps["prefix"]])[0]


@ENCODERS.register("timm")
def _timm_encoder(
    name: str, weights: str | os.PathLike[str] | None, **model_kwargs: Any
) -> tuple[nn.Module, str | os.PathLike[str] | None]:
    """A timm architecture; ``weights`` from a local file, else random init (logged: features are a lower bound)."""
    model = _create_timm_model(name, pretrained=False, **model_kwargs)
    if weights is not None:
        load_weights(model, weights)
    else:
        log.warning(
            "RANDOM WEIGHTS: backbone %r has no --weights; features come from a randomly initialised model "
            "and are only a lower bound.",
            name,
        )
    return model, weights


def _folder_family(find_folder: Callable[[str], Path]) -> EncoderBuilder:
    """A family of timm models in local folders (config.json + weights) that ``find_folder`` locates."""

    def build(
        name: str, weights: str | os.PathLike[str] | None, **model_kwargs: Any
    ) -> tuple[nn.Module, str | os.PathLike[str] | None]:
        folder = find_folder(name)
        local = f"{LOCAL_DIR_PREFIX}{folder}"  # timm's own loader for a folder: config.json + weights, no network
        if weights is None:  # a hub name means "its weights", never random ones
            found = next((folder / f for f in HUB_WEIGHTS_FILES if (folder / f).is_file()), None)
            if found is None:
                raise WeightsNotFoundError(
                    f"backbone {name!r}: {folder} has no weights file (looked for {', '.join(HUB_WEIGHTS_FILES)})"
                )
            return _create_timm_model(local, pretrained=True, shown=name, **model_kwargs), found
        model = _create_timm_model(local, pretrained=False, shown=name, **model_kwargs)
        load_weights(model, weights)
        return model, weights

    return build


ENCODERS.add("hf-hub", _folder_family(hf_snapshot), prefix=HF_HUB_PREFIX)  # the local HF cache only
ENCODERS.add("local-dir", _folder_family(local_dir), prefix=LOCAL_DIR_PREFIX)


def create_backbone(
    name: str,
    weights: str | os.PathLike[str] | None = None,
    mean: tuple[float, float, float] | None = None,
    std: tuple[float, float, float] | None = None,
    **model_kwargs: Any,
) -> Backbone:
    """Build ``timm`` model ``name`` as a headless feature extractor, with weights from a local file or cache.

    Args:
        name: a published pathology encoder of :data:`pathopeft.encoders.PATCH_ENCODERS` (``"uni_v1"``,
            ``"virchow2"``, … with its own preprocessing and embedding; ``weights`` or the HF cache, never
            random), any timm architecture (``timm.list_models()``), e.g. ``"vit_small_patch16_224"``, or
            ``"hf-hub:org/name[@revision]"``: a timm model in the local Hugging Face cache (config and, without
            ``weights``, its weights; never downloaded, :class:`BackboneError` if it is not cached), or
            ``"local-dir:/path"``: the same from a folder.
        weights: local ``.safetensors``/``.pth`` file. ``None`` means the folder's weights for those names
            and random initialisation for plain names, which is logged as a warning because such features are
            only a lower bound.
        mean, std: override the normalisation from timm's default config (e.g. ``(0, 0, 0)``/``(1, 1, 1)``
            for models trained on [0, 1] inputs).
        **model_kwargs: passed to ``timm.create_model`` (``img_size``, ``depth``, …).

    Example:
        >>> bb = create_backbone("vit_tiny_patch16_224", img_size=64, depth=2)
        >>> bb.dim
        192
    """
    import timm

    from pathopeft.encoders import PATCH_ENCODERS, build_encoder

    if name in PATCH_ENCODERS:  # a published pathology encoder: its own preprocessing, never random weights
        if mean is not None or std is not None:
            raise BackboneError(f"encoder {name!r} has its published mean/std; --mean/--std apply to timm names")
        spec = PATCH_ENCODERS.get(name)
        model, path = build_encoder(spec, weights, **model_kwargs)
        return Backbone(model=model, name=name, dim=spec.dim, input_size=spec.input_size, mean=spec.mean,
                        std=spec.std, weights=str(path), resize_px=spec.resize_px,
                        interpolation=spec.interpolation)  # fmt: skip
    model, weights = encoder_family(name).obj(name, weights, **model_kwargs)
    cfg = timm.data.resolve_model_data_config(model)
    input_size = int(cfg["input_size"][-1])
    img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if img_size:  # a ViT built with img_size=... keeps the pretrained cfg's 224; trust the module
        input_size = int(img_size[-1] if isinstance(img_size, (tuple, list)) else img_size)
    model.eval()
    return Backbone(
        model=model,
        name=name,
        dim=int(model.num_features),
        input_size=input_size,
        mean=tuple(mean if mean is not None else cfg["mean"]),
        std=tuple(std if std is not None else cfg["std"]),
        weights=str(weights) if weights is not None else None,
    )


def apply_adapter(backbone: Backbone, adapter_dir: str | os.PathLike[str]) -> Backbone:
    """Load an adapter folder (ours or PEFT's) onto the backbone and merge it, for fine-tuned features.

    Merged, extraction costs exactly the base model; a folder made for another model fails with
    :class:`pathopeft.adapters.AdapterLoadError` naming both.
    """
    from pathopeft import adapters

    wrapped = adapters.load(backbone.model, adapter_dir)
    backbone.model = wrapped.merge_and_unload().eval()
    return backbone
