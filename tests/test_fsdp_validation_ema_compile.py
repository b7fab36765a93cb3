""" The FSDP2 trainer's validation, model EMA and ``--torchcompile`` on the CPU (gloo): summary.csv per epoch, the
best and the latest checkpoint kept, an exact resume into the run's own folder (as after a kill), the EMA's export,
the EMA against timm's ``ModelEmaV3``, compiled blocks against eager, and the refusals.

The runs use a tiny image folder (5 classes, 20 training and 7 validation images: two processes pad the validation
set by one image, which must count nowhere) and switch the model's randomness off, as tests/test_fsdp.py does.
"""
import csv
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import pytest
import timm
import torch

import timm_moejet  # noqa: F401  (registers the models)

REPO = Path(__file__).resolve().parents[1]
ATOL = 1e-5  # float32: the same sums reduced in another order
COMPILE_ATOL = 1e-5  # Inductor's fused float32 kernels against eager over 4 steps (seen: 6e-8)
MODEL = ['--model', 'moejet_vit_test', '--img-size', '32', '--model-kwargs', 'img_size=32', 'patch_size=8',
         'moe_noise_std=0', 'moe_expert_drop=0', 'moe_drop_path_rate=0']
RECIPE = ['--num-classes', '10', '--opt', 'adamw', '--lr', '3e-3', '--weight-decay', '0.05', '--warmup-epochs', '0',
          '--no-aug', '--workers', '0', '--smoothing', '0', '--log-interval', '1000', '-b', '4', '--seed', '1']
EMA = ['--model-ema', '--model-ema-decay', '0.5']


def _image_folder(root: Path) -> Path:
    """5 classes told apart by their colour (plus noise): 4 training images each, 7 validation images."""
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for split, counts in (('train', [4] * 5), ('validation', [2, 2, 1, 1, 1])):
        for c, n in enumerate(counts):
            (root / split / f'class{c}').mkdir(parents=True)
            for i in range(n):
                base = torch.tensor([c * 50, 255 - c * 50, (c * 97) % 256]).view(1, 1, 3)
                noise = torch.randint(-40, 40, (32, 32, 3), generator=g)
                pixels = (base + noise).clamp(0, 255).to(torch.uint8).numpy()
                Image.fromarray(pixels).save(root / split / f'class{c}' / f'{i}.png')
    return root


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('localhost', 0))
        return s.getsockname()[1]


def _torchrun(cwd: Path, *argv: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--nnodes', '1',
           '--rdzv-backend', 'c10d', '--rdzv-endpoint', f'localhost:{_free_port()}', '-m', 'timm_moejet.train', *argv]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get('PYTHONPATH', '')]),
               OMP_NUM_THREADS='1', PYTHONWARNINGS='ignore')
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _summary(path: Path) -> List[Dict[str, str]]:
    with open(path, newline='') as f:
        return list(csv.DictReader(f))


def _row_close(a: Dict[str, str], b: Dict[str, str]) -> float:
    assert a.keys() == b.keys()
    return max(abs(float(a[k]) - float(b[k])) for k in a if a[k] != '')


@pytest.fixture(scope='module')
def ema_run(tmp_path_factory):
    """Two processes, 3 epochs with validation and EMA; its summary and exports; then a resume into its own folder
    from epoch 1 (what a kill during epoch 2 leaves to resume from) keeping 1 checkpoint (the best and the latest)."""
    root = tmp_path_factory.mktemp('ema_run')
    data = _image_folder(root / 'data')
    argv = ['--data-dir', str(data), '--val-split', 'validation', *MODEL, *RECIPE, *EMA, '--epochs', '3',
            '--output', str(root), '--experiment', 'run']
    _torchrun(root, *argv)
    run = root / 'run'
    first = dict(summary=_summary(run / 'summary.csv'),
                 checkpoints=sorted(p.name for p in (run / 'checkpoints').iterdir()))
    for name in ('model', 'model_ema'):
        (run / name).rename(root / f'first_{name}')
    _torchrun(root, *argv, '--resume', str(run / 'checkpoints' / 'epoch_1'), '--checkpoint-hist', '1')
    return root, data, first


def _top1(folder: Path, data: Path) -> float:
    """Top-1 (%) of an exported model on the validation images, in this process (timm's eval transform)."""
    from timm.data import create_dataset, create_transform, resolve_data_config

    model = timm.create_model(f'local-dir:{folder}', pretrained=True).eval()
    config = resolve_data_config({}, model=model)
    dataset = create_dataset('', root=str(data), split='validation', is_training=False)
    dataset.transform = create_transform(**config, is_training=False)
    with torch.no_grad():
        hits = [model(x[None]).argmax(1).item() == y for x, y in dataset]
    return 100. * sum(hits) / len(hits)


