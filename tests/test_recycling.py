""" Checkpoint recycling: strategies, statistics and bad input, on reduced-size donors (no Hub involved). """
import hashlib
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from hub_cache import DenseDonor, dense_vit_state_dict
from scipy.stats import binomtest

import timm_moejet  # noqa: F401
from timm_moejet.recycling import (
    STRATEGIES,
    ActivationStats,
    RecyclingRecipe,
    collect_statistics,
    partition_graph,
    recycle_into,
    recycle_state_dict,
    weights_hash,
)

# moejet_vit_test: D 64, depth 4, MoE blocks 2, 3, 4 core experts (hidden 256) + 8 universal (hidden 64)
TRUNK = DenseDonor('vit_tiny_patch16_224', depth=4, seed=1, model_kwargs=dict(embed_dim=64, num_heads=2, img_size=64))
WIDE = DenseDonor('vit_tiny_patch16_224', depth=4, seed=2, model_kwargs=dict(embed_dim=128, num_heads=2, img_size=64))
MOE_BLOCKS = (2, 3)
FRESH = ('head.', 'fc_norm.')


@pytest.fixture(scope='module')
def donors():
    return dense_vit_state_dict(TRUNK), dense_vit_state_dict(WIDE)


def _new_model():
    torch.manual_seed(0)
    return timm.create_model('moejet_vit_test', num_classes=7)


@pytest.fixture(scope='module')
def model():
    return _new_model()


@pytest.fixture
def fresh_model():
    return _new_model()


def _is_router_key(key: str) -> bool:
    return any(key.startswith(f'blocks.{i}.mlp.') for i in MOE_BLOCKS) and '.fc' not in key


def _params_snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize('strategy', STRATEGIES)
def test_trunk_copied_experts_are_donor_submatrices(strategy, donors, model):
    trunk, wide = donors
    experts = trunk if strategy == 'upcycle' else wide
    before = model.state_dict()
    sd, idx, _ = recycle_state_dict(model, trunk, None if strategy == 'upcycle' else wide,
                                 RecyclingRecipe(strategy=strategy))
    assert set(sd) == set(before)
    for key, value in sd.items():
        assert value.shape == before[key].shape, key
        if key.startswith(FRESH) or _is_router_key(key):
            assert torch.equal(value, before[key]), f'{key} must keep the model value'
        elif not key.startswith(tuple(f'blocks.{i}.mlp.' for i in MOE_BLOCKS)):
            assert torch.equal(value, trunk[key]), f'{key} must equal the trunk donor'
    hidden_pop = experts['blocks.0.mlp.fc1.weight'].shape[0]
    width_pop = experts['blocks.0.norm2.weight'].shape[0]
    for i in MOE_BLOCKS:
        w1, b1 = experts[f'blocks.{i}.mlp.fc1.weight'], experts[f'blocks.{i}.mlp.fc1.bias']
        w2, b2 = experts[f'blocks.{i}.mlp.fc2.weight'], experts[f'blocks.{i}.mlp.fc2.bias']
        for group, (h, c) in idx[i].items():
            n, k = h.shape
            assert (n, k) == tuple(sd[f'blocks.{i}.mlp.{group}.fc1.bias'].shape)
            assert c.shape == (n, 64)
            for rows, pop in ((h, hidden_pop), (c, width_pop)):
                assert int(rows.min()) >= 0 and int(rows.max()) < pop
                for r in rows:
                    assert r.unique().numel() == r.numel(), 'indices repeat within an expert'
                    assert torch.equal(r, r.sort().values)
            for e in range(n):
                p = f'blocks.{i}.mlp.{group}.'
                assert torch.equal(sd[p + 'fc1.weight'][e], w1[h[e]][:, c[e]])
                assert torch.equal(sd[p + 'fc1.bias'][e], b1[h[e]])
                assert torch.equal(sd[p + 'fc2.weight'][e], w2[c[e]][:, h[e]])
                assert torch.equal(sd[p + 'fc2.bias'][e], b2[c[e]])
    model.load_state_dict(sd, strict=True)
    assert torch.isfinite(model(torch.randn(1, 3, 64, 64))).all()


