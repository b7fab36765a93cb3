""" Any dense timm ViT into a MoE Jetpack model (create_moejet_from and moejet_vit_base), offline.

Each family's donor is a random-weight checkpoint in the real key layout of a real timm model name, in a local Hub
cache. For each: the MoE model is built from the donor's own timm config, every trunk tensor equals the donor's,
every expert is a sub-block of the mapped donor block's MLP, the same seed gives bit-identical weights, the dense
blocks compute what the donor's compute, the forward is finite and features_only / forward_intermediates work.
"""
import pytest
import timm
import torch
from hub_cache import DenseDonor, build_hub_cache, dense_vit_state_dict, use_offline_hub

import timm_moejet  # noqa: F401
from timm_moejet import create_moejet_from
from timm_moejet.errors import DonorMismatch
from timm_moejet.recycling import RecyclingRecipe, recycle_state_dict

SMALL_MOE = dict(num_core_experts=3, num_univ_experts=5)

# name -> (donor spec, kwargs of create_moejet_from: depth reductions keep the ViT-B/L donors small)
FAMILIES = {
    'deit3': (DenseDonor('deit3_small_patch16_224', seed=1), dict()),
    'dinov2_reg': (DenseDonor('vit_small_patch14_reg4_dinov2', seed=2), dict()),
    'clip': (DenseDonor('vit_base_patch16_clip_224', depth=4, seed=3), dict(depth=4)),
    'siglip': (DenseDonor('vit_base_patch16_siglip_224', depth=4, seed=4), dict(depth=4)),
}
REPOS = {
    'deit3': 'deit3_small_patch16_224.fb_in22k_ft_in1k',
    'dinov2_reg': 'vit_small_patch14_reg4_dinov2.lvd142m',
    'clip': 'vit_base_patch16_clip_224.openai',
    'siglip': 'vit_base_patch16_siglip_224.webli',
}


def _hub_id(name: str) -> str:
    return timm.models.get_pretrained_cfg(name).hf_hub_id


@pytest.fixture(scope='module')
def cache(tmp_path_factory):
    repos = {_hub_id(REPOS[k]): donor for k, (donor, _) in FAMILIES.items()}
    repos['timm/vit_base_patch16_224.augreg_in21k'] = DenseDonor('vit_base_patch16_224', depth=4, seed=5)
    repos['timm/vit_large_patch16_224.augreg_in21k'] = DenseDonor('vit_large_patch16_224', depth=8, seed=6)
    return build_hub_cache(tmp_path_factory.mktemp('any_vit'), repos)


def _check_recycled(model, trunk, experts, expert_blocks, recipe):
    """Every trunk tensor is the trunk donor's; every expert is W1[h][:, c] / W2[c][:, h] of the mapped donor block,
    with h and c the indices the recycling reports for the same recipe (sorted and unique per expert)."""
    sd = model.state_dict()
    moe = tuple(f'blocks.{i}.mlp.' for i in model.moe_blocks)
    for key, value in sd.items():
        if not key.startswith(('head.', 'fc_norm.') + moe):
            assert torch.equal(value, trunk[key]), f'{key} differs from the trunk donor'
    out, indices, _ = recycle_state_dict(model, trunk, None if experts is trunk else experts, recipe)
    for key in sd:
        if key.startswith(moe) and ('.core.' in key or '.univ.' in key):
            assert torch.equal(sd[key], out[key]), f'{key} is not what the recipe gives'
    for i in model.moe_blocks:
        j = expert_blocks[i]
        w1, w2 = experts[f'blocks.{j}.mlp.fc1.weight'], experts[f'blocks.{j}.mlp.fc2.weight']
        for group, (h, c) in indices[i].items():
            for rows in (h, c):
                assert bool((rows[:, 1:] > rows[:, :-1]).all()), 'indices must be sorted and unique per expert'
            p = f'blocks.{i}.mlp.{group}.'
            assert torch.equal(sd[p + 'fc1.weight'], w1[h[:, :, None], c[:, None, :]])
            assert torch.equal(sd[p + 'fc2.weight'], w2[c[:, :, None], h[:, None, :]])
            assert torch.equal(sd[p + 'fc1.bias'], experts[f'blocks.{j}.mlp.fc1.bias'][h])


