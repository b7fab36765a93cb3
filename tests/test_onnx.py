""" ONNX export (timm_moejet.onnx_export) checked in onnxruntime against eager PyTorch, with both of torch's exporters.

The entmax-1.5 combine finds its threshold with a fixed number of Newton steps and the closed form of the support they
reach (straight-line ops in both eager code and torch.export). Inputs are chosen, and checked, to include rows that
settle within the first three steps and rows that need the fourth. Tolerances, absolute, float32:
1e-5 on entmax probabilities (the exported sort and the eager Newton steps are both exact and round differently:
up to 3e-6 apart measured), 1e-4 on logits.
"""
import contextlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Iterator, List

import onnx
import onnxruntime
import pytest
import timm
import torch
import torch.nn as nn
from timm.layers import set_layer_config

import timm_moejet.layers.entmax as entmax_module
from timm_moejet.errors import InvalidArgument, MissingExtra, OutputExists
from timm_moejet.layers import entmax15_halved, entmax15_settled, entmax15_threshold
from timm_moejet.onnx_export import export_onnx, onnx_max_abs_error

EXPORTERS = [pytest.param(False, id='torchscript'), pytest.param(True, id='dynamo')]
LOGITS_ATOL = 1e-4
PROBS_ATOL = 1e-5


@contextlib.contextmanager
def sorts_recorded() -> Iterator[List[torch.Size]]:
    """Record the shape of the scores of every sort-based threshold computed within."""
    shapes: List[torch.Size] = []
    sort = entmax_module._sorted_threshold

    def recording_sort(z: torch.Tensor, dim: int) -> torch.Tensor:
        shapes.append(z.shape)
        return sort(z, dim)

    entmax_module._sorted_threshold = recording_sort
    try:
        yield shapes
    finally:
        entmax_module._sorted_threshold = sort


def unsettled_rows(z: torch.Tensor, num_steps: int = 3) -> int:
    """Rows of ``z`` (last dim) whose support the first ``num_steps`` Newton steps do not settle."""
    return int((~entmax15_settled(z.reshape(-1, z.shape[-1]), -1, num_steps)).sum())


class Entmax(nn.Module):
    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return entmax15_halved(z, -1)


def _run(path, x: torch.Tensor) -> torch.Tensor:
    session = onnxruntime.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])


def _export_plain(module: nn.Module, example: torch.Tensor, path, dynamo: bool) -> None:
    axes = {0: 'batch', 1: 'tokens'}
    kwargs = dict(dynamic_shapes=(axes,)) if dynamo else dict(dynamic_axes={'z': axes})
    torch.onnx.export(module, (example,), str(path), input_names=['z'], dynamo=dynamo, **kwargs)


def _reference(z: torch.Tensor) -> torch.Tensor:
    z64 = z.double()
    z_max = z64.amax(-1, keepdim=True)
    return torch.clamp(z64 - entmax15_threshold(z64 - z_max) - z_max, min=0.) ** 2


@pytest.mark.parametrize('dynamo', EXPORTERS)
def test_entmax_exports_exactly_on_every_branch(tmp_path, dynamo):
    gen = torch.Generator().manual_seed(0)
    path = tmp_path / 'entmax.onnx'
    _export_plain(Entmax(), torch.randn(2, 5, 294, generator=gen) * 3, path, dynamo)
    ties = torch.tensor([[1.] * 6 + [0.] * 288, [5.] + [0.] * 293, [.5, .5, -3.] + [.4] * 291]).unsqueeze(0)
    inputs = {
        'settles in three steps': torch.randn(3, 7, 294, generator=gen) * 3,
        'needs more steps': torch.randn(1, 60, 294, generator=gen) * .3,
        'ties and one dominant score': ties,
    }
    assert unsettled_rows(inputs['settles in three steps']) == 0
    assert unsettled_rows(inputs['needs more steps']) > 0  # settled by the fourth step
    assert unsettled_rows(inputs['needs more steps'], 4) == 0
    for name, z in inputs.items():
        got = _run(path, z)
        torch.testing.assert_close(got, entmax15_halved(z), rtol=0, atol=PROBS_ATOL, msg=name)
        torch.testing.assert_close(got.double(), _reference(z), rtol=0, atol=PROBS_ATOL, msg=name)
        # independent of any entmax code: a distribution per row, zero below the threshold the output implies
        assert bool((got >= 0).all()), name
        # (a float32 sum of 294 entries: 1e-4)
        torch.testing.assert_close(got.sum(-1), torch.ones(got.shape[:-1]), rtol=0, atol=1e-4, msg=name)
        tau = (z / 2 - got.sqrt()).masked_fill(got == 0, float('inf')).amin(-1, keepdim=True)
        assert bool((got[z / 2 < tau - 1e-4] == 0).all()), name