@pytest.mark.parametrize('strategy', ['random', 'importance', 'graph'])
def test_seed_reproducible_bit_for_bit_and_seed_matters(strategy, donors, model):
    trunk, wide = donors
    a = recycle_state_dict(model, trunk, wide, RecyclingRecipe(strategy=strategy, seed=11)).state_dict
    b = recycle_state_dict(model, trunk, wide, RecyclingRecipe(strategy=strategy, seed=11)).state_dict
    c = recycle_state_dict(model, trunk, wide, RecyclingRecipe(strategy=strategy, seed=12)).state_dict
    assert all(torch.equal(a[k], b[k]) for k in a)
    key = 'blocks.2.mlp.core.fc1.weight'
    assert not torch.equal(a[key], c[key]), 'another seed must give other experts'


def test_upcycle_experts_equal_donor_mlp(donors, model):
    trunk, _ = donors
    sd = recycle_state_dict(model, trunk, recipe=RecyclingRecipe(strategy='upcycle')).state_dict
    for i in MOE_BLOCKS:
        for name in ('fc1.weight', 'fc1.bias', 'fc2.weight', 'fc2.bias'):
            core = sd[f'blocks.{i}.mlp.core.{name}']
            dense = trunk[f'blocks.{i}.mlp.{name}']
            for e in range(core.shape[0]):
                assert torch.equal(core[e], dense), f'core expert {e} {name} differs from the donor MLP'
        # universal experts: the same evenly spaced 64 of the 256 donor units (released uniform shrink)
        units = torch.linspace(0, 255, 64, dtype=torch.float64).round().long()
        univ = sd[f'blocks.{i}.mlp.univ.fc1.weight']
        assert all(torch.equal(univ[e], trunk[f'blocks.{i}.mlp.fc1.weight'][units]) for e in range(univ.shape[0]))


def test_uniform_same_for_every_expert(donors, model):
    trunk, wide = donors
    sd, idx, _ = recycle_state_dict(model, trunk, wide, RecyclingRecipe(strategy='uniform', seed=1))
    h, c = idx[2]['core']
    assert torch.equal(h[0], torch.linspace(0, 511, 256, dtype=torch.float64).round().long())
    assert torch.equal(c[0], torch.linspace(0, 127, 64, dtype=torch.float64).round().long())
    assert all(torch.equal(h[0], r) for r in h) and all(torch.equal(c[0], r) for r in c)


def _stats_for(wide, hidden_imp, channel_imp=None, coact=None, digest=None):
    tensors = {}
    for i in range(4):
        tensors[f'blocks.{i}.hidden.l2'] = hidden_imp
        tensors[f'blocks.{i}.channel.l2'] = channel_imp if channel_imp is not None else torch.ones(128)
        if coact is not None:
            tensors[f'blocks.{i}.hidden.coact'] = coact
    return ActivationStats(tensors, architecture='vit_tiny_patch16_224', hub_id='test/wide',
                           weights_hash=digest or weights_hash(wide))


def test_importance_samples_important_units_more(donors, model):
    trunk, wide = donors
    imp = torch.ones(512)
    high = torch.arange(0, 512, 4)  # 128 units, 8x as important
    imp[high] = 8.
    stats = _stats_for(wide, imp)
    _, idx, _ = recycle_state_dict(model, trunk, wide, RecyclingRecipe(seed=5), stats=stats)
    picks = torch.cat([idx[i]['core'][0].flatten() for i in MOE_BLOCKS])  # 2 layers x 4 experts x 256 units
    is_high = torch.isin(picks, high)
    trials = len(MOE_BLOCKS) * 4 * 128  # each high unit can be picked once per expert
    # under importance-blind sampling each high unit is in an expert with probability 256 / 512
    result = binomtest(int(is_high.sum()), trials, p=0.5, alternative='greater')
    assert result.pvalue < 1e-9, f'high-importance units not favoured: {int(is_high.sum())} of {trials}'
    # and the same test on a random selection does not reject (guards the test itself)
    _, rnd, _ = recycle_state_dict(model, trunk, wide, RecyclingRecipe(strategy='random', seed=5))
    rpicks = torch.cat([rnd[i]['core'][0].flatten() for i in MOE_BLOCKS])
    assert binomtest(int(torch.isin(rpicks, high).sum()), trials, p=0.5).pvalue > 1e-3


