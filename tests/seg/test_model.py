"""SegModel + SegModule: every adapter method trains only adapter + decoder, small checkpoints reload exactly,
real weights load, and a tiny model overfits synthetic discs."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import timm
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from pathopeft.adapters import ADAPTERS, SnellaBudgetCallback
from pathopeft.registry import UnknownPluginError
from pathopeft.seg.decoders import SEG_DECODERS, DecoderError, UNetSpec, ViTProgressiveSpec
from pathopeft.seg.encoder import _base_key
from pathopeft.seg.model import SegModel
from pathopeft.seg.module import SegModule, early_stopping, one_hot

METHODS = list(ADAPTERS)
MODES = [None, "full", *METHODS]  # None = frozen encoder, decoder-only
CONV_MODES = [None, "full", *ADAPTERS.names(conv=True)]
N_CLASSES = 3

TINY_VIT: dict[str, Any] = {
    "encoder": "vit_tiny_patch16_224",
    "img_size": 32,
    "encoder_kwargs": {"depth": 1, "embed_dim": 32, "num_heads": 2},
}
# timm's own miniature ResNet (0.47 M parameters): a real timm CNN with BatchNorm and downsampling convs, fast
# enough on 2 CPU cores for SVD-based adapters (SALT on resnet18's 11 M parameters takes over a minute).
TINY_CNN: dict[str, Any] = {"encoder": "test_resnet"}
TOYS = {"vit": (TINY_VIT, 32), "cnn": (TINY_CNN, 64)}

CAPRICORN = Path("weights/capricorn_densenet121/capricorn0.1_densenet121_timm.safetensors")


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Tiny tensors gain nothing from intra-op threads, and on a busy 2-core machine OpenMP's spin-waiting makes
    a 2-thread run 10-50× slower (measured here: 65 s instead of 7 s for this file)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _quiet_random_init(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="pathopeft.seg.model")


def build(toy: str, adapter: str | None, **kw: Any) -> SegModel:
    cfg, _ = TOYS[toy]
    adapter_kwargs = {"rank": 4} if adapter not in (None, "full") else None
    return SegModel(n_classes=N_CLASSES, adapter=adapter, adapter_kwargs=adapter_kwargs, **cfg, **kw)


def batch_for(toy: str, n: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    size = TOYS[toy][1]
    g = torch.Generator().manual_seed(seed)
    return {
        "image": torch.rand(n, 3, size, size, generator=g),
        "mask": torch.randint(0, N_CLASSES, (n, size, size), generator=g),
    }


def encoder_buffers(model: SegModel) -> dict[str, torch.Tensor]:
    params = {n for n, _ in model.named_parameters()}
    return {k: v.clone() for k, v in model.state_dict().items() if k.startswith("encoder.") and k not in params}


def one_step(toy: str, adapter: str | None) -> None:
    """One AdamW step; then check which parameters moved."""
    model = build(toy, adapter)
    module = SegModule(model, lr=1e-2, max_epochs=1)
    batch = batch_for(toy)
    params_before = {n: p.detach().clone() for n, p in model.named_parameters()}
    buffers_before = encoder_buffers(model)
    opt = module.configure_optimizers()["optimizer"]
    module.train()
    loss, logits = module.compute_loss(batch)
    assert logits.shape == (2, N_CLASSES, *batch["mask"].shape[-2:])
    assert torch.isfinite(loss)
    loss.backward()
    opt.step()

    named = dict(model.named_parameters())
    trainable = {n for n, p in named.items() if p.requires_grad}
    changed = {n for n, p in named.items() if not torch.equal(p, params_before[n])}
    assert changed <= trainable, f"frozen parameters changed: {sorted(changed - trainable)[:4]}"
    decoder = {n for n in named if n.startswith("decoder.")}
    assert decoder <= trainable
    assert changed & decoder
    enc_trainable = {n for n in trainable if n.startswith("encoder.")}
    enc_all = {n for n in named if n.startswith("encoder.")}
    buffers_after = encoder_buffers(model)
    bn_moved = any(not torch.equal(buffers_before[k], buffers_after[k]) for k in buffers_before if "running" in k)
    if adapter is None:
        assert not enc_trainable
        assert model.n_trainable() == sum(named[n].numel() for n in decoder)
    elif adapter == "full":
        assert enc_trainable == enc_all
        assert changed & enc_all
        assert model.n_trainable() == model.n_total()
        assert bn_moved == (toy == "cnn")  # a fully trained CNN updates its BatchNorm statistics
    else:
        base = model._base_keys
        assert enc_trainable, "the adapter has no trainable parameters"
        assert all(_base_key(n.removeprefix("encoder.")) not in base for n in enc_trainable), "base weights train"
        grads = [named[n].grad for n in enc_trainable]
        assert any(g is not None and g.abs().sum() > 0 for g in grads), "no adapter parameter got a gradient"
        assert changed & enc_trainable
    if adapter != "full":
        assert not bn_moved, "BatchNorm statistics of the frozen base changed"

    # what the checkpoint keeps reloads into a fresh model (different adapter init) to the same predictions
    sd = model.trainable_state_dict()
    if adapter != "full":  # no frozen base tensor in the checkpoint
        assert not [k for k in sd if k.startswith("encoder.") and _base_key(k[8:]) in model._base_keys]
    enc_keys = [k for k in sd if k.startswith("encoder.")]
    assert bool(enc_keys) == (adapter is not None)  # frozen: decoder only; adapter: its tensors; full: all
    torch.manual_seed(99)
    fresh = build(toy, adapter)
    fresh.load_trainable_state_dict(sd)
    model.eval()
    fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(batch["image"]), model(batch["image"]), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("adapter", MODES, ids=lambda m: str(m or "frozen"))
def test_vit_one_step_trains_only_adapter_and_decoder(adapter: str | None) -> None:
    one_step("vit", adapter)


@pytest.mark.parametrize("adapter", CONV_MODES, ids=lambda m: str(m or "frozen"))
def test_cnn_one_step_trains_only_adapter_and_decoder(adapter: str | None) -> None:
    one_step("cnn", adapter)


@pytest.mark.parametrize("method", ADAPTERS.names(conv=False))
def test_linear_only_method_on_cnn_raises(method: str) -> None:
    with pytest.raises(ValueError, match=r"nn\.Linear only"):
        build("cnn", method)


def test_cnn_batchnorm_stays_eval_when_adapted() -> None:
    def bn_modes(model: SegModel) -> set[bool]:
        return {m.training for m in model.encoder.modules() if isinstance(m, nn.BatchNorm2d)}

    assert bn_modes(build("cnn", "lora").train()) == {False}
    assert bn_modes(build("cnn", None).train()) == {False}
    full = build("cnn", "full").train()
    assert bn_modes(full) == {True}
    assert bn_modes(full.eval()) == {False}


def test_default_targets() -> None:
    vit = build("vit", "salt")
    adapted = sorted(n for n, m in vit.encoder.named_modules() if hasattr(m, "deltas"))
    assert adapted == ["base_model.blocks.0.attn.proj", "base_model.blocks.0.attn.qkv"]
    cnn = build("cnn", "lora")
    targets = cnn.encoder.peft_config["default"].target_modules
    assert "conv1" not in targets
    assert "layer1.0.conv1" in targets


def test_input_checks() -> None:
    vit = build("vit", None)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        vit(torch.rand(1, 3, 40, 40))
    with pytest.raises(TypeError, match="float images"):
        vit(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    # dynamic_img_size: another multiple of the patch size works, at full resolution
    assert vit(torch.rand(1, 3, 48, 64)).shape == (1, N_CLASSES, 48, 64)
    cnn = build("cnn", None)
    assert cnn(torch.rand(1, 3, 50, 70)).shape == (1, N_CLASSES, 50, 70)  # U-Net resizes to any input
    shallow = SegModel("test_resnet", N_CLASSES, encoder_kwargs={"out_indices": (0, 1, 2)})
    assert len(shallow.encode(torch.rand(1, 3, 64, 64))) == 3
    assert shallow(torch.rand(1, 3, 64, 64)).shape == (1, N_CLASSES, 64, 64)


def test_samvit_and_prefix_tokens() -> None:
    """SAM's neck returns a map; a distilled DeiT has two prefix tokens: both decode to full resolution."""
    sam = SegModel(
        "samvit_base_patch16",
        N_CLASSES,
        img_size=32,
        adapter="lora",
        adapter_kwargs={"rank": 2},
        encoder_kwargs={
            "embed_dim": 32,
            "depth": 2,
            "num_heads": 2,
            "global_attn_indexes": (1,),
            "window_size": 1,
            "neck_chans": 16,
        },
    )
    assert sam(torch.rand(2, 3, 32, 32)).shape == (2, N_CLASSES, 32, 32)
    deit = SegModel("deit_tiny_distilled_patch16_224", N_CLASSES, img_size=32, encoder_kwargs={"depth": 1})
    assert deit.decoder_spec.num_prefix_tokens == 2
    assert deit(torch.rand(1, 3, 32, 32)).shape == (1, N_CLASSES, 32, 32)


