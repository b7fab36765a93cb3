""" A damaged weights file is named, wherever it is read from, before anything is built.

Every kind of damage (a truncated download, a damaged safetensors header, an empty file, a folder in the file's place,
a truncated zip checkpoint, a ``.pth`` that is no torch checkpoint) in every place weights are read from: the Hugging
Face cache (a timm name's trunk donor on load, ``create_moejet_from`` offline, an expert donor on the command line), a
``local-dir:`` model folder and a weights file named on the command line. Each gives the project's
``InvalidCheckpoint`` (one line and exit status 2 on the command line) whose message names the damaged file.
"""
import io
from pathlib import Path

import pytest
import timm
import torch
from hub_cache import DenseDonor, build_hub_cache, repo_snapshot, small_dense_vit, use_offline_hub
from safetensors.torch import save_file

import timm_moejet
from timm_moejet.errors import InvalidCheckpoint
from weights_tools.cli import main

TINY_REPO = 'timm/vit_tiny_patch16_224.augreg_in21k'


def _zip_checkpoint(state_dict) -> bytes:
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    return buffer.getvalue()


def _damage(path: Path, how: str) -> None:
    """Damage the file at ``path`` in place (the names say how)."""
    data = path.read_bytes()
    if how == 'truncated':
        path.write_bytes(data[:len(data) // 2])
    elif how == 'bad header':
        path.write_bytes(b'\xff' * 8 + data[8:])
    elif how == 'empty':
        path.write_bytes(b'')
    elif how == 'folder in its place':
        path.unlink()
        path.mkdir()
    elif how == 'not a checkpoint':
        path.write_bytes(b'<html>rate limited</html>\n' * 40)
    else:
        raise ValueError(how)


SAFETENSORS_DAMAGE = ['truncated', 'bad header', 'empty', 'folder in its place']
PTH_DAMAGE = ['truncated', 'empty', 'folder in its place', 'not a checkpoint']


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """An empty offline Hugging Face cache in effect for the test."""
    return use_offline_hub(monkeypatch, tmp_path / 'hf_cache')


def _named(err: str, path: Path) -> None:
    assert str(path) in err and 'Traceback' not in err and len(err.strip().splitlines()) == 1, err


@pytest.fixture(params=SAFETENSORS_DAMAGE)
def damaged_cached_tiny(hub, request) -> Path:
    """ViT-Ti in21k in the offline cache, its model.safetensors damaged (each way in turn)."""
    build_hub_cache(hub, {TINY_REPO: DenseDonor('vit_tiny_patch16_224', depth=4)})
    damaged = repo_snapshot(hub, TINY_REPO) / 'model.safetensors'
    _damage(damaged, request.param)
    return damaged


def test_create_moejet_from_names_a_damaged_cached_download(damaged_cached_tiny):
    with pytest.raises(InvalidCheckpoint) as e:
        timm_moejet.create_moejet_from('vit_tiny_patch16_224.augreg_in21k', depth=4)
    _named(str(e.value), damaged_cached_tiny)


def test_a_pretrained_tag_names_its_damaged_cached_trunk_donor_before_building(damaged_cached_tiny):
    with pytest.raises(InvalidCheckpoint) as e:
        timm.create_model('moejet_vit_tiny', pretrained=True)
    _named(str(e.value), damaged_cached_tiny)


@pytest.mark.parametrize('how', PTH_DAMAGE)
def test_a_damaged_cached_pytorch_model_bin_is_named(hub, dense_folder, tmp_path, capsys, how):
    """A Hub repository with only ``pytorch_model.bin`` (older checkpoints), named as an expert donor."""
    donor = small_dense_vit(0)
    build_hub_cache(hub, {'org/dense': {'pytorch_model.bin': _zip_checkpoint(donor.state_dict())}})
    damaged = repo_snapshot(hub, 'org/dense') / 'pytorch_model.bin'
    _damage(damaged, how)
    assert main(['recycle', '--model', 'moejet_vit_test', '--trunk', str(dense_folder / 'donor.safetensors'),
                 '--experts', 'hf-hub:org/dense', '--output', str(tmp_path / 'moe')]) == 2
    _named(capsys.readouterr().err, damaged)
    assert not (tmp_path / 'moe').exists()


@pytest.mark.parametrize('how', SAFETENSORS_DAMAGE)
def test_a_damaged_local_dir_model_is_named_before_building(dense_folder, tmp_path, how):
    """timm reads a ``local-dir:`` model's weights itself: they are checked before the model is built."""
    assert main(['recycle', '--model', 'moejet_vit_test', '--trunk', str(dense_folder / 'donor.safetensors'),
                 '--strategy', 'uniform', '--output', str(tmp_path / 'moe')]) == 0
    damaged = tmp_path / 'moe' / 'model.safetensors'
    _damage(damaged, how)
    with pytest.raises(InvalidCheckpoint) as e:
        timm.create_model(f'local-dir:{tmp_path / "moe"}', pretrained=True)
    _named(str(e.value), damaged)


@pytest.mark.parametrize('suffix, how', [('.safetensors', h) for h in SAFETENSORS_DAMAGE] +
                         [('.pth', h) for h in PTH_DAMAGE])
def test_a_damaged_donor_file_on_the_command_line_is_named(tmp_path, capsys, suffix, how):
    donor = small_dense_vit(0).state_dict()
    damaged = tmp_path / f'donor{suffix}'
    if suffix == '.safetensors':
        save_file(donor, str(damaged))
    else:
        damaged.write_bytes(_zip_checkpoint(donor))
    _damage(damaged, how)
    assert main(['recycle', '--model', 'moejet_vit_test', '--trunk', str(damaged), '--output',
                 str(tmp_path / 'moe')]) == 2
    _named(capsys.readouterr().err, damaged)
    assert not (tmp_path / 'moe').exists()


def test_a_damaged_member_of_a_zip_checkpoint_is_named_when_timm_reads_it(tmp_path):
    """Damage the cheap checks cannot see (the zip's directory is intact) is named when timm's loader meets it."""
    donor = small_dense_vit(0)
    data = bytearray(_zip_checkpoint(donor.state_dict()))
    start = data[:data.index(b'/data/0')].rindex(b'PK\x03\x04')  # the local header of the first tensor's record
    data[start:start + 4] = b'\x00' * 4
    damaged = tmp_path / 'donor.pth'
    damaged.write_bytes(bytes(data))
    try:
        timm.models.load_state_dict(str(damaged))
    except Exception:
        pass
    else:
        pytest.skip('this torch reads the damaged member without an error')
    folder = _folder_with(tmp_path, donor, damaged)
    with pytest.raises(InvalidCheckpoint) as e:
        timm_moejet.create_moejet_from(f'local-dir:{folder}')
    _named(str(e.value), folder / 'pytorch_model.bin')
    assert 'PytorchStreamReader' in str(e.value), e.value  # named by timm's read, not by the checks before it


def _folder_with(tmp_path: Path, model, weights: Path) -> Path:
    """A timm Hub folder whose weights file is ``weights`` (renamed to pytorch_model.bin)."""
    folder = tmp_path / 'folder'
    timm.models.save_for_hf(model, str(folder), safe_serialization=True)
    (folder / 'model.safetensors').unlink()
    weights.rename(folder / 'pytorch_model.bin')
    return folder


def test_a_readable_legacy_torch_file_is_still_read(tmp_path):
    """The legacy (non-zip) torch.save format is a pickle, not damage."""
    from timm_moejet.checkpoint_io import read_state_dict

    path = tmp_path / 'legacy.pth'
    torch.save({'w': torch.ones(3)}, path, _use_new_zipfile_serialization=False)
    assert torch.equal(read_state_dict(path)['w'], torch.ones(3))
