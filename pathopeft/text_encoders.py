"""Text encoders for task descriptions: a sentence in, an L2-normalised vector out, offline.

Why: generating an adapter from a task description (:mod:`pathopeft.adapters.lora_generation`) needs the
description and every library task's description in one embedding space. Nothing can be downloaded from a
model hub at run time, so an encoder here must ship its weights with its package. WordLlama (MIT; the
``l2_supercat`` 256-d token embeddings and tokenizer are inside its PyPI wheel) is the default: it loads in
0.1 s on a CPU and needs no torch model. Its own loader looks for the bundled tokenizer in the wrong folder and
then tries Hugging Face; pointing its cache at the package folder and disabling downloads makes it read the
bundled files, and nothing else.

A plugin kind: ``@TEXT_ENCODERS.register("name")`` on a zero-argument factory returning a :class:`TextEncoder`.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from pathopeft.errors import UserError
from pathopeft.registry import Registry


class TextEncoder(Protocol):
    """What a text encoder gives: its name, its dimension and unit-norm embeddings (n × dim, float32)."""

    name: str
    dim: int

    def embed(self, texts: Sequence[str]) -> torch.Tensor: ...


#: Text encoders by name (a plugin kind).
TEXT_ENCODERS: Registry = Registry("text encoder")


class WordLlamaEncoder:
    """WordLlama ``l2_supercat`` at 256 d, read from the files inside the installed wheel (never downloaded)."""

    name = "wordllama"
    dim = 256

    def __init__(self) -> None:
        try:
            import wordllama
            from wordllama import WordLlama
        except ImportError as e:
            raise UserError(
                f"text encoder 'wordllama' needs the wordllama package (pip install wordllama): {e}"
            ) from e
        package = Path(wordllama.__file__).parent
        try:
            self._model = WordLlama.load(config="l2_supercat", dim=self.dim, cache_dir=package, disable_download=True)
        except FileNotFoundError as e:
            raise UserError(f"{package}: the wordllama wheel lacks its bundled weights or tokenizer ({e})") from e

    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        texts = list(texts)
        empty = [i for i, t in enumerate(texts) if not str(t).strip()]
        if empty:
            raise UserError(f"text encoder: description {empty[0]} is empty; describe the task in words")
        vectors = np.asarray(self._model.embed(texts, norm=False), dtype=np.float32)
        return torch.nn.functional.normalize(torch.from_numpy(vectors), dim=1)


TEXT_ENCODERS.add("wordllama", WordLlamaEncoder)


@lru_cache(maxsize=4)
def text_encoder(name: str = "wordllama") -> TextEncoder:
    """The registered text encoder ``name``, built once per process."""
    return TEXT_ENCODERS.get(name)()


__all__ = ["TEXT_ENCODERS", "TextEncoder", "WordLlamaEncoder", "text_encoder"]