def test_auto_decoder_follows_the_encoder_and_a_wrong_choice_is_clear() -> None:
    vit, cnn = build("vit", None), build("cnn", None)
    assert vit.config["decoder"] == "vit-progressive"
    assert isinstance(vit.decoder_spec, ViTProgressiveSpec)
    assert cnn.config["decoder"] == "unet"
    assert isinstance(cnn.decoder_spec, UNetSpec)
    assert list(SEG_DECODERS)[:2] == ["vit-progressive", "unet"]
    explicit = build("cnn", None, decoder="UNet")  # names are case-insensitive
    assert explicit.config["decoder"] == "unet"
    with pytest.raises(DecoderError, match=r"decoder 'unet' takes CNN .*encoder 'vit_tiny_patch16_224' is not one"):
        build("vit", None, decoder="unet")
    with pytest.raises(DecoderError, match=r"decoder 'vit-progressive' takes ViT-like .*decoders that take it: unet"):
        build("cnn", None, decoder="vit-progressive")
    with pytest.raises(UnknownPluginError, match=r"unknown segmentation decoder 'fpn'.*known: vit-progressive, unet"):
        build("cnn", None, decoder="fpn")


def test_config_with_the_resolved_decoder_rebuilds_the_same_model() -> None:
    """The config keeps the chosen decoder by name: rebuilding from it gives the same predictions."""
    for toy in TOYS:
        model = build(toy, None).eval()
        torch.manual_seed(5)  # a different decoder init: only the state dict below makes them equal
        again = SegModel(**model.config).eval()
        again.load_trainable_state_dict(model.trainable_state_dict())
        x = batch_for(toy)["image"]
        with torch.no_grad():
            torch.testing.assert_close(again(x), model(x))


