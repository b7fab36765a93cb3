"""Hardening, round three: nothing of a donor dropped silently, true records, bounded work on untrusted files,
one output per path, exit status 2 for input errors (one test per defect of the third adversarial round)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

import timm_moejet  # noqa: F401
from weights_tools.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _dense(seed: int = 0, **kwargs) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model('vit_tiny_patch16_224', embed_dim=64, depth=4, num_heads=2, img_size=64,
                             num_classes=3, **kwargs).eval()


@pytest.fixture(scope='module')
def donors(tmp_path_factory):
    """Hub folders of a plain ViT, one with LayerScale, one with q/k norms, a DeiT III-style one (LayerScale, no
    class embedding), and a weights file of the plain one."""
    from timm.models import save_for_hf

    root = tmp_path_factory.mktemp('donors')
    variants = dict(vit={}, vit_ls=dict(init_values=0.1), vit_qk=dict(qk_norm=True),
                    vit_deit3=dict(init_values=0.1, no_embed_class=True))
    for i, (name, kwargs) in enumerate(variants.items()):
        model = _dense(i, **kwargs)
        if 'init_values' in kwargs:  # gammas that differ per channel, so a dropped one shows
            with torch.no_grad():
                for block in model.blocks:
                    block.ls1.gamma.uniform_(0.05, 0.5)
                    block.ls2.gamma.uniform_(0.05, 0.5)
        save_for_hf(model, str(root / name), safe_serialization=True)
    save_file(_dense(0).state_dict(), str(root / 'vit.safetensors'))
    return root


def _err(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and 'Traceback' not in err, err
    return err


# defect 1: two outputs of one command naming the same path


def test_two_outputs_naming_one_path_are_refused_before_any_work(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(['inspect', 'moejet_vit_test', '--random-images', '2', '--plot', 'out.png', '--json',
                 'out.png']) == 2
    err = _err(capsys)
    assert 'out.png' in err and 'same path' in err
    assert list(tmp_path.iterdir()) == []
    # also through another spelling of the path
    assert main(['inspect', 'moejet_vit_test', '--random-images', '2', '--plot', 'out.png', '--json',
                 f'../{tmp_path.name}/out.png']) == 2
    assert list(tmp_path.iterdir()) == []


# defect 2: donor components the target cannot hold


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


# defect 3: expert donor tensors of the wrong shape


@pytest.mark.parametrize('key, shape', [('blocks.2.mlp.fc1.weight', (256, 64, 2)),
                                        ('blocks.3.mlp.fc1.bias', (200,)),
                                        ('blocks.3.mlp.fc2.weight', (64, 8))])
def test_expert_donor_tensors_of_the_wrong_shape_are_refused(donors, tmp_path, capsys, key, shape):
    sd = dict(_dense(0).state_dict())
    sd[key] = torch.randn(shape)
    save_file(sd, str(tmp_path / 'bad.safetensors'))
    assert main(['recycle', '--model', 'moejet_vit_test', '--trunk', str(donors / 'vit.safetensors'), '--experts',
                 str(tmp_path / 'bad.safetensors'), '--strategy', 'uniform', '--output', str(tmp_path / 'm')]) == 2
    err = _err(capsys)
    assert key in err and str(tuple(shape)) in err and 'expected' in err, err
    assert not (tmp_path / 'm').exists()


# defect 4: the record describes what ran in this load


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


# defect 5: folder walks and symlink cycles


def test_image_folders_with_symlink_loops_are_read_once(tmp_path):
    from benchmarks.digits.data import write_digits_image_folder
    from timm_moejet.image_folder import image_loader

    write_digits_image_folder(str(tmp_path / 'imgs'), image_size=16)
    model = _dense(0)
    count = image_loader(str(tmp_path / 'imgs'), model)[1]['available']
    first = sorted(p for p in (tmp_path / 'imgs' / 'validation').iterdir() if p.is_dir())[0]
    os.symlink('..', first / 'loop')
    _, summary = image_loader(str(tmp_path / 'imgs'), model)
    assert summary['available'] == count
    os.symlink('..', first / 'loop2')  # two loops: exponential before
    script = ('import sys, timm; from timm_moejet.image_folder import image_loader\n'
              'm = timm.create_model("vit_tiny_patch16_224", img_size=64, embed_dim=64, depth=1, num_heads=1)\n'
              'print(image_loader(sys.argv[1], m)[1]["available"])')
    done = subprocess.run([sys.executable, '-c', script, str(tmp_path / 'imgs')], capture_output=True, text=True,
                          timeout=60, cwd=ROOT)
    assert done.returncode == 0 and int(done.stdout.split()[-1]) == count, done.stderr[-500:]


# defect 6: a checkpoint's declared architecture against its tensors, before any model is built


def test_declared_architecture_is_checked_before_a_model_is_built(tmp_path, capsys, monkeypatch):
    sd = timm.create_model('moejet_vit_test').state_dict()
    official_sd = {k.replace('.mlp.slot_queries', '.mlp.phi'): v for k, v in sd.items()}
    config = dict(embed_dim=8192, depth=24, num_heads=8, moe_layers=[22, 23], core_experts=4, img_size=64)
    save_file(official_sd, str(tmp_path / 'huge.safetensors'), metadata={'config': json.dumps(config)})
    real = timm.create_model

    def create_model(name, *args, **kwargs):
        assert str(kwargs.get('device', '')) == 'meta', 'a model was built before the shapes were checked'
        return real(name, *args, **kwargs)

    monkeypatch.setattr(timm, 'create_model', create_model)
    assert main(['import-official', str(tmp_path / 'huge.safetensors'), '--output', str(tmp_path / 'o')]) == 2
    err = _err(capsys)
    assert 'does not fit' in err and 'huge.safetensors' in err, err


# defect 7: stale-temporary cleanup and names it did not make


@pytest.mark.parametrize('name', ['.ws2.safetensors.moejet-tmp-4294967296-abcdef12.tmp',
                                  '.ws2.safetensors.moejet-tmp-99999999999999999999999-abcdef12.tmp',
                                  '.ws2.safetensors.moejet-tmp-0-abcdef12.tmp',
                                  '.ws2.safetensors.moejet-tmp-12-xyz.tmp'])
def test_stale_cleanup_ignores_names_it_did_not_make(tmp_path, name):
    from timm_moejet.checkpoint_io import save_safetensors_atomic

    (tmp_path / name).write_text('not ours')
    save_safetensors_atomic({'a': torch.ones(2)}, tmp_path / 'ws2.safetensors')
    assert (tmp_path / name).read_text() == 'not ours'
    assert (tmp_path / 'ws2.safetensors').is_file()


# defect 8: create_moejet_from with a plain folder path


def test_create_moejet_from_takes_a_plain_folder(donors, monkeypatch):
    monkeypatch.chdir(donors)
    model = timm_moejet.create_moejet_from('vit', recycle_strategy='uniform')
    ref = timm_moejet.create_moejet_from('local-dir:vit', recycle_strategy='uniform')
    for (k, a), (_, b) in zip(model.state_dict().items(), ref.state_dict().items()):
        if 'head' not in k and 'slot' not in k and 'temperature' not in k:
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)


# defect 9: config.json with model_args that are not a mapping


@pytest.fixture
def bad_config_folder(donors, tmp_path):
    folder = tmp_path / 'badcfg'
    folder.mkdir()
    (folder / 'model.safetensors').write_bytes((donors / 'vit' / 'model.safetensors').read_bytes())
    config = json.loads((donors / 'vit' / 'config.json').read_text())
    config['model_args'] = [1, 2]
    (folder / 'config.json').write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize('command', [
    ['export', '{f}', '--output', '{o}'],
    ['recycle', '--trunk', '{f}', '--output', '{o}'],
    ['recycle', '--model', 'moejet_vit_test', '--trunk', '{f}', '--output', '{o}'],
    ['calibrate', '--donor', '{f}', '--images', '{t}', '--output', '{o}.safetensors'],
])
def test_config_with_model_args_not_a_mapping_is_an_input_error(bad_config_folder, tmp_path, capsys, command):
    (tmp_path / 'imgs').mkdir()
    argv = [a.format(f=bad_config_folder, o=tmp_path / 'o', t=tmp_path / 'imgs') for a in command]
    assert main(argv) == 2
    err = _err(capsys)
    assert 'model_args' in err and 'config.json' in err, err


def test_config_with_model_args_not_a_mapping_is_a_typed_error_from_the_api(bad_config_folder):
    from timm_moejet.errors import InvalidCheckpoint

    with pytest.raises(InvalidCheckpoint, match='model_args'):
        timm_moejet.create_moejet_from(str(bad_config_folder))


# minor classes the command-line catalogue cannot show (environment faults, API routes)


@pytest.mark.parametrize('code, words', [(30, 'read-only'), (28, 'no space left'), (13, 'permission denied')])
def test_unwritable_outputs_name_the_users_path(tmp_path, monkeypatch, code, words):
    """EROFS / ENOSPC / EACCES while the temporary is written: exit 2 naming the output, not the temporary."""
    from timm_moejet import checkpoint_io

    def failing_save(tensors, path, metadata=None):
        raise OSError(code, os.strerror(code), path)

    monkeypatch.setattr(checkpoint_io, 'save_file', failing_save)
    out = tmp_path / 'ws.safetensors'
    from timm_moejet.errors import OutputNotWritable
    with pytest.raises(OutputNotWritable, match=words) as info:
        checkpoint_io.save_safetensors_atomic({'a': torch.ones(2)}, out)
    assert str(out) in str(info.value) and 'moejet-tmp' not in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_a_non_utf8_checkpoint_path_is_read(tmp_path):
    from timm_moejet.checkpoint_io import load_state_dict_file

    path = os.path.join(os.fsencode(tmp_path), b'w\xff.safetensors')
    save_file({'a': torch.ones(2)}, str(tmp_path / 'plain.safetensors'))
    os.rename(tmp_path / 'plain.safetensors', path)
    assert torch.equal(load_state_dict_file(os.fsdecode(path))['a'], torch.ones(2))


def test_an_unreadable_checkpoint_says_permission_denied(tmp_path, monkeypatch):
    from timm_moejet.checkpoint_io import load_state_dict_file
    from timm_moejet.errors import InvalidCheckpoint

    save_file({'a': torch.ones(2)}, str(tmp_path / 'w.safetensors'))
    os.chmod(tmp_path / 'w.safetensors', 0)
    monkeypatch.setattr(os, 'access', lambda path, mode: False)  # root reads mode-000 files: ask as a user would
    with pytest.raises(InvalidCheckpoint, match='permission denied'):
        load_state_dict_file(tmp_path / 'w.safetensors')


def test_official_univ_factor_is_named_as_the_official_config_names_it():
    from timm_moejet.checkpoint_io.official import official_config_to_kwargs
    from timm_moejet.errors import InvalidArgument

    with pytest.raises(InvalidArgument, match='univ_factor'):
        official_config_to_kwargs(dict(moe_layers=[2, 3], core_experts=4, univ_factor=1e-9, embed_dim=64,
                                       num_heads=2, depth=4))


def test_inspect_json_writes_null_for_an_undefined_figure(tmp_path):
    out = tmp_path / 'f.json'
    assert main(['inspect', 'moejet_vit_test', '--model-kwargs', 'num_univ_experts=0', '--random-images', '1',
                 '--json', str(out)]) == 0

    def refuse(constant):
        raise ValueError(f'{constant} is not JSON')

    layers = json.loads(out.read_text(), parse_constant=refuse)['layers']
    assert layers[0]['univ_contribution'] is None


def test_onnx_export_of_cast_experts_says_it_needs_float32(tmp_path):
    pytest.importorskip('onnx')
    from timm_moejet.errors import InvalidArgument
    from timm_moejet.layers import cast_experts
    from timm_moejet.onnx_export import export_onnx

    model = timm.create_model('moejet_vit_test').eval()
    cast_experts(model, torch.bfloat16)
    with pytest.raises(InvalidArgument, match='float32'):
        export_onnx(model, tmp_path / 'm.onnx', check=False)
    assert list(tmp_path.iterdir()) == []


def test_the_launcher_refuses_an_unreadable_script(tmp_path, capsys, monkeypatch):
    from timm_moejet.run import main as run_main

    script = tmp_path / 'train.py'
    script.write_text('print("ran")\n')
    monkeypatch.setattr(os, 'access', lambda path, mode: False)
    assert run_main([str(script)]) == 2
    err = capsys.readouterr().err.strip()
    assert 'cannot be read' in err and str(script) in err and len(err.splitlines()) == 1


@pytest.mark.parametrize('call, error', [
    (lambda: timm_moejet.create_moejet_from('vit_tiny_patch16_224.nonexistent_tag'), 'InvalidArgument'),
    (lambda: timm.create_model('moejet_vit_test', img_size=8), 'InvalidArgument'),
    (lambda: timm.create_model('moejet_vit_test', mlp_ratio=1e300), 'InvalidArgument'),
])
def test_the_python_api_raises_the_typed_errors_the_cli_words(call, error):
    from timm_moejet import errors

    with pytest.raises(getattr(errors, error)):
        call()
