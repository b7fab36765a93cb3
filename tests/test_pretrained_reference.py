""" create_model(..., pretrained=True) gives the same weights as the code before fast construction did.

``fixtures/recycled_sha256.json`` holds the sha256 of every tensor of models recycled on load by the code of commit
e5f1ceb (before the construction was made fast), from donors whose values are integers / 2**22 (the same bits on
every CPU). Recycled tensors and the deterministic constants (temperatures, norms) must match bit for bit; the head
and the slot queries are drawn from the global RNG at construction, whose order changed (experts are no longer
initialised only to be overwritten), so they are checked for the distribution of that initialisation instead.

The other paths (C-JetMoE recycled on load, Weight Selection of a ConvNeXt and a ViT, the command line's recycling
with its seeded initial values, ``create_moejet_from`` a dense folder) were fingerprinted the same way by the code
of commit 70aefd0, before the package was reorganised around its model families.
"""
import hashlib
import json
from pathlib import Path

import pytest
import timm
import torch
from hub_cache import DenseDonor, build_hub_cache, dense_vit_state_dict, repo_snapshot, use_offline_hub
from scipy import stats as scipy_stats

import timm_moejet
from timm_moejet.moe_keys import current_key_names
from timm_moejet.recycling import RecyclingRecipe, weight_proxy_statistics

REFERENCE = json.loads((Path(__file__).parent / 'fixtures' / 'recycled_sha256.json').read_text())
TINY, SMALL = 'timm/vit_tiny_patch16_224.augreg_in21k', 'timm/vit_small_patch16_224.augreg_in21k'
CONVNEXT_T = 'timm/convnext_tiny.fb_in22k'
DONORS = {TINY: DenseDonor('vit_tiny_patch16_224', seed=1, exact=True),
          SMALL: DenseDonor('vit_small_patch16_224', seed=2, exact=True),
          CONVNEXT_T: DenseDonor('convnext_tiny', seed=3, exact=True)}
REDUCED = dict(num_core_experts=3, num_univ_experts=5)
CONFIGS = {
    'importance': dict(),
    'importance_stats': dict(recycle_stats='{stats}'),
    'uniform': dict(recycle_strategy='uniform'),
    'random': dict(recycle_strategy='random', recycle_seed=11),
    'graph_metis': dict(recycle_strategy='graph'),
    'graph_spectral': dict(recycle_strategy='graph', recycle_graph_method='spectral', recycle_graph_parts=8),
    'upcycle': dict(recycle_strategy='upcycle', recycle_experts=False),
}


@pytest.fixture(scope='module')
def exact_cache(tmp_path_factory):
    root = tmp_path_factory.mktemp('exact')
    build_hub_cache(root / 'hub', DONORS)
    stats = root / 'small_stats.safetensors'
    weight_proxy_statistics(dense_vit_state_dict(DONORS[SMALL]), range(6, 12), coactivation=True,
                            hub_id=SMALL).save(stats)
    return root, stats


def _digests(model: torch.nn.Module) -> dict:
    return {k: hashlib.sha256(v.detach().contiguous().numpy().tobytes()).hexdigest()[:32]
            for k, v in model.state_dict().items()}


def _folder(hub, repo: str) -> str:
    return str(repo_snapshot(hub, repo))


# name -> the model built by that path (head and slot queries drawn from the global RNG are not in its reference)
OTHER_PATHS = {
    'convnext_femto': lambda hub: timm.create_model('moejet_convnext_femto', pretrained=True, **REDUCED),
    'select_convnext_femto': lambda hub: timm_moejet.build_selected_model(
        'convnext_femto', _folder(hub, CONVNEXT_T), init_seed=0),
    'select_vit_tiny': lambda hub: timm_moejet.build_selected_model(
        'vit_tiny_patch16_224', _folder(hub, SMALL), init_seed=0, num_classes=10),
    'cli_vit_tiny': lambda hub: timm_moejet.build_recycled_model(
        'moejet_vit_tiny', _folder(hub, TINY) + '/model.safetensors', RecyclingRecipe(experts=_folder(hub, SMALL)),
        init_seed=3407, **REDUCED),
    'from_vit_small': lambda hub: timm_moejet.create_moejet_from(
        f'local-dir:{_folder(hub, SMALL)}', recycle_strategy='random', **REDUCED),
}