@pytest.mark.parametrize("adapter", [None, "full", *METHODS], ids=lambda m: str(m or "frozen"))
def test_module_attaches_the_callback_of_its_adapter_entry(adapter: str | None) -> None:
    module = SegModule(build("vit", adapter))
    factory = ADAPTERS.entry(adapter).caps["callback"] if adapter in ADAPTERS else None
    callbacks = module.configure_callbacks()
    assert [type(c) for c in callbacks] == ([factory] if factory is not None else [])


def test_snella_budget_callback_runs_in_a_fit_and_lora_gets_none(tmp_path: Path) -> None:
    snella = SegModule(build("vit", "snella", decoder_channels=16), lr=1e-2)
    trainer = _fit_one_step(snella, batch_for("vit"), tmp_path)
    budget = [c for c in trainer.callbacks if isinstance(c, SnellaBudgetCallback)]
    assert len(budget) == 1
    assert budget[0].allocator is not None  # on_fit_start built it from the SegModule's SNELLA layers
    assert "snella/mean_sparsity" in trainer.callback_metrics
    lora = SegModule(build("vit", "lora", decoder_channels=16), lr=1e-2)
    trainer = _fit_one_step(lora, batch_for("vit"), tmp_path / "lora")
    assert not [c for c in trainer.callbacks if isinstance(c, SnellaBudgetCallback)]


def test_load_trainable_state_dict_errors() -> None:
    model = build("vit", "lora")
    sd = model.trainable_state_dict()
    with pytest.raises(ValueError, match="missing"):
        model.load_trainable_state_dict(dict(list(sd.items())[1:]))
    with pytest.raises(ValueError, match="unexpected"):
        model.load_trainable_state_dict({**sd, "encoder.base_model.model.cls_token": torch.zeros(1)})
    with pytest.raises(ValueError, match="fit this SegModel"):
        build("vit", "salt").load_trainable_state_dict(sd)


