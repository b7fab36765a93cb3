""" Model families: the ViT, ConvNeXt and MLP-Mixer each in one module, asked through one interface.

The MLP-Mixer family (M-JetMoE) is the proof that a family is one module and one registration: its models build,
recycle on load and on the command line from small random donors (every strategy), take Weight Selection, give
statistics and router diagnostics, shard with FSDP2 and train with timm's layer decay. Selection indices are
recomputed here independently, as in the ConvNeXt tests.
"""
import json

import pytest
import timm
import torch
from hub_cache import DenseDonor, build_hub_cache, dense_vit_state_dict, use_offline_hub
from safetensors.torch import save_file
from timm.models.mlp_mixer import MlpMixer

from timm_moejet.errors import DonorMismatch
from timm_moejet.family import FAMILIES, Family, family_of_model, family_of_state_dict
from timm_moejet.models import MoEConvNeXt, MoEMlpMixer, MoEVisionTransformer
from timm_moejet.recycling import RecyclingRecipe, recycle_state_dict
from weights_tools.cli import main

B16, L16 = 'timm/mixer_b16_224.goog_in21k', 'timm/mixer_l16_224.goog_in21k'
SMALL = dict(num_blocks=4, embed_dim=64, img_size=64)  # 16 tokens of 16 px; token MLP 32, channel MLP 256
MIXER = 'timm.models.mlp_mixer.MlpMixer'  # timm's Mixer entrypoints fix depth and width: reduced donors by class
TRUNK = DenseDonor('mixer_b16_224', seed=21, num_classes=10, model_kwargs=SMALL, model_class=MIXER)
WIDE = DenseDonor('mixer_l16_224', seed=22, num_classes=10, model_kwargs=dict(SMALL, num_blocks=8, embed_dim=128),
                  model_class=MIXER)
EXPERTS = dict(num_core_experts=3, num_univ_experts=5)


@pytest.fixture(scope='module')
def mixer_donors(tmp_path_factory):
    """The reduced Mixer-B/16 and Mixer-L/16 donors in an offline Hub cache, and as weights files."""
    root = tmp_path_factory.mktemp('mixer')
    build_hub_cache(root / 'hub', {B16: TRUNK, L16: WIDE})
    trunk, wide = dense_vit_state_dict(TRUNK), dense_vit_state_dict(WIDE)
    save_file(trunk, str(root / 'trunk.safetensors'))
    save_file(wide, str(root / 'wide.safetensors'))
    return root, trunk, wide


def test_every_family_is_one_registered_module_with_its_model_class():
    assert list(FAMILIES) == ['vit', 'convnext', 'mixer']
    for cls, name in ((MoEVisionTransformer, 'vit'), (MoEConvNeXt, 'convnext'), (MoEMlpMixer, 'mixer')):
        assert cls.family is FAMILIES[name] and isinstance(cls.family, Family)
        # the family's models are registered from the family's module, with a reduced test variant, and its
        # pretrained tags' recipes are of those models
        module = cls.__module__.rsplit('.', 1)[-1]
        models = timm.list_models(module=module)
        assert timm.list_modules().count(module) == 1 and any(n.endswith('_test') for n in models)
        assert cls.family.recipes and {tag.split('.')[0] for tag in cls.family.recipes} <= set(models)
    assert family_of_model(timm.create_model('moejet_mixer_test')) is FAMILIES['mixer']
    assert family_of_model(timm.create_model('mixer_s16_224', device='meta')) is None  # dense: no MoE family


def test_mixer_layout_and_expert_counts():
    model = timm.create_model('moejet_mixer_b16_224', device='meta')
    layers = model.moe_layers()
    assert sorted(layers) == list(range(6, 12))  # the second half
    for layer in layers.values():  # 196 tokens: the paper's 98 core and 196 universal experts
        assert (layer.num_core, layer.num_univ, layer.dim) == (98, 196, 768)
        assert (layer.core.hidden_features, layer.univ.hidden_features) == (3072, 768)
    for i, block in enumerate(model.blocks):  # the token-mixing MLPs stay dense
        assert type(block.mlp_tokens).__name__ == 'Mlp'
        assert (type(block.mlp_channels).__name__ == 'SpheroMoE') == (i >= 6)
    small = timm.create_model('moejet_mixer_test').moe_layers()
    assert sorted(small) == [2, 3] and (small[2].num_core, small[2].num_univ) == (8, 16)  # 16 tokens
    given = timm.create_model('moejet_mixer_test', num_core_experts=3).moe_layers()[2]
    assert (given.num_core, given.num_univ) == (3, 6)


