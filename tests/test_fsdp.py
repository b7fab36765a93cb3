""" FSDP2 on the CPU with gloo: sharding (timm_moejet.training), the trainer (python -m timm_moejet.train) on one and
two processes, sharded checkpoints, their export, and the refusals.

The training runs switch the model's randomness off (``moe_noise_std=0 moe_expert_drop=0 moe_drop_path_rate=0``,
no augmentation): routing noise, drop path and dropout masks are drawn per process for that process's samples, so
one process and two draw different masks for the same global batch, and their losses are comparable only without
them. The trainer's re-seeding before every update (what makes a resume exact with them on) is checked by a resume
of a run with them on.
"""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Optional

import pytest
import timm
import torch

import timm_moejet  # noqa: F401  (registers the models)
from timm_moejet.errors import InvalidArgument, OutputExists

REPO = Path(__file__).resolve().parents[1]
LOSS_ATOL = 1e-5  # float32: one process and two reduce the same sums in another order
STATE_ATOL = 1e-5
DETERMINISTIC = 'moe_noise_std=0 moe_expert_drop=0 moe_drop_path_rate=0'.split()
FAMILIES = {
    # 3 core experts: 2 ranks split them on the hidden axis (Shard(1)), 8 universal ones on the expert axis
    'vit': ['--model', 'moejet_vit_test', '--img-size', '32', '--model-kwargs', 'img_size=32', 'patch_size=8',
            'num_core_experts=3', *DETERMINISTIC],
    'convnext': ['--model', 'moejet_convnext_test', '--img-size', '32', '--model-kwargs', 'img_size=32',
                 *DETERMINISTIC],
}
# the trainer is the same for every family; each family's FSDP2 units are checked step by step against the plain
# model in test_sharded_steps_equal_plain_model (the MLP-Mixer's too)
RECIPE = ['--dataset', 'synthetic', '--train-num-samples', '32', '--num-classes', '10', '--epochs', '2',
          '--opt', 'adamw', '--lr', '2e-3', '--weight-decay', '0.05', '--warmup-epochs', '1', '--warmup-lr', '1e-4',
          '--no-aug', '--workers', '0', '--smoothing', '0.1', '--log-interval', '1000']
GLOBAL_BATCH = 8


def _env(**extra: str) -> dict:
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get('PYTHONPATH', '')]),
                OMP_NUM_THREADS='1', PYTHONWARNINGS='ignore', **extra)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('localhost', 0))
        return s.getsockname()[1]


