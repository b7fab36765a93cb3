""" The trainer's runs, resumes and exports keep what a user has: the newest checkpoint, a log without repeated steps,
a checkpoint that reads back as it was recorded, an export that says it is trained and never lands on its input.

One process, ``moejet_vit_test`` at 32 x 32 on the tiny image folder of tests/conftest.py (2 batches an epoch).
"""
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from timm_moejet.errors import InvalidArgument, InvalidCheckpoint, OutputExists
from timm_moejet.sharded_checkpoint import export_checkpoint, read_record
from timm_moejet.sharded_checkpoint import main as export_main
from timm_moejet.train import main

LOSS_ATOL = 1e-5  # float32, the same operations in the same order: a resume repeats them


def _steps(run: Path) -> list:
    return [json.loads(line) for line in (run / 'steps.jsonl').read_text().splitlines()]


def _epochs(run: Path) -> list:
    return sorted(p.name for p in (run / 'checkpoints').glob('epoch_*'))


@pytest.fixture(scope='module')
def trained(trainer_command, tmp_path_factory):
    """A run of 2 epochs (2 updates each), its checkpoints and its export."""
    out = tmp_path_factory.mktemp('trained')
    assert main(trainer_command(out, '--epochs', '2')) == 0
    return out / 'run'


def _copy(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / 'runs' / 'run'))


def test_grayscale_images_train_a_one_channel_model(trainer_argv, tmp_path):
    """As in train.py, a 1-channel input size reads the images as grayscale (they were read as RGB: the first
    normalisation failed)."""
    import safetensors.torch

    argv = trainer_argv('--model-kwargs', 'img_size=32', 'patch_size=8', 'in_chans=1', '--input-size', '1', '32', '32',
                        '--mean', '0.5', '--std', '0.5', '--val-split', 'train')
    assert main(argv) == 0
    run = tmp_path / 'runs' / 'run'
    assert len((run / 'summary.csv').read_text().splitlines()) == 2  # header and the one epoch, validated
    weights = safetensors.torch.load_file(run / 'model' / 'model.safetensors')
    assert weights['patch_embed.proj.weight'].shape[1] == 1


def test_grad_accum_larger_than_an_epoch_steps_on_the_partial_accumulation(trainer_argv, tmp_path):
    # 2 batches an epoch: --grad-accum-steps 4 makes one update of those 2 each epoch, as --grad-accum-steps 2 does
    runs = {}
    for accum in (4, 2):
        assert main(trainer_argv('--epochs', '2', '--lr', '1e-3', '--grad-accum-steps', str(accum),
                                 '--experiment', f'accum{accum}')) == 0
        runs[accum] = tmp_path / 'runs' / f'accum{accum}'
    assert [s['step'] for s in _steps(runs[4])] == [1, 2]
    for a, b in zip(_steps(runs[4]), _steps(runs[2])):
        assert abs(a['loss'] - b['loss']) <= LOSS_ATOL
    w4, w2 = (load_file(str(runs[a] / 'model' / 'model.safetensors')) for a in (4, 2))
    assert all(torch.allclose(w4[k], w2[k], rtol=0, atol=1e-5) for k in w4)


def test_export_of_a_trained_run_is_tagged_trained(trained):
    config = json.loads((trained / 'model' / 'config.json').read_text())
    assert config['pretrained_cfg']['tag'] == 'trained'


def test_resume_continues_the_log_without_repeating_steps(trained, trainer_argv, tmp_path):
    run = _copy(trained, tmp_path)
    first = _steps(run)
    assert [s['step'] for s in first] == [1, 2, 3, 4]
    assert main(trainer_argv('--epochs', '2', '--resume', str(run / 'checkpoints' / 'epoch_1'))) == 0
    again = _steps(run)
    assert [s['step'] for s in again] == [1, 2, 3, 4]
    assert all(abs(a['loss'] - b['loss']) <= LOSS_ATOL for a, b in zip(first, again))