def test_mixer_recycled_on_load_from_the_tags_donors(mixer_donors, monkeypatch):
    root, trunk, wide = mixer_donors
    use_offline_hub(monkeypatch, root / 'hub')
    kwargs = dict(SMALL, num_classes=10, **EXPERTS)
    model = timm.create_model('moejet_mixer_b16_224', pretrained=True, **kwargs)
    sd = model.state_dict()
    moe = tuple(f'blocks.{i}.mlp_channels.' for i in (2, 3))
    checked = [k for k in sd if not k.startswith(('head.',) + moe)]
    assert all(torch.equal(sd[k], trunk[k]) for k in checked)  # the trunk, token MLPs of the MoE blocks too
    assert 'blocks.3.mlp_tokens.fc1.weight' in checked and 'norm.weight' in checked
    # experts: sub-blocks of the Mixer-L channel MLP of the evenly spaced block (8 blocks for 4: 0, 2, 5, 7)
    _, indices, record = recycle_state_dict(model, trunk, wide, RecyclingRecipe(experts=L16))
    for i, donor_block in ((2, 5), (3, 7)):
        p, q = f'blocks.{i}.mlp_channels.', f'blocks.{donor_block}.mlp_channels.'
        for group, (h, c) in indices[i].items():
            assert torch.equal(sd[f'{p}{group}.fc1.weight'], wide[q + 'fc1.weight'][h[:, :, None], c[:, None, :]])
            assert torch.equal(sd[f'{p}{group}.fc2.weight'], wide[q + 'fc2.weight'][c[:, :, None], h[:, None, :]])
            assert torch.equal(sd[f'{p}{group}.fc1.bias'], wide[q + 'fc1.bias'][h])
    assert record['expert_blocks'] == {'2': 5, '3': 7}
    recorded = model.pretrained_cfg['recycling']
    assert (recorded['trunk'], recorded['experts'], recorded['strategy']) == (B16, L16, 'importance')
    assert set(recorded['dropped']) == {f'blocks.{i}.mlp_channels.{n}' for i in (2, 3)
                                        for n in ('fc1.weight', 'fc1.bias', 'fc2.weight', 'fc2.bias')} | \
        {'head.weight', 'head.bias'}
    with torch.no_grad():
        assert torch.isfinite(model.eval()(torch.randn(2, 3, 64, 64))).all()


@pytest.mark.parametrize('strategy', ['importance', 'uniform', 'random', 'graph', 'upcycle'])
def test_mixer_recycled_on_the_command_line_with_every_strategy(mixer_donors, tmp_path, strategy):
    root, trunk, _ = mixer_donors
    experts = [] if strategy == 'upcycle' else ['--experts', str(root / 'wide.safetensors')]
    extra = ['--graph-method', 'spectral', '--graph-parts', '8'] if strategy == 'graph' else []
    out = tmp_path / 'moe'
    assert main(['recycle', '--model', 'moejet_mixer_test', '--trunk', str(root / 'trunk.safetensors'), *experts,
                 '--strategy', strategy, *extra, '--num-classes', '10', '--output', str(out)]) == 0
    model = timm.create_model(f'local-dir:{out}', pretrained=True).eval()
    assert isinstance(model, MoEMlpMixer)
    assert json.loads((out / 'config.json').read_text())['pretrained_cfg']['recycling']['strategy'] == strategy
    dense = MlpMixer(num_classes=10, **SMALL).eval()
    dense.load_state_dict(trunk)
    x = torch.randn(2, 16, 64)
    for i in (0, 1):  # the dense blocks are the trunk's exactly
        torch.testing.assert_close(model.blocks[i](x), dense.blocks[i](x), rtol=0, atol=0)


