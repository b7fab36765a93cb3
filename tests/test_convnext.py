""" C-JetMoE (MoE ConvNeXt) and Weight Selection, offline: architecture, recycling on load, bad donors, timm features.

Donors are random weights in the real key layout of real timm model names, in a local Hub cache. Selection indices
are recomputed here independently: halving a dimension keeps every second element, a dimension that does not
shrink is kept whole.
"""
import json
import math

import pytest
import timm
import torch
from hub_cache import DenseDonor, build_hub_cache, dense_vit_state_dict, use_offline_hub

import timm_moejet  # noqa: F401
from timm_moejet.errors import DonorMismatch
from timm_moejet.recycling import RecyclingRecipe, recycle_state_dict

TINY_IN22K = 'timm/convnext_tiny.fb_in22k'
CONVNEXT_T = DenseDonor('convnext_tiny', seed=11)
SMALL = dict(num_core_experts=3, num_univ_experts=5)


def _halved(t: torch.Tensor, shape) -> torch.Tensor:
    """Independent Weight Selection of a halving donor: every second element of each dimension that shrinks."""
    for dim, (n, k) in enumerate(zip(t.shape, shape)):
        if n != k:
            assert n == 2 * k, (t.shape, shape)
            t = t.narrow(dim, 0, n)[(slice(None),) * dim + (slice(0, None, 2),)]
    return t


@pytest.fixture(scope='module')
def cache(tmp_path_factory):
    return build_hub_cache(tmp_path_factory.mktemp('convnext'), {TINY_IN22K: CONVNEXT_T})


@pytest.fixture(scope='module')
def donor():
    return dense_vit_state_dict(CONVNEXT_T)


def test_c_jetmoe_f_layout_size_and_cost():
    from timm_moejet.cost import count_macs, count_params

    model = timm.create_model('moejet_convnext_femto', device='meta')
    assert [len(s.blocks) for s in model.stages] == [3, 3, 9, 3]
    assert [s.blocks[0].conv_dw.in_channels for s in model.stages] == [48, 96, 192, 384]
    layers = model.moe_layers()
    assert sorted(layers) == list(range(9, 18))  # blocks 10-18, 1-based over all 18
    for i, layer in layers.items():
        stage3 = i < 15
        assert (layer.num_core, layer.num_univ) == ((98, 196) if stage3 else (24, 48))
        assert (layer.core.hidden_features, layer.univ.hidden_features) == ((768, 192) if stage3 else (1536, 384))
        assert layer.dim == (192 if stage3 else 384) and layer.slots_per_expert == 1
    assert round(count_params(model)['total'] / 1e6, 1) == 391.3
    assert round(count_macs(model)['gmacs'], 3) == 1.223


def test_recycled_on_load_from_convnext_t(cache, donor, monkeypatch):
    use_offline_hub(monkeypatch, cache)
    model = timm.create_model('moejet_convnext_femto', pretrained=True, num_classes=10, **SMALL)
    sd = model.state_dict()
    moe = tuple(f'stages.{s}.blocks.{j}.mlp.' for s, j in [(2, j) for j in range(3, 9)] + [(3, j) for j in range(3)])
    checked = 0
    for key, value in sd.items():
        if key.startswith(('head.fc.',) + moe):
            continue
        assert torch.equal(value, _halved(donor[key], value.shape)), f'{key} is not the selection of the donor'
        checked += 1
    assert checked == 144  # stem, downsamples, the dense MLPs and every norm, dwconv and layer scale, head.norm
    # experts: sub-blocks of the donor MLP of the same block, indices as the recipe draws them
    recipe = RecyclingRecipe(trunk_fit='select')
    out, indices, _ = recycle_state_dict(model, donor, None, recipe)
    blocks = [(s, j) for s, d in enumerate((3, 3, 9, 3)) for j in range(d)]
    for i, groups in indices.items():
        s, j = blocks[i]
        p = f'stages.{s}.blocks.{j}.mlp.'
        w1, w2 = donor[p + 'fc1.weight'], donor[p + 'fc2.weight']
        for group, (h, c) in groups.items():
            assert torch.equal(sd[f'{p}{group}.fc1.weight'], out[f'{p}{group}.fc1.weight'])
            assert torch.equal(sd[f'{p}{group}.fc1.weight'], w1[h[:, :, None], c[:, None, :]])
            assert torch.equal(sd[f'{p}{group}.fc2.weight'], w2[c[:, :, None], h[:, None, :]])
            assert torch.equal(sd[f'{p}{group}.fc1.bias'], donor[p + 'fc1.bias'][h])
            assert torch.equal(sd[f'{p}{group}.fc2.bias'], donor[p + 'fc2.bias'][c])
            for rows in (h, c):  # distinct donor units per expert: sorted, no repeats
                assert bool((rows[:, 1:] > rows[:, :-1]).all())
            assert c.shape[1] == sd[f'{p}{group}.fc1.weight'].shape[2]
    record = model.pretrained_cfg['recycling']
    assert record['trunk'] == TINY_IN22K and record['trunk_fit'] == 'select' and record['strategy'] == 'importance'
    # the same seed gives the same weights
    again = timm.create_model('moejet_convnext_femto', pretrained=True, num_classes=10, **SMALL)
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in sd.items() if not k.startswith('head.fc.')
               and not k.endswith('slot_queries'))
    # finite in float32 (bfloat16: the command-line test, on a smaller model: CPU's bfloat16 depthwise conv is slow)
    with torch.no_grad():
        assert torch.isfinite(model.eval()(torch.randn(2, 3, 64, 64))).all()


