"""SpheroMoE layer and entmax-1.5: routing invariants, exactness, determinism, modes and gradients."""
import dataclasses
import math

import pytest
import torch

from timm_moejet.errors import InvalidArgumentType
from timm_moejet.layers import SpheroMoE, SpheroMoESettings, entmax15


def entmax15_reference(z: torch.Tensor) -> torch.Tensor:
    """Float64 reference of Peters et al. (2019), Algorithm 2, one row at a time, written as the paper states it.

    For tau: sort z/2 descending, and for each support size k compute the mean M_k and the squared deviation S_k of
    the top k; tau_k = M_k - sqrt((1 - S_k) / k); the support is the largest k with tau_k <= z_(k).
    """
    out = torch.zeros_like(z, dtype=torch.float64)
    for r, row in enumerate(z.double().reshape(-1, z.shape[-1])):
        x = (row / 2).tolist()
        srt = sorted(x, reverse=True)
        tau = None
        for k in range(1, len(srt) + 1):
            top = srt[:k]
            mean = sum(top) / k
            ss = sum((t - mean) ** 2 for t in top)
            delta = (1 - ss) / k
            if delta < 0:
                break
            tau_k = mean - math.sqrt(delta)
            if tau_k <= srt[k - 1]:
                tau = tau_k
        out.view(-1, z.shape[-1])[r] = torch.tensor([max(v - tau, 0.) ** 2 for v in x], dtype=torch.float64)
    return out


def small_layer(**kwargs) -> SpheroMoE:
    args = dict(in_features=32, num_core_experts=3, num_univ_experts=6, core_hidden=64, univ_hidden=16,
                moe_expert_drop=0.)
    args.update(kwargs)
    return SpheroMoE(**args)


class TestEntmax15:

    @pytest.mark.parametrize('scale', [0.5, 2., 8.])
    def test_matches_float64_reference(self, scale):
        torch.manual_seed(0)
        z = torch.randn(5, 7, 40, dtype=torch.float64) * scale
        ref = entmax15_reference(z)
        torch.testing.assert_close(entmax15(z, dim=-1), ref, rtol=0, atol=1e-12)
        # float32 path against the float64 reference, tolerance 1e-5
        torch.testing.assert_close(entmax15(z.float(), dim=-1).double(), ref, rtol=0, atol=1e-5)

    def test_other_dim_and_ties(self):
        z = torch.tensor([[1., 1., 1., -5.], [3., 0., 0., 0.]], dtype=torch.float64)
        torch.testing.assert_close(entmax15(z.t(), dim=0).t(), entmax15_reference(z), rtol=0, atol=1e-12)

    def test_sparse_and_normalised(self):
        torch.manual_seed(1)
        z = torch.randn(64, 294) * 4
        p = entmax15(z)
        torch.testing.assert_close(p.sum(-1), torch.ones(64), rtol=0, atol=1e-5)
        assert (p >= 0).all()
        zeros = (p == 0).float().mean().item()
        assert zeros > 0.3, f'entmax-1.5 should give exact zeros, got a zero fraction of {zeros:.3f}'

    def test_gradient_matches_autograd_of_reference_formula(self):
        # the Jacobian of entmax-1.5 is J = diag(s) - s s^T / sum(s) with s = sqrt(p) (Peters et al. 2019, Prop. 2;
        # the 1/2 of z/2 cancels the 2 of the square)
        torch.manual_seed(2)
        z = torch.randn(3, 20, dtype=torch.float64, requires_grad=True)
        g = torch.randn(3, 20, dtype=torch.float64)
        p = entmax15(z)
        (p * g).sum().backward()
        s = p.detach().sqrt()
        expected = s * g - s * (s * g).sum(-1, keepdim=True) / s.sum(-1, keepdim=True)
        torch.testing.assert_close(z.grad, expected, rtol=0, atol=1e-10)
        assert torch.autograd.gradcheck(entmax15, (torch.randn(2, 9, dtype=torch.float64, requires_grad=True),))