def test_exportable_layer_config_selects_the_sort_with_the_same_values_and_gradient():
    # timm's set_layer_config(exportable=True) picks the straight-line sort path in eager code too (float64: exact)
    gen = torch.Generator().manual_seed(2)
    z = (torch.randn(4, 9, 294, generator=gen, dtype=torch.float64) * 3).requires_grad_()
    g = torch.randn(4, 9, 294, generator=gen, dtype=torch.float64)
    with sorts_recorded() as sorts:
        p_newton = entmax15_halved(z)
        assert sorts == []  # these rows settle: the Newton path never sorts
        with set_layer_config(exportable=True):
            p_sort = entmax15_halved(z)
        assert sorts == [z.shape]
    torch.testing.assert_close(p_sort, p_newton, rtol=0, atol=1e-12)
    grad_sort, = torch.autograd.grad(p_sort, z, g)
    grad_newton, = torch.autograd.grad(p_newton, z, g)
    torch.testing.assert_close(grad_sort, grad_newton, rtol=0, atol=1e-12)


def _entmax_inputs(model: nn.Module, x: torch.Tensor) -> list:
    """The scores each MoE layer's entmax receives on ``x`` (eager, eval: the threshold the routing operator's
    entmax computes)."""
    seen = []
    wrapped = entmax_module.entmax15_threshold_newton

    def recording(z: torch.Tensor, dim: int = -1, num_steps: int = 4):
        seen.append(z.detach().clone())
        return wrapped(z, dim, num_steps)

    entmax_module.entmax15_threshold_newton = recording
    try:
        with torch.no_grad():
            model.eval()(x)
    finally:
        entmax_module.entmax15_threshold_newton = wrapped
    return seen


def test_moejet_vit_test_matches_eager_on_many_inputs(tmp_path):
    # the default exporter (TorchScript, as timm's onnx_export.py); the dynamo exporter is checked below
    torch.manual_seed(0)
    model = timm.create_model('moejet_vit_test', num_classes=10)
    result = export_onnx(model, tmp_path / 'moejet_vit_test.onnx')
    assert result.path.is_file() and sorted(p.name for p in tmp_path.iterdir()) == ['moejet_vit_test.onnx']
    assert len(result.batch_sizes) >= 3 and 2 not in result.batch_sizes  # traced with 2, checked on others
    assert result.max_abs_error <= LOGITS_ATOL
    gen = torch.Generator().manual_seed(1)
    inputs = [torch.randn(b, 3, 64, 64, generator=gen) * s for b, s in [(1, 1.), (4, .1), (7, 10.), (3, 1.)]]
    inputs.append(torch.full((2, 3, 64, 64), .5))
    error = onnx_max_abs_error(result.path, model, inputs)
    assert error <= LOGITS_ATOL
    print(f'moejet_vit_test: max abs error {error:.3g} (export check {result.max_abs_error:.3g})')


