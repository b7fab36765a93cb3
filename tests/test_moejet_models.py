"""The registered MoE ViTs: registry, sizes (paper Table 4), create_model kwargs, timm ViT features, bad input."""
import pytest
import timm
import torch

import timm_moejet  # noqa: F401  (registers the models)
from timm_moejet.layers import SpheroMoE
from timm_moejet.models import MoEVisionTransformer


def _params_m(name: str, **kwargs) -> float:
    model = timm.create_model(name, device='meta', **kwargs)
    return round(sum(p.numel() for p in model.parameters()) / 1e6, 1)


def test_registry():
    names = timm.list_models('moejet*')
    for name in ('moejet_vit_tiny_patch16_224', 'moejet_vit_tiny', 'moejet_vit_small_patch16_224', 'moejet_vit_small'):
        assert name in names
    assert 'softmoe_vit_tiny_patch16_224' in timm.list_models('softmoe*')
    # one timm module per family, each registered once
    for module in ('moejet_vit', 'moejet_convnext', 'moejet_mixer'):
        assert timm.list_modules().count(module) == 1
    assert timm.list_models(module='moejet_mixer') == ['moejet_mixer_b16_224', 'moejet_mixer_test']


@pytest.mark.parametrize('name, expected', [
    ('moejet_vit_tiny', 265.4),
    ('moejet_vit_tiny_patch16_224', 265.4),
    ('moejet_vit_small', 1058.1),
    ('softmoe_vit_tiny_patch16_224', 353.9),
])
def test_parameter_counts_match_paper_table_4(name, expected):
    assert _params_m(name) == expected


@pytest.mark.parametrize('moe_blocks, num_core, num_univ, expected', [
    ((10, 11), 98, 196, 92.3),  # 11:12
    ((8, 9, 10, 11), 98, 196, 178.8),  # 9:12
    (tuple(range(4, 12)), 98, 196, 352.0),  # 5:12
    (tuple(range(6, 12)), 32, 64, 89.3),
    (tuple(range(6, 12)), 64, 128, 174.7),
])
def test_ablation_sizes_of_table_4(moe_blocks, num_core, num_univ, expected):
    kwargs = dict(moe_blocks=moe_blocks, num_core_experts=num_core, num_univ_experts=num_univ)
    assert _params_m('moejet_vit_tiny', **kwargs) == expected


def test_default_layout_of_moejet_vit_tiny():
    model = timm.create_model('moejet_vit_tiny', device='meta')
    assert isinstance(model, MoEVisionTransformer) and model.global_pool == 'avg'
    moe = model.moe_layers()
    assert sorted(moe) == list(range(6, 12))
    assert all(not isinstance(model.blocks[i].mlp, SpheroMoE) for i in range(6))
    layer = moe[6]
    assert (layer.num_core, layer.num_univ, layer.num_slots) == (98, 196, 294)
    assert (layer.core.hidden_features, layer.univ.hidden_features) == (768, 192)
    assert layer.router.noise_std == pytest.approx(1 / 294) and layer.router.combine == 'entmax15'
    assert layer.core.drop1.p == 0.4
    # MoE drop path ramps linearly to 0.1 over depth, as released: linspace(0, 0.1, 12)[i]
    for i in range(6, 12):
        assert model.blocks[i].mlp.drop_path.drop_prob == pytest.approx(0.1 * i / 11)
    sd = model.state_dict()
    assert 'fc_norm.weight' in sd and 'norm.weight' not in sd
    assert sd['blocks.6.mlp.core.fc1.weight'].shape == (98, 768, 192)
    assert sd['blocks.6.mlp.univ.fc2.weight'].shape == (196, 192, 192)
    assert sd['blocks.6.mlp.router.slot_queries'].shape == (294, 192)


def test_create_model_kwargs_reach_the_layers():
    model = timm.create_model(
        'moejet_vit_test', moe_blocks=[1, 3], num_core_experts=2, num_univ_experts=3, core_hidden=40,
        univ_hidden=9, slots_per_expert=2, moe_combine='softmax', moe_temperature_init=0.7, moe_noise_std=0.,
        moe_expert_drop=0.1, moe_drop_path_rate=0.2, moe_shared_temperature=True, moe_slot_norm=False)
    assert sorted(model.moe_layers()) == [1, 3]
    layer = model.blocks[3].mlp
    assert (layer.num_core, layer.num_univ, layer.num_slots) == (2, 3, 10)
    assert (layer.core.hidden_features, layer.univ.hidden_features) == (40, 9)
    assert layer.router.combine == 'softmax' and layer.router.noise_std == 0.
    temperature = layer.router.log_temperature
    assert temperature.shape == (1,) and torch.allclose(temperature.exp(), torch.tensor(0.7))
    assert layer.core.drop1.p == 0.1 and layer.drop_path.drop_prob == pytest.approx(0.2)
    assert not isinstance(model.blocks[2].mlp, SpheroMoE)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 1000)