def test_summary_has_train_and_validation_metrics_per_epoch(ema_run):
    root, data, first = ema_run
    rows = first['summary']
    assert [r['epoch'] for r in rows] == ['0', '1', '2']
    assert list(rows[0]) == ['epoch', 'train_loss', 'eval_loss', 'eval_top1', 'eval_top5', 'eval_model_loss',
                             'eval_model_top1', 'eval_model_top5', 'lr']
    assert float(rows[2]['train_loss']) < float(rows[0]['train_loss'])  # it trains
    # the last epoch's metrics are those of the exported weights on all 7 images (the padding counted nowhere)
    assert abs(_top1(root / 'first_model', data) - float(rows[2]['eval_model_top1'])) <= ATOL
    assert abs(_top1(root / 'first_model_ema', data) - float(rows[2]['eval_top1'])) <= ATOL
    assert all(float(r['eval_top1']) * 7 / 100 % 1 < 1e-6 or float(r['eval_top1']) * 7 / 100 % 1 > 1 - 1e-6
               for r in rows)  # a whole number of the 7 images


def test_ema_export_is_the_average_not_the_model(ema_run):
    """Decay 0.5 over 6 updates: the EMA weights lie strictly between the model's and the initial ones."""
    from safetensors.torch import load_file

    root, _, _ = ema_run
    model, ema = (load_file(root / f'first_{n}' / 'model.safetensors') for n in ('model', 'model_ema'))
    assert model.keys() == ema.keys()
    assert max((model[k] - ema[k]).abs().max().item() for k in model) > 1e-4


def test_resume_into_the_run_folder_repeats_the_run(ema_run):
    root, _, first = ema_run
    from safetensors.torch import load_file

    resumed = _summary(root / 'run' / 'summary.csv')
    assert [r['epoch'] for r in resumed] == ['0', '1', '2']  # the rows after epoch 1 were dropped and written again
    assert max(_row_close(a, b) for a, b in zip(first['summary'], resumed)) <= ATOL
    for name in ('model', 'model_ema'):
        a, b = load_file(root / f'first_{name}' / 'model.safetensors'), load_file(root / 'run' / name /
                                                                                   'model.safetensors')
        assert max((a[k] - b[k]).abs().max().item() for k in a) <= ATOL


def test_checkpoint_hist_keeps_the_best_and_the_latest(ema_run):
    root, _, first = ema_run
    assert first['checkpoints'] == ['best', 'epoch_1', 'epoch_2', 'epoch_3', 'latest']
    rows = _summary(root / 'run' / 'summary.csv')
    # ranked by the EMA's top-1 (train.py's eval metric with --model-ema); ties: the newer
    best = max(range(3), key=lambda e: (float(rows[e]['eval_top1']), e)) + 1
    folder = root / 'run' / 'checkpoints'
    assert (folder / 'best').read_text() == f'epoch_{best}'
    assert sorted(p.name for p in folder.glob('epoch_*')) == sorted({f'epoch_{best}', 'epoch_3'})


def test_rank_checkpoints_by_metric():
    from timm_moejet.training.history import rank_checkpoints

    records = {1: dict(metric=50., eval_metric='top1'), 2: dict(metric=70., eval_metric='top1'),
               3: dict(metric=70., eval_metric='top1'), 4: dict(metric=None)}
    assert rank_checkpoints(records) == [3, 2, 1, 4]
    losses = {1: dict(metric=0.5, eval_metric='loss'), 2: dict(metric=0.7, eval_metric='loss')}
    assert rank_checkpoints(losses) == [1, 2]
    assert rank_checkpoints({1: {}, 2: {}, 3: {}}) == [3, 2, 1]  # without validation: the newest
    assert rank_checkpoints({1: {}, 2: {}, 3: {}}, saved=2) == [2, 1, 3]  # a resume saved 2: 3 is left over


def test_prune_keeps_the_best_and_the_latest(tmp_path):
    import json

    from timm_moejet.training.history import prune_checkpoints

    for epoch, top1 in ((1, 80.), (2, 90.), (3, 70.), (4, 60.), (5, 99.)):
        (tmp_path / f'epoch_{epoch}').mkdir()
        (tmp_path / f'epoch_{epoch}' / 'moejet_train.json').write_text(json.dumps(dict(metric=top1,
                                                                                       eval_metric='top1')))
    # epoch 5: left by an earlier run after the checkpoint this one resumed from (4): it ranks last
    assert prune_checkpoints(tmp_path, keep=2, saved=4) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ['best', 'epoch_1', 'epoch_2', 'epoch_4']
    assert (tmp_path / 'best').read_text() == 'epoch_2'


@pytest.mark.parametrize('warmup', [False, True])
def test_sharded_ema_equals_timm_model_ema_v3(gloo, warmup):
    from timm.utils import ModelEmaV3

    from timm_moejet.training import init_device_mesh, shard_model
    from timm_moejet.training.ema import ShardedEma

    kwargs = dict(img_size=32, patch_size=8, num_classes=10)
    torch.manual_seed(0)
    plain = timm.create_model('moejet_vit_test', **kwargs)
    reference = ModelEmaV3(plain, decay=0.9, use_warmup=warmup)
    torch.manual_seed(0)
    sharded = shard_model(timm.create_model('moejet_vit_test', **kwargs), init_device_mesh('cpu'))
    ema = ShardedEma(shard_model(timm.create_model('moejet_vit_test', **kwargs), init_device_mesh('cpu')), 0.9,
                     warmup)
    ema.reset(sharded)
    for step in range(1, 5):
        with torch.no_grad():
            for p, q in zip(plain.parameters(), sharded.parameters()):
                delta = torch.randn(p.shape, generator=torch.Generator().manual_seed(step))
                p.add_(delta)
                q.to_local().add_(delta[tuple(slice(0, s) for s in q.to_local().shape)])  # one rank: the whole
        reference.update(plain, step=step)
        ema.update(sharded, step)
    full = {k: v.full_tensor() for k, v in ema.module.state_dict().items()}
    assert max((full[k] - v).abs().max().item() for k, v in reference.module.state_dict().items()) <= ATOL


