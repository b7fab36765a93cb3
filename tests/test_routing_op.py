""" The routing operator (``moejet::routing_weights`` and its backward, timm_moejet/layers/routing_op.py) on the CPU.

Against the tensor ops it replaces (autograd through the entmax's own closed-form backward), float32: forward and
gradients to 1e-5 absolute; against numerical differentiation in float64 (gradcheck's defaults). Its fake
implementation, torch.library's opcheck, one operator forward and one backward in torch.compile's graphs and in
torch.export's, the noise drawn from torch's generator (a seed reproduces it, a recomputation under gradient
checkpointing sees the same), and the weights in the autocast dtype: exactly the float32 weights rounded, with
gradients within 4e-3 relative (norm of the error over the norm; measured 0.8e-3 to 1.9e-3 at 197 x 294, 49 x 72
and 17 x 63 slots, bfloat16); the layer's own check is in test_speed_numerics.py.
"""
from typing import List

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.checkpoint import checkpoint

from timm_moejet.layers import SpheroMoE
from timm_moejet.layers.routing_op import routing_weights_ops

OP = torch.ops.moejet.routing_weights.default
BACKWARD = torch.ops.moejet.routing_weights_backward.default
ATOL = 1e-5  # float32
BF16_GRAD_REL = 4e-3
SHAPES = [(1, 197, 294), (2, 49, 72), (3, 17, 63)]


def _scores(shape, dtype=torch.float32, seed=0):
    """Cosine scores of random unit tokens and slot queries, with the scales of temperature 0.5 and norms near 1."""
    gen = torch.Generator().manual_seed(seed)
    b, n, s = shape
    x = F.normalize(torch.randn(b, n, 48, generator=gen, dtype=dtype), dim=-1)
    q = F.normalize(torch.randn(s, 48, generator=gen, dtype=dtype), dim=-1)
    scale = 2. / (1. + 0.1 * torch.rand(b, n, 1, generator=gen, dtype=dtype))
    return x @ q.t(), scale, scale * 0.5


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize('sparse', [True, False], ids=['entmax15', 'softmax'])
@pytest.mark.parametrize('shape', SHAPES, ids=str)
def test_operator_equals_the_tensor_ops_forward_and_backward(shape, sparse):
    inputs = [t.requires_grad_() for t in _scores(shape)]
    dispatch, combine = OP(*inputs, 0., sparse, torch.float32)
    ref_dispatch, ref_combine = routing_weights_ops(*inputs, 0., sparse)
    torch.testing.assert_close(dispatch, ref_dispatch, rtol=0, atol=ATOL)
    torch.testing.assert_close(combine, ref_combine, rtol=0, atol=ATOL)
    g_dispatch, g_combine = torch.randn_like(dispatch), torch.randn_like(combine)
    grads = torch.autograd.grad((dispatch * g_dispatch).sum() + (combine * g_combine).sum(), inputs)
    ref = torch.autograd.grad((ref_dispatch * g_dispatch).sum() + (ref_combine * g_combine).sum(), inputs)
    for got, expected in zip(grads, ref):
        torch.testing.assert_close(got, expected, rtol=0, atol=ATOL)


@pytest.mark.parametrize('sparse', [True, False], ids=['entmax15', 'softmax'])
def test_operator_gradient_equals_numerical_differentiation(sparse):
    inputs = tuple(t.requires_grad_() for t in _scores((2, 5, 7), torch.float64))
    assert torch.autograd.gradcheck(lambda *a: OP(*a, 0., sparse, torch.float64), inputs)


@pytest.mark.parametrize('sparse', [True, False], ids=['entmax15', 'softmax'])
def test_opcheck_and_fake_shapes(sparse):
    raw, d_scale, c_scale = (t.requires_grad_() for t in _scores((2, 17, 63)))
    torch.library.opcheck(OP, (raw, d_scale, c_scale, 0., sparse, torch.float32))
    dispatch, combine = OP(raw, d_scale, c_scale, 0., sparse, torch.float32)
    torch.library.opcheck(BACKWARD, (torch.randn_like(dispatch), torch.randn_like(combine), dispatch.detach(),
                                     combine.detach(), raw.detach(), d_scale.detach(), c_scale.detach(), sparse))
    real = [t.detach() for t in (raw, d_scale, c_scale)]
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(t) for t in real]
        d, c = OP(*fake, 0.1, sparse, torch.bfloat16)
        grads = BACKWARD(d, c, d, c, *fake, sparse)
    assert [(t.shape, t.dtype) for t in (d, c)] == [(raw.shape, torch.bfloat16)] * 2
    assert [(t.shape, t.dtype) for t in grads] == [(raw.shape, torch.float32), (d_scale.shape, torch.float32),
                                                   (c_scale.shape, torch.float32)]


