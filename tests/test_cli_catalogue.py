""" The command line on every bad input docs/command_line.md documents: exit status, message, nothing written.

The table in the docs is the catalogue: each row's command runs, as written, in a folder holding the files it names;
the test checks the exit status, that the one-line message says what the row says, that no file appeared and that
every existing file (the earlier output ``moe/`` included) keeps its sha256.
"""
import argparse
import hashlib
import re
import shlex
from pathlib import Path

import pytest
import timm
import torch
from hub_cache import use_offline_hub
from safetensors.torch import save_file

import timm_moejet  # noqa: F401
from timm_moejet.moe_keys import MOE_KEYS
from weights_tools.cli import main

DOC = Path(__file__).resolve().parents[1] / 'docs' / 'command_line.md'


def _catalogue():
    text = DOC.read_text()
    table = text[text.index('<!-- bad-inputs'):text.index('<!-- /bad-inputs -->')]
    rows = []
    for line in table.splitlines():
        cells = [c.strip() for c in re.split(r'(?<!\\)\|', line)[1:-1]]
        if len(cells) != 4 or not cells[1].startswith('`weights-tools'):
            continue
        rows.append(pytest.param(cells[1].strip('`'), int(cells[2]), cells[3].strip('`'), id=cells[0]))
    return rows


