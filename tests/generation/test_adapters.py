"""`AdapterRouter`: resolving a user to their LoRA adapter, per-row routing of one batched forward, overriding the
names between forwards, and the errors for unknown adapters and nested activation."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from testing_utils import make_model

from transformers_spring.generation import AdapterRouter
from transformers_spring.generation.adapters import (
    BASE_ADAPTER,
    activate_adapters,
    override_adapters,
    sanitize_adapter_name,
)

IDS = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12], [13, 14, 15, 16]])


def lora(seed):
    torch.manual_seed(seed)
    return LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)


@pytest.fixture(scope="module")
def peft_model():
    """A tiny Llama with three random (non-zero) adapters, one of them named after a sanitised user id."""
    model = get_peft_model(make_model("llama"), lora(0), adapter_name="alice")
    model.add_adapter("bob", lora(1))
    model.add_adapter("Ron_Dicker", lora(2))
    return model.eval()


def logits_with(model, name, ids):
    """Logits of `ids` with adapter `name` alone (the base model for `BASE_ADAPTER`)."""
    if name == BASE_ADAPTER:
        with model.disable_adapter():
            return model(input_ids=ids).logits
    model.set_adapter(name)
    return model(input_ids=ids).logits


def test_sanitize_adapter_name():
    assert sanitize_adapter_name("Ron Dicker") == "Ron_Dicker"
    assert sanitize_adapter_name("a.b/c:d") == "a_b_c_d"
    assert sanitize_adapter_name("ok-name_42") == "ok-name_42"
    assert sanitize_adapter_name("José") == "Jos_"


def test_router_finds_the_adapters(peft_model):
    router = AdapterRouter(peft_model)
    assert router.has_adapters and router.adapters == {"alice", "bob", "Ron_Dicker"}
    assert len(router.layers) == 4  # q_proj and v_proj of 2 layers
    assert not AdapterRouter(make_model("llama")).has_adapters


def test_resolve(peft_model):
    router = AdapterRouter(peft_model)
    assert router.resolve("alice") == "alice"
    assert router.resolve("Ron Dicker") == "Ron_Dicker"  # the sanitised name is tried too
    assert router.resolve("carol") == BASE_ADAPTER  # no adapter: the base model
    assert router.resolve(None) == BASE_ADAPTER
    assert router.resolve("alice", template="user-{user_id}") == BASE_ADAPTER
    assert router.resolve("ice", template="al{user_id}") == "alice"


def test_activate_routes_each_row_to_its_adapter(peft_model):
    router = AdapterRouter(peft_model)
    names = ["bob", BASE_ADAPTER, "alice"]
    with torch.no_grad():
        expected = torch.cat([logits_with(peft_model, name, IDS[i : i + 1]) for i, name in enumerate(names)])
        peft_model.set_adapter("alice")
        with router.activate(names) as active:
            assert active is router and router.names == names
            routed = peft_model(input_ids=IDS).logits
        unrouted = peft_model(input_ids=IDS).logits
    torch.testing.assert_close(routed, expected)
    assert router.names is None
    torch.testing.assert_close(unrouted, logits_with(peft_model, "alice", IDS).detach())  # hooks removed


def test_override_changes_the_names_inside_the_block(peft_model):
    router = AdapterRouter(peft_model)
    with torch.no_grad():
        expected = logits_with(peft_model, "bob", IDS[:1])
        with router.activate(["alice", "bob", "alice"]):
            with router.override(["bob"]):
                assert router.names == ["bob"]
                one_row = peft_model(input_ids=IDS[:1]).logits  # e.g. the history path of row 1 only
            assert router.names == ["alice", "bob", "alice"]
            with router.override(None):
                assert router.names == ["alice", "bob", "alice"]
    torch.testing.assert_close(one_row, expected)
    with router.override(["bob"]):  # not active: a no-op
        assert router.names is None


def test_activate_rejects_unknown_adapters_and_nesting(peft_model):
    router = AdapterRouter(peft_model)
    with pytest.raises(ValueError, match=r"unknown adapter\(s\) \['carol'\]"):
        with router.activate(["alice", "carol"]):
            pass
    assert router.names is None
    with router.activate(["alice"]):  # the failed activation left no hooks behind
        with pytest.raises(RuntimeError, match="re-entrant"):
            with router.activate(["bob"]):
                pass
    with router.activate([BASE_ADAPTER, BASE_ADAPTER]):  # the base placeholder is always known
        assert router.names == [BASE_ADAPTER, BASE_ADAPTER]


def test_helpers_are_no_ops_without_a_router(peft_model):
    with activate_adapters(None, ["alice"]), override_adapters(None, ["bob"]):
        pass
    router = AdapterRouter(peft_model)
    with activate_adapters(router, None):
        assert router.names is None
    with activate_adapters(router, ["alice"]), override_adapters(router, ["bob"]):
        assert router.names == ["bob"]
    assert router.names is None
