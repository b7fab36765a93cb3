""" The router as a module of its own: its tensors under the names MOE_KEYS gives, and checkpoints that name them as
the layer did before (``blocks.6.mlp.slot_queries``) loading bit for bit. """
import pytest
import timm
import torch

import timm_moejet  # noqa: F401  (registers the models)
from timm_moejet.checkpoint_io.read import check_state_dict_fits
from timm_moejet.errors import InvalidCheckpoint
from timm_moejet.layers import SpheroMoE, SpheroRouter
from timm_moejet.moe_keys import LEGACY_ROUTER_KEYS, MOE_KEYS, current_key_names, is_moe_state_dict


def _legacy(state_dict):
    """The state dict as the layer named its router tensors before the router was a module."""
    old = {new: old for old, new in LEGACY_ROUTER_KEYS.items()}
    out = {}
    for key, value in state_dict.items():
        for new in old:
            if key.endswith('.' + new) or key == new:
                key = key[:len(key) - len(new)] + old[new]
                break
        out[key] = value
    return out


def test_the_router_holds_its_tensors_under_the_moe_keys_names():
    layer = SpheroMoE(16, num_core_experts=2, num_univ_experts=3)
    assert isinstance(layer.router, SpheroRouter)
    router_keys = {k for k in layer.state_dict() if not k.startswith(MOE_KEYS.groups)}
    assert router_keys == {MOE_KEYS.slot_queries, MOE_KEYS.temperature, f'{MOE_KEYS.slot_norm}.weight',
                           f'{MOE_KEYS.slot_norm}.bias'}
    assert dict(layer.named_parameters())[MOE_KEYS.slot_queries] is layer.router.slot_queries


def test_a_checkpoint_with_the_old_router_names_loads_bit_for_bit():
    torch.manual_seed(0)
    source = timm.create_model('moejet_vit_test', num_classes=5)
    sd = source.state_dict()
    old = _legacy(sd)
    assert 'blocks.3.mlp.slot_queries' in old and 'blocks.3.mlp.slot_norm.weight' in old \
        and 'blocks.3.mlp.log_temperature' in old and not any('.router.' in k for k in old)
    assert is_moe_state_dict(old) and current_key_names(old) == sd
    target = timm.create_model('moejet_vit_test', num_classes=5)
    check_state_dict_fits(old, target, 'old.safetensors')  # the fit check maps the old names too
    target.load_state_dict(old, strict=True)
    got = target.state_dict()
    assert all(torch.equal(got[k], v) for k, v in sd.items())


def test_a_layer_loads_its_own_old_names_and_the_fit_check_still_names_real_problems():
    torch.manual_seed(0)
    layer = SpheroMoE(16, num_core_experts=2, num_univ_experts=3)
    fresh = SpheroMoE(16, num_core_experts=2, num_univ_experts=3)
    fresh.load_state_dict(_legacy(layer.state_dict()), strict=True)
    assert torch.equal(fresh.router.slot_queries, layer.router.slot_queries)
    model = timm.create_model('moejet_vit_test')
    old = _legacy(model.state_dict())
    del old['blocks.3.mlp.log_temperature']
    with pytest.raises(InvalidCheckpoint, match=r"missing keys: \['blocks.3.mlp.router.log_temperature'\]"):
        check_state_dict_fits(old, model, 'old.safetensors')