def test_resume_from_an_earlier_epoch_keeps_the_checkpoint_it_saves(trained, trainer_argv, tmp_path):
    run = _copy(trained, tmp_path)
    # a later checkpoint of the run being redone (epoch_3) is newer than the epoch_2 the resume saves: the checkpoint
    # just saved is the one kept, and latest names it
    shutil.copytree(run / 'checkpoints' / 'epoch_2', run / 'checkpoints' / 'epoch_3')
    assert main(trainer_argv('--epochs', '2', '--checkpoint-hist', '1', '--no-export',
                             '--resume', str(run / 'checkpoints' / 'epoch_1'))) == 0
    assert _epochs(run) == ['epoch_2']
    assert (run / 'checkpoints' / 'latest').read_text() == 'epoch_2'


def test_checkpoint_history_of_one_keeps_the_newest(trainer_argv, tmp_path):
    assert main(trainer_argv('--epochs', '2', '--checkpoint-hist', '1', '--no-export')) == 0
    assert _epochs(tmp_path / 'runs' / 'run') == ['epoch_2']


def test_save_checkpoint_refuses_to_keep_none(tmp_path):
    from timm_moejet.training.checkpoint import save_checkpoint
    with pytest.raises(InvalidArgument, match='at least 1'):
        save_checkpoint(tmp_path, 1, torch.nn.Linear(1, 1), None, {}, keep=0)
    assert not any(tmp_path.iterdir())


def test_resume_with_a_tuple_model_kwarg_accepts_its_own_checkpoint(trainer_argv, tmp_path):
    argv = trainer_argv('--model-kwargs', 'img_size=(32,32)', 'patch_size=8', '--no-export')
    assert main(argv) == 0
    run = tmp_path / 'runs' / 'run'
    assert main(argv + ['--epochs', '2', '--resume', str(run)]) == 0  # the last --epochs counts
    assert _epochs(run) == ['epoch_1', 'epoch_2']


def test_resume_into_a_folder_of_another_run_is_refused_and_keeps_it(trained, trainer_argv, tmp_path, capsys):
    # the resume writes into --output/--experiment: its checkpoints would be pruned and replaced by the other run's
    other = _copy(trained, tmp_path)
    before = {p.name: p.stat().st_mtime_ns for p in (other / 'checkpoints').iterdir()}
    assert main(trainer_argv('--epochs', '3', '--checkpoint-hist', '1', '--resume', str(trained))) == 2
    err = capsys.readouterr().err.strip()
    assert 'holds checkpoints of an earlier run' in err and 'is not one of its checkpoints' in err, err
    assert len(err.splitlines()) == 1, err
    assert {p.name: p.stat().st_mtime_ns for p in (other / 'checkpoints').iterdir()} == before


def test_resume_keeps_a_users_note_in_the_summary(trained, trainer_argv, tmp_path):
    run = _copy(trained, tmp_path)
    with open(run / 'summary.csv', 'a') as f:
        f.write('note: lr 1e-3 from here,,,,\n')
    assert main(trainer_argv('--epochs', '3', '--no-export', '--resume', str(run))) == 0
    epochs = [line.split(',')[0] for line in (run / 'summary.csv').read_text().splitlines()[1:]]
    assert epochs == ['0', '1', 'note: lr 1e-3 from here', '2']


@pytest.mark.parametrize('damage', ['not text', 'a folder'])
def test_resume_with_a_damaged_summary_is_refused_before_the_process_group(trained, trainer_argv, tmp_path, capsys,
                                                                         damage, monkeypatch):
    # rank 0 alone rewrites summary.csv: found there, after the group, it failed on one rank and stopped the others
    from timm_moejet.training import trainer
    monkeypatch.setattr(trainer, '_setup_distributed', lambda: pytest.fail('the process group was joined'))
    run = _copy(trained, tmp_path)
    summary = run / 'summary.csv'
    if damage == 'a folder':
        summary.unlink()
        summary.mkdir()
    else:
        summary.write_bytes(b'\xff\xfe\x00e\x00p')
    assert main(trainer_argv('--epochs', '3', '--resume', str(run))) == 2
    err = capsys.readouterr().err.strip()
    assert str(summary) in err and len(err.splitlines()) == 1, err
    assert _epochs(run) == ['epoch_1', 'epoch_2']


