"""Numerics of the fast paths: sort-free entmax-1.5, custom expert backward, bf16 autocast, compile.

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
from timm_moejet.layers.entmax import entmax15_settled
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
    keys = x / (torch.linalg.vector_norm(x, dim=-1, keepdim=True) + layer.router.eps)
    q = layer.router.slot_norm(layer.router.slot_queries)
    q = q / (torch.linalg.vector_norm(q, dim=-1, keepdim=True) + layer.router.eps)
    logits = keys @ q.t()
    inv_temp = torch.exp(-layer.router.log_temperature)
    dispatch = torch.softmax(logits * inv_temp[0], dim=1)
    if layer.router.sparse:
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
    args = dict(in_features=48, num_core_experts=4, num_univ_experts=8, core_hidden=96, univ_hidden=24,
                moe_expert_drop=0., moe_noise_std=0.)
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

    @pytest.mark.parametrize('scale', [0.3, 3., 100.])
    def test_threshold_exact_once_the_support_settles(self, scale):
        # the fixed Newton steps reach the true support; its closed form is the sort's threshold (float64: 1e-12)
        torch.manual_seed(1)
        z = torch.randn(64, 294, dtype=torch.float64) * scale
        tau, root = entmax15_threshold_newton(z, -1)
        z_max = z.amax(-1, keepdim=True)
        tau_ref = entmax15_threshold(z - z_max) + z_max
        assert bool(entmax15_settled(z, -1).all())
        torch.testing.assert_close(tau, tau_ref, rtol=0, atol=1e-12)
        torch.testing.assert_close(root, torch.clamp(z - tau_ref, min=0.), rtol=0, atol=1e-12)

    def test_fewer_steps_approach_the_threshold_from_below(self):
        # scores that need four steps: with fewer, the rows that have not settled are reported and their error
        # shrinks with each step; settled rows are exact at any step count
        torch.manual_seed(0)
        z = torch.randn(4096, 294, dtype=torch.float64) * 0.3
        z_max = z.amax(-1, keepdim=True)
        tau_ref = entmax15_threshold(z - z_max) + z_max
        errors = []
        for n in range(5):
            tau, _ = entmax15_threshold_newton(z, -1, n)
            settled = entmax15_settled(z, -1, n).squeeze(-1)
            error = (tau - tau_ref).abs().squeeze(-1)
            assert float(torch.where(settled, error, 0.).max()) < 1e-12
            errors.append(float(error.max()))
        assert not bool(entmax15_settled(z, -1, 3).all()) and bool(entmax15_settled(z, -1, 4).all())
        assert errors == sorted(errors, reverse=True) and errors[-1] < 1e-12, errors

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
        dict(moe_combine='softmax'),
        dict(moe_combine='softmax', num_univ_experts=0),
        dict(slots_per_expert=2),
        dict(moe_combine='softmax', slots_per_expert=2, moe_shared_temperature=True),
        dict(num_core_experts=0),
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

    @pytest.mark.parametrize('p', [0.4, 0.1, 0.75])
    def test_expert_dropout_distribution(self, p):
        drop = ExpertDropout(p).train()
        torch.manual_seed(0)
        x = torch.ones(4_000_000 + 3)  # not a multiple of the four lanes per random word
        y = drop(x)
        kept = y.ne(0)
        keep_rate = 1 - round(p * 65536) / 65536  # the lanes' resolution: within 2**-17 of 1 - p
        # binomial std over n draws is sqrt(k (1 - k) / n); 6 sigma bounds every check below
        for n, rate in [(kept.numel(), kept.float().mean())] + [
                (kept.numel() // 4, kept[lane:-3:4].float().mean()) for lane in range(4)]:  # each lane of a word
            assert abs(rate.item() - keep_rate) < 6 * (keep_rate * (1 - keep_rate) / n) ** 0.5, (rate, keep_rate)
        # kept values are scaled by the inverse of the exact keep probability: the expectation is x
        torch.testing.assert_close(y[kept], torch.full_like(y[kept], 1 / keep_rate), rtol=1e-6, atol=0)
        # neighbours (lanes of one word) and consecutive words are independent: P(both kept) = k^2
        for lag in (1, 2, 3, 4, 5):
            both = (kept[:-lag] & kept[lag:]).float().mean().item()
            k2 = keep_rate ** 2
            assert abs(both - k2) < 6 * (k2 * (1 - k2) / (kept.numel() - lag)) ** 0.5, (lag, both, k2)
        assert torch.equal(drop.eval()(x), x)

    def test_expert_dropout_is_seeded_and_masks_the_gradient(self):
        drop = ExpertDropout(0.4).train()
        x = torch.randn(3, 5, 7, requires_grad=True)
        torch.manual_seed(3)
        y = drop(x)
        torch.manual_seed(3)
        assert torch.equal(drop(x), y)
        y.backward(torch.ones_like(y))
        torch.testing.assert_close(x.grad, (y != 0).float() / (1 - round(0.4 * 65536) / 65536), rtol=1e-6, atol=0)


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

    def test_bf16_expert_weights_close_to_float32(self):
        """cast_experts (opt-in inference mode): expert weights in bf16, everything else float32. Error against
        float32 on the fixture's logits: relative norm <= 1e-3 (bf16 keeps 8 bits; measured 1.1e-4)."""
        from timm_moejet import cast_experts
        from timm_moejet.layers import BatchedLinear
        model, tensors = _fixture_model()
        x = tensors['input']
        with torch.no_grad():
            ref = model(x)
            assert cast_experts(model) == 2 * len(model.moe_blocks) * 2  # fc1, fc2 of core and universal experts
            out = model(x)
        for name, p in model.named_parameters():
            in_experts = '.' in name and isinstance(model.get_submodule(name.rsplit('.', 1)[0]), BatchedLinear)
            assert p.dtype == (torch.bfloat16 if in_experts else torch.float32), name
        assert out.dtype == torch.float32
        rel = ((out - ref).norm() / ref.norm()).item()
        assert 0 < rel <= 1e-3, f"bf16 expert weights relative error {rel:.3g} not in (0, 1e-3]"
        # back to float32: the bf16-rounded weights compute in float32 again, closer to the reference
        cast_experts(model, torch.float32)
        with torch.no_grad():
            back = model(x)
        assert ((back - ref).norm() / ref.norm()).item() < rel

    @pytest.mark.parametrize('bad', [torch.int8, 'bfloat16'])
    def test_cast_experts_refuses_bad_input(self, bad):
        from timm_moejet import cast_experts
        from timm_moejet.errors import InvalidArgument
        with pytest.raises(InvalidArgument, match='floating-point torch.dtype'):
            cast_experts(make_layer(), bad)
        with pytest.raises(InvalidArgument, match='no experts'):
            cast_experts(torch.nn.Linear(2, 2))

    def test_routing_is_computed_in_float32_under_autocast_and_written_in_bfloat16(self):
        # the weights are written in the dtype of the bmm's that use them: exactly the float32 weights rounded
        model, tensors = _fixture_model()
        layer = model.blocks[model.moe_blocks[0]].mlp
        x = torch.randn(2, 17, 64)
        with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
            dispatch, combine = layer.router(x)
        assert dispatch.dtype == torch.bfloat16 and combine.dtype == torch.bfloat16
        with torch.no_grad():
            d32, c32 = layer.router(x)
        assert torch.equal(dispatch, d32.bfloat16()) and torch.equal(combine, c32.bfloat16())

    @pytest.mark.parametrize('combine', ['entmax15', 'softmax'])
    def test_compile_equals_eager_without_graph_breaks(self, combine):
        model, tensors = _fixture_model()
        layer = model.blocks[model.moe_blocks[0]].mlp
        layer.router.sparse = combine == 'entmax15'
        layer.router.combine = combine
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
    from timm_moejet.layers import expert_ops
    from timm_moejet.layers import experts as experts_module
    from timm_moejet.layers.expert_ops import batched_linear_ops

    calls = []
    original = expert_ops._WeightGradInLayout.apply

    def counting(*args):
        calls.append(args[1].dtype)
        return original(*args)

    layer = experts_module.BatchedLinear(6, 32, 24)
    x = torch.randn(6, 10, 32, requires_grad=True)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        plain = batched_linear_ops(x, layer.weight, layer.bias)
    grads_plain = torch.autograd.grad(plain.float().square().sum(), [x, layer.weight, layer.bias])
    monkeypatch.setattr(expert_ops._WeightGradInLayout, 'apply', counting)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        fast = layer(x)
    grads_fast = torch.autograd.grad(fast.float().square().sum(), [x, layer.weight, layer.bias])
    assert calls == [torch.bfloat16], 'the fast function must run, on bfloat16 operands'
    assert fast.dtype == plain.dtype == torch.bfloat16
    torch.testing.assert_close(fast, plain, rtol=0, atol=0)
    for a, b in zip(grads_fast, grads_plain):
        assert a.dtype == b.dtype  # the parameter gradients come back in float32, as autocast's
        torch.testing.assert_close(a, b, rtol=2e-2, atol=1e-2)