def _check_against_reference(model, name):
    # the reference names the router tensors as the layer did before its router was a module (slot_queries)
    got, expected = _digests(model), current_key_names(REFERENCE[name])
    assert set(expected) <= set(got)
    differ = [k for k in expected if got[k] != expected[k]]
    assert not differ, f'{len(differ)} tensors differ from the reference, e.g. {differ[:4]}'


@pytest.mark.parametrize('name', CONFIGS)
def test_recycled_weights_equal_the_reference(name, exact_cache, monkeypatch):
    root, stats = exact_cache
    use_offline_hub(monkeypatch, root / 'hub')
    kwargs = {k: (v.format(stats=stats) if isinstance(v, str) else v) for k, v in CONFIGS[name].items()}
    torch.manual_seed(0)
    _check_against_reference(timm.create_model('moejet_vit_tiny', pretrained=True, **REDUCED, **kwargs), name)


@pytest.mark.parametrize('name', OTHER_PATHS)
def test_other_recycling_paths_equal_the_reference(name, exact_cache, monkeypatch):
    root, _ = exact_cache
    hub = use_offline_hub(monkeypatch, root / 'hub')
    torch.manual_seed(0)
    _check_against_reference(OTHER_PATHS[name](hub), name)


def test_full_size_default_tag_equals_the_reference_and_keeps_the_init_distribution(exact_cache, monkeypatch):
    root, _ = exact_cache
    use_offline_hub(monkeypatch, root / 'hub')
    torch.manual_seed(0)
    model = timm.create_model('moejet_vit_tiny', pretrained=True)
    _check_against_reference(model, 'full_tiny')
    # the head: timm's trunc_normal(std 0.02), zero bias (one-sample KS against N(0, 0.02); the truncation at
    # +-2 is 100 std away and never acts)
    head = model.head.weight.detach().flatten().double()
    assert head.numel() == 1000 * 192 and torch.equal(model.head.bias, torch.zeros(1000))
    assert scipy_stats.kstest(head.numpy(), 'norm', args=(0, 0.02)).pvalue > 1e-3
    # slot queries: orthogonal init, columns orthonormal, entries distributed as a fresh orthogonal draw (KS)
    fresh = torch.nn.init.orthogonal_(torch.empty(294, 192), generator=torch.Generator().manual_seed(1))
    for i in range(6, 12):
        q = model.blocks[i].mlp.router.slot_queries.detach()
        torch.testing.assert_close(q.t() @ q, torch.eye(192), rtol=0, atol=1e-5)
        assert scipy_stats.ks_2samp(q.flatten().numpy(), fresh.flatten().numpy()).pvalue > 1e-3
    # and they are not all the same draw
    assert not torch.equal(model.blocks[6].mlp.router.slot_queries, model.blocks[7].mlp.router.slot_queries)


def test_plain_construction_draws_each_expert_once_from_the_same_distribution():
    """Without weights the experts are trunc-normal(0.02) as before (drawn once now, not four times)."""
    torch.manual_seed(0)
    layer = timm.create_model('moejet_vit_test').blocks[3].mlp
    for group in (layer.core, layer.univ):
        w = group.fc1.weight.detach().flatten().double()
        assert scipy_stats.kstest(w.numpy(), 'norm', args=(0, 0.02)).pvalue > 1e-3
        assert torch.equal(group.fc1.bias, torch.zeros_like(group.fc1.bias))


def test_a_moe_checkpoint_missing_experts_is_refused_not_left_uninitialised():
    """Built for pretrained weights, the experts are not initialised; a MoE checkpoint must fill them all, also when
    timm's load is not strict (a new head)."""
    sd = timm.create_model('moejet_vit_test', num_classes=3).state_dict()
    del sd['blocks.3.mlp.univ.fc2.weight']
    with pytest.raises(ValueError, match=r'lacks expert weights.*blocks.3.mlp.univ.fc2.weight'):
        timm.create_model('moejet_vit_test', pretrained=True, num_classes=5,
                          pretrained_cfg_overlay=dict(state_dict=sd, num_classes=3))
