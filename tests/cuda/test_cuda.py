""" CUDA checks (skipped without a CUDA device: run them on a GPU machine with ``pytest tests/cuda``).

Official fixture parity on the GPU (float32, TF32 off, 1e-5), CPU-vs-CUDA agreement of a model with MoE layers
(float32, 1e-4: different kernels and reduction orders), fullgraph ``torch.compile`` (default Inductor settings,
stride padding on) in eval and train against eager, no host synchronisation in the eager forward and backward
(``torch.cuda.set_sync_debug_mode('error')``), and the bf16 autocast error against float32 (2% relative).
"""
import json
import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors import safe_open

import timm_moejet
from timm_moejet.layers import SpheroMoE, SpheroRouter

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from paths import OFFICIAL_FIXTURE  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')


@pytest.fixture(autouse=True)
def no_tf32():
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def _deterministic(model: torch.nn.Module) -> torch.nn.Module:
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.
        if isinstance(m, SpheroRouter):
            m.noise_std = 0.
        if hasattr(m, 'drop_prob'):
            m.drop_prob = 0.
    return model


def test_official_fixture_parity_on_cuda():
    with safe_open(str(OFFICIAL_FIXTURE), 'pt') as f:
        config = json.loads(f.metadata()['config'])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    state_dict = {k[len('state_dict.'):]: v for k, v in tensors.items() if k.startswith('state_dict.')}
    model = timm_moejet.load_official(state_dict, config).cuda().eval()
    with torch.no_grad():
        logits = model(tensors['input'].cuda()).cpu()
    torch.testing.assert_close(logits, tensors['logits'], rtol=0, atol=1e-5)


@pytest.mark.parametrize('name', ['moejet_vit_test', 'moejet_convnext_test'])
def test_cpu_and_cuda_agree(name):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10).eval()
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        cpu = model(x)
        gpu = model.cuda()(x.cuda()).cpu()
    torch.testing.assert_close(gpu, cpu, rtol=0, atol=1e-4)


@pytest.mark.parametrize('train', [False, True], ids=['eval', 'train'])
@pytest.mark.parametrize('name', ['layer', 'moejet_vit_test', 'moejet_convnext_test'])
def test_fullgraph_compile_equals_eager(name, train, monkeypatch):
    monkeypatch.setattr(torch._dynamo.config, 'error_on_recompile', True)
    torch.manual_seed(0)
    if name == 'layer':
        model, x = SpheroMoE(192), torch.randn(8, 197, 192)
    else:
        model, x = timm.create_model(name, num_classes=10), torch.randn(8, 3, 64, 64)
    model = _deterministic(model).cuda().train(train)
    x = x.cuda()
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    for step in range(3):
        xs = x + 0.1 * step
        with torch.autocast('cuda', dtype=torch.bfloat16):
            got = compiled(xs).float()
            want = model(xs).float()
        torch.testing.assert_close(got, want, rtol=0, atol=2e-2 * float(want.abs().max()))
        if train:
            got.sum().backward()


@pytest.mark.parametrize('amp', [False, True], ids=['fp32', 'bf16'])
def test_forward_backward_never_synchronises(amp):
    torch.manual_seed(0)
    model = timm.create_model('moejet_vit_test', num_classes=10).cuda().train()
    x = torch.randn(4, 3, 64, 64, device='cuda')
    model(x).sum().backward()  # warm-up: lazy initialisations may synchronise once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode('error')
    try:
        with torch.autocast('cuda', dtype=torch.bfloat16, enabled=amp):
            out = model(x)
        out.float().sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode('default')


def test_bf16_autocast_error():
    torch.manual_seed(0)
    model = timm.create_model('moejet_vit_tiny', num_classes=10, moe_blocks=(10, 11)).cuda().eval()
    x = torch.randn(8, 3, 224, 224, device='cuda')
    with torch.no_grad():
        ref = model(x)
        with torch.autocast('cuda', dtype=torch.bfloat16):
            out = model(x).float()
    rel = float((out - ref).norm() / ref.norm())
    print(f'bf16 autocast relative error: {rel:.3g}')
    assert rel < 2e-2
