""" Router diagnostics (timm_moejet.diagnostics): output mass, shares, contribution, sparsity, plot. """
import copy
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import torch.nn as nn
from hub_cache import small_dense_vit

import timm_moejet  # noqa: F401
from timm_moejet.diagnostics import (
    active_parameters,
    format_diagnostics,
    plot_diagnostics,
    router_diagnostics,
)
from timm_moejet.layers import SpheroMoE


class _OneLayer(nn.Module):
    """A model made of one SpheroMoE layer applied to tokens [B, N, D]."""

    def __init__(self, layer: SpheroMoE) -> None:
        super().__init__()
        self.layer = layer

    def moe_layers(self):
        return {0: self.layer}

    def forward(self, x):
        return self.layer(x)

    def train(self, mode: bool = True):  # the wrapped layer stays in eval, so route() below has no noise
        return super().train(False)


def _layer(seed: int = 0, combine: str = 'entmax15') -> SpheroMoE:
    torch.manual_seed(seed)
    layer = SpheroMoE(16, num_core_experts=3, num_univ_experts=5, core_hidden=32, univ_hidden=8, moe_combine=combine,
                      moe_temperature_init=0.1, moe_expert_drop=0.)
    for p in layer.parameters():  # move every parameter off its init, so biases are not all zero
        p.data.add_(torch.randn_like(p) * 0.1)
    return layer.eval()


def _only_expert(layer: SpheroMoE, expert: int) -> SpheroMoE:
    """A copy whose experts all output zero except ``expert`` (core first, then universal)."""
    layer = copy.deepcopy(layer)
    for group, offset in ((layer.core, 0), (layer.univ, layer.num_core)):
        for e in range(group.num_experts):
            if e + offset != expert:
                group.fc2.weight.data[e].zero_()
                group.fc2.bias.data[e].zero_()
    return layer


def test_output_mass_matches_masked_forwards():
    # with one slot per expert, expert e's output mass is the summed norm of the layer output when only e is on
    layer = _layer()
    x = torch.randn(2, 10, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        mass = torch.stack([_only_expert(layer, e)(x).norm(dim=-1).sum() for e in range(8)])
    (d,) = router_diagnostics(_OneLayer(layer), x)
    expected = mass / mass.sum()
    torch.testing.assert_close(d.expert_share, expected, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(d.contribution, expected * 8, rtol=1e-4, atol=1e-5)
    assert d.core_share == pytest.approx(float(expected[:3].sum()), abs=1e-5)
    assert d.core_contribution == pytest.approx(float(expected[:3].max() * 8), rel=1e-4)
    assert d.univ_contribution == pytest.approx(float(expected[3:].max() * 8), rel=1e-4)


def test_silent_universal_experts_have_no_share():
    layer = _layer(seed=3)
    for e in range(layer.num_univ):
        layer.univ.fc2.weight.data[e].zero_()
        layer.univ.fc2.bias.data[e].zero_()
    (d,) = router_diagnostics(_OneLayer(layer), torch.randn(3, 12, 16))
    assert d.univ_share == pytest.approx(0., abs=1e-7)
    assert d.core_share == pytest.approx(1., abs=1e-6)
    assert d.univ_contribution == pytest.approx(0., abs=1e-6)


def test_sparsity_entropy_and_support_against_route():
    layer = _layer(seed=5)
    x = torch.randn(4, 9, 16, generator=torch.Generator().manual_seed(2))
    (d,) = router_diagnostics(_OneLayer(layer), list(x.split(2)))  # two batches accumulate like one
    with torch.no_grad():  # per batch, as measured (entmax zeros at the threshold depend on the batch's matmul)
        routes = [layer.router(part) for part in x.split(2)]
    dispatch, combine = (torch.cat(r, dim=0) for r in zip(*routes))
    assert d.combine_sparsity == pytest.approx(int((combine == 0).sum()) / combine.numel(), abs=1e-12)
    assert d.combine_support == pytest.approx(float((combine > 0).sum(-1).float().mean()), rel=1e-6)
    ent = -(dispatch * dispatch.clamp_min(1e-30).log()).sum(1) / torch.log(torch.tensor(9.))
    assert d.dispatch_entropy == pytest.approx(float(ent.mean()), rel=1e-5)
    assert 0 < d.dispatch_entropy < 1
    (soft,) = router_diagnostics(_OneLayer(_layer(seed=5, combine='softmax')), x)
    assert soft.combine_sparsity == 0.  # softmax has no exact zeros


def test_model_diagnostics_active_params_and_plot():
    from PIL import Image

    model = timm.create_model('moejet_vit_test', num_classes=10)
    model.train()
    diags = router_diagnostics(model, torch.randn(2, 3, 64, 64))
    assert model.training  # mode restored
    assert [d.block for d in diags] == [2, 3]
    total = sum(p.numel() for p in model.parameters())
    active = active_parameters(model, diags)
    assert active['per_image'] == total
    expert_params = sum(p.numel() for i in (2, 3) for group in (model.blocks[i].mlp.core, model.blocks[i].mlp.univ)
                        for p in group.parameters())
    assert total - expert_params <= active['per_token'] <= total
    table = format_diagnostics(diags)
    assert len(table.splitlines()) == 3 and 'core contrib' in table
    png = plot_diagnostics(diags)
    with Image.open(io.BytesIO(png)) as im:
        assert im.format == 'PNG'
    with pytest.raises(ValueError, match='no SpheroMoE layer'):
        router_diagnostics(timm.create_model('vit_tiny_patch16_224', depth=1, img_size=32), torch.randn(1, 3, 32, 32))


def test_balanced_subset_is_seeded_and_balanced():
    from timm_moejet.image_folder import balanced_indices

    targets = [0] * 50 + [1] * 30 + [2] * 5
    a = balanced_indices(targets, 20, seed=1)
    assert a == balanced_indices(targets, 20, seed=1)
    assert a != balanced_indices(targets, 20, seed=2)
    counts = [sum(targets[i] == c for i in a) for c in range(3)]
    assert counts == [8, 7, 5]  # class 2 has only 5; the others share the rest evenly
    assert len(set(a)) == 20
    assert sorted(balanced_indices(targets, None, seed=0)) == list(range(85))


def test_image_folders_with_symlink_loops_are_read_once(tmp_path):
    from benchmarks.digits.data import write_digits_image_folder
    from timm_moejet.image_folder import image_loader

    write_digits_image_folder(str(tmp_path / 'imgs'), image_size=16)
    model = small_dense_vit(0)
    count = image_loader(str(tmp_path / 'imgs'), model)[1]['available']
    first = sorted(p for p in (tmp_path / 'imgs' / 'validation').iterdir() if p.is_dir())[0]
    os.symlink('..', first / 'loop')
    _, summary = image_loader(str(tmp_path / 'imgs'), model)
    assert summary['available'] == count
    os.symlink('..', first / 'loop2')  # two loops: exponential before
    script = ('import sys, timm; from timm_moejet.image_folder import image_loader\n'
              'm = timm.create_model("vit_tiny_patch16_224", img_size=64, embed_dim=64, depth=1, num_heads=1)\n'
              'print(image_loader(sys.argv[1], m)[1]["available"])')
    done = subprocess.run([sys.executable, '-c', script, str(tmp_path / 'imgs')], capture_output=True, text=True,
                          timeout=60, cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0 and int(done.stdout.split()[-1]) == count, done.stderr[-500:]