def test_vit_weights_from_another_size(tmp_path: Path) -> None:
    """A checkpoint for 64-px inputs loads into a 32-px model: pos-embed resampled, other tensors as saved."""
    kw = {**TINY_VIT["encoder_kwargs"], "num_classes": 5}
    src = timm.create_model("vit_tiny_patch16_224", img_size=64, **kw)
    path = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, path)
    model = build("vit", None, weights=str(path))
    enc = model.encoder
    assert enc.pos_embed.shape == (1, 1 + 4, 32)
    assert torch.equal(enc.blocks[0].attn.qkv.weight, src.blocks[0].attn.qkv.weight)
    assert torch.equal(enc.patch_embed.proj.weight, src.patch_embed.proj.weight)
    bad = tmp_path / "bad.safetensors"
    save_file({"blocks.0.attn.qkv.weight": torch.zeros(3, 3)}, bad)
    with pytest.raises(ValueError, match="do not fit"):
        build("vit", None, weights=str(bad))


def test_features_only_weights_renamed(tmp_path: Path) -> None:
    """timm's features_only DenseNet renames ``features.conv0`` → ``features_conv0``; plain checkpoints load."""
    kw = {"growth_rate": 8, "block_config": (1, 1, 1, 1)}
    src = timm.create_model("densenet121", num_classes=4, **kw)
    path = tmp_path / "densenet.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, path)
    model = SegModel("densenet121", N_CLASSES, weights=str(path), encoder_kwargs=kw, adapter="lora")
    base = model.encoder.base_model.model
    assert torch.equal(base.features_conv0.weight, src.features.conv0.weight)
    assert torch.equal(base.features_norm5.running_var, src.features.norm5.running_var)
    assert "features_conv0" not in model.encoder.peft_config["default"].target_modules  # the stem stays plain
    assert model(torch.rand(1, 3, 64, 64)).shape == (1, N_CLASSES, 64, 64)


def _fit_one_step(module: SegModule, batch: dict[str, torch.Tensor], tmp_path: Path) -> pl.Trainer:
    trainer = pl.Trainer(
        max_steps=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
    )
    loader = torch.utils.data.DataLoader(
        [{k: v[i] for k, v in batch.items()} for i in range(len(batch["image"]))], batch_size=len(batch["image"])
    )
    trainer.fit(module, loader, loader)
    return trainer


@pytest.mark.parametrize(
    ("toy", "adapter", "cfg"),
    [
        ("vit", "lora", {"encoder_kwargs": {"depth": 2}, "decoder_channels": 16}),  # embed_dim 192
        ("cnn", "salt", {"decoder_channels": 16}),
        ("cnn", None, {"decoder_channels": 16}),
    ],
    ids=["vit-lora", "cnn-salt", "cnn-frozen"],
)
def test_checkpoint_holds_adapter_and_decoder_only(toy: str, adapter: str | None, cfg: dict, tmp_path: Path) -> None:
    model = SegModel(
        n_classes=N_CLASSES,
        adapter=adapter,
        adapter_kwargs={"rank": 4} if adapter else None,
        **{**TOYS[toy][0], **cfg},
    )
    module = SegModule(model, lr=1e-2)
    batch = batch_for(toy)
    trainer = _fit_one_step(module, batch, tmp_path)
    assert {"train/loss", "val/dice", "val/iou"} <= set(trainer.callback_metrics)
    ckpt = tmp_path / "seg.ckpt"
    trainer.save_checkpoint(ckpt)

    saved = torch.load(ckpt, map_location="cpu", weights_only=False)
    keys = {k.removeprefix("model.") for k in saved["state_dict"]}
    assert keys == set(model.trainable_state_dict())
    assert not [k for k in keys if k.startswith("encoder.") and _base_key(k[8:]) in model._base_keys]
    saved_bytes = sum(v.numel() * v.element_size() for v in saved["state_dict"].values())
    model_bytes = sum(v.numel() * v.element_size() for v in model.state_dict().values())
    assert saved_bytes < 0.3 * model_bytes, (saved_bytes, model_bytes)

    torch.manual_seed(123)  # a different adapter/decoder init in the fresh model: the checkpoint must override it
    restored = SegModule.load_from_checkpoint(ckpt, map_location="cpu")
    assert restored.hparams["model"] == model.config
    want = module.predict_tiles(batch)
    got = restored.predict_tiles(batch)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert torch.allclose(got.sum(dim=1), torch.ones(()), atol=1e-5)


