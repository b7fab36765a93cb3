""" torch.compile as users run it on GPUs, checked on the CPU: one graph, no recompilation, compiled equals eager.

Every case compiles with the Inductor backend, ``fullgraph=True`` (any graph break raises) and Inductor's stride
padding forced on (``disable_padding_cpu = False``: what Inductor does on GPUs by default, and what broke a
``torch.cond`` branch that asserted the unpadded stride), runs three steps of one shape with different values under
``torch._dynamo.config.error_on_recompile`` (a recompilation raises), and compares with eager code: float32 to 1e-4
absolute on outputs and gradients (Inductor reorders the reductions), bfloat16 autocast to 2% of the largest output
magnitude (bfloat16 keeps 8 bits; each side rounds differently). Each case also checks that Inductor padded at least
one buffer (``torch._inductor.metrics.num_comprehensive_padding``), so the padding is exercised, not only allowed.

Cases: the ViT-T-shaped layer (width 192, 197 tokens, 294 slots) in eval (float32) and train under bfloat16
autocast; ``moejet_vit_test``, ``moejet_convnext_test`` and ``moejet_mixer_test`` in eval and train (forward and
backward), float32 only:
bfloat16 on the models would add about 45 s and 65 s of C++ code generation on a shared two-core CPU (the layer case
covers bfloat16 through Inductor). The models keep their registered architecture (blocks, widths, MoE placement,
entmax combine) with more experts (ViT and Mixer: both MoE blocks; ConvNeXt: stage 3's), so that the routing tensors
[B, tokens, slots] have a stride above Inductor's padding threshold (1024) that is no multiple of its alignment
(32 float32 elements): ViT 17 tokens x 63 slots, ConvNeXt stage 3 and Mixer 16 tokens x 69 slots; at the registered
expert counts nothing is padded.

Inductor's FX graph and AOT autograd caches are off in these tests: a cache hit skips lowering, where the padding is
decided and counted. No two cases share a graph, so the caches would only help a rerun; the compiled C++ kernels are
still cached by source and shared between cases. Measured with a cold cache on a shared two-core CPU (load 2-4),
the whole module in 3 min 40 s: the layer 21 s eval, 28 s train; ViT 19 s eval, 35 s train; ConvNeXt 34 s eval,
77 s train (the four model cases 165 s).
"""
from typing import Callable, List, Tuple

import pytest
import timm
import torch
import torch._dynamo
import torch._functorch.config
import torch._inductor.config
import torch._inductor.metrics

import timm_moejet  # noqa: F401  (registers the models)
from timm_moejet.layers import SpheroMoE, SpheroRouter


def _deterministic(model: torch.nn.Module) -> torch.nn.Module:
    """Train mode without randomness (dropouts, routing noise, drop path off), so eager and compiled agree."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.
        if isinstance(m, SpheroRouter):
            m.noise_std = 0.
        if hasattr(m, 'drop_prob'):
            m.drop_prob = 0.
    return model


def _vit_t_layer() -> Tuple[torch.nn.Module, torch.Tensor]:
    # ViT-T's MoE layer: width 192, 197 tokens, 98 core + 196 universal experts (294 slots)
    return SpheroMoE(192), torch.randn(1, 197, 192)


def _vit_test() -> Tuple[torch.nn.Module, torch.Tensor]:
    # 17 tokens x 63 slots (21 core + 42 universal experts) in both MoE blocks: routing strides of 1071, padded
    model = timm.create_model('moejet_vit_test', num_classes=10, num_core_experts=21, num_univ_experts=42)
    return model, torch.randn(2, 3, 64, 64)


def _convnext_test() -> Tuple[torch.nn.Module, torch.Tensor]:
    # stage 3 (4 x 4 tokens): 23 core + 46 universal experts, routing strides of 16 x 69 = 1104, padded; stage 4
    # (2 x 2 tokens) keeps its derived 2 + 4 (stages 1 and 2 have no MoE block)
    model = timm.create_model('moejet_convnext_test', num_classes=10, num_core_experts=(1, 1, 23, 2))
    return model, torch.randn(2, 3, 64, 64)


def _mixer_test() -> Tuple[torch.nn.Module, torch.Tensor]:
    # 16 tokens x 69 slots (23 core + 46 universal experts) in both MoE blocks: routing strides of 1104, padded
    model = timm.create_model('moejet_mixer_test', num_classes=10, num_core_experts=23)
    return model, torch.randn(2, 3, 64, 64)


CASES = {'vit_t_layer': _vit_t_layer, 'moejet_vit_test': _vit_test, 'moejet_convnext_test': _convnext_test,
         'moejet_mixer_test': _mixer_test}
# (train, bfloat16 autocast) per case: the models in float32 only (bfloat16 through Inductor: the layer)
MODES = {
    'vit_t_layer': [(False, False), (True, True)],
    'moejet_vit_test': [(False, False), (True, False)],
    'moejet_convnext_test': [(False, False), (True, False)],
    'moejet_mixer_test': [(False, False), (True, False)],
}
PARAMS = [
    pytest.param(case, train, amp, id=f"{case}-{'train' if train else 'eval'}-{'bf16' if amp else 'fp32'}")
    for case, modes in MODES.items() for train, amp in modes
]


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


@pytest.mark.parametrize('case,train,amp', PARAMS)
def test_fullgraph_compile_with_padding_equals_eager(case: str, train: bool, amp: bool, monkeypatch) -> None:
    monkeypatch.setattr(torch._inductor.config, 'disable_padding_cpu', False)
    monkeypatch.setattr(torch._inductor.config, 'fx_graph_cache', False)
    monkeypatch.setattr(torch._functorch.config, 'enable_autograd_cache', False)
    monkeypatch.setattr(torch._dynamo.config, 'error_on_recompile', True)
    torch.manual_seed(0)
    model, x = CASES[case]()
    model = _deterministic(model).train(train)
    torch._dynamo.reset()
    torch._inductor.metrics.reset()
    compiled = torch.compile(model, fullgraph=True, backend='inductor')
    got = _run(compiled, model, x, train, amp)
    assert torch._inductor.metrics.num_comprehensive_padding > 0, 'Inductor padded no buffer: the padding is untested'
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
