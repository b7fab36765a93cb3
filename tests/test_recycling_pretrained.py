""" Recycling on load: ``timm.create_model(..., pretrained=True)`` through a fake offline Hub cache. """
import pytest
import timm
import torch
from hub_cache import (
    DenseDonor,
    build_hub_cache,
    dense_vit_state_dict,
    official_state_dict,
    pretrained_tag_repos,
    use_offline_hub,
)
from safetensors.torch import load_file, save_file
from timm.models.vision_transformer import checkpoint_filter_fn as vit_filter_fn

import timm_moejet  # noqa: F401
from timm_moejet.recycling import checkpoint_filter_fn, weight_proxy_statistics

TINY = 'timm/vit_tiny_patch16_224.augreg_in21k'
SMALL = 'timm/vit_small_patch16_224.augreg_in21k'
REDUCED = dict(num_core_experts=3, num_univ_experts=5)  # default geometry, fewer experts: fast tests


@pytest.fixture(scope='module')
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp('hub')
    repos = pretrained_tag_repos(['moejet_vit_tiny.recycled_in21k', 'moejet_vit_tiny.upcycled_in21k'])
    assert set(repos) == {TINY, SMALL}
    return build_hub_cache(root / 'full', repos)


@pytest.fixture(scope='module')
def donors(cache):
    from hub_cache import repo_snapshot
    return {repo: load_file(repo_snapshot(cache, repo) / 'model.safetensors') for repo in (TINY, SMALL)}


@pytest.fixture
def hub(cache, monkeypatch):
    return use_offline_hub(monkeypatch, cache)


def _recover(values: torch.Tensor, donor_values: torch.Tensor) -> torch.Tensor:
    """Donor indices of recycled bias values (random donor values are distinct, so the lookup is unique)."""
    order = donor_values.argsort()
    pos = torch.searchsorted(donor_values[order], values.contiguous()).clamp_max(len(order) - 1)
    idx = order[pos]
    assert torch.equal(donor_values[idx], values), 'a recycled bias value is not a donor value'
    return idx


def _check_experts_are_submatrices(sd, expert_donor, blocks, width):
    """Every expert is W1[h][:, c] / W2[c][:, h] of the donor, h and c recovered from the biases."""
    for i in blocks:
        w1, b1 = expert_donor[f'blocks.{i}.mlp.fc1.weight'], expert_donor[f'blocks.{i}.mlp.fc1.bias']
        w2, b2 = expert_donor[f'blocks.{i}.mlp.fc2.weight'], expert_donor[f'blocks.{i}.mlp.fc2.bias']
        for group, hidden in (('core', 768), ('univ', 192)):
            p = f'blocks.{i}.mlp.{group}.'
            h = _recover(sd[p + 'fc1.bias'], b1)
            c = _recover(sd[p + 'fc2.bias'], b2)
            assert h.shape[1] == hidden and c.shape[1] == width
            for rows in (h, c):
                assert bool((rows[:, 1:] > rows[:, :-1]).all()), 'indices must be sorted and unique per expert'
            assert torch.equal(sd[p + 'fc1.weight'], w1[h[:, :, None], c[:, None, :]])
            assert torch.equal(sd[p + 'fc2.weight'], w2[c[:, :, None], h[:, None, :]])


def _check_trunk(sd, trunk, skip=(), moe_blocks=range(6, 12), num_blocks=12):
    moe = tuple(f'blocks.{i}.mlp.' for i in moe_blocks)
    keys = [k for k in sd if not k.startswith(('head.', 'fc_norm.') + moe)]
    # embeddings, attention and norms of every block, the dense MLPs
    assert len(keys) == 4 + num_blocks * 8 + (num_blocks - len(moe)) * 4
    for key in keys:
        if key not in skip:
            assert torch.equal(sd[key], trunk[key]), f'{key} differs from the trunk donor'


def test_default_tag_reduced_experts(hub, donors):
    fresh = timm.create_model('moejet_vit_tiny', **REDUCED).state_dict()
    model = timm.create_model('moejet_vit_tiny', pretrained=True, **REDUCED)
    sd = model.state_dict()
    _check_trunk(sd, donors[TINY])
    _check_experts_are_submatrices(sd, donors[SMALL], range(6, 12), 192)
    # the new head, fc_norm and the router keep the model's own initial values: the constants exactly, the random
    # draws (head, slot queries; their distribution is tested in test_pretrained_reference.py) are not the donor's
    for key in sd:
        if key.startswith('fc_norm.') or key.endswith('log_temperature') or '.slot_norm.' in key \
                or key == 'head.bias':
            assert torch.equal(sd[key], fresh[key]), key
    assert sd['head.weight'].shape == (1000, 192) and 0.015 < float(sd['head.weight'].std()) < 0.025
    rec = model.pretrained_cfg['recycling']
    assert (rec['strategy'], rec['seed'], rec['trunk'], rec['experts']) == ('importance', 3407, TINY, SMALL)
    assert rec['stats'] == 'weights-proxy'
    assert model.pretrained_cfg['tag'] == 'recycled_in21k'