class TestGradRecycler:
    """Expert weight gradients reuse their memory between steps on CPU, without changing any gradient a caller sees."""

    @staticmethod
    def _step(layer, x, g):
        layer(x).backward(g)
        return layer.weight.grad

    @staticmethod
    def _reference_grad(layer, x, g):
        w = layer.weight.detach().clone().requires_grad_()
        torch.baddbmm(layer.bias.detach().unsqueeze(1), x, w.transpose(1, 2)).backward(g)
        return w.grad

    def test_recycled_gradients_equal_fresh_ones_and_reuse_memory(self):
        from timm_moejet.layers.experts import BatchedLinear
        torch.manual_seed(0)
        layer = BatchedLinear(4, 16, 8).train()
        xs, gs = [torch.randn(4, 5, 16) for _ in range(3)], [torch.randn(4, 5, 8) for _ in range(3)]
        pointers = []
        for x, g in zip(xs, gs):
            layer.zero_grad(set_to_none=True)
            grad = self._step(layer, x, g)
            torch.testing.assert_close(grad, self._reference_grad(layer, x, g), rtol=0, atol=1e-6)
            pointers.append(grad.data_ptr())
            del grad
        # malloc may hand a freed block back by chance; the recycler's own storage is what must hold the gradient
        assert pointers[1] == pointers[2] == layer.grad_recycler._storages[False].data_ptr()

    def test_a_kept_gradient_never_changes(self):
        from timm_moejet.layers.experts import BatchedLinear
        torch.manual_seed(0)
        layer = BatchedLinear(4, 16, 8).train()
        x, g = torch.randn(4, 5, 16), torch.randn(4, 5, 8)
        layer.zero_grad(set_to_none=True)
        kept = self._step(layer, x, g)  # the caller keeps a reference, then timm sets .grad to None
        snapshot = kept.clone()
        layer.zero_grad(set_to_none=True)
        new = self._step(layer, 2 * x, g)
        assert new.data_ptr() != kept.data_ptr()
        assert torch.equal(kept, snapshot)
        torch.testing.assert_close(new, 2 * snapshot, rtol=1e-6, atol=1e-6)

    @pytest.mark.parametrize('set_to_none', [True, False])
    def test_accumulation_adds_the_steps(self, set_to_none):
        from timm_moejet.layers.experts import BatchedLinear
        torch.manual_seed(0)
        layer = BatchedLinear(4, 16, 8).train()
        xs, gs = [torch.randn(4, 5, 16) for _ in range(3)], [torch.randn(4, 5, 8) for _ in range(3)]
        expected = sum(self._reference_grad(layer, x, g) for x, g in zip(xs, gs))
        for _ in range(2):  # the second round runs on recycled memory
            layer.zero_grad(set_to_none=set_to_none)
            for x, g in zip(xs, gs):
                self._step(layer, x, g)
            torch.testing.assert_close(layer.weight.grad, expected, rtol=1e-5, atol=1e-6)

    def test_compiled_backward_recycles_the_same_memory(self):
        """Under torch.compile the weight gradient goes through the recycler too (an operator Inductor keeps
        opaque), equal to eager's (1e-6) and in the same memory every step. aot_eager keeps the check quick."""
        from timm_moejet.layers.experts import BatchedLinear
        torch.manual_seed(0)
        layer = BatchedLinear(4, 16, 8).train()
        torch._dynamo.reset()
        compiled = torch.compile(layer, fullgraph=True, backend='aot_eager')
        pointers = []
        for _ in range(3):
            x, g = torch.randn(4, 5, 16), torch.randn(4, 5, 8)
            layer.zero_grad(set_to_none=True)
            compiled(x).backward(g)
            torch.testing.assert_close(layer.weight.grad, self._reference_grad(layer, x, g), rtol=0, atol=1e-6)
            pointers.append(layer.weight.grad.data_ptr())
        assert pointers[1] == pointers[2] == layer.grad_recycler._storages[False].data_ptr()

    def test_eval_and_moving_release_the_memory(self):
        from timm_moejet.layers.experts import BatchedLinear
        layer = BatchedLinear(4, 16, 8).train()
        self._step(layer, torch.randn(4, 5, 16), torch.randn(4, 5, 8))
        assert layer.grad_recycler._storages
        layer.eval()
        assert not layer.grad_recycler._storages
        layer.train()
        self._step(layer, torch.randn(4, 5, 16), torch.randn(4, 5, 8))
        layer.double()
        assert not layer.grad_recycler._storages
        # the next gradient is right in the new dtype (no float32 memory reused)
        layer.zero_grad(set_to_none=True)
        x, g = torch.randn(4, 5, 16, dtype=torch.float64), torch.randn(4, 5, 8, dtype=torch.float64)
        grad = self._step(layer, x, g)
        assert grad.dtype == torch.float64
        torch.testing.assert_close(grad, self._reference_grad(layer, x, g), rtol=0, atol=1e-12)
        import copy
        assert not copy.deepcopy(layer).grad_recycler._storages