def test_mixer_refuses_donors_of_other_families_and_blocks(mixer_donors):
    model = timm.create_model('moejet_mixer_test', **EXPERTS)
    vit = dense_vit_state_dict(DenseDonor('vit_tiny_patch16_224', depth=4, model_kwargs=dict(embed_dim=64,
                                                                                             num_heads=2)))
    with pytest.raises(DonorMismatch, match='of family vit, the model MoEMlpMixer'):
        recycle_state_dict(model, vit, None, RecyclingRecipe(strategy='uniform'), trunk_id='a ViT')
    # ResMLP and gMLP live in timm's mlp_mixer.py too, with other blocks (affine norms, gated MLPs)
    for name in ('resmlp_12_224', 'gmlp_ti16_224'):
        sd = timm.create_model(name, img_size=64, device='meta').state_dict()
        with pytest.raises(DonorMismatch, match='not a dense checkpoint of a supported family.*timm MLP-Mixer'):
            family_of_state_dict({k: torch.zeros(v.shape) for k, v in sd.items()}, 'donor', name)


def test_weight_selection_of_a_dense_mixer(mixer_donors):
    from timm_moejet.recycling import select_state_dict

    _, _, wide = mixer_donors
    model = MlpMixer(num_classes=10, **SMALL)  # half the width, half the blocks of the wide donor
    dropped = {}
    sd = select_state_dict(model, wide, dropped=dropped)
    model.load_state_dict(sd, strict=True)
    assert torch.equal(sd['blocks.1.mlp_channels.fc1.weight'],  # block 1 of 4 is donor block 2 of 8; halved
                       wide['blocks.2.mlp_channels.fc1.weight'][::2, ::2])
    # the token MLP: as many tokens (16), half the hidden units (0.5 x width)
    assert torch.equal(sd['blocks.3.mlp_tokens.fc1.weight'], wide['blocks.7.mlp_tokens.fc1.weight'][::2])
    assert torch.equal(sd['stem.proj.weight'], wide['stem.proj.weight'][::2])
    assert 'blocks.1.norm1.weight' in dropped and 'not selected' in dropped['blocks.1.norm1.weight']


def test_mixer_statistics_diagnostics_and_cost(mixer_donors):
    from timm_moejet.cost import count_params
    from timm_moejet.diagnostics import router_diagnostics
    from timm_moejet.recycling import collect_statistics

    _, trunk, _ = mixer_donors
    dense = MlpMixer(num_classes=10, **SMALL)
    dense.load_state_dict(trunk)
    stats = collect_statistics(dense, [torch.randn(2, 3, 64, 64)], progress=False, blocks=[2, 3])
    assert stats.get(2, 'hidden', 'l2').shape == (256,) and stats.get(3, 'channel', 'l2').shape == (64,)
    assert stats.num_tokens == 2 * 16  # every token of every image, at the channel MLP
    model = timm.create_model('moejet_mixer_test', num_classes=10)
    diags = router_diagnostics(model, torch.randn(2, 3, 64, 64))
    assert [d.block for d in diags] == [2, 3] and all(d.num_tokens == 16 for d in diags)
    experts = sum(p.numel() for layer in model.moe_layers().values() for group in (layer.core, layer.univ)
                  for p in group.parameters())
    assert count_params(model)['experts'] == experts > 0


def test_mixer_trains_with_timm_layer_decay_features_and_checkpointing():
    from timm.optim import create_optimizer_v2

    from timm_moejet.training.sharding import fsdp_units

    model = timm.create_model('moejet_mixer_test', num_classes=10)
    optimizer = create_optimizer_v2(model, 'adamw', lr=1e-3, weight_decay=0.05, layer_decay=0.5)
    groups = {id(p): g['lr_scale'] for g in optimizer.param_groups for p in g['params']}
    named = dict(model.named_parameters())
    # the MoE layers and the norms feeding them at the full lr, the dense trunk decayed by depth
    assert groups[id(named['blocks.2.mlp_channels.router.slot_queries'])] == 1.0
    assert groups[id(named['blocks.3.norm2.weight'])] == 1.0
    assert groups[id(named['blocks.1.mlp_channels.fc1.weight'])] < 1.0
    assert groups[id(named['blocks.2.mlp_tokens.fc1.weight'])] < 1.0
    x = torch.randn(2, 3, 64, 64)
    out = model.eval()(x)
    features = timm.create_model('moejet_mixer_test', features_only=True, out_indices=(1, 3))
    assert [f.shape[-1] for f in features(x)] == [4, 4]
    model.set_grad_checkpointing(True)
    torch.testing.assert_close(model(x), out, rtol=0, atol=1e-6)
    assert fsdp_units(model)[-4:] == [f'blocks.{i}' for i in range(4)]