def _dense(width: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model('vit_tiny_patch16_224', embed_dim=width, depth=4, num_heads=2, img_size=64,
                             num_classes=3)


class _Payload:
    """A Python object besides the weights, which weights_only refuses to unpickle."""


@pytest.fixture(scope='module')
def workspace(tmp_path_factory):
    """The files the catalogue names."""
    from timm.models import save_for_hf

    from benchmarks.digits.data import write_digits_image_folder
    from timm_moejet.recycling import collect_statistics

    root = tmp_path_factory.mktemp('catalogue')
    donor = _dense(64, 0)
    save_file(donor.state_dict(), str(root / 'donor.safetensors'))
    save_file(_dense(128, 1).state_dict(), str(root / 'wide.safetensors'))
    save_file(_dense(32, 2).state_dict(), str(root / 'narrow.safetensors'))
    nan = dict(donor.state_dict())
    nan['blocks.2.mlp.fc1.weight'] = nan['blocks.2.mlp.fc1.weight'].clone().fill_(float('nan'))
    save_file(nan, str(root / 'nan_donor.safetensors'))
    save_for_hf(donor, str(root / 'donor'), safe_serialization=True)
    collect_statistics(donor, [torch.randn(2, 3, 64, 64)], progress=False).save(root / 'donor_stats.safetensors')
    (root / 'corrupt.safetensors').write_bytes(b'\x00\x01 not safetensors')
    write_digits_image_folder(str(root / 'images'), image_size=16)
    (root / 'empty_images' / 'cls0').mkdir(parents=True)
    (root / 'broken').mkdir()
    (root / 'broken' / 'config.json').write_text('{"architecture": ')
    torch.save({'epoch': 1, 'state_dict': timm.create_model('moejet_vit_test').state_dict(),
                'args': argparse.Namespace(model='moejet_vit_test')}, root / 'train_checkpoint.pth.tar')
    torch.save({'state_dict': {}, 'hub': _Payload()}, root / 'pickled.pth')
    assert main(['recycle', '--model', 'moejet_vit_test', '--trunk', str(root / 'donor.safetensors'),
                 '--strategy', 'uniform', '--output', str(root / 'moe')]) == 0
    _round_three_files(root, donor)
    return root


def _png_header(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` pixels (a decompression bomb's header; no pixel data)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data))
    return b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', struct.pack('>IIBBBBB', width, height, 8, 2, 0, 0, 0)) + \
        chunk(b'IEND', b'')


def _round_three_files(root: Path, donor: torch.nn.Module) -> None:
    """Donors with components a target cannot hold, damaged donors, configs and images of the third round."""
    import json
    import shutil

    from timm.models import save_for_hf

    for name, kwargs in (('ls_donor', dict(init_values=0.1)), ('qk_donor', dict(qk_norm=True)),
                         ('deit3_donor', dict(init_values=0.1, no_embed_class=True))):
        torch.manual_seed(0)
        model = timm.create_model('vit_tiny_patch16_224', embed_dim=64, depth=4, num_heads=2, img_size=64,
                                  num_classes=3, **kwargs)
        save_for_hf(model, str(root / name), safe_serialization=True)
    sd = dict(donor.state_dict())
    save_file(dict(sd, **{'blocks.2.mlp.fc1.weight': torch.randn(256, 64, 2)}), str(root / 'bad_experts.safetensors'))
    save_file(dict(sd, **{'blocks.3.mlp.fc1.bias': torch.randn(200)}), str(root / 'short_bias.safetensors'))
    save_file(dict(sd, **{'blocks.3.mlp.fc2.weight': sd['blocks.3.mlp.fc2.weight'][:, :, None, None].contiguous()}),
              str(root / 'conv_experts.safetensors'))
    save_file(dict(sd, **{'blocks.1.attn.qkv.weight': sd['blocks.1.attn.qkv.weight'].to(torch.int32)}),
              str(root / 'int_donor.safetensors'))
    official = {k.replace(f'.mlp.{MOE_KEYS.slot_queries}', '.mlp.phi'): v for k, v in
                timm.create_model('moejet_vit_test').state_dict().items()}
    huge = dict(embed_dim=8192, depth=24, num_heads=8, moe_layers=[22, 23], core_experts=4, img_size=64)
    save_file(official, str(root / 'huge_official.safetensors'), metadata={'config': json.dumps(huge)})
    for name, edit in (('list_args', lambda c: dict(c, model_args=[1, 2])),
                       ('unknown_arch', lambda c: dict(c, architecture='vit_nonexistent_patch3')),
                       ('list_config', lambda c: [1, 2])):
        shutil.copytree(root / 'donor', root / name)
        config = json.loads((root / name / 'config.json').read_text())
        (root / name / 'config.json').write_text(json.dumps(edit(config)))
    shutil.copytree(root / 'moe', root / 'truncated')
    data = (root / 'truncated' / 'model.safetensors').read_bytes()
    (root / 'truncated' / 'model.safetensors').write_bytes(data[:len(data) // 2])
    for name, payload in (('bomb_images', _png_header(20000, 20000)), ('bad_images', b'not an image')):
        shutil.copytree(root / 'images' / 'validation', root / name)
        cls = sorted(p for p in (root / name).iterdir() if p.is_dir())[0]
        (cls / 'zz_extra.png').write_bytes(payload)
    stats = root / 'donor_stats.safetensors'
    from safetensors import safe_open
    with safe_open(str(stats), 'pt') as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    fmt = next(k for k in meta if k.startswith('timm_moejet'))
    doc = json.loads(meta[fmt])
    for name, change in (('tampered_stats', dict(weights_hash=123)), ('nohash_stats', dict(weights_hash=''))):
        altered = dict(doc, identity=dict(doc['identity'], **change))
        save_file(tensors, str(root / f'{name}.safetensors'), metadata=dict(meta, **{fmt: json.dumps(altered)}))


def _digests(root: Path) -> dict:
    """Every path under ``root`` (hidden ones included) with the sha256 of each file."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else 'folder'
            for p in sorted(root.rglob('*')) if 'hf_cache' not in p.parts}


@pytest.mark.parametrize('command, status, says', _catalogue())
def test_bad_input(command, status, says, workspace, monkeypatch, capsys):
    monkeypatch.chdir(workspace)
    use_offline_hub(monkeypatch, workspace / 'hf_cache')
    before = _digests(workspace)
    argv = shlex.split(command)
    assert argv[0] == 'weights-tools', 'the catalogue names the installed command'
    assert main(argv[1:]) == status
    err = capsys.readouterr().err.strip()
    assert says in err and len(err.splitlines()) == 1 and 'Traceback' not in err, err
    assert _digests(workspace) == before, 'a bad input changed or added a file'


def test_the_catalogue_is_read():
    assert len(_catalogue()) >= 25
