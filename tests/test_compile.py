""" torch.compile as users run it on GPUs, checked on the CPU: one graph, no recompilation, compiled equals eager.

Each case compiles with ``fullgraph=True`` (any graph break raises) and Inductor's stride padding forced on
(``disable_padding_cpu = False``: what Inductor does on GPUs by default, and what broke a ``torch.cond`` branch that
asserted the unpadded stride), runs three steps of one shape with different values under
``torch._dynamo.config.error_on_recompile`` (a recompilation raises), and compares with eager code:
float32 to 1e-4 absolute on outputs and gradients (Inductor reorders the reductions), bfloat16 autocast to 2% of the
largest output magnitude (bfloat16 keeps 8 bits; each side rounds differently).

Inductor's C++ code generation on a shared two-core CPU is slow (the ViT-T-shaped layer: 78 s eval, 163 s train
measured under load), so Inductor (with the padding) compiles the layer, the only part with data-dependent math;
the two test models go through the same Dynamo capture and AOT autograd with ``backend='aot_eager'`` (one graph
forward and backward, no recompilation, equal to eager) without the code generation.
"""
from typing import Callable, List, Tuple

import pytest
import timm
import torch
import torch._dynamo
import torch._inductor.config

import timm_moejet  # noqa: F401  (registers the models)
from timm_moejet.layers import SpheroMoE


def _deterministic(model: torch.nn.Module) -> torch.nn.Module:
    """Train mode without randomness (dropouts, routing noise, drop path off), so eager and compiled agree."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.
        if isinstance(m, SpheroMoE):
            m.noise_std = 0.
        if hasattr(m, 'drop_prob'):
            m.drop_prob = 0.
    return model


def _vit_t_layer() -> Tuple[torch.nn.Module, torch.Tensor]:
    # ViT-T's MoE layer: width 192, 197 tokens, 98 core + 196 universal experts (294 slots)
    return SpheroMoE(192), torch.randn(1, 197, 192)


def _vit_test() -> Tuple[torch.nn.Module, torch.Tensor]:
    return timm.create_model('moejet_vit_test', num_classes=10), torch.randn(2, 3, 64, 64)


def _convnext_test() -> Tuple[torch.nn.Module, torch.Tensor]:
    return timm.create_model('moejet_convnext_test', num_classes=10), torch.randn(2, 3, 64, 64)


CASES = {'vit_t_layer': _vit_t_layer, 'moejet_vit_test': _vit_test, 'moejet_convnext_test': _convnext_test}
BACKENDS = {'vit_t_layer': 'inductor', 'moejet_vit_test': 'aot_eager', 'moejet_convnext_test': 'aot_eager'}


def _run(fn: Callable, model: torch.nn.Module, x: torch.Tensor, train: bool, amp: bool) -> List[torch.Tensor]:
    """Three steps of one shape; returns the outputs, and in train mode the input and parameter gradients."""
    results = []
    params = [p for p in model.parameters() if p.requires_grad]
    for step in range(3):
        xs = (x + 0.1 * step).requires_grad_(train)
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=amp):
            out = fn(xs)
        results.append(out.float().detach())
        if train:
            g = torch.randn(out.shape, generator=torch.Generator().manual_seed(step))
            results += [t.float() for t in torch.autograd.grad(out.float(), [xs] + params, g)]
    return results


@pytest.mark.parametrize('train,amp', [(False, False), (True, True)], ids=['eval-fp32', 'train-bf16'])
@pytest.mark.parametrize('case', list(CASES))
def test_fullgraph_compile_with_padding_equals_eager(case, train, amp, monkeypatch):
    monkeypatch.setattr(torch._inductor.config, 'disable_padding_cpu', False)
    monkeypatch.setattr(torch._dynamo.config, 'error_on_recompile', True)
    torch.manual_seed(0)
    model, x = CASES[case]()
    model = _deterministic(model).train(train)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend=BACKENDS[case])
    got = _run(compiled, model, x, train, amp)
    want = _run(model, model, x, train, amp)
    for a, b in zip(got, want):
        if amp:
            torch.testing.assert_close(a, b, rtol=0, atol=2e-2 * float(b.abs().max()) + 1e-6)
        else:
            torch.testing.assert_close(a, b, rtol=0, atol=1e-4)


def test_explain_finds_one_graph_and_no_break():
    # torch._dynamo.explain counts graph breaks without compiling: train mode under bfloat16 autocast (the most
    # branches: noise, dropout, casts) on tokens, eval in float32 on a channels-last map (ConvNeXt's layout)
    torch.manual_seed(0)
    layer = SpheroMoE(32, num_core_experts=3, num_univ_experts=5)
    for x, train, amp in ((torch.randn(2, 9, 32), True, True), (torch.randn(2, 3, 3, 32), False, False)):
        torch._dynamo.reset()
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=amp):
            explained = torch._dynamo.explain(layer.train(train))(x)
        assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
