""" weights_tools on bad input: exit status 2, a one-line message naming the problem, and no output written. """
import os
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

import timm_moejet  # noqa: F401
from weights_tools.cli import main


@pytest.fixture(scope='module')
def donors(tmp_path_factory):
    """Two different dense donors (weights files) and statistics made for the first."""
    from timm.models import save_for_hf

    from timm_moejet.recycling import collect_statistics

    root = tmp_path_factory.mktemp('wt_errors')
    torch.manual_seed(0)
    a = timm.create_model('vit_tiny_patch16_224', embed_dim=64, depth=4, num_heads=2, img_size=64, num_classes=10)
    b = timm.create_model('vit_tiny_patch16_224', embed_dim=64, depth=4, num_heads=2, img_size=64, num_classes=10)
    save_file(a.state_dict(), str(root / 'a.safetensors'))
    save_file(b.state_dict(), str(root / 'b.safetensors'))
    save_for_hf(a, str(root / 'a_folder'), safe_serialization=True)
    stats = collect_statistics(a, [torch.randn(2, 3, 64, 64)], progress=False, donor_id='a')
    stats.save(str(root / 'a_stats.safetensors'))
    (root / 'corrupt.safetensors').write_bytes(b'\x00\x01 definitely not safetensors')
    (root / 'images_empty').mkdir()
    (root / 'images_empty' / 'cls0').mkdir()
    return root


def _run(argv, capsys):
    status = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    return status, err


def _assert_failed(status, err, *needles):
    assert status == 2, (status, err)
    assert len(err.splitlines()) == 1, err  # one line, no traceback
    assert 'Traceback' not in err
    for needle in needles:
        assert needle in err, (needle, err)


def _leftovers(folder: Path, name: str):
    """Anything named like the output, including our temporary '.name.*' folders/files."""
    return [p for p in os.listdir(folder) if p == name or p.startswith(f'.{name}.')]


def test_missing_donor_file(donors, tmp_path, capsys):
    out = tmp_path / 'moe'
    status, err = _run(['recycle', '--model', 'moejet_vit_test', '--trunk', donors / 'missing.safetensors',
                        '--output', out], capsys)
    _assert_failed(status, err, 'missing.safetensors', 'does not exist')
    assert _leftovers(tmp_path, 'moe') == []


def test_corrupt_donor_file(donors, tmp_path, capsys):
    status, err = _run(['recycle', '--model', 'moejet_vit_test', '--trunk', donors / 'corrupt.safetensors',
                        '--output', tmp_path / 'moe'], capsys)
    _assert_failed(status, err, 'corrupt.safetensors', 'not a readable safetensors')
    assert _leftovers(tmp_path, 'moe') == []


def test_wrong_format_statistics_file(donors, tmp_path, capsys):
    # a weights file passed where a statistics file is expected
    status, err = _run(['recycle', '--model', 'moejet_vit_test', '--trunk', donors / 'a.safetensors',
                        '--stats', donors / 'b.safetensors', '--output', tmp_path / 'moe'], capsys)
    _assert_failed(status, err, 'b.safetensors', 'not an activation statistics file')
    assert _leftovers(tmp_path, 'moe') == []


def test_wrong_format_import_official(donors, tmp_path, capsys):
    # a dense timm checkpoint is not an official MoE Jetpack checkpoint
    status, err = _run(['import-official', donors / 'a.safetensors', '--config', '{"moe_layers": [2, 3]}',
                        '--output', tmp_path / 'off'], capsys)
    _assert_failed(status, err, 'a.safetensors', 'not an official MoE Jetpack checkpoint')
    assert _leftovers(tmp_path, 'off') == []


def test_mismatched_donor_statistics(donors, tmp_path, capsys):
    # statistics made for donor a, recycling donor b
    status, err = _run(['recycle', '--model', 'moejet_vit_test', '--trunk', donors / 'b.safetensors',
                        '--stats', donors / 'a_stats.safetensors', '--output', tmp_path / 'moe'], capsys)
    _assert_failed(status, err, 'made for donor', 'b.safetensors')
    assert _leftovers(tmp_path, 'moe') == []


def test_donor_of_wrong_width(donors, tmp_path, capsys):
    # a 64-wide donor cannot be the trunk of a 192-wide MoE model
    status, err = _run(['recycle', '--model', 'moejet_vit_test', '--model-kwargs', 'embed_dim=128', '--trunk',
                        donors / 'a.safetensors', '--output', tmp_path / 'moe'], capsys)
    _assert_failed(status, err, 'width')
    assert _leftovers(tmp_path, 'moe') == []


@pytest.mark.parametrize('command', [
    ['export', 'moejet_vit_tinyy', '--output', '{out}'],
    ['inspect', 'moejet_vit_tinyy', '--plot', '{out}'],
    ['recycle', '--model', 'moejet_vit_tinyy', '--trunk', '{donor}', '--output', '{out}'],
])
def test_unknown_model_name(command, donors, tmp_path, capsys):
    out = tmp_path / 'out.png'
    argv = [c.format(out=out, donor=donors / 'a.safetensors') for c in command]
    status, err = _run(argv, capsys)
    _assert_failed(status, err, "unknown model name 'moejet_vit_tinyy'", 'moejet_vit_tiny')  # with a suggestion
    assert _leftovers(tmp_path, 'out.png') == []


