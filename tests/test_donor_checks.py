""" Donors checked before any work, and accounted for after: nothing of a donor dropped silently.

A component the model cannot hold (LayerScale, q/k norms, another class-token layout) is refused naming it and how
to get a model that holds it; tensors of the wrong shape, NaN or Inf are refused naming the tensor; a missing donor
is named before the model is built; a model's own config cannot name other files; the record lists every dropped
tensor and describes the recycling of this load.
"""
import json
from pathlib import Path

import pytest
import timm
import torch
from hub_cache import small_dense_vit
from safetensors.torch import save_file

import timm_moejet
from timm_moejet.recycling import ActivationStats
from weights_tools.cli import main


def _err(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and 'Traceback' not in err, err
    return err


@pytest.mark.parametrize('role, key, value', [
    ('trunk', 'blocks.1.attn.qkv.weight', float('nan')),
    ('expert', 'blocks.3.mlp.fc2.bias', float('inf')),
])
def test_non_finite_donor_weights_are_refused_naming_the_tensor(dense_folder, tmp_path, capsys, role, key, value):
    from safetensors.torch import load_file, save_file

    from weights_tools.cli import main

    sd = load_file(str(dense_folder / 'donor.safetensors'))
    sd[key] = sd[key].clone()
    sd[key].view(-1)[3] = value
    save_file(sd, str(tmp_path / 'bad.safetensors'))
    good, bad = str(dense_folder / 'donor.safetensors'), str(tmp_path / 'bad.safetensors')
    trunk, experts = (bad, good) if role == 'trunk' else (good, bad)
    status = main(['recycle', '--model', 'moejet_vit_test', '--trunk', trunk, '--experts', experts,
                   '--output', str(tmp_path / 'moe')])
    err = capsys.readouterr().err
    assert status == 2 and f'{role} donor' in err and key in err and 'NaN or Inf' in err, err
    assert not (tmp_path / 'moe').exists()


def test_statistics_given_to_a_strategy_that_ignores_them_are_refused(dense_folder, tmp_path, capsys):
    """random/uniform/upcycle read no statistics: a file given anyway is refused before any work (see
    test_options_a_strategy_ignores.py for every other option)."""
    from weights_tools.cli import main

    other = {f'blocks.{i}.hidden.l2': torch.ones(256) for i in range(4)}  # statistics of another donor
    ActivationStats(other, hub_id='org/other', weights_hash='0' * 64).save(tmp_path / 'other.safetensors')
    status = main(['recycle', '--model', 'moejet_vit_test', '--trunk', str(dense_folder / 'donor.safetensors'),
                   '--strategy', 'random', '--stats', str(tmp_path / 'other.safetensors'),
                   '--output', str(tmp_path / 'moe')])
    assert status == 2 and "strategy 'random' ignores --stats" in _err(capsys)
    assert not (tmp_path / 'moe').exists()


def test_a_donor_that_also_gives_the_experts_has_only_its_head_dropped(donors, monkeypatch):
    """Recycled on load from one donor (create_moejet_from, the README's offline example), the MLPs of the MoE blocks
    become the experts: the record drops only the head and does not describe a separate expert donor."""
    monkeypatch.chdir(donors)
    record = timm_moejet.create_moejet_from('local-dir:vit', recycle_strategy='uniform').pretrained_cfg['recycling']
    assert record['trunk'] == record['experts'] == 'vit/model.safetensors', record
    assert set(record['dropped']) == {'head.weight', 'head.bias'}, record
    assert 'expert_donor_reads' not in record, record


def _dense_folder_for(tmp_path: Path, name: str, architecture: str, model_args: dict, pretrained_cfg: dict,
                      donor_kwargs: dict) -> Path:
    """A timm Hub folder holding dense ViT weights whose config.json names a MoE architecture."""
    import json

    from hub_cache import DenseDonor, dense_vit_state_dict
    from safetensors.torch import save_file

    folder = tmp_path / name
    folder.mkdir()
    save_file(dense_vit_state_dict(DenseDonor('vit_tiny_patch16_224', **donor_kwargs)),
              str(folder / 'model.safetensors'))
    (folder / 'config.json').write_text(json.dumps(dict(architecture=architecture, num_classes=10,
                                                        model_args=model_args, pretrained_cfg=pretrained_cfg)))
    return folder


def test_a_model_config_cannot_make_the_loader_read_other_files(tmp_path, monkeypatch):
    """config.json of a local-dir:/hf-hub: model is data from the checkpoint: its model_args may not name other
    files or repos (only the caller's kwargs can), and its tag may not pull the tag's expert donor from the Hub."""
    from hub_cache import build_hub_cache, use_offline_hub
    from safetensors.torch import load_file, save_file

    from timm_moejet.recycling import weight_proxy_statistics

    small = dict(depth=4, model_kwargs=dict(embed_dim=64, num_heads=2, img_size=64))
    secret, stats = tmp_path / 'secret.safetensors', tmp_path / 'stats.safetensors'
    save_file({'w': torch.ones(1)}, str(secret))
    tampered = _dense_folder_for(tmp_path, 'tampered', 'moejet_vit_test',
                                 dict(num_classes=10, recycle_stats=str(stats), recycle_experts=str(secret)),
                                 dict(num_classes=10), small)
    weight_proxy_statistics(load_file(str(tampered / 'model.safetensors')), [2, 3]).save(stats)
    with pytest.raises(ValueError, match=r'config.*recycle_experts, recycle_stats.*caller'):
        timm.create_model(f'local-dir:{tampered}', pretrained=True)
    cache = build_hub_cache(tmp_path / 'hub', {'evil/tampered': {
        'model.safetensors': (tampered / 'model.safetensors').read_bytes(),
        'config.json': (tampered / 'config.json').read_bytes()}})
    use_offline_hub(monkeypatch, cache)
    with pytest.raises(ValueError, match=r'config.*recycle_experts, recycle_stats.*caller'):
        timm.create_model('hf-hub:evil/tampered', pretrained=True)

    # the caller may name files
    clean = _dense_folder_for(tmp_path, 'clean', 'moejet_vit_test', dict(num_classes=10), dict(num_classes=10), small)
    model = timm.create_model(f'local-dir:{clean}', pretrained=True, recycle_stats=str(stats))
    assert model.pretrained_cfg['recycling']['stats_file'] == 'stats.safetensors'

    # a dense folder that claims a recycling tag is its own (only) donor: the tag's expert repo is not fetched
    use_offline_hub(monkeypatch, tmp_path / 'empty_cache')
    tagged = _dense_folder_for(tmp_path, 'tagged', 'moejet_vit_tiny', dict(num_core_experts=3, num_univ_experts=5),
                               dict(tag='recycled_in21k', num_classes=10), dict(depth=12))
    model = timm.create_model(f'local-dir:{tagged}', pretrained=True)
    assert model.pretrained_cfg['recycling']['experts'] == f'local-dir:{tagged}'


def test_a_missing_donor_is_named_before_the_model_is_built(tmp_path, monkeypatch):
    """export moejet_vit_small --pretrained from an empty offline cache failed only after building 1058M
    parameters; the donors are now looked up first."""
    from hub_cache import use_offline_hub

    from timm_moejet.models import MoEVisionTransformer

    use_offline_hub(monkeypatch, tmp_path / 'empty_cache')

    def never(*args, **kwargs):
        raise AssertionError('the model was built before its donors were found')
    monkeypatch.setattr(MoEVisionTransformer, '__init__', never)
    with pytest.raises(FileNotFoundError, match=r"trunk donor 'timm/vit_small_patch16_224.augreg_in21k'.*not reach"):
        timm.create_model('moejet_vit_small', pretrained=True)


def _block_out(model: torch.nn.Module, i: int, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.blocks[i](x)


@pytest.mark.parametrize('donor, component', [('vit_ls', 'LayerScale'), ('vit_qk', 'q/k norm'),
                                              ('vit_deit3', 'LayerScale')])
def test_recycling_refuses_donor_components_the_model_cannot_hold(donors, tmp_path, capsys, donor, component):
    assert main(['recycle', '--model', 'moejet_vit_test', '--trunk', str(donors / donor), '--output',
                 str(tmp_path / 'm')]) == 2
    err = _err(capsys)
    assert component in err and 'create_moejet_from' in err and 'without --model' in err, err
    assert not (tmp_path / 'm').exists()


def test_selection_refuses_donor_components_the_model_cannot_hold(donors, tmp_path, capsys):
    assert main(['select', '--model', 'vit_tiny_patch16_224', '--donor', str(donors / 'vit_ls'),
                 '--model-kwargs', 'embed_dim=32', 'depth=2', 'num_heads=2', 'img_size=64', '--output',
                 str(tmp_path / 'ws.safetensors')]) == 2
    err = _err(capsys)
    assert 'LayerScale' in err and 'init_values' in err, err
    assert not (tmp_path / 'ws.safetensors').exists()


def test_a_filter_load_of_a_deit3_donor_into_a_class_embedded_model_is_refused(donors):
    """The pretrained filter route (create_model with a file overlay) refuses what the target cannot hold."""
    from timm_moejet.errors import DonorMismatch

    with pytest.raises(DonorMismatch, match='LayerScale'):
        timm.create_model('moejet_vit_test', pretrained=True,
                          pretrained_cfg_overlay=dict(file=str(donors / 'vit_deit3' / 'model.safetensors')))


@pytest.mark.parametrize('donor', ['vit_ls', 'vit_qk', 'vit_deit3'])
def test_recycling_without_model_carries_every_component_exactly(donors, tmp_path, donor):
    """Built with the donor's architecture, the recycled model's dense blocks reproduce the donor's exactly."""
    from timm.models import load_checkpoint

    out = tmp_path / 'm'
    assert main(['recycle', '--trunk', str(donors / donor), '--strategy', 'uniform', '--output', str(out)]) == 0
    moe = timm.create_model(f'local-dir:{out}', pretrained=True).eval()
    dense = timm.create_model(f'local-dir:{donors / donor}').eval()
    load_checkpoint(dense, str(donors / donor / 'model.safetensors'))
    x = torch.randn(2, 17 if not dense.no_embed_class else 17, 64)
    for i in (0, 1):  # the dense blocks (MoE in the second half)
        assert i not in moe.moe_layers()
        torch.testing.assert_close(_block_out(moe, i, x), _block_out(dense, i, x), rtol=0, atol=0)
    torch.testing.assert_close(moe.pos_embed, dense.pos_embed, rtol=0, atol=0)
    record = moe.pretrained_cfg['recycling']
    assert set(record['dropped']) == {'head.weight', 'head.bias'}, record


def test_the_record_lists_every_dropped_donor_tensor(donors):
    from timm_moejet.build import build_recycled_model

    model = build_recycled_model('moejet_vit_test', str(donors / 'vit'))
    dropped = model.pretrained_cfg['recycling']['dropped']
    # moejet_vit_test pools by average with a new fc_norm: the donor's final norm goes with its head
    assert set(dropped) == {'head.weight', 'head.bias', 'norm.weight', 'norm.bias'}, dropped
    assert all('head' in why or 'fc_norm' in why for why in dropped.values())


@pytest.mark.parametrize('key, shape', [('blocks.2.mlp.fc1.weight', (256, 64, 2)),
                                        ('blocks.3.mlp.fc1.bias', (200,)),
                                        ('blocks.3.mlp.fc2.weight', (64, 8))])
def test_expert_donor_tensors_of_the_wrong_shape_are_refused(donors, tmp_path, capsys, key, shape):
    sd = dict(small_dense_vit(0).state_dict())
    sd[key] = torch.randn(shape)
    save_file(sd, str(tmp_path / 'bad.safetensors'))
    assert main(['recycle', '--model', 'moejet_vit_test', '--trunk', str(donors / 'vit.safetensors'), '--experts',
                 str(tmp_path / 'bad.safetensors'), '--strategy', 'uniform', '--output', str(tmp_path / 'm')]) == 2
    err = _err(capsys)
    assert key in err and str(tuple(shape)) in err and 'expected' in err, err
    assert not (tmp_path / 'm').exists()


@pytest.mark.parametrize('keys', [('blocks.3.mlp.fc2.weight',), ('blocks.2.mlp.fc1.weight', 'blocks.2.mlp.fc2.weight')])
def test_an_expert_donor_with_1x1_convolution_mlps_is_refused(donors, tmp_path, capsys, keys):
    """timm's conv_mlp=True layout (fc weights [out, in, 1, 1]) is named, not reshaped through a deprecated
    ``out=`` resize."""
    import warnings

    sd = dict(small_dense_vit(0).state_dict())
    for key in keys:
        sd[key] = sd[key][:, :, None, None].contiguous()
    save_file(sd, str(tmp_path / 'conv.safetensors'))
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # torch's "an output with one or more elements was resized" included
        status = main(['recycle', '--model', 'moejet_vit_test', '--trunk', str(donors / 'vit.safetensors'),
                       '--experts', str(tmp_path / 'conv.safetensors'), '--strategy', 'uniform',
                       '--output', str(tmp_path / 'm')])
    err = _err(capsys)
    assert status == 2 and keys[0] in err and str(tuple(sd[keys[0]].shape)) in err and '1x1-convolution' in err, err
    assert not (tmp_path / 'm').exists()


@pytest.mark.parametrize('role, key, dtype', [('trunk', 'blocks.1.attn.qkv.weight', torch.int32),
                                              ('experts', 'blocks.3.mlp.fc1.weight', torch.int8),
                                              ('experts', 'blocks.2.mlp.fc2.bias', torch.bool),
                                              ('select', 'blocks.0.norm1.weight', torch.int32)])
def test_integer_donor_weights_are_refused_naming_the_tensor(donors, tmp_path, capsys, role, key, dtype):
    """Copying an integer tensor into the model's float weights would cast it silently (recycling and Weight
    Selection)."""
    sd = dict(small_dense_vit(0).state_dict())
    sd[key] = sd[key].to(dtype)
    bad, good = str(tmp_path / 'int.safetensors'), str(donors / 'vit.safetensors')
    save_file(sd, bad)
    out = str(tmp_path / 'm')
    if role == 'select':
        argv = ['select', '--model', 'vit_tiny_patch16_224', '--donor', bad, '--model-kwargs', 'embed_dim=32',
                'depth=2', 'num_heads=2', 'img_size=64', '--output', out + '.safetensors']
    else:
        trunk, experts = (bad, good) if role == 'trunk' else (good, bad)
        argv = ['recycle', '--model', 'moejet_vit_test', '--trunk', trunk, '--experts', experts, '--strategy',
                'uniform', '--output', out]
    assert main(argv) == 2
    err = _err(capsys)
    assert key in err and str(dtype).replace('torch.', '') in err and 'floating-point' in err, err
    assert not list(tmp_path.glob('m*'))


def test_the_record_describes_the_recycling_of_this_load(donors, tmp_path):
    out = tmp_path / 'm'
    assert main(['recycle', '--model', 'moejet_vit_test', '--trunk', str(donors / 'vit.safetensors'), '--strategy',
                 'uniform', '--output', str(out)]) == 0
    assert json.loads((out / 'config.json').read_text())['pretrained_cfg']['recycling']['strategy'] == 'uniform'
    (out / 'model.safetensors').write_bytes((donors / 'vit.safetensors').read_bytes())  # dense weights
    model = timm.create_model(f'local-dir:{out}', pretrained=True)
    assert model.pretrained_cfg['recycling']['strategy'] == 'importance'  # what ran: the default recipe
    # no weights loaded: no recycling record at all
    assert 'recycling' not in (timm.create_model(f'local-dir:{out}').pretrained_cfg or {})


def test_create_moejet_from_takes_a_plain_folder(donors, monkeypatch):
    monkeypatch.chdir(donors)
    model = timm_moejet.create_moejet_from('vit', recycle_strategy='uniform')
    ref = timm_moejet.create_moejet_from('local-dir:vit', recycle_strategy='uniform')
    for (k, a), (_, b) in zip(model.state_dict().items(), ref.state_dict().items()):
        if 'head' not in k and 'slot' not in k and 'temperature' not in k:
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)