def _argv(nproc: int, output: Path, experiment: str, *extra: str) -> list:
    return ['-b', str(GLOBAL_BATCH // nproc), '--output', str(output), '--experiment', experiment, *RECIPE, *extra]


def _train(nproc: int, output: Path, experiment: str, *extra: str, fresh_process: bool = False,
           env: Optional[dict] = None) -> None:
    """``python -m timm_moejet.train`` with global batch 8: two processes under torchrun; one process in this one
    (its imports are done: a few seconds instead of tens), or in a fresh one with ``fresh_process``."""
    from timm_moejet.train import main

    argv = _argv(nproc, output, experiment, *extra)
    if nproc == 1 and not fresh_process:
        assert main(argv) == 0
        return
    cmd = [sys.executable, '-m', 'timm_moejet.train', *argv]
    if nproc > 1:
        cmd[1:3] = ['-m', 'torch.distributed.run', '--nproc_per_node', str(nproc), '--nnodes', '1',
                    '--rdzv-backend', 'c10d', '--rdzv-endpoint', f'localhost:{_free_port()}', '-m',
                    'timm_moejet.train']
    proc = subprocess.run(cmd, cwd=output, env=_env(**(env or {})), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _losses(output: Path, experiment: str) -> dict:
    lines = (output / experiment / 'steps.jsonl').read_text().splitlines()
    return {r['step']: r['loss'] for r in map(json.loads, lines)}


@pytest.fixture(scope='module', params=sorted(FAMILIES))
def runs(request, tmp_path_factory):
    """One family: one process, two processes, and both resumed from the two processes' epoch-1 checkpoint."""
    family = request.param
    out = tmp_path_factory.mktemp(f'fsdp_{family}')
    model_args = FAMILIES[family]
    _train(1, out, 'one', *model_args)
    _train(2, out, 'two', *model_args)
    sharded = out / 'two' / 'checkpoints' / 'epoch_1'
    _train(1, out, 'resume_one', *model_args, '--resume', str(sharded), '--no-export')
    _train(2, out, 'resume_two', *model_args, '--resume', str(sharded), '--no-export')
    return family, out


def _close(a: dict, b: dict) -> float:
    assert a.keys() == b.keys(), (sorted(a), sorted(b))
    return max(abs(a[k] - b[k]) for k in a)


def test_two_processes_match_one(runs):
    family, out = runs
    one, two = _losses(out, 'one'), _losses(out, 'two')
    assert sorted(one) == list(range(1, 9))
    dev = _close(one, two)
    print(f'{family}: max |loss(2 processes) - loss(1 process)| over 8 steps = {dev:.2e}')
    assert dev <= LOSS_ATOL
    assert one[8] < one[1] - 0.05  # it trains: the comparison is not between two flat lines


def test_resume_on_one_and_two_processes_continues(runs):
    family, out = runs
    two = _losses(out, 'two')
    for name in ('resume_one', 'resume_two'):
        resumed = _losses(out, name)
        assert sorted(resumed) == [5, 6, 7, 8]  # the update count and the epoch came back
        dev = _close(resumed, {k: two[k] for k in resumed})
        print(f'{family} {name}: max |loss - uninterrupted| = {dev:.2e}')
        assert dev <= LOSS_ATOL


def test_export_equals_single_process_and_loads_in_timm(runs):
    from safetensors.torch import load_file

    family, out = runs
    one = load_file(out / 'one' / 'model' / 'model.safetensors')
    two = load_file(out / 'two' / 'model' / 'model.safetensors')
    assert one.keys() == two.keys()
    dev = max((one[k] - two[k]).abs().max().item() for k in one)
    print(f'{family}: max |exported weight (2 processes) - (1 process)| = {dev:.2e}')
    assert dev <= STATE_ATOL
    config = json.loads((out / 'two' / 'model' / 'config.json').read_text())
    # timm keeps a checkpoint's classifier when the overlay says how many classes it has (as for any fine-tune)
    overlay = dict(file=str(out / 'two' / 'model' / 'model.safetensors'), num_classes=config['num_classes'])
    model = timm.create_model(config['architecture'], pretrained=True, **config['model_args'],
                              pretrained_cfg_overlay=overlay)
    assert all(torch.equal(v, two[k]) for k, v in model.state_dict().items())
    folder = timm.create_model(f'local-dir:{out / "two" / "model"}', pretrained=True)
    assert all(torch.equal(v, two[k]) for k, v in folder.state_dict().items())


def test_resume_refuses_another_model_or_recipe(runs, capsys):
    from timm_moejet.train import main

    family, out = runs
    sharded = out / 'two' / 'checkpoints' / 'epoch_1'
    before = sorted((p.name, p.stat().st_mtime_ns) for p in sharded.iterdir())
    other = FAMILIES['convnext' if family == 'vit' else 'vit']
    assert main(_argv(1, out, 'refused', *other, '--resume', str(sharded))) == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and 'written by another model or recipe' in err and 'model: checkpoint' in err, err
    assert main(_argv(1, out, 'refused', *FAMILIES[family], '--opt', 'sgd', '--resume', str(sharded))) == 2
    assert "opt: checkpoint 'adamw', now 'sgd'" in capsys.readouterr().err
    assert main(_argv(1, out, 'refused', *FAMILIES[family], '-b', '2', '--resume', str(sharded))) == 2
    assert 'global_batch: checkpoint 8, now 2' in capsys.readouterr().err
    assert not (out / 'refused').exists()  # refused before anything was written
    assert sorted((p.name, p.stat().st_mtime_ns) for p in sharded.iterdir()) == before
    assert main(_argv(1, out, 'one', *FAMILIES[family])) == 2  # a finished run's folder, without --resume
    assert 'holds checkpoints of an earlier run' in capsys.readouterr().err


def test_resume_with_randomness_on_is_exact(tmp_path):
    """Routing noise, expert dropout and drop path on (the models' defaults): the trainer re-seeds before every
    update from the update count, so a resumed run draws the same masks as the uninterrupted one."""
    model_args = ['--model', 'moejet_vit_test', '--img-size', '32', '--model-kwargs', 'img_size=32', 'patch_size=8']
    _train(1, tmp_path, 'full', *model_args, '--no-export')
    _train(1, tmp_path, 'resumed', *model_args, '--no-export', '--resume', str(tmp_path / 'full' / 'checkpoints'
                                                                              / 'epoch_1'))
    full, resumed = _losses(tmp_path, 'full'), _losses(tmp_path, 'resumed')
    assert sorted(resumed) == [5, 6, 7, 8]
    assert _close(resumed, {k: full[k] for k in resumed}) <= LOSS_ATOL


def test_peak_memory_per_process_falls_with_two_processes(tmp_path):
    """Reduced depth, all blocks MoE (51M parameters, 99% experts): the peak memory a process grows by in training
    falls from one process to two by the sharded state, as docs/training.md states (16 bytes per local element).

    Large blocks are mmapped (MALLOC_MMAP_THRESHOLD_), so that freed tensors leave the resident set: otherwise glibc
    keeps them in per-thread arenas and the peak resident set measures the allocator (measured: 461 MiB on one
    process, 467 on two, at half this size). The rest of the growth, 60-150 MiB from run to run, is torch's and
    gloo's (kernels, buffers, threads) and the activations: hence the tolerance on the fall.
    """
    from timm_moejet.training import plan_shards

    kwargs = dict(embed_dim=128, moe_blocks=(0, 1, 2, 3), num_core_experts=64, num_univ_experts=128)
    with torch.device('meta'):
        model = timm.create_model('moejet_vit_test', num_classes=10, img_size=32, patch_size=8, **kwargs)
    total = sum(p.numel() for p in model.parameters())
    model_args = ['--model', 'moejet_vit_test', '--img-size', '32', '--model-kwargs', 'img_size=32', 'patch_size=8',
                  *(f'{k}={v}' for k, v in kwargs.items()), *DETERMINISTIC]
    # a parent larger than the trainer's own peak, as in a full test run: the trainer must not inherit its peak
    ballast = torch.ones(2 * 2 ** 30 // 4)
    peaks, states = {}, {}
    for n in (1, 2):
        _train(n, tmp_path, f'mem{n}', *model_args, '--epochs', '1', '--train-num-samples', '8', '--no-export',
               fresh_process=True, env=dict(MALLOC_MMAP_THRESHOLD_='65536'))
        peaks[n] = json.loads((tmp_path / f'mem{n}' / 'steps.jsonl').read_text().splitlines()[-1])['peak_rss_growth']
        plan = plan_shards(model, n)
        states[n] = 16 * plan.local_numel(model)
        transient = 12 * plan.largest_unit_numel(model)
        print(f'{total / 1e6:.1f}M parameters, {n} process(es): peak growth per process {peaks[n] / 2 ** 20:.0f} MiB; '
              f'stated: state {states[n] / 2 ** 20:.0f} MiB + gathered units {transient / 2 ** 20:.0f} MiB')
        assert 0.9 * states[n] <= peaks[n] <= states[n] + transient + 256 * 2 ** 20  # 256 MiB: torch, gloo, activations
    del ballast
    fall, stated_fall = peaks[1] - peaks[2], states[1] - states[2]
    print(f'fall from 1 to 2 processes: {fall / 2 ** 20:.0f} MiB, stated {stated_fall / 2 ** 20:.0f} MiB')
    assert 0.6 * stated_fall <= fall <= 1.3 * stated_fall


# --- in-process: sharding on a one-process gloo group ---------------------------------------------------------------

@pytest.mark.parametrize('name', ['moejet_vit_test', 'moejet_convnext_test', 'moejet_mixer_test'])
def test_sharded_steps_equal_plain_model(gloo, name):
    """The FSDP2 units (experts, routers, blocks, stages, root) compute what the plain model computes: the same
    losses and weights after three AdamW steps, with activation checkpointing on."""
    from timm_moejet.training import init_device_mesh, shard_model

    kwargs = dict(img_size=32, num_classes=10, moe_noise_std=0., moe_expert_drop=0., moe_drop_path_rate=0.)
    torch.manual_seed(0)
    plain = timm.create_model(name, **kwargs)
    torch.manual_seed(0)
    sharded = shard_model(timm.create_model(name, **kwargs), init_device_mesh('cpu'), grad_checkpointing=True)
    x, y = torch.randn(4, 3, 32, 32), torch.arange(4)
    losses = []
    for model in (plain, sharded):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        for _ in range(3):
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
    assert max(abs(a - b) for a, b in zip(losses[:3], losses[3:])) <= LOSS_ATOL
    full = {k: v.full_tensor() for k, v in sharded.state_dict().items()}
    assert max((full[k] - v).abs().max().item() for k, v in plain.state_dict().items()) <= STATE_ATOL


def test_expert_shard_axes():
    from timm_moejet.training import plan_shards

    model = timm.create_model('moejet_vit_test', num_core_experts=3)  # core [3, 256, 64], universal [8, 64, 64]
    plan = plan_shards(model, 2)
    assert plan.shard_dims['blocks.2.mlp.core.fc1.weight'] == 1 and plan.shard_dims['blocks.2.mlp.core.fc2.weight'] == 1
    assert plan.shard_dims['blocks.2.mlp.univ.fc1.weight'] == 0
    assert plan.units[0] == 'blocks.2.mlp.core' and plan.units[-1] == ''
    assert plan.local_numel(model) < sum(p.numel() for p in model.parameters()) // 2 + 20_000


def test_world_size_that_cannot_shard_the_experts(gloo):
    from timm_moejet.training import plan_shards

    model = timm.create_model('moejet_vit_test')  # experts [4, 256, 64] and [8, 64, 64]: 3 divides no axis
    with pytest.raises(InvalidArgument, match='3 ranks cannot shard the experts of blocks.2.mlp.core.fc1 evenly'):
        plan_shards(model, 3)


def test_mesh_on_another_device_is_refused_before_sharding(gloo):
    from torch.distributed.fsdp import FSDPModule

    from timm_moejet.training import init_device_mesh, shard_model

    model = timm.create_model('moejet_vit_test').to('meta')
    with pytest.raises(InvalidArgument, match='the model is on meta but the mesh is on cpu'):
        shard_model(model, init_device_mesh('cpu'))
    with pytest.raises(InvalidArgument, match='already on the CPU'):
        shard_model(timm.create_model('moejet_vit_test'), init_device_mesh('cpu'), cpu_offload=True)
    assert not isinstance(model, FSDPModule)


def test_export_refuses_an_occupied_output(runs, tmp_path):
    from timm_moejet.sharded_checkpoint import export_checkpoint

    family, out = runs
    (tmp_path / 'taken').mkdir()
    with pytest.raises(OutputExists):
        export_checkpoint(out / 'two' / 'checkpoints', tmp_path / 'taken')
    assert not any((tmp_path / 'taken').iterdir())