class TestSpheroMoE:

    def test_shape_and_routing_distributions(self):
        torch.manual_seed(0)
        layer = small_layer(slots_per_expert=2).eval()
        x = torch.randn(4, 17, 32)
        assert layer(x).shape == x.shape
        dispatch, combine = layer.router(x)
        assert dispatch.shape == combine.shape == (4, 17, layer.num_slots) == (4, 17, 18)
        # dispatch: each slot is a distribution over tokens; combine: each token a distribution over slots
        torch.testing.assert_close(dispatch.sum(1), torch.ones(4, 18), rtol=0, atol=1e-5)
        torch.testing.assert_close(combine.sum(-1), torch.ones(4, 17), rtol=0, atol=1e-5)
        assert (dispatch > 0).all() and (combine >= 0).all()

    def test_forward_equals_explicit_per_expert_computation(self):
        # output = combine @ expert_e(dispatch^T x), computed naively expert by expert (tolerance 1e-5, float32)
        torch.manual_seed(3)
        layer = small_layer(slots_per_expert=2).eval()
        with torch.no_grad():
            for p in layer.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        x = torch.randn(2, 11, 32)
        dispatch, combine = layer.router(x)
        slots = torch.einsum('bns,bnd->bsd', dispatch, x)
        outs = []
        for group in (layer.core, layer.univ):
            w1, b1, w2, b2 = group.fc1.weight, group.fc1.bias, group.fc2.weight, group.fc2.bias
            for e in range(group.num_experts):
                for j in range(layer.slots_per_expert):
                    s = slots[:, len(outs)]
                    h = torch.nn.functional.gelu(s @ w1[e].t() + b1[e])
                    outs.append(h @ w2[e].t() + b2[e])
        expected = torch.einsum('bns,bsd->bnd', combine, torch.stack(outs, 1))
        torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-5)

    def test_eval_is_deterministic_and_training_adds_noise(self):
        torch.manual_seed(0)
        layer = small_layer(moe_noise_std=0.1).eval()
        x = torch.randn(2, 9, 32)
        assert torch.equal(layer(x), layer(x))
        layer.train()
        assert not torch.allclose(layer(x), layer(x)), 'routing noise should act in training'
        layer_no_noise = small_layer(moe_noise_std=0.).train()
        assert torch.equal(layer_no_noise(x), layer_no_noise(x))

    def test_default_noise_is_one_over_slots(self):
        assert small_layer().router.noise_std == pytest.approx(1 / 9)

    def test_temperatures_start_at_init_and_stay_positive(self):
        layer = small_layer(moe_temperature_init=0.5)
        assert torch.allclose(layer.router.log_temperature.exp(), torch.tensor([0.5, 0.5]))
        with torch.no_grad():
            layer.router.log_temperature.fill_(-50.)  # any real value is a positive temperature
        x = torch.randn(1, 5, 32)
        assert torch.isfinite(layer.eval()(x)).all()

    def test_entmax_combine_is_sparse_softmax_combine_is_dense(self):
        torch.manual_seed(0)
        x = torch.randn(2, 50, 32)
        sparse = small_layer(num_core_experts=30, num_univ_experts=60, moe_temperature_init=0.05).eval()
        dense = small_layer(num_core_experts=30, num_univ_experts=60, moe_combine='softmax',
                            moe_temperature_init=0.05).eval()
        dense.load_state_dict(sparse.state_dict())
        _, c_sparse = sparse.router(x)
        _, c_dense = dense.router(x)
        assert (c_sparse == 0).any() and (c_dense > 0).all()
        # both are distributions over slots from the same logits; entmax-1.5 puts more mass on the top slots
        torch.testing.assert_close(c_dense.sum(-1), torch.ones(2, 50), rtol=0, atol=1e-5)
        assert (c_sparse.amax(-1) >= c_dense.amax(-1) - 1e-6).all()
        # softmax combine: exactly softmax of the scaled cosine logits
        keys = x / (x.norm(dim=-1, keepdim=True) + 1e-6)
        q = dense.router.slot_norm(dense.router.slot_queries)
        q = q / (q.norm(dim=-1, keepdim=True) + 1e-6)
        logits = keys @ q.t() / 0.05
        torch.testing.assert_close(c_dense, torch.softmax(logits, -1), rtol=0, atol=1e-5)

    def test_soft_moe_mode(self):
        layer = SpheroMoE(32, num_core_experts=12, num_univ_experts=0, moe_combine='softmax',
                          moe_shared_temperature=True, moe_temperature_init=1.0, moe_slot_norm=False,
                          moe_expert_drop=0.).eval()
        assert layer.univ is None and layer.router.log_temperature.numel() == 1
        assert not any('slot_norm' in n for n, _ in layer.named_parameters())
        x = torch.randn(2, 7, 32)
        dispatch, combine = layer.router(x)
        keys = x / (x.norm(dim=-1, keepdim=True) + 1e-6)
        q = layer.router.slot_queries / (layer.router.slot_queries.norm(dim=-1, keepdim=True) + 1e-6)
        logits = keys @ q.t()
        # one scale: dispatch and combine come from the same logits
        torch.testing.assert_close(dispatch, torch.softmax(logits, 1), rtol=0, atol=1e-6)
        torch.testing.assert_close(combine, torch.softmax(logits, -1), rtol=0, atol=1e-6)
        assert layer(x).shape == x.shape

    def test_gradients_reach_every_parameter(self):
        torch.manual_seed(0)
        layer = small_layer(moe_expert_drop=0.4, drop_path=0.1).train()
        layer(torch.randn(4, 9, 32)).square().sum().backward()
        for name, p in layer.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, f'no gradient for {name}'

    def test_torchscript_matches_eager(self):
        layer = small_layer().eval()
        x = torch.randn(2, 9, 32)
        scripted = torch.jit.script(layer)
        torch.testing.assert_close(scripted(x), layer(x), rtol=0, atol=1e-6)

    @pytest.mark.parametrize('kwargs, match', [
        (dict(num_core_experts=0, num_univ_experts=0), 'at least one expert'),
        (dict(core_hidden=0), 'core_hidden'),
        (dict(univ_hidden=-3), 'univ_hidden'),
        (dict(moe_combine='sparsemax'), "combine must be one of"),
        (dict(slots_per_expert=0), 'slots_per_expert'),
        (dict(moe_temperature_init=0.), 'temperature_init'),
        (dict(moe_expert_drop=1.5), 'expert_drop'),
    ])
    def test_bad_arguments(self, kwargs, match):
        with pytest.raises(ValueError, match=match):
            small_layer(**kwargs)

    def test_bad_argument_type(self):
        with pytest.raises(TypeError, match='num_core'):
            small_layer(num_core_experts=2.5)


