"""Numerics of the fast paths: sort-free entmax-1.5, custom expert backward, SDPA combine, bf16 autocast, compile.

Every fast path must compute what the plain formulation computes; each check below compares the two (or the
official fixture) with a stated tolerance.
"""
import json
import os

import pytest
import torch
import torch.nn.functional as F
from paths import OFFICIAL_FIXTURE

from timm_moejet.layers import SpheroMoE, entmax15, entmax15_halved, entmax15_threshold, entmax15_threshold_newton
from timm_moejet.layers.experts import ExpertDropout

FIXTURE = str(OFFICIAL_FIXTURE)


def entmax15_sorted(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Sort-based entmax-1.5 differentiated by autograd through the tau identity (the pre-optimisation code)."""
    z = x / 2
    z = z - z.amax(dim=dim, keepdim=True).detach()
    with torch.no_grad():
        tau = entmax15_threshold(z, dim)
        root = torch.clamp(z - tau, min=0.)
        dtau = root / root.sum(dim=dim, keepdim=True)
    if z.requires_grad:
        tau = tau + (dtau * (z - z.detach())).sum(dim=dim, keepdim=True)
    out = torch.clamp(z - tau, min=0.)
    return out * out


def reference_layer_forward(layer: SpheroMoE, x: torch.Tensor) -> torch.Tensor:
    """The layer's function written plainly: normalised keys, sort-based entmax, slices, autograd's own bmm."""
    keys = x / (torch.linalg.vector_norm(x, dim=-1, keepdim=True) + layer.eps)
    q = layer.slot_norm(layer.slot_queries)
    q = q / (torch.linalg.vector_norm(q, dim=-1, keepdim=True) + layer.eps)
    logits = keys @ q.t()
    inv_temp = torch.exp(-layer.log_temperature)
    dispatch = torch.softmax(logits * inv_temp[0], dim=1)
    if layer.sparse_combine:
        combine = entmax15_sorted(logits * inv_temp[-1], dim=-1)
    else:
        combine = torch.softmax(logits * inv_temp[-1], dim=-1)
    slots = dispatch.transpose(1, 2) @ x
    b, _, d = x.shape
    s = layer.slots_per_expert
    outs = []
    start = 0
    for group in (layer.core, layer.univ):
        if group is None:
            continue
        n = group.num_experts * s
        h = slots[:, start:start + n].reshape(b, group.num_experts, s, d).transpose(0, 1).reshape(-1, b * s, d)
        h = F.gelu(torch.baddbmm(group.fc1.bias.unsqueeze(1), h, group.fc1.weight.transpose(1, 2)))
        h = torch.baddbmm(group.fc2.bias.unsqueeze(1), h, group.fc2.weight.transpose(1, 2))
        outs.append(h.reshape(group.num_experts, b, s, d).transpose(0, 1).reshape(b, n, d))
        start += n
    return combine @ torch.cat(outs, dim=1)


def make_layer(**kwargs) -> SpheroMoE:
    args = dict(in_features=48, num_core=4, num_univ=8, core_hidden=96, univ_hidden=24, expert_drop=0.,
                noise_std=0.)
    args.update(kwargs)
    torch.manual_seed(0)
    layer = SpheroMoE(**args)
    with torch.no_grad():  # move every parameter away from its init, temperatures included
        for p in layer.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return layer


class TestEntmaxFastPath:

    @pytest.mark.parametrize('dtype,atol', [(torch.float64, 1e-6), (torch.float32, 1e-5)])
    @pytest.mark.parametrize('scale', [0.3, 2., 10.])
    @pytest.mark.parametrize('dim', [-1, 1])
    def test_equals_sort_reference_with_gradient(self, dtype, atol, scale, dim):
        torch.manual_seed(0)
        x = (torch.randn(4, 33, 294, dtype=dtype) * scale).requires_grad_()
        x_ref = x.detach().clone().requires_grad_()
        p, p_ref = entmax15(x, dim), entmax15_sorted(x_ref, dim)
        torch.testing.assert_close(p, p_ref, rtol=0, atol=atol)
        g = torch.randn_like(p)
        grad, = torch.autograd.grad(p, x, g)
        grad_ref, = torch.autograd.grad(p_ref, x_ref, g)
        torch.testing.assert_close(grad, grad_ref, rtol=0, atol=atol)

    def test_ties_and_masked_scores(self):
        inf = float('inf')
        x = torch.tensor([[1., 1., 1., 1.], [0., 0., -inf, 5.], [3., 3., 0., 0.], [2., -inf, -inf, -inf]],
                         dtype=torch.float64)
        torch.testing.assert_close(entmax15(x), entmax15_sorted(x), rtol=0, atol=1e-12)

    @pytest.mark.parametrize('num_steps,max_steps', [(0, 0), (1, 1), (3, 8)])
    def test_threshold_exact_for_any_step_count(self, num_steps, max_steps):
        # (0, 0): almost every row fails verification and takes the sort fallback; the result must not change
        torch.manual_seed(1)
        z = torch.randn(64, 294, dtype=torch.float64) * 3
        tau, root = entmax15_threshold_newton(z, -1, num_steps, max_steps)
        z_max = z.amax(-1, keepdim=True)
        tau_ref = entmax15_threshold(z - z_max) + z_max
        torch.testing.assert_close(tau, tau_ref, rtol=0, atol=1e-12)
        torch.testing.assert_close(root, torch.clamp(z - tau_ref, min=0.), rtol=0, atol=1e-12)

    def test_torchscript_path_equals_eager(self):
        scripted = torch.jit.script(entmax15_halved)
        torch.manual_seed(2)
        z = (torch.randn(8, 100, dtype=torch.float64) * 2).requires_grad_()
        z2 = z.detach().clone().requires_grad_()
        p, p_script = entmax15_halved(z), scripted(z2, -1, 3)
        torch.testing.assert_close(p_script, p, rtol=0, atol=1e-12)
        g = torch.randn_like(p)
        torch.testing.assert_close(torch.autograd.grad(p_script, z2, g)[0], torch.autograd.grad(p, z, g)[0],
                                   rtol=0, atol=1e-12)


class TestLayerFastPaths:

    @pytest.mark.parametrize('kwargs', [
        dict(),
        dict(combine='softmax'),
        dict(combine='softmax', num_univ=0),
        dict(slots_per_expert=2),
        dict(combine='softmax', slots_per_expert=2, shared_temperature=True),
        dict(num_core=0),
    ])
    def test_forward_and_gradients_equal_plain_formulation(self, kwargs):
        layer = make_layer(**kwargs).double()
        x = torch.randn(3, 21, 48, dtype=torch.float64)
        layer.eval()
        with torch.no_grad():
            torch.testing.assert_close(layer(x), reference_layer_forward(layer, x), rtol=0, atol=1e-10)
        layer.train()  # no noise, no dropout: the train graph (custom expert backward) computes the same function
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        g = torch.randn_like(x)
        params = [p for _, p in sorted(layer.named_parameters())]
        grads = torch.autograd.grad(layer(xa), [xa] + params, g)
        grads_ref = torch.autograd.grad(reference_layer_forward(layer, xb), [xb] + params, g)
        for a, b in zip(grads, grads_ref):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-10)

    def test_scripted_and_fx_traced_layer_equal_eager(self):
        layer = make_layer().eval()
        x = torch.randn(2, 17, 48)
        with torch.no_grad():
            ref = layer(x)
            torch.testing.assert_close(torch.jit.script(layer)(x), ref, rtol=0, atol=1e-6)
            torch.testing.assert_close(torch.fx.symbolic_trace(layer)(x), ref, rtol=0, atol=1e-6)

    def test_expert_dropout_distribution(self):
        drop = ExpertDropout(0.4).train()
        x = torch.ones(1_000_000)
        y = drop(x)
        kept = y.ne(0)
        # keep rate 0.6; binomial std over 1e6 draws is 4.9e-4, so 0.003 is about 6 sigma
        assert abs(kept.float().mean().item() - 0.6) < 3e-3
        torch.testing.assert_close(y[kept], torch.full_like(y[kept], 1 / 0.6), rtol=1e-6, atol=0)
        assert torch.equal(drop.eval()(x), x)


def _fixture_model():
    assert os.path.exists(FIXTURE), f'official fixture missing: {FIXTURE}'
    from safetensors import safe_open
    from safetensors.torch import load_file

    import timm_moejet
    tensors = load_file(FIXTURE)
    with safe_open(FIXTURE, 'pt') as f:
        config = json.loads(f.metadata()['config'])
    state_dict = {k[len('state_dict.'):]: v for k, v in tensors.items() if k.startswith('state_dict.')}
    return timm_moejet.load_official(state_dict, config).eval(), tensors


class TestFixtureAtSpeed:

    def test_bf16_autocast_close_to_float32(self):
        model, tensors = _fixture_model()
        x = tensors['input']
        with torch.no_grad():
            ref = model(x)
            torch.testing.assert_close(ref, tensors['logits'], rtol=0, atol=1e-5)  # parity still holds
            with torch.autocast('cpu', dtype=torch.bfloat16):
                out = model(x).float()
        assert torch.isfinite(out).all()
        rel = ((out - ref).norm() / ref.norm()).item()
        assert rel <= 1e-2, f'bf16 autocast relative error {rel:.3g} > 1e-2'

    def test_routing_stays_float32_under_autocast(self):
        model, tensors = _fixture_model()
        layer = model.blocks[model.moe_blocks[0]].mlp
        x = torch.randn(2, 17, 64)
        with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
            dispatch, combine = layer.route(x)
        assert dispatch.dtype == torch.float32 and combine.dtype == torch.float32
        with torch.no_grad():
            d32, c32 = layer.route(x)
        torch.testing.assert_close(combine, c32, rtol=0, atol=1e-6)

    @pytest.mark.parametrize('combine', ['entmax15', 'softmax'])
    def test_compile_equals_eager_without_graph_breaks(self, combine):
        model, tensors = _fixture_model()
        layer = model.blocks[model.moe_blocks[0]].mlp
        layer.sparse_combine = combine == 'entmax15'
        layer.combine = combine
        x = model.blocks[model.moe_blocks[0]].norm2(torch.randn(4, 17, 64)).detach()
        torch._dynamo.reset()
        compiled = torch.compile(layer, fullgraph=True)  # fullgraph: any graph break raises
        with torch.no_grad():
            torch.testing.assert_close(compiled(x), layer(x), rtol=0, atol=1e-5)


def test_compiled_train_graph_equals_eager():
    """The custom backwards (entmax, experts) trace into one graph; aot_eager keeps the check quick."""
    layer = make_layer().train()  # no noise, no dropout, no drop path: train output is deterministic
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend='aot_eager')
    x = torch.randn(3, 17, 48)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_c, out_e = compiled(xa), layer(xb)
    torch.testing.assert_close(out_c, out_e, rtol=0, atol=1e-5)
    g = torch.randn_like(out_e)
    params = list(layer.parameters())
    for a, b in zip(torch.autograd.grad(out_c, [xa] + params, g), torch.autograd.grad(out_e, [xb] + params, g)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_fast_expert_backward_runs_under_autocast(monkeypatch):
    """Under autocast the experts still take the custom backward (weight gradient in the [E, out, in] layout), and
    its results equal autocast's own bmm path (bf16 operands; tolerance 2e-2 relative, bf16 has 8 bits)."""
    from timm_moejet.layers import experts as experts_module

    calls = []
    original = experts_module._BatchedLinearFunction.apply

    def counting(*args):
        calls.append(args[1].dtype)
        return original(*args)

    layer = experts_module.BatchedLinear(6, 32, 24)
    x = torch.randn(6, 10, 32, requires_grad=True)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        plain = experts_module._batched_linear_ops(x, layer.weight, layer.bias)
    grads_plain = torch.autograd.grad(plain.float().square().sum(), [x, layer.weight, layer.bias])
    monkeypatch.setattr(experts_module._BatchedLinearFunction, 'apply', counting)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        fast = layer(x)
    grads_fast = torch.autograd.grad(fast.float().square().sum(), [x, layer.weight, layer.bias])
    assert calls == [torch.bfloat16], 'the fast function must run, on bfloat16 operands'
    assert fast.dtype == plain.dtype == torch.bfloat16
    torch.testing.assert_close(fast, plain, rtol=0, atol=0)
    for a, b in zip(grads_fast, grads_plain):
        assert a.dtype == b.dtype  # the parameter gradients come back in float32, as autocast's
        torch.testing.assert_close(a, b, rtol=2e-2, atol=1e-2)
