import numpy as np
import pytest

from transformers_spring.memory import CallableEncoder, HashingEncoder, resolve_encoder


def test_hashing_encoder_is_deterministic_and_normalised():
    enc = HashingEncoder(32)
    a, b = enc.encode(["the cat sat", "the cat sat"]), HashingEncoder(32).encode(["the cat sat", "x"])
    assert np.array_equal(a[0], b[0]) and np.allclose(np.linalg.norm(a, axis=1), 1.0)


def test_resolve_variants():
    assert resolve_encoder("hashing:16").dim == 16
    enc = resolve_encoder(lambda texts: np.ones((len(texts), 5)))
    assert isinstance(enc, CallableEncoder) and enc.dim == 5
    with pytest.raises(TypeError, match="encoder"):
        resolve_encoder(42)


def test_callable_encoder_output_is_checked():
    with pytest.raises(ValueError, match="NaN"):
        CallableEncoder(lambda t: np.full((len(t), 3), np.nan)).encode(["a"])
    with pytest.raises(ValueError, match="2 texts"):
        CallableEncoder(lambda t: np.ones((1, 3))).encode(["a", "b"])