def test_data_free_proxy_favours_large_weights_and_is_logged(donors, model, caplog):
    trunk, wide = donors
    wide = dict(wide)
    strong = torch.arange(0, 512, 4)
    for i in MOE_BLOCKS:
        w1 = wide[f'blocks.{i}.mlp.fc1.weight'].clone()
        w1[strong] *= 6  # larger pre-activation spread -> larger post-GELU RMS under the proxy
        wide[f'blocks.{i}.mlp.fc1.weight'] = w1
    with caplog.at_level(logging.WARNING):
        _, idx, _ = recycle_state_dict(model, trunk, wide, RecyclingRecipe(seed=3))
    assert 'data-free' in caplog.text
    picks = torch.cat([idx[i]['core'][0].flatten() for i in MOE_BLOCKS])
    hits = int(torch.isin(picks, strong).sum())
    assert binomtest(hits, 1024, p=0.5, alternative='greater').pvalue < 1e-9


def _planted_coact(groups: int = 16, size: int = 32) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    n = groups * size
    perm = torch.randperm(n, generator=g)  # scatter the groups over the unit indices
    label = torch.empty(n, dtype=torch.long)
    label[perm] = torch.arange(n) // size
    same = label[:, None] == label[None, :]
    c = torch.where(same, 0.5, 0.01) + 0.005 * torch.rand(n, n, generator=g)
    c = (c + c.t()) / 2
    c.fill_diagonal_(0)
    return c, label


@pytest.mark.parametrize('method', ['metis', 'spectral'])
def test_graph_experts_are_unions_of_parts(method, donors, model):
    trunk, wide = donors
    coact, label = _planted_coact()
    parts, weights = partition_graph(coact, 16, method=method, seed=3407)
    # the partitioner recovers the planted co-activation groups
    assert sorted(tuple(sorted(label[p].unique().tolist())) for p in parts) == [(j,) for j in range(16)]
    stats = _stats_for(wide, torch.rand(512, generator=torch.Generator().manual_seed(1)) + 0.5, coact=coact)
    recipe = RecyclingRecipe(strategy='graph', graph_parts=16, graph_method=method)
    _, idx, _ = recycle_state_dict(model, trunk, wide, recipe, stats=stats)
    for i in MOE_BLOCKS:
        for h in idx[i]['core'][0]:
            covered = [int(torch.isin(p, h).sum()) for p in parts]
            whole = [c for c, p in zip(covered, parts) if c == p.numel()]
            partial = [c for c, p in zip(covered, parts) if 0 < c < p.numel()]
            # 256 units = 8 whole parts of 32 (an expert may end with one part cut short)
            assert len(partial) <= 1 and sum(whole) + sum(partial) == 256, (whole, partial)


def _loader(n_batches: int, batch: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n_batches * batch, 3, 64, 64, generator=g)
    return [(images[i:i + batch], torch.zeros(batch)) for i in range(0, len(images), batch)]


@pytest.fixture(scope='module')
def small_donor():
    torch.manual_seed(0)
    return timm.create_model('vit_tiny_patch16_224', embed_dim=64, num_heads=2, depth=2, img_size=64,
                             num_classes=3).eval()


def test_statistics_match_direct_computation_and_batching(small_donor):
    stats = collect_statistics(small_donor, _loader(2, 3), progress=False, donor_id='me/donor')
    # independent reference: capture every token, then compute the statistics in one go
    seen = {}
    hooks = [small_donor.blocks[1].mlp.act.register_forward_hook(lambda m, i, o: seen.setdefault('h', []).append(o)),
             small_donor.blocks[1].norm2.register_forward_hook(lambda m, i, o: seen.setdefault('c', []).append(o))]
    with torch.no_grad():
        small_donor(torch.cat([b[0] for b in _loader(2, 3)]))
    for h in hooks:
        h.remove()
    x = seen['h'][0].reshape(-1, 256).double()
    pos = (x > 0).double()
    co = pos.t() @ pos / x.shape[0]
    co.fill_diagonal_(0)
    tol = dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats.get(1, 'hidden', 'l2').double(), x.square().mean(0).sqrt(), **tol)
    torch.testing.assert_close(stats.get(1, 'hidden', 'l1').double(), x.abs().mean(0), **tol)
    torch.testing.assert_close(stats.get(1, 'hidden', 'freq').double(), pos.mean(0), **tol)
    torch.testing.assert_close(stats.get(1, 'hidden', 'coact').double(), co, **tol)
    c = seen['c'][0].reshape(-1, 64).double()
    torch.testing.assert_close(stats.get(1, 'channel', 'l2').double(), c.square().mean(0).sqrt(), **tol)
    assert stats.num_tokens == 6 * 17 and stats.hub_id == 'me/donor'
    # other batching, same statistics (exact sums, not per-batch averages)
    other = collect_statistics(small_donor, _loader(3, 2), progress=False)
    for key, value in stats.tensors.items():
        torch.testing.assert_close(other.tensors[key], value, rtol=1e-5, atol=1e-6)


