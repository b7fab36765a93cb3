""" The GPU cost model (benchmarks/gpu_model): CUDA's autocast rules emulated on the CPU, what each op is charged,
the recording of a small model, and the command lines (gpu_model, gpu_check.sh) refusing bad input. """
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

from benchmarks.gpu_model.__main__ import main, parse_args
from benchmarks.gpu_model.cost import DEVICES, FITTED, op_times, step_time
from benchmarks.gpu_model.pairs import unknown_ops
from benchmarks.gpu_model.record import Recorder, cuda_autocast_rules, fake_module, record_step

ROOT = Path(__file__).resolve().parents[1]


class _Block(nn.Module):
    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, 2 * dim)
        self.norm = nn.LayerNorm(2 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.fc(x)).softmax(-1).transpose(0, 1)


def _ops_by_name(ops):
    return {op.name: op for op in ops}


def test_layer_norm_and_softmax_run_in_float32_and_linear_in_bfloat16_under_cuda_rules():
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    ops = _ops_by_name(record_step(fake_module(_Block, fake), (4, 16), 2, train=False, is_model=False,
                                   fake_mode=fake))
    assert ops['addmm'].dtype == 'bfloat16' and ops['addmm'].gemm_dtype == 'bfloat16'
    assert ops['native_layer_norm'].dtype == 'float32'
    assert ops['_softmax'].dtype == 'float32'
    assert ops['transpose'].kernels == 0  # a view launches nothing


def test_the_cpu_rules_come_back_after_the_cuda_rules():
    x = torch.randn(2, 8)
    with cuda_autocast_rules():
        assert F.layer_norm(F.linear(x, torch.randn(8, 8)), (8,)).dtype == torch.float32
    with torch.autocast('cpu', dtype=torch.bfloat16):  # the CPU's own autocast: LayerNorm stays in bfloat16
        assert F.layer_norm(F.linear(x, torch.randn(8, 8)), (8,)).dtype == torch.bfloat16


def test_a_linear_is_charged_its_gemm_flops_and_its_backward_the_weight_gradient():
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    ops = record_step(fake_module(lambda: nn.Linear(16, 32), fake), (16,), 8, train=True, is_model=False,
                      fake_mode=fake)
    gemms = [op for op in ops if op.flops]
    assert gemms[0].flops == 2 * 8 * 16 * 32  # forward: 2 M N K
    # backward: the weight gradient only (the input needs none)
    assert sum(op.flops for op in gemms[1:]) == 2 * 8 * 16 * 32


def test_a_custom_op_is_one_fused_kernel_over_its_bytes():
    lib = torch.library.Library('gpu_model_test', 'FRAGMENT')
    lib.define('scale(Tensor x) -> Tensor')
    lib.impl('scale', lambda x: x * 2, 'CPU')
    lib.impl('scale', lambda x: torch.empty_like(x), 'Meta')
    try:
        fake = FakeTensorMode(allow_non_fake_inputs=True)
        with fake:
            x = torch.empty(256, 1024)
        recorder = Recorder()
        with fake, recorder:
            torch.ops.gpu_model_test.scale(x)
        (op,) = recorder.ops
        assert (op.name, op.kernels, op.known, op.bytes) == ('gpu_model_test::scale', 1, False, 2 * 256 * 1024 * 4)
        assert unknown_ops({('p', 'moe', 'eval'): recorder.ops}) == ['gpu_model_test::scale']
        device = DEVICES['h200']
        (seconds,) = op_times(recorder.ops, device, FITTED)
        expected = op.bytes / (device.bandwidth * FITTED.bandwidth_efficiency) + FITTED.kernel_floor_s
        assert seconds == pytest.approx(expected, rel=1e-9)
    finally:
        lib._destroy()


def test_a_bigger_batch_costs_more_and_the_slower_memory_costs_more():
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    module = fake_module(_Block, fake)
    small, big = (record_step(module, (197, 16), b, train=True, is_model=False, fake_mode=fake) for b in (2, 512))
    h200, h100 = DEVICES['h200'], DEVICES['h100']
    assert step_time(big, h200, FITTED)['device_s'] > step_time(small, h200, FITTED)['device_s']
    assert step_time(big, h100, FITTED)['device_s'] > step_time(big, h200, FITTED)['device_s']
    assert step_time(big, h200, FITTED)['kernels'] == step_time(small, h200, FITTED)['kernels']


