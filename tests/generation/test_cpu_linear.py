"""`skinny_cpu_linear`: same results as nn.Linear, scoped to one model, restored on exit, used by fused decoding."""

import pytest
import torch
import torch.nn as nn
from testing_utils import make_model, run_processor

from transformers_spring.generation import FusedDualPathDecoder, skinny_cpu_linear


@pytest.mark.parametrize("shape", [(1, 1, 16), (2, 1, 16), (3, 16), (2, 4, 16), (9, 16), (1, 40, 16)])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_linear(shape, bias):
    torch.manual_seed(0)
    layer = nn.Linear(16, 24, bias=bias)
    x = torch.randn(*shape)
    expected = layer(x)
    with skinny_cpu_linear(layer, max_rows=8) as switched:
        assert switched == 1
        got = layer(x)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    rows = x.numel() // x.shape[-1]
    if not 1 < rows <= 8:
        assert torch.equal(got, expected)  # one row and prefill-sized inputs keep the default kernel exactly


def test_restores_forward_and_skips_other_modules():
    model = make_model("llama")
    other = nn.Linear(4, 4)
    hooked = nn.Linear(4, 4)
    hooked.forward = lambda x: x  # e.g. accelerate's offload hook: must not be replaced
    model.add_module("extra_hooked", hooked)
    half = nn.Linear(4, 4).to(torch.bfloat16)
    model.add_module("extra_half", half)
    linears = [m for m in model.modules() if type(m) is nn.Linear]
    with skinny_cpu_linear(model) as switched:
        assert switched == len(linears) - 2
        assert "forward" not in other.__dict__ and "forward" not in half.__dict__
        assert hooked.forward(torch.ones(1)) is not None and "spring_skinny" not in vars(hooked.forward)
    assert all("forward" not in m.__dict__ for m in linears if m is not hooked)
    assert "forward" in hooked.__dict__


def test_restored_after_an_exception():
    layer = nn.Linear(4, 4)
    with pytest.raises(RuntimeError), skinny_cpu_linear(layer):
        raise RuntimeError("boom")
    assert "forward" not in layer.__dict__


def test_rejects_bad_max_rows():
    with pytest.raises(ValueError, match="max_rows"):
        with skinny_cpu_linear(nn.Linear(2, 2), max_rows=1):
            pass


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_fused_tokens_same_with_and_without(arch, monkeypatch):
    model = make_model(arch)
    with_skinny, _, _ = run_processor(model, 0.5, penalty=1.2, fused=True)
    original = FusedDualPathDecoder.__init__

    def without(self, *args, **kwargs):
        original(self, *args, **{**kwargs, "skinny_cpu_linear": False})

    monkeypatch.setattr(FusedDualPathDecoder, "__init__", without)
    plain_kernel, _, _ = run_processor(model, 0.5, penalty=1.2, fused=True)
    assert torch.equal(with_skinny, plain_kernel)
    assert all("forward" not in m.__dict__ for m in model.modules())