class TestCpuFastPathSwitch:
    """One switch turns every CPU fast path off; the CPU then computes the same step as any other device."""

    @staticmethod
    def _step(enabled: bool) -> tuple:
        from timm_moejet.layers import cpu_fast_path
        previous = cpu_fast_path.set_enabled(enabled)
        try:
            layer = make_layer().train()
            x = torch.randn(3, 17, 48, generator=torch.Generator().manual_seed(1), requires_grad=True)
            grads = []
            for _ in range(2):  # the second step may run on recycled gradient memory
                layer.zero_grad(set_to_none=True)
                out = layer(x)
                out.square().sum().backward()
                grads.append([x.grad] + [p.grad for p in layer.parameters()])
                x.grad = None
            recycled = [m.weight.grad.data_ptr() == m.grad_recycler._storages[False].data_ptr()
                        for m in (layer.core.fc1, layer.univ.fc2) if m.grad_recycler._storages]
        finally:
            cpu_fast_path.set_enabled(previous)
        return out, grads, recycled

    def test_switched_off_the_plain_path_gives_the_same_step(self):
        out_fast, grads_fast, recycled_fast = self._step(True)
        out_plain, grads_plain, recycled_plain = self._step(False)
        assert recycled_fast == [True, True] and recycled_plain == []  # on: recycled memory; off: none kept
        torch.testing.assert_close(out_plain, out_fast, rtol=0, atol=1e-6)
        for a, b in zip(grads_plain[-1], grads_fast[-1]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)

    def test_switched_off_expert_dropout_is_torch_dropout(self):
        from timm_moejet.layers import cpu_fast_path
        x = torch.ones(1000)
        previous = cpu_fast_path.set_enabled(False)
        try:
            torch.manual_seed(5)
            off = ExpertDropout(0.4).train()(x)
        finally:
            cpu_fast_path.set_enabled(previous)
        torch.manual_seed(5)
        assert torch.equal(off, F.dropout(x, 0.4, True))
        torch.manual_seed(5)
        assert not torch.equal(ExpertDropout(0.4).train()(x), off)  # on: the lane generator, another stream

    def test_environment_switch(self):
        import subprocess
        import sys
        code = 'from timm_moejet.layers import cpu_fast_path; print(cpu_fast_path.enabled())'
        for value, expected in (('0', 'False'), ('1', 'True')):
            env = dict(os.environ, TIMM_MOEJET_CPU_FAST_PATH=value)
            out = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True, check=True)
            assert out.stdout.strip() == expected