class TestTimmMlpCall:
    """SpheroMoE takes timm's Mlp call, so timm's Block builds it through a plain partial."""

    def test_block_builds_it_through_a_partial(self):
        from functools import partial

        from timm.models.vision_transformer import Block

        block = Block(32, num_heads=2, mlp_ratio=2.,
                      mlp_layer=partial(SpheroMoE, num_core_experts=2, num_univ_experts=3))
        assert isinstance(block.mlp, SpheroMoE)
        # hidden_features (dim x mlp_ratio) is the default core hidden size, a quarter of it the universal one
        assert (block.mlp.core.hidden_features, block.mlp.univ.hidden_features) == (64, 16)
        assert block(torch.randn(2, 5, 32)).shape == (2, 5, 32)

    def test_bias_and_drop_are_honoured(self):
        layer = SpheroMoE(16, bias=False, drop=0.5, num_core_experts=2, num_univ_experts=2, moe_expert_drop=0.)
        assert layer.core.fc1.bias is None and not any(n.endswith('bias') and 'fc' in n
                                                       for n, _ in layer.named_parameters())
        x = torch.randn(2, 5, 16)
        layer.train()
        out = layer(x)
        # output dropout: about half the outputs are exactly zero, the rest scaled by 2
        zeros = (out == 0).float().mean().item()
        assert 0.3 < zeros < 0.7
        assert torch.equal(layer.eval()(x), layer(x))

    def test_norm_layer_is_refused_not_dropped(self):
        with pytest.raises(ValueError, match='norm_layer=LayerNorm.*scale_mlp_norm'):
            SpheroMoE(16, norm_layer=torch.nn.LayerNorm)

    def test_unknown_setting_named(self):
        with pytest.raises(TypeError, match=r"unknown argument 'experts'.*num_core_experts"):
            SpheroMoE(16, experts=3)

    def test_old_setting_names_work_with_a_deprecation_warning(self):
        with pytest.warns(DeprecationWarning, match='num_core.*num_core_experts'):
            old = SpheroMoE(16, num_core=2, num_univ_experts=3, combine='softmax')
        assert old.settings == SpheroMoESettings(num_core_experts=2, num_univ_experts=3, moe_combine='softmax')

    def test_an_old_name_beside_its_new_name_is_refused(self):
        with pytest.raises(InvalidArgumentType, match='^SpheroMoE got both num_core and num_core_experts, one '
                                                      'setting twice: give num_core_experts only.$'):
            SpheroMoE(16, num_core=4, num_core_experts=8)

    def test_a_settings_object_is_taken_as_it_is(self, monkeypatch):
        from timm_moejet.settings import Check
        cfg = SpheroMoESettings(num_core_experts=2, num_univ_experts=3)
        checks = []
        original = Check.__call__
        monkeypatch.setattr(Check, '__call__', lambda self, label, value: checks.append(label) or original(
            self, label, value))
        SpheroMoESettings(moe_combine='softmax')
        assert 'moe_combine' in checks  # the counter sees the settings' own checks
        checks.clear()
        layer = SpheroMoE(16, settings=cfg)
        assert layer.settings is cfg
        assert not [c for c in checks if c in {f.name for f in dataclasses.fields(SpheroMoESettings)}]
        assert SpheroMoE(16, settings=cfg, moe_combine='softmax').settings.moe_combine == 'softmax'

    def test_channels_last_maps(self):
        layer = small_layer().eval()
        x = torch.randn(2, 3, 4, 32)
        torch.testing.assert_close(layer(x), layer(x.reshape(2, 12, 32)).reshape(2, 3, 4, 32), rtol=0, atol=0)


def test_routing_is_recorded_from_the_forward_itself():
    from timm_moejet.layers import record_routing
    torch.manual_seed(0)
    layer = SpheroMoE(32, num_core_experts=3, num_univ_experts=5, slots_per_expert=2).eval()
    x = torch.randn(2, 7, 32)
    records = []
    out_plain = layer(x)
    with record_routing(layer, records.append):
        out = layer(x)
    layer(x)  # off again after the context
    assert len(records) == 1
    torch.testing.assert_close(out, out_plain, rtol=0, atol=0)
    dispatch, combine = layer.router(x)
    torch.testing.assert_close(records[0].dispatch, dispatch, rtol=0, atol=0)
    torch.testing.assert_close(records[0].combine, combine, rtol=0, atol=0)
    slots = torch.bmm(dispatch.transpose(1, 2), x)
    norms = torch.linalg.vector_norm(torch.cat(layer.expert_outputs(slots), dim=1), dim=-1)
    torch.testing.assert_close(records[0].slot_output_norm, norms, rtol=0, atol=1e-6)