def test_statistics_file_round_trip_and_donor_check(small_donor, tmp_path):
    stats = collect_statistics(small_donor, _loader(1, 2), progress=False, max_batches=1, donor_id='me/donor')
    path = tmp_path / 'stats.safetensors'
    stats.save(path)
    loaded = ActivationStats.load(path, donor_model=small_donor)
    assert loaded.identity() == stats.identity()
    assert all(torch.equal(loaded.tensors[k], v) for k, v in stats.tensors.items())
    torch.manual_seed(1)
    other = timm.create_model('vit_tiny_patch16_224', embed_dim=64, num_heads=2, depth=2, img_size=64,
                              num_classes=3)
    with pytest.raises(ValueError, match=r'me/donor.*' + weights_hash(other.state_dict())[:12]):
        ActivationStats.load(path, donor_model=other)
    with pytest.raises(FileNotFoundError, match='missing.safetensors'):
        ActivationStats.load(tmp_path / 'missing.safetensors')


def test_recycle_into_records_recipe(donors, fresh_model, tmp_path):
    model = fresh_model
    trunk, wide = donors
    stats = _stats_for(wide, torch.rand(512) + 0.1)
    stats.save(tmp_path / 's.safetensors')
    recycle_into(model, trunk, wide, RecyclingRecipe(stats=tmp_path / 's.safetensors', seed=9),
                 trunk_id='org/trunk', expert_id='org/wide')
    rec = model.pretrained_cfg['recycling']
    assert (rec['strategy'], rec['seed'], rec['trunk'], rec['experts']) == ('importance', 9, 'org/trunk', 'org/wide')
    assert rec['stats']['hub_id'] == 'test/wide' and rec['stats']['weights_hash'] == weights_hash(wide)


@pytest.mark.parametrize('in_chans', [1, 4])
def test_recycle_into_adapts_the_patch_embedding_to_the_input_channels(donors, in_chans):
    """A 3-channel donor recycled into a model of other in_chans: timm's own adapt_input_conv of the donor's
    patch embedding (exact), the rest as for 3 channels."""
    from timm.models import adapt_input_conv
    trunk, wide = donors
    torch.manual_seed(0)
    model = timm.create_model('moejet_vit_test', num_classes=7, in_chans=in_chans)
    recycle_into(model, trunk, wide, RecyclingRecipe(strategy='uniform'))
    weight = model.state_dict()['patch_embed.proj.weight']
    assert weight.shape[1] == in_chans
    assert torch.equal(weight, adapt_input_conv(in_chans, trunk['patch_embed.proj.weight']))
    assert torch.equal(model.state_dict()['blocks.0.attn.qkv.weight'], trunk['blocks.0.attn.qkv.weight'])


def _bad_inputs(trunk, wide):
    narrow = dense_vit_state_dict(DenseDonor('vit_tiny_patch16_224', depth=4, model_kwargs=dict(
        embed_dim=32, num_heads=2, img_size=64)))
    shallow = dense_vit_state_dict(DenseDonor('vit_tiny_patch16_224', depth=3, model_kwargs=dict(
        embed_dim=128, num_heads=2, img_size=64)))
    nan_stats = _stats_for(wide, torch.full((512,), float('nan')))
    short_stats = _stats_for(wide, torch.ones(300))
    return [
        (dict(expert_state_dict=narrow), ValueError, 'narrower'),
        (dict(expert_state_dict=shallow), ValueError, 'depth 4'),
        (dict(trunk_state_dict=wide), ValueError, 'width 64'),
        (dict(strategy='magic'), ValueError, 'upcycle, uniform, random, importance, graph'),
        (dict(strategy='upcycle'), ValueError, 'upcycle'),
        (dict(stats=nan_stats), ValueError, 'NaN'),
        (dict(stats=short_stats), ValueError, r'shape \(300,\)'),
        (dict(stats=_stats_for(wide, torch.ones(512), digest='0' * 64)), ValueError, 'another donor|not for'),
        (dict(trunk_state_dict={'weight': torch.zeros(3)}), ValueError, 'not a dense checkpoint.*timm ViT'),
        (dict(seed=-1), ValueError, 'seed'),
    ]