def test_module_from_kwargs_and_helpers() -> None:
    module = SegModule({**TINY_VIT, "n_classes": N_CLASSES, "adapter": "lora"}, loss="dicefocal", max_epochs=3)
    assert isinstance(module.model, SegModel)
    assert module.model.mode == "adapter"
    opt = module.configure_optimizers()
    assert opt["lr_scheduler"]["scheduler"].T_max == 3
    n_opt = sum(p.numel() for g in opt["optimizer"].param_groups for p in g["params"])
    assert n_opt == module.model.n_trainable() < module.model.n_total()
    batch = {**batch_for("vit"), "index": torch.tensor([0, 1]), "y": torch.tensor([0, 0]), "x": torch.tensor([0, 32])}
    module.train()
    out = module.predict_step(batch, 0)
    assert module.training  # predict_tiles restores the mode
    assert out["probs"].shape == (2, N_CLASSES, 32, 32)
    assert torch.equal(out["x"], batch["x"])
    loss, _ = module.compute_loss(batch)
    assert torch.isfinite(loss)
    with pytest.raises(ValueError, match="unknown loss"):
        SegModule(module.model, loss="bce")  # type: ignore[arg-type]
    es = early_stopping(5)
    assert (es.monitor, es.mode, es.patience) == ("val/dice", "max", 5)


def test_capricorn_densenet_loads(shared_dir: Path) -> None:
    path = shared_dir / CAPRICORN
    if not path.is_file():
        pytest.skip(f"{path} is missing")
    model = SegModel(
        "densenet121", 2, weights=str(path), mean=(0, 0, 0), std=(1, 1, 1), bn_eps=1.001e-5, adapter="lora"
    )
    file = load_file(str(path))
    base = model.encoder.base_model.model
    assert torch.equal(base.features_conv0.weight, file["features.conv0.weight"])
    own = {_base_key(k): v for k, v in model.encoder.state_dict().items()}
    n_equal = sum(
        torch.equal(own[k.replace("features.", "features_", 1)], v)
        for k, v in file.items()
        if not k.startswith("classifier.")
    )
    assert n_equal == len(file) - 2  # every tensor but the classifier's weight and bias
    assert model.mean.flatten().tolist() == [0, 0, 0]
    assert model.std.flatten().tolist() == [1, 1, 1]
    assert {m.eps for m in model.encoder.modules() if isinstance(m, nn.BatchNorm2d)} == {1.001e-5}
    with torch.no_grad():
        logits = model.eval()(torch.rand(1, 3, 64, 64))
    assert logits.shape == (1, 2, 64, 64)
    assert torch.isfinite(logits).all()


# ------------------------------------------------------------------------------------------ overfit


def disc_batch(n: int = 4, size: int = 64, seed: int = 0) -> dict[str, torch.Tensor]:
    """Two coloured discs (classes 1, 2) per image on a striped, noisy pale background."""
    g = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    images, masks = [], []
    for i in range(n):
        img = 0.85 + 0.1 * g.random((size, size, 3))
        img[..., 1] -= 0.15 * (np.sin(xx / 3.0 + i) > 0)
        mask = np.zeros((size, size), np.int64)
        for cls, colour in ((1, (0.55, 0.2, 0.6)), (2, (0.8, 0.35, 0.5))):
            r = int(g.integers(8, 14))
            cy, cx = g.integers(r, size - r, 2)
            disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
            img[disc] = np.array(colour) + 0.05 * g.standard_normal((int(disc.sum()), 3))
            mask[disc] = cls
        images.append(torch.from_numpy(img.clip(0, 1)).permute(2, 0, 1).float())
        masks.append(torch.from_numpy(mask))
    return {"image": torch.stack(images), "mask": torch.stack(masks)}


