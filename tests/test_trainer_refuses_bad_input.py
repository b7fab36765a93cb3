""" ``python -m timm_moejet.train`` refuses bad input before anything runs: one line naming what is wrong and what to
do, exit status 2, nothing written; the same checks raise the project's errors to a library caller.

The trainer runs in this process (``main(argv)``, as tests/test_fsdp.py does for one process): a refusal happens
before the model is built, so these tests take a second each.
"""
from pathlib import Path

import pytest
import yaml

from timm_moejet.errors import InvalidArgument, MoEJetError
from timm_moejet.train import main, parse_args

CONFIGS = sorted((Path(__file__).resolve().parents[1] / 'configs').glob('*.yaml'))


def _refused(argv, capsys, tmp_path, *words):
    """``main(argv)`` exits with status 2 and one line on stderr holding ``words``, and writes no run folder."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert all(w in err for w in words), err
    assert not (tmp_path / 'runs').exists()
    return err


@pytest.mark.parametrize('extra, words', [
    (['--data-dir', 'no/such/folder'], ['--data-dir', 'does not exist']),
    (['--model', 'moejet_vit_tset'], ['--model moejet_vit_tset', 'did you mean moejet_vit_test']),
    (['--opt', 'nosuch'], ['--opt nosuch', 'list_optimizers']),
    (['--opt', 'adamww'], ['did you mean adamw']),
    (['--sched', 'nosuch'], ['--sched nosuch', 'cosine']),
    (['--epochs', '0'], ['--epochs must be at least 1']),
    (['--workers', '-1'], ['--workers must be at least 0']),
    (['--log-interval', '0'], ['--log-interval must be at least 1']),
    (['--checkpoint-hist', '0'], ['--checkpoint-hist must be at least 1', 'newest checkpoint is always kept']),
    (['--batch-size', '0'], ['--batch-size must be at least 1']),
    (['--epochs', 'ten'], ["--epochs: invalid int value: 'ten'", '--help']),  # argparse's error, without the usage
    (['--lr', 'nan'], ['--lr must be a finite number, got nan']),
    (['--lr', '-0.1'], ['--lr must be at least 0']),
    (['--smoothing', '1'], ['--smoothing must be in [0, 1)']),
    (['--clip-grad', '0'], ['--clip-grad must be above 0']),
    (['--hflip', '2'], ['--hflip must be in [0, 1]']),
    (['--seed', '-1'], ['--seed must be in [0, 2147483647]']),
    (['--num-classes', '1'], ['--num-classes must be at least 2']),
    (['--img-size', '0'], ['--img-size must be at least 1']),
    (['--std', '0', '0', '0'], ['--std must be above 0']),
    (['--mean', '0.5', '0.5'], ['--mean takes 1 value or one per channel (3), got 2']),
    (['--lr-base-scale', 'sqr'], ["--lr-base-scale 'sqr' is not one of linear, sqrt"]),
    (['--opt-kwargs', 'nosuch=1'], ['--opt sgd refuses its settings', 'nosuch']),
    (['--opt', 'adamw', '--opt-betas', '0.9'], ['--opt adamw refuses its settings']),
    (['--train-split', 'trian'], ['--train-split trian', 'has no such folder']),
    (['--model', 'local-dir:no/such/folder'], ['no/such/folder does not exist']),
    (['--img-size', '40'], ['the model takes 32 x 32 images', 'data would be 40 x 40']),  # found once it is built
    (['--input-size', '1', '32', '32', '--mean', '0.5', '--std', '0.5'],
     ['the model takes 3-channel images', '--input-size gives 1']),
    (['--input-size', '4', '32', '32'], ['reads images as RGB (3 channels) or grayscale (1), not 4']),
    (['--model-kwargs', 'img_size=32', 'patch_size=8', 'in_chans=1', '--input-size', '1', '32', '32'],
     ['grayscale images (1 channel) need their own normalisation', '--mean M --std S']),
])
def test_bad_option_values_are_refused_in_one_line(trainer_argv, capsys, tmp_path, extra, words):
    _refused(trainer_argv(*extra), capsys, tmp_path, *words)


def test_hub_model_offline_is_refused(trainer_argv, capsys, tmp_path, monkeypatch):
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', True)
    _refused(trainer_argv('--model', 'hf-hub:timm-moejet-tests/no-such-repo'), capsys, tmp_path,
             '--model hf-hub:timm-moejet-tests/no-such-repo is not in the local Hugging Face cache')


def test_missing_data_dir_is_refused(trainer_argv, capsys, tmp_path):
    argv = trainer_argv()
    i = argv.index('--data-dir')
    _refused(argv[:i] + argv[i + 2:], capsys, tmp_path, '--data-dir is required')


def test_empty_data_dir_is_refused(trainer_argv, capsys, tmp_path):
    (tmp_path / 'empty' / 'train').mkdir(parents=True)
    _refused(trainer_argv('--data-dir', str(tmp_path / 'empty')), capsys, tmp_path, str(tmp_path / 'empty'))


def _class_folders(root: Path, classes) -> Path:
    """An image folder ``train/<class>/0.png`` of 2 x 2 images ('' puts the image in train/ itself)."""
    from PIL import Image
    for name in classes:
        (root / 'train' / name).mkdir(parents=True, exist_ok=True)
        Image.new('RGB', (2, 2)).save(root / 'train' / name / '0.png')
    return root


@pytest.mark.parametrize('classes, words', [
    ([''], ['holds images but no class folders', 'train/<class>/']),
    (['a'], ['holds one class folder (a)']),
    ([str(c) for c in range(11)], ['holds 11 classes', 'more than --num-classes 10']),  # a label past the head
])
def test_image_folder_classes_that_cannot_train_are_refused(trainer_argv, capsys, tmp_path, classes, words):
    data = _class_folders(tmp_path / 'data', classes)
    _refused(trainer_argv('--data-dir', str(data)), capsys, tmp_path, *words)


def test_validation_folder_without_train_folder_is_refused(trainer_argv, capsys, tmp_path):
    # timm would read the whole folder, labelling validation/<class>/ images by their class: training on them
    data = _class_folders(tmp_path / 'data', ['a', 'b'])
    (data / 'train').rename(data / 'validation')
    _refused(trainer_argv('--data-dir', str(data)), capsys, tmp_path, '--train-split train', 'no such folder')


@pytest.mark.parametrize('where', ['output', 'run'])
def test_output_that_is_a_file_is_refused(trainer_argv, trainer_command, capsys, tmp_path, where):
    path = tmp_path / 'runs' / 'run' if where == 'run' else tmp_path / 'runs'
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text('a file of the user')
    assert main(trainer_argv()) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f'{path} is not a folder' in err, err
    assert path.read_text() == 'a file of the user'


def test_run_folder_with_an_earlier_export_is_refused_and_kept(trainer_argv, capsys, tmp_path):
    run = tmp_path / 'runs' / 'run'
    (run / 'model').mkdir(parents=True)
    (run / 'model' / 'model.safetensors').write_text('weights of an earlier run')
    (run / 'steps.jsonl').write_text('{"step": 1}\n')
    before = sorted(p.relative_to(run) for p in run.rglob('*'))
    assert main(trainer_argv()) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "holds an earlier run's model, steps.jsonl" in err, err
    assert sorted(p.relative_to(run) for p in run.rglob('*')) == before
    assert (run / 'model' / 'model.safetensors').read_text() == 'weights of an earlier run'


def test_damaged_tar_is_refused(trainer_argv, capsys, tmp_path):
    tar = tmp_path / 'images.tar'
    tar.write_bytes(b'not a tar archive')
    assert main(trainer_argv('--data-dir', str(tar))) == 2
    err = capsys.readouterr().err.strip()
    assert f'--data-dir {tar}: timm cannot read the training data' in err.splitlines()[-1], err  # after timm's log
    assert 'Traceback' not in err and not (tmp_path / 'runs').exists()


def test_data_smaller_than_a_batch_is_refused(trainer_argv, capsys, tmp_path):
    _refused(trainer_argv('-b', '32'), capsys, tmp_path, '16 samples', 'fewer than one batch of 32')


def _config(tmp_path, content) -> str:
    path = tmp_path / 'c.yaml'
    path.write_text(content if isinstance(content, str) else yaml.safe_dump(content))
    return str(path)


def test_config_typo_is_refused_with_the_close_name(trainer_argv, capsys, tmp_path):
    _refused(trainer_argv('--config', _config(tmp_path, {'lr_bsae': 0.1})), capsys, tmp_path,
             "'lr_bsae'", "did you mean 'lr_base'")


@pytest.mark.parametrize('content, words', [
    ({'clip_mode': 'agc'}, ["clip_mode: 'agc' would change training", "only 'norm'"]),
    ({'jsd_loss': True}, ['jsd_loss: True would change training']),
    ({'no_such_option': 1}, ["unknown key 'no_such_option'"]),
    ('- epochs\n- 3\n', ['top level is a list', 'mapping']),
    ({'epochs': 'ten'}, ["epochs: 'ten' is not int"]),
    ({'lr_base': '4e-3'}, ['lr_base', 'write 4.0e-3']),
    ({'opt_betas': 0.9}, ['opt_betas', 'must be a list']),
    ({'model_kwargs': 'img_size=32'}, ['model_kwargs', 'must be a mapping']),
    ({'resume': 123}, ['resume: 123 is not text', 'quotes']),
    ({'lr': float('nan')}, ['--lr must be a finite number']),
    ('epochs: [1\n', ['cannot read --config', "expected ',' or ']'"]),  # YAML's message spans lines
    ('epochs: 3\nlr: 0.1\nepochs: 5\n', ["'epochs' is given twice", 'line 3']),  # PyYAML keeps the last
    ('model_kwargs: {img_size: 32, img_size: 64}\n', ["'img_size' is given twice"]),
])
def test_config_that_would_change_training_unsupported_is_refused(trainer_argv, capsys, tmp_path, content, words):
    _refused(trainer_argv('--config', _config(tmp_path, content)), capsys, tmp_path, *words)


def test_config_anchors_and_merge_keys_load_as_yaml_says(tmp_path):
    """A key overriding one that a ``<<`` merge brings is YAML, not a repeat."""
    from timm_moejet.training.args import _read_config

    config = _read_config(_config(tmp_path, 'base: &b {img_size: 32, patch_size: 4}\n'
                                            'model_kwargs:\n  <<: *b\n  patch_size: 8\n'))
    assert config['model_kwargs'] == {'img_size': 32, 'patch_size': 8}


def test_config_keys_that_do_not_change_training_are_named_and_left_out(tmp_path, caplog):
    path = _config(tmp_path, {'device_modules': ['timm_moejet'], 'clip_mode': 'norm', 'epochs': 3})
    args = parse_args(['--config', path])
    assert args.epochs == 3
    assert not hasattr(args, 'device_modules') and not hasattr(args, 'clip_mode')
    notes = [r.getMessage() for r in caplog.records if 'left out' in r.getMessage()]
    assert len(notes) == 1 and 'device_modules' in notes[0] and 'clip_mode' in notes[0], notes


def test_config_errors_are_the_projects_errors(tmp_path):
    with pytest.raises(InvalidArgument, match='did you mean'):
        parse_args(['--config', _config(tmp_path, {'lr_bsae': 0.1})])
    with pytest.raises(MoEJetError, match='mapping'):
        parse_args(['--config', _config(tmp_path, '[1, 2]')])


@pytest.mark.parametrize('path', CONFIGS, ids=lambda p: p.stem)
def test_shipped_configs_load(path, caplog):
    args = parse_args(['--config', str(path)])
    assert args.model == yaml.safe_load(path.read_text())['model']
