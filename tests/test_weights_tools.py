""" weights_tools end to end on real images (the scikit-learn digits), import-official, push (fake HfApi), help. """
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from paths import OFFICIAL_FIXTURE
from safetensors.torch import load_file, save_file

import timm_moejet  # noqa: F401  (registers the models)
from timm_moejet.checkpoint_io import read_state_dict
from weights_tools.cli import main

FIXTURE = OFFICIAL_FIXTURE


def _dense_vit(width: int, seed: int) -> torch.nn.Module:
    """A small dense timm ViT donor: depth 4 like moejet_vit_test, 64x64 input."""
    torch.manual_seed(seed)
    return timm.create_model('vit_tiny_patch16_224', embed_dim=width, depth=4, num_heads=2, img_size=64,
                             num_classes=10)


@pytest.fixture(scope='module')
def workspace(tmp_path_factory):
    """Digits image folder, a trunk donor as a weights file, an expert donor as a Hub folder and in a fake Hub cache
    (with a full-size ViT-Ti under its timm hub id)."""
    from hub_cache import DenseDonor, build_hub_cache
    from timm.models import save_for_hf

    from benchmarks.digits.data import write_digits_image_folder

    root = tmp_path_factory.mktemp('weights_tools')
    write_digits_image_folder(str(root / 'digits'), image_size=16)
    save_file(_dense_vit(64, seed=1).state_dict(), str(root / 'trunk.safetensors'))
    experts = _dense_vit(128, seed=2)
    save_for_hf(experts, str(root / 'experts'), safe_serialization=True)
    build_hub_cache(root / 'hf_cache', {
        'testorg/vit_dense128.digits': experts,
        'timm/vit_tiny_patch16_224.augreg_in21k': DenseDonor('vit_tiny_patch16_224'),
    })
    return root


def test_end_to_end_calibrate_recycle_inspect_export(workspace, capsys, monkeypatch):
    from hub_cache import repo_snapshot, use_offline_hub
    from PIL import Image

    from timm_moejet.layers import experts_to_be_loaded
    from timm_moejet.recycling import RecyclingRecipe, recycle_into

    root = workspace
    use_offline_hub(monkeypatch, root / 'hf_cache')
    expert_donor = 'hf-hub:testorg/vit_dense128.digits'
    stats, moe, png, export = root / 'e2e_stats.safetensors', root / 'e2e_moe', root / 'e2e.png', root / 'e2e_export'
    assert main(['calibrate', '--donor', expert_donor, '--images', str(root / 'digits'), '--limit', '120',
                 '--batch-size', '40', '--no-progress', '--output', str(stats)]) == 0
    out = capsys.readouterr().out
    assert 'on 120 of 1438 images (10 classes' in out, out
    assert main(['recycle', '--model', 'moejet_vit_test', '--num-classes', '10',
                 '--trunk', str(root / 'trunk.safetensors'), '--experts', expert_donor,
                 '--strategy', 'importance', '--stats', str(stats), '--seed', '11', '--output', str(moe)]) == 0
    assert sorted(os.listdir(moe)) == ['config.json', 'model.safetensors']
    assert main(['inspect', str(moe), '--images', str(root / 'digits'), '--limit', '20', '--plot', str(png),
                 '--json', str(root / 'e2e.json')]) == 0
    out = capsys.readouterr().out
    assert 'GMACs per image' in out and 'core contrib' in out, out
    assert main(['export', str(moe), '--output', str(export)]) == 0

    # the PNG is a valid image of a plausible size
    with Image.open(png) as im:
        im.verify()
    with Image.open(png) as im:
        assert im.format == 'PNG' and im.size[0] >= 400 and im.size[1] >= 300, im.size
    figures = json.loads((root / 'e2e.json').read_text())
    assert [layer['block'] for layer in figures['layers']] == [2, 3]
    for layer in figures['layers']:
        assert abs(sum(layer['expert_share']) - 1) < 1e-5  # shares of all experts sum to 1 (float32 sums)
        assert abs(layer['core_share'] + layer['univ_share'] - 1) < 1e-5

    # the exported folder holds the recipe and rebuilds, through timm alone, the model recycled in memory
    config = json.loads((export / 'config.json').read_text())
    assert config['architecture'] == 'moejet_vit_test'
    record = config['pretrained_cfg']['recycling']
    assert record['strategy'] == 'importance' and record['seed'] == 11 and record['stats']['source'] == 'data'
    assert record['experts'] == expert_donor
    # recycle seeds the values that are not recycled (head, slot queries) with --seed; the experts are filled from
    # the donor, so construction leaves them uninitialised
    with torch.random.fork_rng(), experts_to_be_loaded():
        torch.manual_seed(11)
        reference = timm.create_model('moejet_vit_test', num_classes=10)
    recycle_into(reference, read_state_dict(root / 'trunk.safetensors'),
                 read_state_dict(repo_snapshot(root / 'hf_cache', expert_donor[7:]) / 'model.safetensors'),
                 RecyclingRecipe(stats=stats, seed=11))
    loaded = timm.create_model(f'local-dir:{export}', pretrained=True)
    assert loaded.pretrained_cfg['recycling'] == record  # the moejet entrypoint puts the recipe back
    reference.eval()
    loaded.eval()
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(x), reference(x))  # bit-identical: same seed, same weights, same code