@pytest.mark.slow
def test_overfit_synthetic_discs(tmp_path: Path) -> None:
    """LoRA on a random tiny ResNet + U-Net decoder reaches Dice > 0.9 on 4 images within 300 steps."""
    from monai.metrics import DiceMetric

    batch = disc_batch()
    model = SegModel("test_resnet", N_CLASSES, adapter="lora", adapter_kwargs={"rank": 4}, decoder_channels=16)
    module = SegModule(model, lr=1e-2)
    loader = torch.utils.data.DataLoader([{k: v[i] for k, v in batch.items()} for i in range(4)], batch_size=4)
    stop = early_stopping(patience=300, stopping_threshold=0.95, check_on_train_epoch_end=False)
    trainer = pl.Trainer(
        max_epochs=300,  # one step per epoch
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[stop],
        default_root_dir=tmp_path,
    )
    trainer.fit(module, loader, loader)
    assert trainer.global_step <= 300
    pred = module.predict_tiles(batch).argmax(dim=1)
    dice = DiceMetric(include_background=False)
    dice(one_hot(pred, N_CLASSES), one_hot(batch["mask"], N_CLASSES))
    assert dice.aggregate().item() > 0.9, (trainer.global_step, trainer.callback_metrics)


@pytest.mark.gpu
@pytest.mark.parametrize("adapter", MODES)
def test_bf16_training_step_on_gpu(adapter: str | None) -> None:
    """On CUDA the module autocasts to bf16: float32 logits, finite loss, finite gradients on every trainable."""
    module = SegModule(build("vit", adapter)).cuda().train()
    batch = {k: v.cuda() for k, v in batch_for("vit").items()}
    inner: list[torch.dtype] = []
    first_linear = next(m for m in module.model.modules() if isinstance(m, nn.Linear))
    first_linear.register_forward_hook(lambda _m, _i, out: inner.append(out.dtype))
    loss, logits = module.compute_loss(batch)
    assert inner  # the hook ran
    assert inner[0] == torch.bfloat16  # autocast really ran inside
    assert logits.dtype == torch.float32
    assert torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in module.parameters() if p.requires_grad]
    assert grads
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_salt_regulariser_joins_the_training_loss_only_when_weighted():
    """SALT's ``regularizer`` capability: SegModule adds reg_weight · (‖Σ'top − Σtop‖ + ‖XY‖) to the loss."""
    cfg, _ = TOYS["vit"]
    plain = SegModule(SegModel(n_classes=N_CLASSES, adapter="salt", adapter_kwargs={"rank": 4}, **cfg))
    weighted = SegModule(
        SegModel(n_classes=N_CLASSES, adapter="salt", adapter_kwargs={"rank": 4, "reg_weight": 0.5}, **cfg)
    )
    batch = batch_for("vit")
    for m in (plain, weighted):
        m.compute_loss(batch)  # SALT's SVD is taken at the first forward
        for d in m.modules():
            if hasattr(d, "beta") and hasattr(d, "X"):
                with torch.no_grad():
                    d.beta.fill_(0.1)  # a shifted top block: the regulariser is > 0
    assert plain._adapter_regularizer() is None
    reg = weighted._adapter_regularizer()
    assert reg is not None
    assert float(reg) > 0


@pytest.mark.parametrize("adapter", ["salt", "lora"])
def test_train_norms_adds_the_norms_and_position_embeddings_to_every_method(adapter):
    base = build("vit", adapter)
    cfg, _ = TOYS["vit"]
    with_norms = SegModel(n_classes=N_CLASSES, adapter=adapter, adapter_kwargs={"rank": 4}, train_norms=True, **cfg)
    trained = {n for n, p in with_norms.named_parameters() if p.requires_grad}
    assert any("norm" in n for n in trained)
    assert any("pos_embed" in n for n in trained)
    assert with_norms.n_trainable() > base.n_trainable()
    rebuilt = SegModel(**with_norms.config)  # the switch is in the config, so a checkpoint rebuilds it
    rebuilt.load_trainable_state_dict(with_norms.trainable_state_dict())


def test_a_diverged_fit_is_counted_and_warned(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A non-finite training loss (here: NaN pixels) is counted on the device and reported at the end, so a
    comparison can tell a diverged run from a bad method (seg compare records ``nonfinite_steps``)."""
    module = SegModule(build("vit", "lora", decoder_channels=16), lr=1e-2)
    batch = batch_for("vit")
    batch["image"] = batch["image"].float() * float("nan")
    with caplog.at_level("WARNING", logger="pathopeft.seg.module"):
        _fit_one_step(module, batch, tmp_path)
    assert int(module.nonfinite_steps) == 1
    assert "training diverged: 1 of 1 steps had a non-finite loss" in caplog.text