@pytest.mark.parametrize('dynamo', EXPORTERS)
def test_wide_router_takes_both_entmax_branches_in_the_exported_model(tmp_path, dynamo):
    # 294 slots (the tiny models' count) at width 64 and a lower temperature: some batches settle within three
    # Newton steps in every row, others need the fourth
    torch.manual_seed(0)
    model = timm.create_model('moejet_vit_test', num_classes=10, num_core_experts=98, num_univ_experts=196,
                              moe_temperature_init=0.2)
    result = export_onnx(model, tmp_path / 'wide.onnx', dynamo=dynamo)
    assert result.max_abs_error <= LOGITS_ATOL
    ops = [n.op_type for n in onnx.load(str(result.path), load_external_data=False).graph.node]
    # dynamo: the straight-line Newton steps (no If, no sort); TorchScript: the straight-line sort (TopK)
    assert (ops.count('If'), 'TopK' in ops) == ((0, False) if dynamo else (0, True)), sorted(set(ops))
    gen = torch.Generator().manual_seed(0)
    inputs = [torch.randn(b, 3, 64, 64, generator=gen) for b in (1, 2, 5)]
    counts = [unsettled_rows(z) for x in inputs for z in _entmax_inputs(model, x)]
    assert 0 in counts and max(counts) > 0, counts
    error = onnx_max_abs_error(result.path, model, inputs)
    assert error <= LOGITS_ATOL
    print(f'294-slot moejet_vit_test ({"dynamo" if dynamo else "torchscript"}): max abs error {error:.3g}, '
          f'unsettled rows per layer call {counts}')


def test_moejet_vit_tiny_moe_layer_at_full_size(tmp_path):
    # moejet_vit_tiny at its real width, token and expert counts (197 tokens, 98 + 196 experts), MoE in the last
    # block only: the whole 265M-parameter model takes about 50 s to export and check on 2 cores (docs/timm_scripts.md)
    torch.manual_seed(0)
    model = timm.create_model('moejet_vit_tiny', num_classes=10, moe_blocks=(11,))
    result = export_onnx(model, tmp_path / 'tiny.onnx', check=False)
    gen = torch.Generator().manual_seed(0)
    error = onnx_max_abs_error(result.path, model, [torch.randn(b, 3, 224, 224, generator=gen) for b in (1, 3)])
    assert error <= LOGITS_ATOL
    print(f'moejet_vit_tiny, MoE in block 11: max abs error {error:.3g}')


class _TracesDifferently(nn.Module):
    """Eager output + 1 in the exported graph: what a check must catch."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean((1, 2, 3))[:, None] * self.scale + (1. if torch.jit.is_tracing() else 0.)


def test_a_mismatch_is_reported_and_nothing_written(tmp_path):
    with pytest.raises(RuntimeError, match=r'differs from eager PyTorch by 1 \(more than atol=0.0001\)'):
        export_onnx(_TracesDifferently(), tmp_path / 'bad.onnx', input_size=(3, 8, 8))
    assert list(tmp_path.iterdir()) == []


def test_bad_arguments_are_one_line_errors(tmp_path, monkeypatch):
    model = timm.create_model('moejet_vit_test', num_classes=3)
    (tmp_path / 'there.onnx').write_bytes(b'old')
    with pytest.raises(OutputExists, match='there.onnx already exists; pass overwrite=True'):
        export_onnx(model, tmp_path / 'there.onnx')
    assert (tmp_path / 'there.onnx').read_bytes() == b'old'
    with pytest.raises(InvalidArgument, match='output must name a .onnx file'):
        export_onnx(model, tmp_path / 'model.pt')
    with pytest.raises(InvalidArgument, match='batch_size must be an int >= 2, got 1'):
        export_onnx(model, tmp_path / 'new.onnx', batch_size=1, dynamo=True)
    with pytest.raises(InvalidArgument, match=r'input_size must be \(C, H, W\)'):
        export_onnx(model, tmp_path / 'new.onnx', input_size=(64, 64))
    monkeypatch.setitem(sys.modules, 'onnxruntime', None)  # as if not installed
    missing = r'needs onnxruntime, which is not installed: pip install "timm-moejet\[onnx\]"'
    with pytest.raises(MissingExtra, match=missing):
        export_onnx(model, tmp_path / 'new.onnx')
    assert sorted(p.name for p in tmp_path.iterdir()) == ['there.onnx']


def test_package_import_stays_light():
    # onnx, onnxruntime and onnxscript are imported when an export function runs, not with the package
    root = Path(__file__).resolve().parents[1]
    code = 'import sys, timm_moejet, timm_moejet.onnx_export; print(sorted(m for m in ("onnx", "onnxruntime", ' \
           '"onnxscript") if m in sys.modules))'
    env = dict(os.environ, PYTHONPATH=str(root))
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True, cwd=root, env=env)
    assert out.stdout.strip() == '[]', out.stdout


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
