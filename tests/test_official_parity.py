"""The official MoE Jetpack fixture: our model must compute the same function (float32, max abs error 1e-5)."""
import json

import pytest
import torch
from paths import OFFICIAL_FIXTURE
from safetensors import safe_open
from safetensors.torch import save_file

from timm_moejet import load_official
from timm_moejet.checkpoint_io.official import official_config_to_kwargs

FIXTURE = OFFICIAL_FIXTURE
TOL = 1e-5


@pytest.fixture(scope='module')
def fixture():
    assert FIXTURE.is_file(), f'fixture missing: {FIXTURE}'
    with safe_open(str(FIXTURE), 'pt') as f:
        config = json.loads(f.metadata()['config'])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    state_dict = {k[len('state_dict.'):]: v for k, v in tensors.items() if k.startswith('state_dict.')}
    return config, state_dict, tensors


def _max_errors(model, tensors):
    model.eval()
    with torch.no_grad():
        logits = model(tensors['input'])
        features = model.forward_features(tensors['input'])
    return (logits - tensors['logits']).abs().max().item(), (features - tensors['features']).abs().max().item()


def test_parity_logits_and_features(fixture):
    config, state_dict, tensors = fixture
    model = load_official(state_dict, config)
    err_logits, err_features = _max_errors(model, tensors)
    assert err_logits <= TOL and err_features <= TOL, (err_logits, err_features)


def test_parity_breaks_when_a_weight_changes(fixture):
    # the check above can fail: perturb one expert weight and the logits move past the tolerance
    config, state_dict, tensors = fixture
    sd = dict(state_dict)
    key = 'blocks.3.mlp.core_experts.vit_fc2.weight'
    # a constant offset would be a per-token shift that the final LayerNorm removes; use a random one
    sd[key] = sd[key] + 0.05 * torch.randn(sd[key].shape, generator=torch.Generator().manual_seed(0))
    err_logits, _ = _max_errors(load_official(sd, config), tensors)
    assert err_logits > TOL


@pytest.mark.parametrize('fmt', ['pth_wrapped', 'safetensors'])
def test_load_from_files(fixture, tmp_path, fmt):
    config, state_dict, tensors = fixture
    if fmt == 'pth_wrapped':
        path = tmp_path / 'official.pth'
        # mmpretrain layout: {'meta': ..., 'state_dict': {'model.<key>': tensor}}
        torch.save({'meta': {'epoch': 3}, 'state_dict': {f'model.{k}': v for k, v in state_dict.items()}}, path)
    else:
        path = tmp_path / 'official.safetensors'
        save_file(state_dict, str(path))
    err_logits, err_features = _max_errors(load_official(path, config), tensors)
    assert err_logits <= TOL and err_features <= TOL


def test_config_mapping(fixture):
    config, _, _ = fixture
    kwargs = official_config_to_kwargs(config)
    assert kwargs['moe_blocks'] == (2, 3)
    assert (kwargs['num_core_experts'], kwargs['num_univ_experts']) == (8, 16)
    assert (kwargs['core_hidden'], kwargs['univ_hidden']) == (256, 64)
    assert kwargs['moe_expert_drop'] == 0.4 and kwargs['global_pool'] == 'avg'


def test_shape_mismatch_names_key_and_shapes(fixture):
    config, state_dict, _ = fixture
    with pytest.raises(ValueError, match=r'blocks\.2\.mlp\.core\.fc1\.weight: checkpoint \(8, 256, 64\) vs model '
                                         r'\(9, 256, 64\)'):
        load_official(state_dict, dict(config, core_experts=9, univ_experts=16))


@pytest.mark.parametrize('bad, match', [
    (dict(not_an_arg=1), 'keys the official VisionTransformerMoe does not take'),
    (dict(multi_head=True), 'does not implement'),
    (dict(if_dualpath=False), 'if_dualpath=False'),
])
def test_bad_config(fixture, bad, match):
    config, state_dict, _ = fixture
    with pytest.raises(ValueError, match=match):
        load_official(state_dict, dict(config, **bad))


def test_missing_and_corrupt_files(fixture, tmp_path):
    config, _, _ = fixture
    with pytest.raises(FileNotFoundError, match='nope.pth'):
        load_official(tmp_path / 'nope.pth', config)
    corrupt = tmp_path / 'corrupt.pth'
    corrupt.write_bytes(b'not a checkpoint')
    with pytest.raises(ValueError, match='corrupt.pth'):
        load_official(corrupt, config)
    (tmp_path / 'x.npz').write_bytes(b'')
    with pytest.raises(ValueError, match='unsupported checkpoint format'):
        load_official(tmp_path / 'x.npz', config)


def test_non_positive_temperature_is_refused(fixture):
    config, state_dict, _ = fixture
    sd = dict(state_dict, **{'blocks.2.mlp.scales.1': torch.tensor(-0.5)})
    with pytest.raises(ValueError, match='non-positive temperature'):
        load_official(sd, config)


def test_official_config_values_are_checked():
    from timm_moejet.checkpoint_io.official import official_config_to_kwargs

    config = dict(embed_dim='64', depth=4, num_heads=2, moe_layers=[2, 3], core_experts=8)
    with pytest.raises(ValueError, match=r"embed_dim must be an int >= 1, got '64' \(str\)"):
        official_config_to_kwargs(config)
    with pytest.raises(ValueError, match=r'moe_layers must be a list of ints'):
        official_config_to_kwargs(dict(config, embed_dim=64, moe_layers=3))


def test_official_univ_factor_is_named_as_the_official_config_names_it():
    from timm_moejet.checkpoint_io.official import official_config_to_kwargs
    from timm_moejet.errors import InvalidArgument

    with pytest.raises(InvalidArgument, match='univ_factor'):
        official_config_to_kwargs(dict(moe_layers=[2, 3], core_experts=4, univ_factor=1e-9, embed_dim=64,
                                       num_heads=2, depth=4))