def test_compiled_blocks_break_only_at_the_fsdp_hooks(gloo):
    """Per-block compilation (dynamo's eager backend: no Inductor): the only graph breaks are FSDP2's own hooks
    of the units inside the blocks (experts, routers), so the graphs end where the sharding units do."""
    from torch._dynamo.utils import counters

    from timm_moejet.training import init_device_mesh, shard_model

    torch._dynamo.reset()
    counters.clear()
    model = timm.create_model('moejet_vit_test', img_size=32, patch_size=8, num_classes=10)
    shard_model(model, init_device_mesh('cpu'), compile_backend='eager')
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    breaks = counters['graph_break']
    assert sum(breaks.values()) > 0 and all('skipping FSDP hooks' in reason for reason in breaks), dict(breaks)
    assert counters['stats']['unique_graphs'] >= 4  # one per block at least


def test_compiled_blocks_train_as_eager(tmp_path):
    """--torchcompile --grad-checkpointing on two processes: the same losses and validation as eager."""
    import json

    data = _image_folder(tmp_path / 'data')
    common = ['--data-dir', str(data), *MODEL, *RECIPE, '--epochs', '2', '--output', str(tmp_path), '--no-export']
    _torchrun(tmp_path, *common, '--experiment', 'eager')
    _torchrun(tmp_path, *common, '--experiment', 'compiled', '--torchcompile', '--grad-checkpointing')
    losses = {n: [json.loads(line)['loss'] for line in (tmp_path / n / 'steps.jsonl').read_text().splitlines()]
              for n in ('eager', 'compiled')}
    assert len(losses['eager']) == 4
    dev = max(abs(a - b) for a, b in zip(losses['eager'], losses['compiled']))
    print(f'max |loss(compiled) - loss(eager)| over 4 steps = {dev:.2e}')
    assert dev <= COMPILE_ATOL
    eager, compiled = _summary(tmp_path / 'eager' / 'summary.csv'), _summary(tmp_path / 'compiled' / 'summary.csv')
    assert max(_row_close(a, b) for a, b in zip(eager, compiled)) <= COMPILE_ATOL


@pytest.mark.parametrize('extra, message', [
    (['--val-split', 'holdout'], '--val-split holdout: '),
    (['--model-ema', '--model-ema-force-cpu'], '--model-ema-force-cpu is not supported'),
    (['--model-ema', '--model-ema-decay', '1.5'], '--model-ema-decay must be in [0, 1)'),
    (['--model-ema', '--model-ema-decay', '1'], 'the EMA would keep the initial weights'),
    (['--eval-metric', 'top3'], "--eval-metric 'top3' is not reported"),
    (['--val-interval', '0'], '--val-interval must be 1 or more'),
    (['--torchcompile', 'no_such_backend'], '--torchcompile no_such_backend: torch has no such backend'),
    (['--torchcompile', '--torchcompile-mode', 'fastest'], '--torchcompile-mode fastest is not one of default'),
    (['--torchcompile-mode', 'max-autotune'], '--torchcompile-mode max-autotune needs --torchcompile'),
    (['--dataset', 'synthetic', '--train-num-samples', '8', '--val-split', 'validation'], 'needs --val-num-samples'),
    (['--model-ema', '--model-ema-decay', 'nan'], '--model-ema-decay must be a finite number'),
])
def test_bad_options_are_refused_in_one_line(tmp_path, capsys, extra, message):
    from timm_moejet.train import main

    data = _image_folder(tmp_path / 'data')
    assert main(['--data-dir', str(data), *MODEL, *RECIPE, '--output', str(tmp_path / 'out'), *extra]) == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and message in err, err
    assert not (tmp_path / 'out').exists()


def test_ema_export_of_a_run_without_ema_is_refused(tmp_path, capsys):
    from timm_moejet.sharded_checkpoint import main as export_main
    from timm_moejet.train import main

    argv = ['--dataset', 'synthetic', '--train-num-samples', '8', *MODEL, *RECIPE, '--epochs', '1',
            '--output', str(tmp_path), '--experiment', 'plain', '--no-export']
    assert main(argv) == 0
    assert export_main([str(tmp_path / 'plain' / 'checkpoints'), str(tmp_path / 'ema'), '--ema']) == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and 'holds no EMA weights' in err, err
    assert not (tmp_path / 'ema').exists()