def test_bad_input_raises_before_writing(donors, fresh_model):
    model = fresh_model
    trunk, wide = donors
    snapshot = _params_snapshot(model)
    for overrides, exc, pattern in _bad_inputs(trunk, wide):
        kwargs = dict(trunk_state_dict=trunk, expert_state_dict=wide)
        kwargs.update(overrides)
        t, e = kwargs.pop('trunk_state_dict'), kwargs.pop('expert_state_dict')
        recipe_fields = {k: kwargs.pop(k) for k in ('strategy', 'seed') if k in kwargs}
        with pytest.raises(exc, match=pattern):
            recycle_into(model, t, e, RecyclingRecipe(**recipe_fields), **kwargs)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in snapshot.items()), 'a failed recycle wrote into the model'
    assert 'recycling' not in (model.pretrained_cfg or {})


def test_a_registered_strategy_is_one_entry(donors):
    """Adding a strategy is one table entry: create_model, the recipe check and the record pick it up."""
    from timm_moejet.recycling import Strategy, register_strategy

    class LastUnits(Strategy):
        name, doc = 'last', 'the last k units of the donor (a toy)'

        def hidden(self, ctx, num, population, k):
            return torch.arange(population - k, population).expand(num, k)

    trunk, wide = donors
    register_strategy(LastUnits())
    try:
        torch.manual_seed(0)
        model = timm.create_model('moejet_vit_test', pretrained=True, num_classes=7, recycle_strategy='last',
                                  recycle_experts=None, pretrained_cfg_overlay=dict(state_dict=trunk))
        sd = model.state_dict()
        # same width as the trunk donor: every channel kept; hidden: the last 256 of 256 core / evenly spaced univ
        w1 = trunk['blocks.2.mlp.fc1.weight']
        assert torch.equal(sd['blocks.2.mlp.core.fc1.weight'][1], w1[-256:])
        assert model.pretrained_cfg['recycling']['strategy'] == 'last'
        _, idx, _ = recycle_state_dict(model, trunk, wide, RecyclingRecipe(strategy='last'))
        assert torch.equal(idx[3]['core'][0][0], torch.arange(256, 512))  # of the wide donor's 512 units
    finally:
        STRATEGIES.pop('last')
    with pytest.raises(ValueError, match="recycle_strategy must be one of .*; got 'last'"):
        RecyclingRecipe(strategy='last')


def test_statistics_files_are_byte_identical_across_processes(tmp_path):
    """Two separate processes writing the same statistics give the same bytes (metadata order included)."""
    script = (
        'import sys, torch; from timm_moejet.recycling import ActivationStats\n'
        't = {f"blocks.{i}.hidden.l2": torch.arange(4.) + i for i in range(3)}\n'
        'ActivationStats(t, architecture="vit_x", hub_id="org/x", weights_hash="ab" * 32, num_tokens=7)'
        '.save(sys.argv[1])\n')
    digests = set()
    for i in range(3):  # the hash seed of each process differs; a dict-ordered header would vary with it
        out = tmp_path / f's{i}.safetensors'
        subprocess.run([sys.executable, '-c', script, str(out)], check=True, env={'PYTHONHASHSEED': str(i)},
                       cwd=Path(__file__).resolve().parents[1])
        digests.add(hashlib.sha256(out.read_bytes()).hexdigest())
        assert ActivationStats.load(out).identity()['num_tokens'] == 7
    assert len(digests) == 1


def test_statistics_files_without_the_one_metadata_entry_are_refused(tmp_path):
    import json

    from safetensors.torch import save_file

    from timm_moejet.errors import InvalidCheckpoint

    # a layout no release wrote (two metadata entries): refused, naming what is missing
    save_file({'blocks.0.hidden.l2': torch.ones(3)}, str(tmp_path / 'old.safetensors'),
              metadata={'format': 'timm_moejet.activation_stats.v1', 'identity': json.dumps({'hub_id': 'org/x'})})
    with pytest.raises(InvalidCheckpoint, match='not an activation statistics file'):
        ActivationStats.load(tmp_path / 'old.safetensors')