def test_default_tag_full_size_with_new_classes_channels_and_size(hub, donors):
    model = timm.create_model('moejet_vit_tiny', pretrained=True, num_classes=10, in_chans=1, img_size=32)
    sd = model.state_dict()
    trunk = donors[TINY]
    expected = vit_filter_fn({'pos_embed': trunk['pos_embed'], 'patch_embed.proj.weight': trunk[
        'patch_embed.proj.weight']}, model)
    # pos embed resampled to the 2x2 grid as timm's ViT does; RGB patch filters summed into one channel
    assert torch.equal(sd['pos_embed'], expected['pos_embed']) and sd['pos_embed'].shape == (1, 5, 192)
    torch.testing.assert_close(sd['patch_embed.proj.weight'], trunk['patch_embed.proj.weight'].sum(1, keepdim=True),
                               rtol=0, atol=1e-7)
    _check_trunk(sd, trunk, skip=('pos_embed', 'patch_embed.proj.weight'))
    _check_experts_are_submatrices(sd, donors[SMALL], range(6, 12), 192)
    assert sd['blocks.6.mlp.core.fc1.weight'].shape == (98, 768, 192)
    assert sd['blocks.6.mlp.univ.fc1.weight'].shape == (196, 192, 192)
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(2, 1, 32, 32))
    assert out.shape == (2, 10) and bool(torch.isfinite(out).all())


def test_small_default_tag_experts_from_base_at_reduced_depth(monkeypatch, tmp_path):
    base = 'timm/vit_base_patch16_224.augreg_in21k'
    repos = {SMALL: DenseDonor('vit_small_patch16_224', depth=4, seed=7),
             base: DenseDonor('vit_base_patch16_224', depth=4, seed=8)}
    use_offline_hub(monkeypatch, build_hub_cache(tmp_path / 'cache', repos))
    model = timm.create_model('moejet_vit_small', pretrained=True, depth=4, moe_blocks=(2, 3), num_core_experts=2,
                              num_univ_experts=3)
    sd = model.state_dict()
    trunk, experts = dense_vit_state_dict(repos[SMALL]), dense_vit_state_dict(repos[base])
    _check_trunk(sd, trunk, moe_blocks=(2, 3), num_blocks=4)
    for i in (2, 3):
        for group, hidden in (('core', 1536), ('univ', 384)):
            p = f'blocks.{i}.mlp.{group}.'
            h = _recover(sd[p + 'fc1.bias'], experts[f'blocks.{i}.mlp.fc1.bias'])
            c = _recover(sd[p + 'fc2.bias'], experts[f'blocks.{i}.mlp.fc2.bias'])
            assert h.shape[1] == hidden and c.shape[1] == 384  # of ViT-B's 3072 units and 768 channels
            assert torch.equal(sd[p + 'fc1.weight'], experts[f'blocks.{i}.mlp.fc1.weight'][h[:, :, None], c[:, None]])
    assert model.pretrained_cfg['recycling']['experts'] == base


def test_upcycled_tag_copies_donor_mlp(hub, donors):
    model = timm.create_model('moejet_vit_tiny.upcycled_in21k', pretrained=True, **REDUCED)
    sd = model.state_dict()
    trunk = donors[TINY]
    _check_trunk(sd, trunk)
    for i in range(6, 12):
        for name in ('fc1.weight', 'fc1.bias', 'fc2.weight', 'fc2.bias'):
            dense = trunk[f'blocks.{i}.mlp.{name}']
            assert all(torch.equal(e, dense) for e in sd[f'blocks.{i}.mlp.core.{name}'])
    assert model.pretrained_cfg['recycling']['strategy'] == 'upcycle'
    assert model.pretrained_cfg['recycling']['experts'] == TINY


def test_create_model_recycle_kwargs_seeded_and_recorded(hub):
    # (bit-identical results for one seed are tested on recycle_state_dict in test_recycling.py)
    a = timm.create_model('moejet_vit_tiny', pretrained=True, recycle_strategy='random', recycle_seed=5, **REDUCED)
    c = timm.create_model('moejet_vit_tiny', pretrained=True, recycle_strategy='random', recycle_seed=6, **REDUCED)
    key = 'blocks.7.mlp.core.fc1.weight'
    assert not torch.equal(a.state_dict()[key], c.state_dict()[key])
    assert a.pretrained_cfg['recycling']['strategy'] == 'random' and a.pretrained_cfg['recycling']['seed'] == 5


def test_recycle_stats_file_used_and_foreign_stats_refused(hub, donors, tmp_path):
    good = weight_proxy_statistics(donors[SMALL], range(6, 12), hub_id=SMALL)
    good.save(tmp_path / 'small.safetensors')
    model = timm.create_model('moejet_vit_tiny', pretrained=True, recycle_stats=tmp_path / 'small.safetensors',
                              **REDUCED)
    assert model.pretrained_cfg['recycling']['stats']['hub_id'] == SMALL
    foreign = weight_proxy_statistics(donors[TINY], range(6, 12), hub_id=TINY)
    foreign.save(tmp_path / 'tiny.safetensors')
    with pytest.raises(ValueError, match='vit_tiny_patch16_224.augreg_in21k.*vit_small_patch16_224.augreg_in21k'):
        timm.create_model('moejet_vit_tiny', pretrained=True, recycle_stats=tmp_path / 'tiny.safetensors', **REDUCED)