def _layer(**kwargs) -> SpheroMoE:
    return SpheroMoE(32, num_core_experts=3, num_univ_experts=6, core_hidden=64, univ_hidden=16, moe_expert_drop=0.,
                     **kwargs)


def _count(graph: torch.fx.Graph, target) -> int:
    return sum(n.target == target for n in graph.nodes)


def test_compile_export_and_fx_see_one_routing_operator():
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd
    torch.manual_seed(0)
    layer, x = _layer(moe_noise_std=0.).train(), torch.randn(2, 9, 32)
    graphs: List[torch.fx.GraphModule] = []

    def keep(gm, _):
        graphs.append(gm)
        return make_boxed_func(gm.forward)

    torch._dynamo.reset()
    compiled = torch.compile(layer, backend=aot_autograd(fw_compiler=keep, bw_compiler=keep), fullgraph=True)
    compiled(x).sum().backward()
    forward, backward = graphs
    assert (_count(forward.graph, OP), _count(forward.graph, BACKWARD)) == (1, 0)
    assert (_count(backward.graph, OP), _count(backward.graph, BACKWARD)) == (0, 1)
    # nothing of the routing math outside the operator: no softmax, no entmax threshold's clamp
    assert not [n for g in graphs for n in g.graph.nodes if 'softmax' in str(n.target) or 'clamp' in str(n.target)]
    exported = torch.export.export(layer.eval(), (x,))
    assert _count(exported.graph, OP) == 1
    traced = torch.fx.symbolic_trace(layer)
    assert [n.target.__name__ for n in traced.graph.nodes if n.op == 'call_function'].count('routing_weights') == 1
    torch.testing.assert_close(traced(x), layer(x), rtol=0, atol=0)


def test_noise_follows_the_torch_seed_and_gradient_checkpointing_recomputes_it():
    layer, x = _layer(moe_noise_std=0.5).train(), torch.randn(2, 9, 32)
    outs = []
    for seed in (1, 1, 2):
        torch.manual_seed(seed)
        outs.append(layer(x))
    assert torch.equal(outs[0], outs[1]) and not torch.allclose(outs[0], outs[2])

    def grads(checkpointed: bool) -> List[torch.Tensor]:
        layer.zero_grad()
        torch.manual_seed(3)
        out = checkpoint(layer, x, use_reentrant=False) if checkpointed else layer(x)
        out.square().sum().backward()
        return [p.grad.clone() for p in layer.parameters()]

    # the recomputation restores the RNG state: the same noise, so exactly the same gradients
    for got, expected in zip(grads(True), grads(False)):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize('sparse', [True, False], ids=['entmax15', 'softmax'])
@pytest.mark.parametrize('shape', SHAPES, ids=str)
def test_weights_in_bfloat16_are_the_rounded_float32_weights(shape, sparse):
    raw, d_scale, c_scale = _scores(shape)
    d32, c32 = OP(raw, d_scale, c_scale, 0., sparse, torch.float32)
    d16, c16 = OP(raw, d_scale, c_scale, 0., sparse, torch.bfloat16)
    # what autocast's cast before the bmm's gives, bit for bit
    assert torch.equal(d16, d32.bfloat16()) and torch.equal(c16, c32.bfloat16())
    g_dispatch = torch.randn(shape, generator=torch.Generator().manual_seed(1)).bfloat16()
    g_combine = torch.randn(shape, generator=torch.Generator().manual_seed(2)).bfloat16()
    from_bf16 = BACKWARD(g_dispatch, g_combine, d16, c16, raw, d_scale, c_scale, sparse)
    from_fp32 = BACKWARD(g_dispatch.float(), g_combine.float(), d32, c32, raw, d_scale, c_scale, sparse)
    for got, expected in zip(from_bf16, from_fp32):
        assert got.dtype == torch.float32 and _rel(got, expected) < BF16_GRAD_REL

