""" weights_tools on bad input: exit status 2, a one-line message naming the problem, and no output written.

Also: an output that is or holds an input is refused; two outputs of one command may not name one path; Ctrl-C and
SIGTERM say whether the output was written; a missing optional package names its extra; long messages are cut.
"""
import hashlib
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
from timm_moejet.moe_keys import MOE_KEYS
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


@pytest.mark.parametrize('command', [['export', '--output', 'out'], ['inspect', '--random-images', '1']])
def test_a_class_count_other_than_the_checkpoints_is_refused(donors, tmp_path, capsys, monkeypatch, command):
    """A folder's model has its trained head: --num-classes 5 for a 10-class checkpoint would replace it."""
    monkeypatch.chdir(tmp_path)
    status, err = _run([command[0], donors / 'a_folder', '--num-classes', '5', *command[1:]], capsys)
    _assert_failed(status, err, 'num_classes=5 conflicts with', 'whose checkpoint has 10 classes',
                   'Leave num_classes out')
    assert os.listdir(tmp_path) == []
    from timm_moejet.build import load_model
    from timm_moejet.errors import InvalidArgument
    with pytest.raises(InvalidArgument, match='conflicts with'):
        load_model(str(donors / 'a_folder'), model_kwargs=dict(num_classes=5))
    assert load_model(str(donors / 'a_folder'), model_kwargs=dict(num_classes=10))[0].num_classes == 10


def test_the_class_count_given_twice_is_refused(donors, tmp_path, capsys):
    status, err = _run(['export', 'moejet_vit_test', '--num-classes', '10', '--model-kwargs', 'num_classes=10',
                        '--output', tmp_path / 'out'], capsys)
    _assert_failed(status, err, 'given twice', '--num-classes 10', 'num_classes=10')
    assert not (tmp_path / 'out').exists()


def _sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


_SIGTERM_RUN = '''
import os, signal, sys
from pathlib import Path
import timm.models
from weights_tools.cli import main

def slow_save(model, save_directory, **kwargs):
    (Path(save_directory) / 'model.safetensors').write_bytes(b'half')
    os.kill(os.getpid(), signal.SIGTERM)
    raise AssertionError('SIGTERM did not stop the write')

timm.models.save_for_hf = slow_save
sys.exit(main(['export', 'moejet_vit_test', '--output', sys.argv[1]]))
'''