def test_timm_vit_features_keep_working():
    torch.manual_seed(0)
    model = timm.create_model('moejet_vit_test', num_classes=7).eval()
    x = torch.randn(2, 3, 64, 64)
    out = model(x)
    assert out.shape == (2, 7)
    feats = model.forward_features(x)
    assert feats.shape == (2, 17, 64)
    torch.testing.assert_close(model.forward_head(feats), out)
    final, inters = model.forward_intermediates(x, indices=2)
    assert len(inters) == 2 and inters[-1].shape == (2, 64, 4, 4)
    model.set_grad_checkpointing(True)
    torch.testing.assert_close(model(x), out, rtol=0, atol=1e-6)
    model.reset_classifier(3)
    assert model(x).shape == (2, 3)
    fmodel = timm.create_model('moejet_vit_test', features_only=True)
    assert [f.shape for f in fmodel(x)] == [(2, 64, 4, 4)] * 3
    dyn = timm.create_model('moejet_vit_test', dynamic_img_size=True).eval()
    assert dyn(torch.randn(1, 3, 96, 80)).shape == (1, 1000)
    big = timm.create_model('moejet_vit_test', img_size=96)
    assert big.pos_embed.shape == (1, 37, 64)


def test_soft_moe_variant():
    model = timm.create_model('softmoe_vit_test')
    layer = model.blocks[3].mlp
    assert layer.univ is None and layer.router.combine == 'softmax' and layer.router.log_temperature.numel() == 1


@pytest.mark.parametrize('name', ['softmoe_vit_test', 'softmoe_vit_tiny_patch16_224'])
def test_soft_moe_models_take_the_callers_settings(name):
    """Settings the Soft MoE entrypoints fix (experts, combine) can still be given: the caller's win."""
    model = timm.create_model(name, num_core_experts=6, moe_combine='entmax15', device='meta')
    layer = model.blocks[model.moe_blocks[0]].mlp
    assert layer.core.num_experts == 6 and layer.router.combine == 'entmax15'


@pytest.mark.parametrize('name', ['moejet_vit_test', 'moejet_convnext_test', 'moejet_mixer_test'])
def test_deprecated_layer_names_are_refused_by_create_model(name):
    """The layer's old short names (num_core ...) are not create_model kwargs: named, with the setting to give, even
    next to the current name (which would make one setting given twice)."""
    from timm_moejet.errors import InvalidArgument

    for kwargs in (dict(num_core=4, num_core_experts=8), dict(num_core=4), dict(expert_drop=0.1)):
        old = next(iter(kwargs))
        with pytest.raises(InvalidArgument, match=f"^{old} is the SpheroMoE layer's deprecated name of "):
            timm.create_model(name, **kwargs)


@pytest.mark.parametrize('kwargs, exc, match', [
    (dict(num_core_experts=0, num_univ_experts=0), ValueError, 'at least one expert.*num_core_experts'),
    (dict(moe_blocks=(2, 4)), ValueError, r'moe_blocks \[4\] are outside the model depth; allowed block indices '
                                          r'are 0\.\.3'),
    (dict(moe_blocks=(-1,)), ValueError, 'outside the model depth'),
    (dict(embed_dim=65), ValueError, r'embed_dim \(65\) must be divisible by num_heads \(2\)'),
    (dict(core_hidden=0), ValueError, 'core_hidden must be an int >= 1'),
    (dict(univ_hidden=0), ValueError, 'univ_hidden must be an int >= 1'),
    (dict(moe_combine='top2'), ValueError, r"moe_combine must be one of entmax15, softmax; got 'top2'"),
    (dict(not_a_kwarg=1), TypeError, 'not_a_kwarg'),
])
def test_bad_construction_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        timm.create_model('moejet_vit_test', **kwargs)


@pytest.mark.parametrize('kwargs, match', [
    (dict(moe_blocks=2), r'moe_blocks must be a list of ints \(block indices\), got 2 \(int\)'),
    (dict(num_core_experts='4'), r"num_core_experts must be an int >= 0, got '4' \(str\)"),
    (dict(moe_drop_path_rate=2), r'moe_drop_path_rate must be a number in \[0, 1\), got 2\.'),
    (dict(num_classes=-5), r'num_classes must be an int >= 0, got -5'),
])
def test_bad_model_kwargs_are_named_with_the_value_given(kwargs, match):
    with pytest.raises(ValueError, match=match):
        timm.create_model('moejet_vit_test', **kwargs)