def test_seeds_of_a_long_run_stay_in_numpys_range():
    import argparse

    import numpy as np

    from timm_moejet.training.trainer import _reseed
    draws = []
    for updates in (4_295, 4_296, 4_295):  # 42 + 1_000_003 * 4_295 passes 2**32: numpy refused it mid-run
        _reseed(argparse.Namespace(seed=42), updates, rank=3)
        draws.append((torch.rand(1).item(), np.random.rand()))
    assert draws[0] == draws[2] and draws[0][0] != draws[1][0] and draws[0][1] != draws[1][1]


def test_resume_of_a_file_says_to_give_the_run_folder(trained, trainer_argv, capsys):
    assert main(trainer_argv('--resume', str(trained / 'model' / 'model.safetensors'))) == 2
    err = capsys.readouterr().err.strip()
    assert 'is a file; give the run folder' in err and len(err.splitlines()) == 1, err


def test_latest_that_links_outside_the_run_is_refused(trained, trainer_argv, capsys, tmp_path):
    run = _copy(trained, tmp_path)
    outside = tmp_path / 'elsewhere'
    shutil.copytree(run / 'checkpoints' / 'epoch_1', outside)
    latest = run / 'checkpoints' / 'latest'
    latest.unlink()
    latest.symlink_to(outside)
    assert main(trainer_argv('--epochs', '2', '--resume', str(run))) == 2
    assert 'latest' in capsys.readouterr().err
    latest.unlink()
    latest.write_text('../../elsewhere')
    with pytest.raises(InvalidCheckpoint, match='latest'):
        read_record(run / 'checkpoints')
    assert _epochs(run) == ['epoch_1', 'epoch_2'] and outside.is_dir()


@pytest.mark.parametrize('where', ['same', 'inside', 'holds'])
def test_export_onto_its_own_checkpoint_is_refused(trained, tmp_path, capsys, where):
    run = _copy(trained, tmp_path)
    checkpoint = run / 'checkpoints'
    output = dict(same=checkpoint, inside=checkpoint / 'model', holds=run)[where]
    before = sorted(p.relative_to(run) for p in run.rglob('*'))
    assert export_main([str(checkpoint), str(output), '--overwrite']) == 2
    err = capsys.readouterr().err.strip()
    assert 'would overwrite the checkpoints' in err and len(err.splitlines()) == 1, err
    assert sorted(p.relative_to(run) for p in run.rglob('*')) == before
    with pytest.raises(OutputExists):
        export_checkpoint(checkpoint / 'epoch_2', checkpoint / 'epoch_1', overwrite=True)
    assert read_record(checkpoint / 'epoch_1')['epoch'] == 1


def _damage(run: Path, how: str) -> Path:
    epoch = run / 'checkpoints' / 'epoch_2'
    if how == 'metadata':
        (epoch / '.metadata').write_bytes(b'not a pickle')
        return epoch / '.metadata'
    if how == 'record':
        (epoch / 'moejet_train.json').write_text('[1, 2]')
        return epoch / 'moejet_train.json'
    shard = max(epoch.glob('*.distcp'), key=lambda p: p.stat().st_size)
    shard.write_bytes(shard.read_bytes()[:shard.stat().st_size // 2])
    return shard


@pytest.mark.parametrize('how', ['metadata', 'shard', 'record'])
def test_damaged_checkpoint_is_named(trained, trainer_argv, tmp_path, capsys, how):
    run = _copy(trained, tmp_path)
    damaged = _damage(run, how)
    assert export_main([str(run / 'checkpoints'), str(tmp_path / 'export')]) == 2
    assert str(damaged) in capsys.readouterr().err
    assert not (tmp_path / 'export').exists()
    assert main(trainer_argv('--epochs', '3', '--resume', str(run))) == 2
    err = capsys.readouterr().err.strip()
    assert str(damaged) in err and len(err.splitlines()) == 1, err
    assert _epochs(run) == ['epoch_1', 'epoch_2']
