""" Reading weights (``timm_moejet.checkpoint_io``): every state dict through one reader on timm's loaders.

``.pth`` only with ``weights_only=True``, training checkpoints of timm's train.py (EMA weights only when asked) and
mmengine, wrappers stripped in one place, paths that are not UTF-8, unreadable files named in one line, weight
sources named as timm names them.
"""
import argparse
import os
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

import timm_moejet  # noqa: F401
from timm_moejet.checkpoint_io import read_state_dict
from timm_moejet.checkpoint_io.names import WeightSource, parse_source
from timm_moejet.errors import InvalidArgument, InvalidCheckpoint, NotFound
from timm_moejet.moe_keys import is_expert_key, is_moe_key


class _Payload:
    """An arbitrary Python object, as a malicious checkpoint would carry."""


def test_pth_is_read_with_weights_only(tmp_path):
    # refused, never unpickled (argparse.Namespace, which train.py stores beside the weights, is allowed)
    path = tmp_path / 'evil.pth'
    torch.save({'obj': _Payload(), 'args': argparse.Namespace(lr=1)}, path)
    with pytest.raises(ValueError, match='_Payload.*weights_only=True'):
        read_state_dict(path)
    good = tmp_path / 'good.pt'
    torch.save({'w': torch.ones(2)}, good)
    assert torch.equal(read_state_dict(good)['w'], torch.ones(2))


class _HistoryBufferLike:
    """Stands in for the Python objects mmengine stores beside the weights (message hub buffers)."""

    def __init__(self):
        self.values = [1, 2]


def _train_py_checkpoint(path: Path, model, ema_model) -> None:
    """What timm's train.py (CheckpointSaver) writes: weights, EMA weights, optimizer state and its argparse args."""
    import argparse

    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(1, 3, 64, 64)).sum().backward()
    optimizer.step()
    torch.save({'epoch': 3, 'arch': 'moejet_vit_test', 'state_dict': model.state_dict(),
                'optimizer': optimizer.state_dict(), 'version': 2, 'metric': 41.5,
                'args': argparse.Namespace(model='moejet_vit_test', lr=0.1, model_ema=True),
                'state_dict_ema': ema_model.state_dict()}, path)


def test_timm_train_py_checkpoints_load_with_their_ema(tmp_path, capsys):
    from timm_moejet.build import load_model
    from weights_tools.cli import main

    torch.manual_seed(0)
    model = timm.create_model('moejet_vit_test', num_classes=3)
    ema = timm.create_model('moejet_vit_test', num_classes=3)
    for name in ('checkpoint-3.pth.tar', 'model_best.pth.tar'):
        _train_py_checkpoint(tmp_path / name, model, ema)
        for use_ema, reference in ((False, model), (True, ema)):
            out = tmp_path / f'{name}-{use_ema}'
            argv = ['export', 'moejet_vit_test', '--num-classes', '3', '--checkpoint', str(tmp_path / name),
                    '--output', str(out)] + (['--ema'] if use_ema else [])
            assert main(argv) == 0, capsys.readouterr().err
            loaded, _ = load_model(f'local-dir:{out}')
            assert all(torch.equal(v, reference.state_dict()[k]) for k, v in loaded.state_dict().items())
    torch.save({'state_dict': model.state_dict()}, tmp_path / 'no_ema.pth')
    status = main(['export', 'moejet_vit_test', '--num-classes', '3', '--checkpoint', str(tmp_path / 'no_ema.pth'),
                   '--ema', '--output', str(tmp_path / 'x')])
    assert status == 2 and 'no EMA weights' in capsys.readouterr().err


def test_mmengine_checkpoints_as_far_as_weights_only_allows(tmp_path):

    sd = {'backbone.blocks.0.weight': torch.ones(2)}
    torch.save({'meta': {'mmengine_version': '0.10.4', 'epoch': 300, 'seed': 3407}, 'state_dict': sd},
               tmp_path / 'plain.pth')
    assert list(read_state_dict(tmp_path / 'plain.pth')) == ['blocks.0.weight']  # mmpretrain's prefix stripped
    torch.save({'meta': {'epoch': 300}, 'state_dict': sd, 'message_hub': _HistoryBufferLike()}, tmp_path / 'mm.pth')
    with pytest.raises(ValueError, match=r'_HistoryBufferLike.*weights_only.*state_dict'):
        read_state_dict(tmp_path / 'mm.pth')


def test_a_non_utf8_checkpoint_path_is_read(tmp_path):

    path = os.path.join(os.fsencode(tmp_path), b'w\xff.safetensors')
    save_file({'a': torch.ones(2)}, str(tmp_path / 'plain.safetensors'))
    os.rename(tmp_path / 'plain.safetensors', path)
    assert torch.equal(read_state_dict(os.fsdecode(path))['a'], torch.ones(2))


def test_an_unreadable_checkpoint_says_permission_denied(tmp_path, monkeypatch):

    save_file({'a': torch.ones(2)}, str(tmp_path / 'w.safetensors'))
    os.chmod(tmp_path / 'w.safetensors', 0)
    monkeypatch.setattr(os, 'access', lambda path, mode: False)  # root reads mode-000 files: ask as a user would
    with pytest.raises(InvalidCheckpoint, match='permission denied'):
        read_state_dict(tmp_path / 'w.safetensors')


@pytest.mark.parametrize('name, kind, location', [
    ('hf-hub:org/repo@v1', 'hub', 'org/repo@v1'),
    ('org/repo', 'hub', 'org/repo'),
    ('vit_small_patch16_224.augreg_in21k', 'timm', 'vit_small_patch16_224.augreg_in21k'),
])
def test_weight_sources_are_read_in_one_place(name, kind, location):
    assert parse_source(name) == WeightSource(kind, location, name)


def test_local_weight_sources_and_expert_keys(tmp_path):
    (tmp_path / 'w.safetensors').write_bytes(b'')
    assert parse_source(f'local-dir:{tmp_path}').kind == parse_source(tmp_path).kind == 'folder'
    assert parse_source(tmp_path / 'w.safetensors').kind == 'file'
    with pytest.raises(NotFound):
        parse_source(tmp_path / 'missing.pth')
    with pytest.raises(InvalidArgument, match='not a Hub repository id'):
        parse_source('hf-hub:org/a/b')
    assert is_expert_key('blocks.6.mlp.core.fc1.weight') and is_expert_key('stages.2.blocks.3.mlp.univ.fc2.bias')
    assert not is_expert_key('blocks.6.mlp.slot_queries') and is_moe_key('blocks.6.mlp.slot_queries')
    assert not is_moe_key('blocks.6.mlp.fc1.weight')


def test_compiled_model_prefix_is_stripped(tmp_path):
    from timm_moejet.checkpoint_io import strip_wrappers

    sd = {'_orig_mod.module.blocks.0.mlp.fc1.weight': torch.zeros(1), 'model.head.weight': torch.zeros(1)}
    assert set(strip_wrappers(sd)) == {'blocks.0.mlp.fc1.weight', 'head.weight'}
    # a training checkpoint's weights, nested or flattened into one safetensors file
    assert set(strip_wrappers({'state_dict': sd, 'optimizer': {}})) == {'blocks.0.mlp.fc1.weight', 'head.weight'}
    assert set(strip_wrappers({f'state_dict.{k}': v for k, v in sd.items()})) == \
        {'blocks.0.mlp.fc1.weight', 'head.weight'}