def _run(args, **env):
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=str(ROOT), **env))


def test_gpu_model_refuses_a_bad_batch_with_one_line_and_status_2(tmp_path):
    out = tmp_path / 'out.json'
    proc = _run([sys.executable, '-m', 'benchmarks.gpu_model', '--batch-size', '0', '--json', str(out)])
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == \
        'python -m benchmarks.gpu_model: error: --batch-size must be >= 1, got 0'
    assert not out.exists()


@pytest.mark.parametrize('argv, message', [
    (['--device', 'a100'], "argument --device: invalid choice: 'a100'"),
    (['--pairs', 'nope'], "argument --pairs: invalid choice: 'nope'"),
    (['--fit', '--device', 'h100'], '--fit fits the H200 measurements'),
])
def test_gpu_model_refuses_bad_options(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_gpu_model_writes_the_table_of_the_layer(tmp_path, capsys):
    out = tmp_path / 'out.json'
    assert main(['--pairs', 'layer', '--batch-size', '4', '--top', '3', '--json', str(out)]) == 0
    results = json.loads(out.read_text())
    assert set(results['pairs']) == {'layer/eval', 'layer/train'}
    assert all(row['moe']['kernels'] > row['dense']['kernels'] for row in results['pairs'].values())
    assert '| layer |' in capsys.readouterr().out and len(results['top']['layer/train']) == 3


def test_gpu_check_without_cuda_says_so_in_one_line_and_exits_2(tmp_path):
    proc = _run(['bash', 'benchmarks/gpu_check.sh', '--quick', str(tmp_path / 'out')], CUDA_VISIBLE_DEVICES='')
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        'gpu_check: no CUDA device here (torch.cuda.is_available() is False); run it on a machine with a GPU']
    assert not (tmp_path / 'out').exists()


def test_gpu_model_models_another_checkout_side_by_side_and_removes_its_worktree(tmp_path):
    out = tmp_path / 'out.json'
    proc = _run([sys.executable, '-m', 'benchmarks.gpu_model', '--ref', 'HEAD', '--pairs', 'layer', '--batch-size', '2',
                 '--top', '0', '--json', str(out)])
    assert proc.returncode == 0, proc.stderr
    results = json.loads(out.read_text())
    assert results['ref']['ref'] == 'HEAD' and set(results['ref']['pairs']) == set(results['current']['pairs'])
    # each checkout's tables once, then the two side by side
    assert proc.stdout.count('## this checkout:') == proc.stdout.count('## HEAD:') == 1
    assert '## MoE/dense, HEAD -> this checkout' in proc.stdout
    assert 'gpu_model_' not in _run(['git', 'worktree', 'list']).stdout  # its temporary worktree is gone


def test_a_depthwise_convolution_backward_costs_what_its_forward_costs_per_gradient():
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    build = lambda: nn.Sequential(*[nn.Conv2d(8, 8, 3, padding=1, groups=8) for _ in range(2)])  # noqa: E731
    ops = record_step(fake_module(build, fake), (8, 14, 14), 4, train=True, is_model=False, fake_mode=fake)
    forward = [op for op in ops if op.name == 'convolution_grouped']
    backward = [op for op in ops if op.name == 'convolution_grouped_backward']
    assert len(forward) == len(backward) == 2 and forward[0].flops == 2 * 4 * 8 * 14 * 14 * 9
    # the first convolution needs the weight gradient only, the second the input's too
    assert sum(op.flops for op in backward) == 3 * forward[0].flops


class _ReadsAValue(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * float(x.abs().max())  # a host synchronisation


def test_a_step_that_reads_a_value_on_the_host_is_refused_in_one_line(monkeypatch, capsys):
    import benchmarks.gpu_model.pairs as pairs
    monkeypatch.setattr(pairs, 'SpheroMoE', lambda dim, **kwargs: _ReadsAValue(dim, dim))
    assert main(['--pairs', 'layer', '--batch-size', '2']) == 1
    assert capsys.readouterr().err.strip() == (
        "python -m benchmarks.gpu_model: error: the step reads a tensor's value on the host "
        '(aten._local_scalar_dense.default), which the model cannot record: it models code without host '
        'synchronisation')