def test_empty_image_folder(donors, tmp_path, capsys):
    out = tmp_path / 'stats.safetensors'
    status, err = _run(['calibrate', '--donor', donors / 'a_folder', '--images', donors / 'images_empty',
                        '--output', out], capsys)
    _assert_failed(status, err, 'images_empty', 'holds no images')
    assert _leftovers(tmp_path, 'stats.safetensors') == []


def test_missing_image_folder(donors, tmp_path, capsys):
    status, err = _run(['calibrate', '--donor', donors / 'a_folder', '--images', tmp_path / 'nope',
                        '--output', tmp_path / 'stats.safetensors'], capsys)
    _assert_failed(status, err, 'nope', 'does not exist')
    assert _leftovers(tmp_path, 'stats.safetensors') == []


def test_refuses_to_overwrite_then_overwrites(donors, tmp_path, capsys):
    out = tmp_path / 'moe'
    out.mkdir()
    (out / 'keep.txt').write_text('mine')
    argv = ['recycle', '--model', 'moejet_vit_test', '--trunk', donors / 'a.safetensors', '--strategy', 'uniform',
            '--output', out]
    status, err = _run(argv, capsys)
    _assert_failed(status, err, str(out), 'already exists', '--overwrite')
    assert os.listdir(out) == ['keep.txt'] and _leftovers(tmp_path, 'moe') == ['moe']
    status, err = _run(argv + ['--overwrite'], capsys)
    assert status == 0, err
    assert sorted(os.listdir(out)) == ['config.json', 'model.safetensors']
    assert _leftovers(tmp_path, 'moe') == ['moe']  # the replaced folder and the temporary one are gone


def test_failure_while_writing_leaves_nothing(donors, tmp_path, capsys, monkeypatch):
    import timm.models

    def broken_save(model, save_directory, **kwargs):
        (Path(save_directory) / 'model.safetensors').write_bytes(b'half')
        raise OSError('disk full')

    monkeypatch.setattr(timm.models, 'save_for_hf', broken_save)
    status, err = _run(['export', 'moejet_vit_test', '--output', tmp_path / 'moe'], capsys)
    assert status == 1 and 'disk full' in err and len(err.splitlines()) == 1, (status, err)  # not an input error
    assert os.listdir(tmp_path) == []  # neither the output nor its temporary folder


def test_bad_argument_values(donors, tmp_path, capsys):
    status, err = _run(['recycle', '--model', 'moejet_vit_test', '--trunk', donors / 'a.safetensors',
                        '--strategy', 'best', '--output', tmp_path / 'moe'], capsys)
    _assert_failed(status, err, "'best'", 'importance')
    status, err = _run(['calibrate', '--donor', donors / 'a.safetensors', '--images', donors, '--output',
                        tmp_path / 's.safetensors'], capsys)
    _assert_failed(status, err, '--donor-arch')
    status, err = _run(['inspect', 'moejet_vit_test', '--plot', tmp_path / 'plot.jpg'], capsys)
    _assert_failed(status, err, '.png')
    status, err = _run(['push', 'moejet_vit_test', 'a/b/c'], capsys)
    _assert_failed(status, err, 'ORG/NAME')
    assert main(['recycle']) == 2  # argparse usage error
    assert os.listdir(tmp_path) == []


def test_debug_shows_the_exception(donors, tmp_path):
    with pytest.raises(FileNotFoundError):
        main(['--debug', 'recycle', '--model', 'moejet_vit_test', '--trunk', str(donors / 'missing.pth'),
              '--output', str(tmp_path / 'moe')])
    with pytest.raises(FileNotFoundError):
        main(['recycle', '--debug', '--model', 'moejet_vit_test', '--trunk', str(donors / 'missing.pth'),
              '--output', str(tmp_path / 'moe')])


def test_interrupted_write_leaves_nothing(donors, tmp_path, capsys, monkeypatch):
    import timm.models

    def interrupted_save(model, save_directory, **kwargs):
        (Path(save_directory) / 'model.safetensors').write_bytes(b'half')
        raise KeyboardInterrupt

    monkeypatch.setattr(timm.models, 'save_for_hf', interrupted_save)
    status, err = _run(['recycle', '--model', 'moejet_vit_test', '--trunk', donors / 'a.safetensors',
                        '--strategy', 'uniform', '--output', tmp_path / 'moe'], capsys)
    assert status == 130 and 'interrupted' in err, (status, err)
    assert os.listdir(tmp_path) == []


def test_more_bad_inputs(donors, tmp_path, capsys):
    # a device this machine does not have
    status, err = _run(['inspect', 'moejet_vit_test', '--device', 'cuda:99'], capsys)
    _assert_failed(status, err, 'cuda:99', 'CUDA device')
    # a dense model has no router to inspect
    status, err = _run(['inspect', 'vit_tiny_patch16_224', '--model-kwargs', 'depth=1', '--plot',
                        tmp_path / 'p.png'], capsys)
    _assert_failed(status, err, 'no SpheroMoE layer')
    # a Hub folder with a broken config.json
    broken = tmp_path / 'broken'
    broken.mkdir()
    (broken / 'config.json').write_text('{"architecture": ')
    status, err = _run(['export', broken, '--output', tmp_path / 'out'], capsys)
    _assert_failed(status, err, 'config.json', 'not valid JSON')
    # a model name without pretrained weights as a donor
    status, err = _run(['calibrate', '--donor', 'moejet_vit_test', '--images', donors / 'images_empty',
                        '--output', tmp_path / 's.safetensors'], capsys)
    _assert_failed(status, err, 'moejet_vit_test has no pretrained weights')
    assert sorted(os.listdir(tmp_path)) == ['broken']