def test_sigterm_is_handled_like_ctrl_c(tmp_path):
    proc = subprocess.run([sys.executable, '-c', _SIGTERM_RUN, str(tmp_path / 'out')], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 143, (proc.returncode, proc.stderr[-2000:])
    assert 'terminated' in proc.stderr and 'no output was written' in proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_interrupt_after_the_output_is_in_place_says_so(tmp_path, monkeypatch, capsys):
    from timm_moejet.checkpoint_io import hub
    from weights_tools.cli import main

    real_save = hub.save_hub_folder

    def save_then_interrupt(*args, **kwargs):
        real_save(*args, **kwargs)
        raise KeyboardInterrupt
    monkeypatch.setattr(hub, 'save_hub_folder', save_then_interrupt)
    assert main(['export', 'moejet_vit_test', '--output', str(tmp_path / 'out')]) == 130
    err = capsys.readouterr().err
    assert 'no output was written' not in err and f'{tmp_path / "out"} was written completely' in err, err
    assert sorted(p.name for p in (tmp_path / 'out').iterdir()) == ['config.json', 'model.safetensors']


def _tree_digest(path: Path) -> dict:
    return {str(p.relative_to(path)): _sha(p) for p in sorted(Path(path).rglob('*')) if p.is_file()}


@pytest.mark.parametrize('argv, input_name', [
    (['calibrate', '--donor', '{root}/donor', '--images', '{root}/digits', '--limit', '8',
      '--output', '{root}/donor/model.safetensors', '--overwrite'], 'donor'),
    (['recycle', '--model', 'moejet_vit_test', '--trunk', '{root}/donor', '--strategy', 'uniform',
      '--output', '{root}/donor', '--overwrite'], 'donor'),
    (['recycle', '--model', 'moejet_vit_test', '--trunk', '{root}/donor/model.safetensors', '--strategy', 'uniform',
      '--output', '{root}', '--overwrite'], 'donor'),
    (['export', 'local-dir:{root}/donor', '--output', '{root}/donor/export', '--overwrite'], 'donor'),
    (['inspect', 'moejet_vit_test', '--images', '{root}/digits', '--limit', '4',
      '--plot', '{root}/digits/train/0/p.png', '--overwrite'], 'digits'),
])
def test_no_output_overwrites_an_input(dense_folder, argv, input_name, capsys):
    """An output that is, contains or lives inside one of the command's inputs is refused, --overwrite or not."""
    from weights_tools.cli import main

    before = _tree_digest(dense_folder)
    status = main([a.format(root=dense_folder) for a in argv])
    err = capsys.readouterr().err
    assert status == 2 and any(w in err for w in ('is the', 'lies inside the', 'contains the')), err
    assert str(dense_folder / input_name) in err, err
    assert _tree_digest(dense_folder) == before


@pytest.mark.parametrize('argv, fragment', [
    (['recycle', '--trunk', '{donor}', '--seed', str(2 ** 70), '--output', '{out}'],
     'argument --seed: must be an int in [0, 9223372036854775807], got'),
    (['calibrate', '--donor', '{donor}', '--donor-arch', 'vit_tiny_patch16_224', '--images', '{digits}',
      '--seed', str(2 ** 70), '--output', '{out}.safetensors'], 'argument --seed: must be an int in [0, 92233720'),
    (['export', 'moejet_vit_test', '--num-classes', '-5', '--output', '{out}'],
     'argument --num-classes: must be an int >= 0, got -5'),
    (['inspect', 'moejet_vit_test', '--batch-size', '0'], 'argument --batch-size: must be an int >= 1, got 0'),
    (['import-official', '{out}.pth', '--output', '{out}'], 'checkpoint file not found'),
    (['recycle', '--model', 'moejet_vit_test', '--trunk', 'local-dir:{donor}', '--output', '{out}'],
     'names a file; local-dir: takes a Hub folder'),
    (['calibrate', '--donor', '{root}/donor', '--images', '{digits}', '--split', 'trian', '--output',
      '{out}.safetensors'], "split 'trian':"),
    (['calibrate', '--donor', 'vit_small_patch16_224.augreg_in21k', '--images', '{digits}', '--output',
      '{out}.safetensors'], "vit_small_patch16_224.augreg_in21k (Hub repository 'timm/vit_small_patch16_224."
                            "augreg_in21k') is not in the local Hugging Face cache and the Hub was not reachable"),
])
def test_bad_arguments_get_one_clear_line(dense_folder, tmp_path, monkeypatch, capsys, argv, fragment):
    from hub_cache import use_offline_hub

    from weights_tools.cli import main

    use_offline_hub(monkeypatch, tmp_path / 'empty_cache')
    args = [a.format(donor=dense_folder / 'donor.safetensors', digits=dense_folder / 'digits', out=tmp_path / 'o',
                     root=dense_folder) for a in argv]
    status = main(args)
    err = capsys.readouterr().err.strip()
    assert status == 2 and fragment in err and len(err.splitlines()) == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ['empty_cache']


def test_long_messages_are_cut_to_a_readable_line(tmp_path, capsys):
    """A checkpoint of another model used to give a 4,500-character line."""
    from safetensors.torch import save_file

    from weights_tools.cli import main

    save_file(timm.create_model('vit_tiny_patch16_224', depth=2).state_dict(), str(tmp_path / 'other.safetensors'))
    status = main(['export', 'moejet_vit_test', '--checkpoint', str(tmp_path / 'other.safetensors'),
                   '--output', str(tmp_path / 'out')])
    err = capsys.readouterr().err.strip()
    assert status == 2 and 'does not fit' in err and len(err.splitlines()) == 1 and len(err) <= 600, (len(err), err)
    assert '--debug' in err


@pytest.mark.parametrize('module, argv', [
    ('pymetis', ['recycle', '--model', 'moejet_vit_test', '--trunk', '{donor}', '--strategy', 'graph',
                 '--output', '{out}']),
    ('matplotlib', ['inspect', 'moejet_vit_test', '--random-images', '2', '--plot', '{out}.png']),
])
def test_a_missing_optional_package_names_its_extra(dense_folder, tmp_path, monkeypatch, capsys, module, argv):
    """pymetis and matplotlib are extras ([graph], [plot]): without them, one line says which extra to install."""
    from weights_tools.cli import main

    for name in list(sys.modules):
        if name == module or name.startswith(module + '.'):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if the package were not installed
    status = main([a.format(donor=dense_folder / 'donor.safetensors', out=tmp_path / 'o') for a in argv])
    err = capsys.readouterr().err.strip()
    extra = 'graph' if module == 'pymetis' else 'plot'
    assert status == 2 and f'needs {module}' in err and f'pip install "timm-moejet[{extra}]"' in err, err
    assert len(err.splitlines()) == 1 and list(tmp_path.iterdir()) == []


def _err(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and 'Traceback' not in err, err
    return err


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


def test_declared_architecture_is_checked_before_a_model_is_built(tmp_path, capsys, monkeypatch):
    sd = timm.create_model('moejet_vit_test').state_dict()
    official_sd = {k.replace(f'.mlp.{MOE_KEYS.slot_queries}', '.mlp.phi'): v for k, v in sd.items()}
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


@pytest.fixture
def bad_config_folder(donors, tmp_path):
    folder = tmp_path / 'badcfg'
    folder.mkdir()
    (folder / 'model.safetensors').write_bytes((donors / 'a_folder' / 'model.safetensors').read_bytes())
    config = json.loads((donors / 'a_folder' / 'config.json').read_text())
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


def test_inspect_json_writes_null_for_an_undefined_figure(tmp_path):
    out = tmp_path / 'f.json'
    assert main(['inspect', 'moejet_vit_test', '--model-kwargs', 'num_univ_experts=0', '--random-images', '1',
                 '--json', str(out)]) == 0

    def refuse(constant):
        raise ValueError(f'{constant} is not JSON')

    layers = json.loads(out.read_text(), parse_constant=refuse)['layers']
    assert layers[0]['univ_contribution'] is None


@pytest.mark.parametrize('call, error', [
    (lambda: timm_moejet.create_moejet_from('vit_tiny_patch16_224.nonexistent_tag'), 'InvalidArgument'),
    (lambda: timm.create_model('moejet_vit_test', img_size=8), 'InvalidArgument'),
    (lambda: timm.create_model('moejet_vit_test', mlp_ratio=1e300), 'InvalidArgument'),
    (lambda: timm.create_model('moejet_vit_test', drop_path_rate=5), 'InvalidArgument'),
    (lambda: timm_moejet.load_model('moejet_vit_test', ema=True), 'InvalidArgument'),
    (lambda: timm_moejet.load_model('moejet_vit_test', model_kwargs=dict(drop_rate=2.)), 'InvalidArgument'),
    (lambda: timm_moejet.load_model('./no/such/model'), 'NotFound'),
    (lambda: timm_moejet.load_official('./no/such/checkpoint.pth'), 'NotFound'),
])
def test_the_python_api_raises_the_typed_errors_the_cli_words(call, error):
    from timm_moejet import errors

    with pytest.raises(getattr(errors, error)):
        call()


@pytest.mark.parametrize('argv, existing, fragment', [
    (['inspect', 'moejet_vit_test', '--random-images', '1', '--json', '{out}', '--overwrite'], 'folder',
     'is a folder; a file cannot replace it'),
    (['calibrate', '--donor', '{donor}', '--images', '{images}', '--output', '{out}', '--overwrite'], 'folder',
     'is a folder; a file cannot replace it'),
    (['export', 'moejet_vit_test', '--output', '{out}', '--overwrite'], 'file', 'is a file, not a folder'),
    (['export', 'moejet_vit_test', '--output', ''], None, 'empty path'),
])
def test_an_output_of_the_other_kind_or_no_path_is_refused_before_any_work(donors, tmp_path, capsys, monkeypatch,
                                                                              argv, existing, fragment):
    """A folder where a file is to be written (or a file where a folder is) is never replaced, --overwrite or not;
    it used to fail after the work with the hidden temporary's path, or replace nothing with a vague line."""
    import timm_moejet.checkpoint_io.atomic as atomic

    out = tmp_path / 'out.safetensors'
    if existing == 'folder':
        (out / 'mine').mkdir(parents=True)
    elif existing == 'file':
        out.write_text('mine')
    monkeypatch.setattr(atomic, '_staging', None)  # no writer may start
    monkeypatch.chdir(tmp_path)
    before = _tree_digest(tmp_path)
    status, err = _run([a.format(out=out, donor=donors / 'a_folder', images=donors / 'images_empty') for a in argv],
                       capsys)
    _assert_failed(status, err, fragment)
    assert _tree_digest(tmp_path) == before and sorted(os.listdir(tmp_path)) == (['out.safetensors'] if existing
                                                                                 else [])


def test_a_link_to_no_folder_is_not_replaced_by_an_output_folder(tmp_path, capsys):
    (tmp_path / 'loop').symlink_to(tmp_path / 'loop')
    _assert_failed(*_run(['export', 'moejet_vit_test', '--output', tmp_path / 'loop', '--overwrite'], capsys),
                   'is a link to no folder')
    assert os.listdir(tmp_path) == ['loop'] and os.readlink(tmp_path / 'loop') == str(tmp_path / 'loop')


def test_none_given_where_the_help_allows_it_means_the_default(donors, tmp_path, capsys):
    """recycle --help says --experts and --stats allow None; the command line took it for a model name."""
    assert main(['recycle', '--model', 'moejet_vit_test', '--trunk', str(donors / 'a.safetensors'), '--experts',
                 'None', '--strategy', 'uniform', '--output', str(tmp_path / 'moe')]) == 0, capsys.readouterr().err
    config = json.loads((tmp_path / 'moe' / 'config.json').read_text())
    assert config['pretrained_cfg']['recycling']['experts'] == config['pretrained_cfg']['recycling']['trunk']


def test_the_writer_refuses_an_output_of_the_other_kind(tmp_path):
    from timm_moejet.checkpoint_io import atomic_output_dir, atomic_write_bytes
    from timm_moejet.errors import OutputExists

    (tmp_path / 'folder').mkdir()
    (tmp_path / 'file').write_text('mine')
    with pytest.raises(OutputExists, match='is a folder'):
        atomic_write_bytes(b'new', tmp_path / 'folder', overwrite=True)
    with pytest.raises(OutputExists, match='is a file, not a folder'):
        with atomic_output_dir(tmp_path / 'file', overwrite=True):
            pass
    assert sorted(os.listdir(tmp_path)) == ['file', 'folder'] and (tmp_path / 'file').read_text() == 'mine'


@pytest.mark.parametrize('extra, fragment', [
    (['--ema'], 'ema takes the EMA weights of a training checkpoint'),
    (['--pretrained'], 'moejet_vit_test has no pretrained weights'),
    (['--pretrained', '--checkpoint', '{ckpt}'], 'give one of them'),
    (['--model-kwargs', 'pretrained=True'], 'pretrained is not a model kwarg here'),
    (['--model-kwargs', 'checkpoint_path="{ckpt}"'], 'checkpoint_path is not a model kwarg here'),
    (['--model-kwargs', 'drop_path_rate=5'], 'drop_path_rate must be a number in [0, 1], got 5'),
    (['--model-kwargs', 'attn_drop_rate=-1'], 'attn_drop_rate must be a number in [0, 1], got -1'),
    (['--model-kwargs', 'in_chans=0'], 'in_chans must be an int >= 1, got 0'),
    (['--model-kwargs', 'global_pool="max2"'], 'moejet_vit_test: Only avg'),
    (['--model-kwargs', 'num_core_expert=2'], "unexpected keyword argument 'num_core_expert'; did you mean "
                                              "num_core_experts"),
])
def test_model_arguments_that_contradict_or_that_the_model_refuses_are_one_line(donors, tmp_path, capsys, extra,
                                                                                 fragment):
    """These used to be ignored (exit 0), or end in exit status 1 as if the program had failed."""
    argv = ['export', 'moejet_vit_test', *[a.format(ckpt=donors / 'a.safetensors') for a in extra],
            '--output', tmp_path / 'out']
    _assert_failed(*_run(argv, capsys), fragment)
    assert os.listdir(tmp_path) == []


def test_a_model_path_that_does_not_exist_is_named_as_a_path(tmp_path, capsys):
    for command in (['export', str(tmp_path / 'no_model'), '--output', str(tmp_path / 'o')],
                    ['push', f'./{tmp_path.name}_no_model', 'org/name']):
        _assert_failed(*_run(command, capsys), 'no_model does not exist', 'local-dir:FOLDER')
    assert os.listdir(tmp_path) == []


def test_random_images_are_drawn_one_batch_at_a_time(tmp_path, capsys, monkeypatch):
    """--random-images 10**12 used to allocate every image at once and end in exit status 1 (out of memory)."""
    import timm_moejet.diagnostics as diagnostics
    from timm_moejet.errors import InvalidArgument

    def first_batch_only(model, images, device=None):
        batch = next(iter(images))
        raise InvalidArgument(f'stopped after one batch of {batch.shape[0]}')

    monkeypatch.setattr(diagnostics, 'router_diagnostics', first_batch_only)
    status, err = _run(['inspect', 'moejet_vit_test', '--random-images', str(10 ** 12), '--batch-size', '3'], capsys)
    _assert_failed(status, err, 'stopped after one batch of 3')