@pytest.mark.parametrize('spec, says', [
    (DenseDonor('vit_small_patch16_224', depth=4), 'of family vit'),
    (DenseDonor('convnext_small'), r'must have the depth of the model MoEConvNeXt'),
    (DenseDonor('convnext_tiny', model_kwargs=dict(dims=(40, 80, 160, 320))),
     r'width \(40, 80, 160, 320\), depth 18\) is narrower than the model MoEConvNeXt \(width \(48, 96, 192, 384\)'),
])
def test_donors_of_another_family_depth_or_narrower_are_refused(spec, says):
    model = timm.create_model('moejet_convnext_femto', **SMALL)
    with pytest.raises(DonorMismatch, match=says) as info:
        recycle_state_dict(model, dense_vit_state_dict(spec), None, RecyclingRecipe(trunk_fit='select'),
                           trunk_id=spec.architecture)
    assert spec.architecture in str(info.value) and 'MoEConvNeXt' in str(info.value)


def test_timm_features_and_training_hooks():
    model = timm.create_model('moejet_convnext_test').eval()
    x = torch.randn(2, 3, 64, 64)
    out = model(x)
    features = timm.create_model('moejet_convnext_test', features_only=True)
    assert [f.shape[1] for f in features(x)] == [16, 32, 64, 128]
    final, inters = model.forward_intermediates(x, indices=2)
    assert [t.shape[1] for t in inters] == [64, 128]
    model.set_grad_checkpointing(True)
    torch.testing.assert_close(model(x), out, rtol=0, atol=1e-6)
    model.reset_classifier(3)
    assert model(x).shape == (2, 3)
    from timm.optim import create_optimizer_v2
    optimizer = create_optimizer_v2(model, 'adamw', lr=1e-3, weight_decay=0.05, layer_decay=0.6)
    scale = {id(p): g['lr_scale'] for g in optimizer.param_groups for p in g['params']}
    moe = model.moe_layers()[3]
    assert scale[id(moe.core.fc1.weight)] == 1.0 and scale[id(model.stages[2].blocks[1].norm.weight)] == 1.0
    assert scale[id(model.stages[0].blocks[0].conv_dw.weight)] < 1.0
    # inside a MoE block only the MoE layer and its norm move up: the block's depthwise conv keeps its decayed lr
    assert scale[id(model.stages[2].blocks[1].conv_dw.weight)] < 1.0
    decay = {id(p): g['weight_decay'] for g in optimizer.param_groups for p in g['params']}
    assert decay[id(moe.core.fc1.bias)] == 0 and decay[id(moe.core.fc1.weight)] == 0.05


def test_statistics_of_a_convnext_donor_drive_recycling(donor):
    from timm_moejet.recycling import collect_statistics

    dense = timm.create_model('convnext_tiny', num_classes=10)
    dense.load_state_dict(donor)
    images = torch.randn(2, 3, 64, 64)
    stats = collect_statistics(dense, [images], progress=False, coactivation=False)
    assert stats.get(9, 'hidden', 'l2').shape == (1536,) and stats.get(15, 'channel', 'l2').shape == (768,)
    # block 9 (stage 3, block 3): the RMS over every position of its MLP activation, computed here with a hook
    seen = []
    hook = dense.stages[2].blocks[3].mlp.act.register_forward_hook(lambda m, i, o: seen.append(o.detach()))
    with torch.no_grad():
        dense.eval()(images)
    hook.remove()
    direct = seen[0].reshape(-1, 1536).square().mean(0).sqrt()
    torch.testing.assert_close(stats.get(9, 'hidden', 'l2'), direct, rtol=1e-5, atol=1e-6)
    model = timm.create_model('moejet_convnext_femto', **SMALL)
    recipe = RecyclingRecipe(trunk_fit='select')
    out, measured, _ = recycle_state_dict(model, donor, None, recipe, stats=stats)
    assert out['stages.3.blocks.2.mlp.core.fc1.weight'].shape == (3, 1536, 384)
    _, proxy, _ = recycle_state_dict(model, donor, None, recipe)  # the data-free proxy instead
    assert any(not torch.equal(measured[i]['core'][0], proxy[i]['core'][0]) for i in measured), \
        'the measured statistics must change which hidden units the experts take'