@pytest.mark.parametrize('family', FAMILIES)
def test_family_recycles_from_its_own_config(family, cache, monkeypatch):
    use_offline_hub(monkeypatch, cache)
    donor_spec, kwargs = FAMILIES[family]
    name = REPOS[family]
    trunk = dense_vit_state_dict(donor_spec)
    model = create_moejet_from(name, **kwargs, **SMALL_MOE, recycle_seed=7)
    reference = timm.create_model(name.split('.')[0], **kwargs).eval()
    # the architecture is the donor's
    for attr in ('num_prefix_tokens', 'num_reg_tokens', 'no_embed_class', 'global_pool', 'embed_dim'):
        assert getattr(model, attr) == getattr(reference, attr), attr
    assert model.patch_embed.patch_size == reference.patch_embed.patch_size
    assert type(model.blocks[0].ls1) is type(reference.blocks[0].ls1)
    assert model.blocks[0].norm1.eps == reference.blocks[0].norm1.eps
    depth = len(model.blocks)
    assert model.moe_blocks == tuple(range(depth // 2, depth))
    _check_recycled(model, trunk, trunk, {i: i for i in model.moe_blocks}, RecyclingRecipe(seed=7))
    # the dense blocks compute what the donor's compute (activation, norms, layer scale carried over)
    reference.load_state_dict({k: v for k, v in trunk.items() if not k.startswith('head.')}, strict=False)
    model.eval()
    tokens = torch.randn(2, model.patch_embed.num_patches + model.num_prefix_tokens, model.embed_dim)
    with torch.no_grad():
        torch.testing.assert_close(model.blocks[0](tokens), reference.blocks[0](tokens), rtol=0, atol=1e-6)
    # same seed, same weights
    again = create_moejet_from(name, **kwargs, **SMALL_MOE, recycle_seed=7)
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in model.state_dict().items()
               if not k.startswith('head.') and not k.endswith('slot_queries'))
    # forward, features, intermediates
    x = torch.randn(1, *model.pretrained_cfg['input_size'])
    with torch.no_grad():
        assert torch.isfinite(model(x)).all()
        final, inters = model.forward_intermediates(x, indices=2)
    assert len(inters) == 2 and torch.isfinite(final).all()
    features = create_moejet_from(name, pretrained=False, **kwargs, **SMALL_MOE, features_only=True)
    assert len(features(x)) == 3


def test_vit_base_recycles_experts_from_a_deeper_wider_donor(cache, monkeypatch):
    """moejet_vit_base: trunk ViT-B, experts ViT-L (here 4 and 8 blocks): MoE block i takes ViT-L block
    round(linspace(0, 7, 4))[i] and the channels are cut from 1024 to 768; the mapping is recorded."""
    use_offline_hub(monkeypatch, cache)
    model = timm.create_model('moejet_vit_base', pretrained=True, depth=4, moe_blocks=(2, 3), **SMALL_MOE)
    trunk = dense_vit_state_dict(DenseDonor('vit_base_patch16_224', depth=4, seed=5))
    experts = dense_vit_state_dict(DenseDonor('vit_large_patch16_224', depth=8, seed=6))
    _check_recycled(model, trunk, experts, {2: 5, 3: 7}, RecyclingRecipe())
    record = model.pretrained_cfg['recycling']
    assert record['expert_blocks'] == {'2': 5, '3': 7} and record['block_map'] == 'even'
    assert record['experts'] == 'timm/vit_large_patch16_224.augreg_in21k'
    first = timm.create_model('moejet_vit_base', pretrained=True, depth=4, moe_blocks=(2, 3), **SMALL_MOE,
                              recycle_block_map='first')
    _check_recycled(first, trunk, experts, {2: 2, 3: 3}, RecyclingRecipe(block_map='first'))


def test_vit_base_size_and_cost():
    from timm_moejet.cost import count_macs, count_params

    model = timm.create_model('moejet_vit_base', device='meta')
    layer = model.blocks[6].mlp
    assert (layer.num_core, layer.num_univ) == (98, 196)
    assert (layer.core.hidden_features, layer.univ.hidden_features) == (3072, 768)
    assert round(count_params(model)['total'] / 1e6, 1) == 4225.5
    assert round(count_macs(model)['gmacs'], 2) == 16.95


def test_defaults_scale_with_the_donor_tokens():
    from timm_moejet.build import moejet_vit_kwargs

    args, _ = moejet_vit_kwargs('vit_small_patch14_reg4_dinov2.lvd142m')
    assert (args['num_core_experts'], args['num_univ_experts']) == (37 * 37 // 2, 37 * 37)
    # at another input size the counts follow its tokens (16 x 16 patches of 14 px at 224)
    args, _ = moejet_vit_kwargs('vit_small_patch14_reg4_dinov2.lvd142m', img_size=224)
    assert (args['num_core_experts'], args['num_univ_experts']) == (128, 256)
    args, _ = moejet_vit_kwargs('vit_small_patch14_reg4_dinov2.lvd142m', img_size=(224, 112))
    assert (args['num_core_experts'], args['num_univ_experts']) == (64, 128)
    args, _ = moejet_vit_kwargs('vit_base_patch16_224.augreg_in21k')
    assert (args['num_core_experts'], args['num_univ_experts']) == (98, 196)


@pytest.mark.parametrize('name, says', [
    ('eva02_small_patch14_224.mim_in22k', 'is a timm.models.eva.Eva, not a timm VisionTransformer'),
    ('vit_giant_patch14_dinov2.lvd142m', 'blocks.0.mlp is a GluMlp'),
    ('convnext_tiny.fb_in22k', 'not a timm VisionTransformer'),
])
def test_unsupported_donors_are_refused_before_any_weight_is_fetched(name, says, tmp_path, monkeypatch):
    use_offline_hub(monkeypatch, tmp_path / 'empty')  # nothing cached: a fetch would fail with NotFound instead
    with pytest.raises(DonorMismatch, match=says) as info:
        create_moejet_from(name)
    assert name in str(info.value)
    with pytest.raises(DonorMismatch, match=says):
        create_moejet_from('vit_base_patch16_224.augreg_in21k', experts=name)


def test_export_round_trip_and_command_line(cache, monkeypatch, tmp_path, capsys):
    """A model made from a DINOv2 donor exports to a Hub folder that timm rebuilds alone; the command line recycles
    it without --model (the trunk's own architecture)."""
    from timm_moejet.checkpoint_io.hub import save_hub_folder
    from weights_tools.cli import main

    use_offline_hub(monkeypatch, cache)
    name = REPOS['dinov2_reg']
    model = create_moejet_from(name, **SMALL_MOE, num_classes=4)
    save_hub_folder(model, tmp_path / 'moe')
    loaded = timm.create_model(f'local-dir:{tmp_path / "moe"}', pretrained=True)
    assert loaded.num_reg_tokens == 4 and loaded.patch_embed.patch_size == (14, 14)
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())
    assert main(['recycle', '--trunk', name, '--model-kwargs', 'num_core_experts=3', 'num_univ_experts=5',
                 '--output', str(tmp_path / 'cli')]) == 0, capsys.readouterr().err
    cli = timm.create_model(f'local-dir:{tmp_path / "cli"}', pretrained=True)
    assert cli.pretrained_cfg['architecture'] == 'moejet_vit' and cli.num_reg_tokens == 4
    assert cli.moe_blocks == tuple(range(6, 12)) and cli.blocks[6].mlp.num_core == 3