def test_calibrate_timm_name_donor_from_hub_cache(workspace, tmp_path, monkeypatch, capsys):
    from hub_cache import DenseDonor, dense_vit_state_dict, use_offline_hub

    from timm_moejet.recycling import ActivationStats

    use_offline_hub(monkeypatch, workspace / 'hf_cache')
    out = tmp_path / 'stats.safetensors'
    assert main(['calibrate', '--donor', 'vit_tiny_patch16_224.augreg_in21k', '--images', str(workspace / 'digits'),
                 '--split', 'validation', '--limit', '6', '--batch-size', '3', '--no-coactivation',
                 '--output', str(out)]) == 0
    assert 'on 6 of 359 images (6 classes' in capsys.readouterr().out
    stats = ActivationStats.load(out)
    assert stats.hub_id == 'vit_tiny_patch16_224.augreg_in21k' and stats.source == 'data'
    assert stats.num_tokens == 6 * 197  # 224x224 (the donor's data config), 196 patches + class token
    assert list(stats.blocks) == list(range(12))
    stats.check_donor(dense_vit_state_dict(DenseDonor('vit_tiny_patch16_224')))  # the cached donor
    with pytest.raises(ValueError, match='made for donor'):
        stats.check_donor(dense_vit_state_dict(DenseDonor('vit_tiny_patch16_224', seed=1)))


def test_import_official_reproduces_fixture_logits(tmp_path):
    out = tmp_path / 'official'
    assert main(['import-official', str(FIXTURE), '--output', str(out)]) == 0
    ref = load_file(str(FIXTURE))
    model = timm.create_model(f'local-dir:{out}', pretrained=True).eval()
    with torch.no_grad():
        err = (model(ref['input']) - ref['logits']).abs().max().item()
    assert err <= 1e-5, err  # float32 parity with the official implementation

    # the same checkpoint as a .pth (read with weights_only=True) with the config as a JSON file
    from safetensors import safe_open
    with safe_open(str(FIXTURE), 'pt') as f:
        config = f.metadata()['config']
    sd = {k[len('state_dict.'):]: v for k, v in ref.items() if k.startswith('state_dict.')}
    torch.save({'state_dict': sd}, tmp_path / 'official.pth')
    (tmp_path / 'official.json').write_text(config)
    out2 = tmp_path / 'official_pth'
    assert main(['import-official', str(tmp_path / 'official.pth'), '--config', str(tmp_path / 'official.json'),
                 '--output', str(out2)]) == 0
    assert load_file(str(out2 / 'model.safetensors')).keys() == load_file(str(out / 'model.safetensors')).keys()


class FakeHfApi:
    """Records what a push would upload; nothing leaves the machine."""
    uploads = []

    def __init__(self, token=None, library_name=None, library_version=None):
        self.token = token

    def create_repo(self, repo_id, private=False, exist_ok=False):
        from types import SimpleNamespace
        return SimpleNamespace(repo_id=repo_id)

    def file_exists(self, repo_id, filename, revision=None):
        return False

    def upload_folder(self, repo_id, folder_path, revision=None, create_pr=False, commit_message=''):
        folder = Path(folder_path)
        FakeHfApi.uploads.append(dict(
            repo_id=repo_id, files=sorted(p.name for p in folder.iterdir()),
            config=json.loads((folder / 'config.json').read_text()),
            tensors=load_file(str(folder / 'model.safetensors')), commit_message=commit_message))
        return f'https://huggingface.co/{repo_id}/commit/fake'


def test_push_uploads_safetensors_and_config(workspace, tmp_path, monkeypatch, capsys):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, 'HfApi', FakeHfApi)
    FakeHfApi.uploads.clear()
    folder = tmp_path / 'moe'
    assert main(['recycle', '--model', 'moejet_vit_test', '--trunk', str(workspace / 'trunk.safetensors'),
                 '--strategy', 'uniform', '--output', str(folder)]) == 0
    assert main(['push', str(folder), 'someone/moejet-test', '--commit-message', 'first']) == 0
    assert len(FakeHfApi.uploads) == 1
    up = FakeHfApi.uploads[0]
    assert up['repo_id'] == 'someone/moejet-test' and up['commit_message'] == 'first'
    assert up['files'] == ['README.md', 'config.json', 'model.safetensors']  # no pickled pytorch_model.bin
    assert up['config']['architecture'] == 'moejet_vit_test'
    assert up['config']['pretrained_cfg']['recycling']['strategy'] == 'uniform'
    local = load_file(str(folder / 'model.safetensors'))
    assert up['tensors'].keys() == local.keys()
    assert all(torch.equal(up['tensors'][k], local[k]) for k in local)


def test_export_leaves_out_load_time_recycle_kwargs(tmp_path):
    # recycle_* kwargs configure the dense->MoE filter at load time; a recycle_stats path would not exist elsewhere
    out = tmp_path / 'moe'
    assert main(['export', 'moejet_vit_test', '--model-kwargs', 'recycle_strategy="uniform"', 'num_classes=3',
                 '--output', str(out)]) == 0
    config = json.loads((out / 'config.json').read_text())
    assert config['model_args']['num_classes'] == 3
    assert not [k for k in config['model_args'] if k.startswith('recycle_')], config['model_args']
    assert timm.create_model(f'local-dir:{out}', pretrained=True).num_classes == 3


def test_help_as_subprocess():
    res = subprocess.run([sys.executable, '-m', 'weights_tools', '--help'], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr
    for command in ('calibrate', 'recycle', 'export', 'push', 'import-official', 'inspect'):
        assert command in res.stdout


@pytest.mark.parametrize('command', ['calibrate', 'recycle', 'export', 'push', 'import-official', 'inspect'])
def test_each_command_help_has_an_example(command, capsys):
    assert main([command, '--help']) == 0
    out = capsys.readouterr().out
    assert 'example' in out and f'weights-tools {command}' in out, out