@pytest.mark.parametrize('small, large, kwargs', [
    ('vit_tiny_patch16_224', DenseDonor('vit_small_patch16_224', seed=3), {}),
    ('convnext_femto', CONVNEXT_T, {}),
])
def test_weight_selection_loads_in_timm(small, large, kwargs, tmp_path, monkeypatch, capsys):
    """ViT-Ti from ViT-S and ConvNeXt-F (2-2-6-2, 1x1-conv MLP) from ConvNeXt-T (3-3-9-3): the file loads with
    pretrained_cfg_overlay=dict(file=...) and every tensor is the evenly spaced selection of the mapped donor's."""
    from safetensors.torch import load_file, save_file

    from weights_tools.cli import main

    donor = dense_vit_state_dict(large)
    save_file(donor, str(tmp_path / 'donor.safetensors'))
    out = tmp_path / 'selected.safetensors'
    assert main(['select', '--model', small, '--donor', str(tmp_path / 'donor.safetensors'), '--output',
                 str(out)]) == 0, capsys.readouterr().err
    model = timm.create_model(small, pretrained=True, pretrained_cfg_overlay=dict(file=str(out)))
    assert all(torch.equal(v, load_file(str(out))[k]) for k, v in model.state_dict().items())
    blocks = {}
    if small == 'convnext_femto':  # stages of 2, 2, 6, 2 blocks take blocks round(linspace(0, n - 1, k)) of 3, 3, 9, 3
        for s, (k, n) in enumerate(zip((2, 2, 6, 2), (3, 3, 9, 3))):
            picks = torch.linspace(0, n - 1, k, dtype=torch.float64).round().long().tolist()
            blocks.update({f'stages.{s}.blocks.{j}.': f'stages.{s}.blocks.{d}.' for j, d in enumerate(picks)})
    for key, value in model.state_dict().items():
        if key.startswith('head.fc.') or key.startswith('head.weight') or key.startswith('head.bias'):
            continue
        prefix = next((p for p in blocks if key.startswith(p)), None)
        src = donor[blocks[prefix] + key[len(prefix):] if prefix else key]
        if value.ndim == 4 and src.ndim == 2:  # the femto's 1x1-conv MLP from the tiny's linear one
            src = src[..., None, None]
        assert torch.equal(value, _halved(src, value.shape)), key


def test_command_line_recycles_inspects_and_exports_a_convnext(tmp_path, capsys):
    from safetensors.torch import save_file

    from weights_tools.cli import main

    wide = DenseDonor('convnext_tiny', seed=12, model_kwargs=dict(depths=(1, 1, 2, 2), dims=(32, 64, 128, 256)))
    save_file(dense_vit_state_dict(wide), str(tmp_path / 'wide.safetensors'))
    assert main(['recycle', '--model', 'moejet_convnext_test', '--trunk', str(tmp_path / 'wide.safetensors'),
                 '--trunk-fit', 'select', '--num-classes', '5', '--output', str(tmp_path / 'moe')]) == 0
    assert main(['inspect', str(tmp_path / 'moe'), '--random-images', '2', '--json', str(tmp_path / 'r.json')]) == 0
    assert main(['export', str(tmp_path / 'moe'), '--output', str(tmp_path / 'again')]) == 0
    out = capsys.readouterr().out
    assert 'recycled moejet_convnext_test' in out and 'router diagnostics' in out, out
    report = json.loads((tmp_path / 'r.json').read_text())
    assert [layer['block'] for layer in report['layers']] == [3, 4, 5]  # one per MoE layer
    for layer in report['layers']:
        assert math.isfinite(layer['dispatch_entropy']) and 0 <= layer['dispatch_entropy'] <= 1
        assert abs(layer['core_share'] + layer['univ_share'] - 1) < 1e-6  # the shares of one layer's output mass
    a = timm.create_model(f'local-dir:{tmp_path / "moe"}', pretrained=True)
    b = timm.create_model(f'local-dir:{tmp_path / "again"}', pretrained=True)
    assert a.pretrained_cfg['recycling']['trunk_fit'] == 'select'
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    # the recycled model is finite in bfloat16 too (autocast, and bfloat16 weights)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        with torch.autocast('cpu', dtype=torch.bfloat16):
            assert torch.isfinite(a.eval()(x).float()).all()
        assert torch.isfinite(a.to(torch.bfloat16)(x.bfloat16()).float()).all()
