"""``SegModule``: Lightning training of a :class:`~pathopeft.seg.model.SegModel` on image/mask tiles.

Batches are dicts with ``image`` float (B, 3, H, W) in [0, 1] and ``mask`` int64 (B, H, W); the model
normalises. Loss: MONAI ``DiceCELoss`` or ``DiceFocalLoss`` on softmax outputs. Validation: Dice and
IoU of the argmax prediction per tile, by the one convention of :mod:`pathopeft.seg.metrics` (foreground
classes; a class absent from truth and prediction scores 1), the same ``seg compare`` scores whole images with.

Precision: ``forward`` runs the model under ``torch.autocast(bfloat16)`` when its input is on CUDA and
``bf16=True``, and returns float32 logits, so the module is the same under a ``precision="32"`` Trainer, in
plain inference code, and on CPU (no autocast at all). A Trainer with ``precision="bf16-mixed"`` works too.

Checkpoints hold only what training changed (adapter + decoder, see
:meth:`SegModel.trainable_state_dict`) plus the hyperparameters that rebuild the frozen encoder from its
weights file: megabytes instead of the encoder's size. :func:`load_checkpoint` (or
``SegModule.load_from_checkpoint``) restores them; the former turns a missing or corrupt file into one
:class:`SegCheckpointError` naming it.

Lightning's "Found N module(s) in eval mode at the start of training" warning is expected with a frozen or
adapted encoder: :meth:`SegModel.train` keeps the frozen encoder (or its BatchNorm layers) in eval mode.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import EarlyStopping

from pathopeft.errors import UserError
from pathopeft.seg.metrics import DiceIoU, one_hot  # noqa: F401 - one_hot re-exported for callers
from pathopeft.seg.model import SegModel

log = logging.getLogger(__name__)

TRAINABLE_ONLY = "pathopeft_trainable_only"  # checkpoint flag: the state dict lacks the frozen encoder


class SegCheckpointError(UserError, ValueError):
    """A checkpoint that is missing, unreadable or not written by ``pathopeft seg fit``; the message names it."""


def early_stopping(patience: int = 10, **kwargs: Any) -> EarlyStopping:
    """Stop when the validation Dice has not improved for ``patience`` validation runs.

    Checked after validation only (``check_on_train_epoch_end=False``): ``val/dice`` exists only then, and a
    ``ckpt_path`` resume from a checkpoint saved at validation end runs ``on_train_epoch_end`` first, where
    Lightning would stop with "metric val/dice which is not available".
    """
    kwargs.setdefault("check_on_train_epoch_end", False)
    return EarlyStopping(monitor="val/dice", mode="max", patience=patience, **kwargs)


def _make_loss(name: str, include_background: bool) -> torch.nn.Module:
    from monai.losses import DiceCELoss, DiceFocalLoss

    if name == "dicece":
        return DiceCELoss(to_onehot_y=True, softmax=True, include_background=include_background)
    if name == "dicefocal":
        return DiceFocalLoss(to_onehot_y=True, softmax=True, include_background=include_background)
    raise ValueError(f"unknown loss {name!r}; choose 'dicece' or 'dicefocal'")


class SegModule(pl.LightningModule):
    """Trains a :class:`SegModel`.

    Args:
        model: a built ``SegModel`` or its keyword arguments (a checkpoint stores the latter and rebuilds).
        loss: ``"dicece"`` or ``"dicefocal"``.
        include_background: whether the Dice (and focal) term counts the background class. Default
            ``False``, as nnU-Net does with softmax: background dominates tiles and would swamp the Dice term;
            the cross-entropy term always covers every class.
        lr, weight_decay: AdamW (no decay on biases and norm weights).
        max_epochs: length of the cosine learning-rate schedule; ``None`` = the Trainer's ``max_epochs``
            (no schedule if that is unbounded).
        bf16: bfloat16 autocast in ``forward`` when running on CUDA.
        optimizer: ``"adamw"``, or ``"dct-adamw"`` (:class:`pathopeft.optim.DctAdamW`, low-rank DCT gradient
            projection for full fine-tuning, rank ``dct_rank``); an adapter whose registry entry names its own
            optimiser (LoRA-Pro) uses that.
    """

    def __init__(
        self,
        model: SegModel | dict[str, Any],
        loss: Literal["dicece", "dicefocal"] = "dicece",
        include_background: bool = False,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        max_epochs: int | None = None,
        bf16: bool = True,
        optimizer: Literal["adamw", "dct-adamw"] = "adamw",
        dct_rank: int = 64,
    ) -> None:
        super().__init__()
        self._nonfinite: torch.Tensor | None = None  # non-finite training losses, counted on the device
        if isinstance(model, SegModel):
            self.model = model
        else:
            self.model = SegModel(**dict(model))
        self.save_hyperparameters(
            {
                "model": dict(self.model.config),
                "loss": loss,
                "include_background": include_background,
                "lr": lr,
                "weight_decay": weight_decay,
                "max_epochs": max_epochs,
                "bf16": bf16,
                "optimizer": optimizer,
                "dct_rank": dct_rank,
            }
        )
        self.loss_fn = _make_loss(loss, include_background)
        self.lr, self.weight_decay, self.max_epochs, self.bf16 = lr, weight_decay, max_epochs, bf16
        if optimizer not in ("adamw", "dct-adamw"):
            raise ValueError(f"unknown optimizer {optimizer!r}; choose 'adamw' or 'dct-adamw'")
        self.optimizer_name, self.dct_rank = optimizer, dct_rank
        self.val_scores = DiceIoU(self.model.n_classes)

    @property
    def n_classes(self) -> int:
        return self.model.n_classes

    # --- forward and loss -----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] → float32 logits (bf16 autocast inside on CUDA, see the module docstring)."""
        ctx = torch.autocast("cuda", dtype=torch.bfloat16) if self.bf16 and x.is_cuda else contextlib.nullcontext()
        with ctx:
            logits = self.model(x)
        return logits.float()

    def compute_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, logits) of a batch; used by the training and validation steps."""
        logits = self(batch["image"])
        return self.loss_fn(logits, batch["mask"].long()[:, None]), logits

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss, _ = self.compute_loss(batch)
        reg = self._adapter_regularizer()
        if reg is not None:  # the method's own loss term (SALT's, when its reg_weight > 0)
            self.log("train/adapter_reg", reg, batch_size=batch["image"].shape[0])
            loss = loss + reg
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["image"].shape[0])
        bad = (~torch.isfinite(loss.detach())).to(torch.int64)  # counted on the device: no sync per step
        self._nonfinite = bad if self._nonfinite is None else self._nonfinite + bad
        return loss

    @property
    def nonfinite_steps(self) -> int:
        """Training steps whose loss was not finite (0 before training)."""
        return int(self._nonfinite) if self._nonfinite is not None else 0

    def on_train_end(self) -> None:
        """Say so when training diverged (a non-finite loss), instead of leaving an all-background model silent."""
        n = self.nonfinite_steps
        if n:
            log.warning(
                "training diverged: %d of %d steps had a non-finite loss (lr %g)", n, self.global_step, self.lr
            )

    # --- validation -----------------------------------------------------------------------------------
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        loss, logits = self.compute_loss(batch)
        self.log("val/loss", loss, on_epoch=True, batch_size=batch["image"].shape[0])
        self.val_scores.update(logits.argmax(dim=1), batch["mask"])

    def on_validation_epoch_end(self) -> None:
        if self.val_scores.count:  # the convention of pathopeft.seg.metrics, the same as seg compare's
            dice, iou = self.val_scores.compute()
            self.log("val/dice", dice, prog_bar=True)
            self.log("val/iou", iou)
        self.val_scores.reset()

    # --- prediction -----------------------------------------------------------------------------------
    @torch.no_grad()
    def predict_tiles(self, batch: dict[str, Any] | torch.Tensor) -> torch.Tensor:
        """Softmax probabilities (B, C, H, W), float32, in eval mode (the previous mode is restored)."""
        x = batch["image"] if isinstance(batch, dict) else batch
        was_training = self.training
        self.eval()
        try:
            return torch.softmax(self(x.to(self.device)), dim=1)
        finally:
            self.train(was_training)

    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        """Probabilities plus the batch's stitching keys (``index``, ``y``, ``x``) when present."""
        out: dict[str, Any] = {"probs": self.predict_tiles(batch)}
        out.update({k: batch[k] for k in ("index", "y", "x") if k in batch})
        return out

    # --- optimisation ---------------------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        """AdamW over the trainable parameters only (adapter + decoder), cosine-annealed per epoch; the adapter's
        own optimiser where its ``ADAPTERS`` entry names one (LoRA-Pro)."""
        factory = self._adapter_caps().get("optimizer")
        if factory is not None:
            opt = factory(self.model, self.lr, self.weight_decay)
        else:
            decay = [p for p in self.model.parameters() if p.requires_grad and p.ndim >= 2]
            no_decay = [p for p in self.model.parameters() if p.requires_grad and p.ndim < 2]
            groups = [{"params": ps, "weight_decay": wd}
                      for ps, wd in ((decay, self.weight_decay), (no_decay, 0.0)) if ps]  # fmt: skip
            if self.optimizer_name == "dct-adamw":
                from pathopeft.optim import DctAdamW

                opt = DctAdamW(groups, lr=self.lr, rank=self.dct_rank)
            else:
                opt = torch.optim.AdamW(groups, lr=self.lr)
        epochs = self.max_epochs
        if epochs is None and self._trainer is not None:
            epochs = self.trainer.max_epochs
        if not epochs or epochs < 0:
            return opt
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs, eta_min=self.lr * 1e-2)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}

    def _adapter_caps(self) -> dict[str, Any]:
        """The capabilities of this model's adapter in ``ADAPTERS``; empty for frozen/full or a PEFT method
        known only by its PEFT name."""
        from pathopeft.adapters import ADAPTERS

        name = self.model.config["adapter"]
        if self.model.mode != "adapter" or name not in ADAPTERS:
            return {}
        return ADAPTERS.entry(name).caps

    def _adapter_regularizer(self) -> torch.Tensor | None:
        """The loss term the adapter's ``ADAPTERS`` entry adds to training (``regularizer``), if any."""
        term = self._adapter_caps().get("regularizer")
        return term(self.model) if term is not None else None

    def configure_callbacks(self) -> list[pl.Callback]:
        """The callback the adapter's ``ADAPTERS`` entry says training needs (SNELLA's budget schedule), so
        every Trainer that fits this module runs it; none for other methods or without an adapter."""
        factory = self._adapter_caps().get("callback")
        return [factory()] if factory is not None else []

    # --- small checkpoints ----------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep only the trained tensors; the frozen encoder is rebuilt from the hyperparameters."""
        checkpoint["state_dict"] = {f"model.{k}": v for k, v in self.model.trainable_state_dict().items()}
        checkpoint[TRAINABLE_ONLY] = True

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Load the trained tensors into this freshly built model, then hand Lightning the complete state dict
        so its strict ``load_state_dict`` that follows is a no-op instead of a missing-keys error."""
        if not checkpoint.get(TRAINABLE_ONLY):
            return
        sd = {k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items()}
        self.model.load_trainable_state_dict(sd)
        checkpoint["state_dict"] = self.state_dict()


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()).split(". ")[0]  # torch appends paragraphs of advice after the first sentence
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def load_checkpoint(path: str | os.PathLike[str], map_location: Any = "cpu") -> SegModule:
    """A :class:`SegModule` from a ``seg fit`` checkpoint; a missing, truncated or foreign file is one clear error.

    torch reports a bad file as whatever its unpickler tripped on (``struct.error``, ``RuntimeError``,
    ``EOFError``, ``KeyError`` …), so the file is read and its layout checked here before Lightning rebuilds
    the model from it (checkpoints are megabytes: adapter + decoder only).
    """
    p = Path(path)
    if not p.is_file():
        raise SegCheckpointError(f"{p}: checkpoint not found")
    data = p.read_bytes()
    try:
        ckpt = torch.load(io.BytesIO(data), map_location=map_location, weights_only=None)  # as Lightning loads
    except Exception as e:  # any unpickling failure means the file is not a usable checkpoint
        raise SegCheckpointError(
            f"{p}: not a readable checkpoint, truncated or not a torch file ({_one_line(e)})"
        ) from e
    hparams = ckpt.get("hyper_parameters") if isinstance(ckpt, dict) else None
    if not isinstance(hparams, dict) or "model" not in hparams or "state_dict" not in ckpt:
        raise SegCheckpointError(f"{p}: not a checkpoint of 'pathopeft seg fit' (no SegModule hyperparameters)")
    try:
        return SegModule.load_from_checkpoint(io.BytesIO(data), map_location=map_location)
    except UserError:
        raise
    except (KeyError, TypeError, ValueError) as e:  # e.g. an adapter state dict that fits another model
        raise SegCheckpointError(f"{p}: cannot rebuild the model from this checkpoint ({_one_line(e)})") from e