def test_overlay_checkpoint_is_both_donors(donors, monkeypatch, tmp_path):
    use_offline_hub(monkeypatch, tmp_path / 'empty')  # the tag's Hub donors are not needed, nor available
    save_file(donors[TINY], str(tmp_path / 'dense.safetensors'))
    model = timm.create_model('moejet_vit_tiny', pretrained=True, recycle_strategy='upcycle', **REDUCED,
                              pretrained_cfg_overlay=dict(file=str(tmp_path / 'dense.safetensors')))
    sd = model.state_dict()
    _check_trunk(sd, donors[TINY])
    assert torch.equal(sd['blocks.9.mlp.core.fc2.weight'][1], donors[TINY]['blocks.9.mlp.fc2.weight'])
    rec = model.pretrained_cfg['recycling']
    assert rec['trunk'] == rec['experts'] == str(tmp_path / 'dense.safetensors')


def test_bad_recycle_kwargs(hub, tmp_path):
    with pytest.raises(ValueError, match='upcycle, uniform, random, importance, graph'):
        timm.create_model('moejet_vit_tiny', pretrained=True, recycle_strategy='magic', **REDUCED)
    with pytest.raises(TypeError, match='recycle_strategy'):
        timm.create_model('moejet_vit_tiny', pretrained=True, recycle_stategy='random', **REDUCED)
    with pytest.raises(FileNotFoundError, match='nope.safetensors'):
        timm.create_model('moejet_vit_tiny', pretrained=True, recycle_stats=tmp_path / 'nope.safetensors', **REDUCED)


def test_missing_donors_offline_name_the_repo(monkeypatch, tmp_path):
    only_trunk = build_hub_cache(tmp_path / 'c1', {TINY: DenseDonor('vit_tiny_patch16_224')})
    use_offline_hub(monkeypatch, only_trunk)
    with pytest.raises(FileNotFoundError, match=f"expert donor '{SMALL}'.*Hub was not reachable"):
        timm.create_model('moejet_vit_tiny', pretrained=True, **REDUCED)
    use_offline_hub(monkeypatch, tmp_path / 'empty')
    with pytest.raises(FileNotFoundError, match=f"trunk donor '{TINY}'.*Hub was not reachable"):
        timm.create_model('moejet_vit_tiny', pretrained=True, **REDUCED)


# reduced-size path (moejet_vit_test: D 64, depth 4, MoE blocks 2, 3) for the pass-through and export round trips
SMALL_DONOR = DenseDonor('vit_tiny_patch16_224', depth=4, seed=3, model_kwargs=dict(embed_dim=64, num_heads=2,
                                                                                   img_size=64))


@pytest.fixture
def recycled_test_model(tmp_path):
    path = tmp_path / 'donor.safetensors'
    save_file(dense_vit_state_dict(SMALL_DONOR), str(path))
    return timm.create_model('moejet_vit_test', pretrained=True, num_classes=3, recycle_seed=1,
                             pretrained_cfg_overlay=dict(file=str(path)))


def test_moe_checkpoints_pass_through_and_official_format(recycled_test_model):
    sd = recycled_test_model.state_dict()
    out = checkpoint_filter_fn(dict(sd), recycled_test_model)
    assert set(out) == set(sd) and all(torch.equal(out[k], v) for k, v in sd.items())
    official = official_state_dict(sd)
    model = timm.create_model('moejet_vit_test', pretrained=True, num_classes=3,
                              pretrained_cfg_overlay=dict(state_dict=official, num_classes=3))
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, sd[key], rtol=1e-6, atol=0, msg=key)  # exp/log round trip of temperatures


def test_not_a_vit_checkpoint_refused():
    with pytest.raises(ValueError, match='neither a dense timm ViT nor a MoE'):
        timm.create_model('moejet_vit_test', pretrained=True,
                          pretrained_cfg_overlay=dict(state_dict={'conv.weight': torch.zeros(2, 2)}))


def test_export_round_trips_through_local_dir_and_hub(recycled_test_model, tmp_path, monkeypatch):
    from timm.models import save_for_hf

    sd = recycled_test_model.state_dict()
    record = recycled_test_model.pretrained_cfg['recycling']
    assert record['seed'] == 1
    save_for_hf(recycled_test_model, tmp_path / 'export', safe_serialization=True)
    local = timm.create_model(f'local-dir:{tmp_path / "export"}', pretrained=True)
    cache = build_hub_cache(tmp_path / 'cache', {'someorg/moejet-test': recycled_test_model})
    use_offline_hub(monkeypatch, cache)
    hub = timm.create_model('hf-hub:someorg/moejet-test', pretrained=True)
    for loaded in (local, hub):
        loaded_sd = loaded.state_dict()
        assert set(loaded_sd) == set(sd)
        assert all(torch.equal(loaded_sd[k], v) for k, v in sd.items())
        assert loaded.pretrained_cfg['recycling'] == record
