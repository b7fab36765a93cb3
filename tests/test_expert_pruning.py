""" Pruning experts by measured routing (timm_moejet.pruning, weights-tools prune): what is kept, what the pruned
model computes, and that a pruned model is a model like the registered ones (save and reload, new head, features,
backward, torch.compile, ONNX, FSDP2, inspect). Float32 comparisons to 1e-5 unless stated. """
import json
import re

import pytest
import timm
import torch

import timm_moejet  # noqa: F401  (registers the models)
from timm_moejet import prune_experts
from timm_moejet.checkpoint_io.hub import save_hub_folder
from timm_moejet.diagnostics import moe_layers
from timm_moejet.errors import InvalidArgument, InvalidArgumentType, InvalidCheckpoint
from timm_moejet.layers import record_routing
from timm_moejet.layers.entmax import entmax15
from timm_moejet.pruning import kept_count, kept_experts, load_routing, measure_routing, router_hash
from weights_tools.cli import main

ATOL = 1e-5
IMAGES = 64  # px of the test models


def _model(name: str = 'moejet_vit_test', seed: int = 0, **kwargs) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(name, num_classes=10, **kwargs).eval()


def _images(n: int = 6, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, IMAGES, IMAGES, generator=torch.Generator().manual_seed(seed))


def _pruned(name: str = 'moejet_vit_test', keep=0.5, **kwargs):
    model = _model(name, **kwargs)
    routing = measure_routing(model, _images(), name=name, seed=1)
    return model, routing, prune_experts(model, routing, keep)


def test_rounding_of_fractions_and_counts():
    assert [kept_count(0.5, n) for n in (1, 2, 3, 8, 16)] == [1, 1, 2, 4, 8]
    assert [kept_count(0.75, n) for n in (7, 8, 196)] == [6, 6, 147]  # up, and 0.75 x 8 stays 6
    assert [kept_count(0.01, n) for n in (1, 98)] == [1, 1]  # at least one per group
    assert [kept_count(4, n) for n in (2, 8)] == [2, 4] and kept_count(0.5, 0) == 0  # at most the group; none: none


def test_keeping_every_expert_computes_the_same():
    model, routing, pruned = _pruned(keep=1.0)
    x = _images(4, seed=2)
    with torch.no_grad():
        assert (pruned(x) - model(x)).abs().max().item() <= ATOL
    assert [layer['kept_core'] for layer in pruned.pretrained_cfg['pruning']['layers']] == [[0, 1, 2, 3]] * 2


@pytest.mark.parametrize('slots', [1, 2])
def test_the_experts_of_highest_contribution_are_kept_with_their_slots_and_queries(slots):
    model, routing, pruned = _pruned(keep=(0.5, 0.25), slots_per_expert=slots)
    for layer, before, after in zip(routing.layers, moe_layers(model).values(), moe_layers(pruned).values()):
        core = sorted(sorted(range(4), key=lambda e: -layer.core[e])[:2])
        univ = sorted(sorted(range(8), key=lambda e: -layer.univ[e])[:2])
        assert kept_experts(routing, (0.5, 0.25))[layer.block] == (core, univ)
        assert (after.num_core, after.num_univ, after.num_slots) == (2, 2, 4 * slots)
        assert torch.equal(after.core.fc1.weight, before.core.fc1.weight[core])
        assert torch.equal(after.univ.fc2.bias, before.univ.fc2.bias[univ])
        slot_ids = [e * slots + j for e in core + [4 + u for u in univ] for j in range(slots)]
        assert torch.equal(after.router.slot_queries, before.router.slot_queries[slot_ids])
        assert torch.equal(after.router.log_temperature, before.router.log_temperature)


def test_the_combine_renormalises_over_the_kept_slots():
    """Each token's combine weights are the router's entmax-1.5 over the kept slots' logits alone: they sum to 1."""
    model, routing, pruned = _pruned(keep=0.5)
    layer = moe_layers(pruned)[3]
    seen = []
    tokens = torch.randn(2, 17, 64)
    with torch.no_grad(), record_routing(layer, seen.append):
        layer(tokens)
        queries = layer.router.slot_norm(layer.router.slot_queries)
        queries = queries / (queries.norm(dim=-1, keepdim=True) + layer.router.eps)
        logits = tokens @ queries.t() / (tokens.norm(dim=-1, keepdim=True) + layer.router.eps)
        expected = entmax15(logits * torch.exp(-layer.router.log_temperature[-1]), dim=-1)
    combine = seen[0].combine
    assert (combine.sum(-1) - 1).abs().max().item() <= ATOL
    assert (combine - expected).abs().max().item() <= ATOL


@pytest.mark.parametrize('name', ['softmoe_vit_test', 'moejet_convnext_test'])
def test_soft_moe_and_convnext_prune(name):
    model, routing, pruned = _pruned(name, keep=0.25)
    before = {b: (m.num_core, m.num_univ) for b, m in moe_layers(model).items()}
    after = {b: (m.num_core, m.num_univ) for b, m in moe_layers(pruned).items()}
    assert after == {b: (kept_count(0.25, c), kept_count(0.25, u)) for b, (c, u) in before.items()}
    if name == 'moejet_convnext_test':
        assert len(set(after.values())) > 1  # layers of different stages keep different counts
    with torch.no_grad():
        assert pruned(_images(2)).shape == (2, 10)


def test_a_pruned_folder_reloads_with_its_record_a_new_head_and_features(tmp_path):
    model, routing, pruned = _pruned(keep=0.5)
    save_hub_folder(pruned, tmp_path / 'pruned')
    config = json.loads((tmp_path / 'pruned' / 'config.json').read_text())
    assert config['model_args']['moe_experts_per_layer'] == [[2, 4], [2, 4]]
    assert config['pretrained_cfg']['pruning']['statistics']['router_hash'] == router_hash(model)
    assert config['pretrained_cfg']['pruning']['statistics']['seed'] == 1
    loaded = timm.create_model(f'local-dir:{tmp_path / "pruned"}', pretrained=True).eval()
    x = _images(3, seed=3)
    with torch.no_grad():
        assert (loaded(x) - pruned(x)).abs().max().item() <= ATOL
    assert loaded.pretrained_cfg['pruning'] == pruned.pretrained_cfg['pruning']
    new_head = timm.create_model(f'local-dir:{tmp_path / "pruned"}', pretrained=True, num_classes=3).eval()
    assert new_head(x).shape == (3, 3)
    assert torch.equal(new_head.blocks[2].mlp.core.fc1.weight, pruned.blocks[2].mlp.core.fc1.weight)
    features = timm.create_model(f'local-dir:{tmp_path / "pruned"}', pretrained=True, features_only=True,
                                 out_indices=(2, 3))
    assert [f.shape[1] for f in features(x)] == [64, 64]
    assert len(loaded.forward_intermediates(x, indices=2, intermediates_only=True)) == 2


def test_a_pruned_model_trains_and_compiles_to_one_graph():
    _, _, pruned = _pruned(keep=0.5)
    pruned.train()
    loss = torch.nn.functional.cross_entropy(pruned(_images(4)), torch.arange(4))
    loss.backward()
    assert all(p.grad is not None for p in pruned.blocks[3].mlp.parameters())
    pruned.eval()
    compiled = torch.compile(pruned, fullgraph=True)
    x = _images(2, seed=4)
    with torch.no_grad():
        assert (compiled(x) - pruned(x)).abs().max().item() <= 1e-4  # Inductor reorders reductions


def test_a_pruned_model_exports_to_onnx(tmp_path):
    from timm_moejet.onnx_export import export_onnx

    _, _, pruned = _pruned(keep=0.5)
    result = export_onnx(pruned, tmp_path / 'pruned.onnx')
    assert result.max_abs_error <= 1e-4  # as tests/test_onnx.py: ONNX Runtime's kernels against eager float32


def test_a_pruned_model_shards_with_fsdp2():
    import torch.distributed as dist

    from timm_moejet.training import init_device_mesh, shard_model

    _, _, pruned = _pruned(keep=0.5)
    x = _images(2, seed=5)
    with torch.no_grad():
        expected = pruned(x)
    dist.init_process_group('gloo', store=dist.HashStore(), rank=0, world_size=1)
    try:
        sharded = shard_model(pruned, init_device_mesh('cpu'))
        with torch.no_grad():
            assert (sharded(x) - expected).abs().max().item() <= ATOL
    finally:
        dist.destroy_process_group()


def test_expert_counts_per_layer_are_checked():
    for bad, error, match in ((((2, 4),), InvalidArgument, 'one pair per MoE block'),
                              (((2, 4), (0, 0)), InvalidArgument, 'keeps no expert'),
                              (((2, 4), (2,)), InvalidArgumentType, 'pair of ints'),
                              ('2,4', InvalidArgumentType, 'list of')):
        with pytest.raises(error, match=match):
            timm.create_model('moejet_vit_test', moe_experts_per_layer=bad)


@pytest.mark.parametrize('keep, match', [(0., r'\(0, 1\]'), (1.5, r'\(0, 1\]'), (0, 'at least one'),
                                         ((0.5, 0), 'at least one'), (True, 'fraction')])
def test_library_refuses_what_keeps_nothing_or_too_much(keep, match):
    model = _model()
    routing = measure_routing(model, _images())
    with pytest.raises(InvalidArgument, match=match):
        prune_experts(model, routing, keep)


def test_library_refuses_statistics_of_another_model_and_a_dense_model():
    routing = measure_routing(_model(seed=0), _images())
    with pytest.raises(InvalidCheckpoint, match='router weights differ'):
        prune_experts(_model(seed=1), routing, 0.5)
    with pytest.raises(InvalidCheckpoint, match='MoE layers'):
        prune_experts(_model(num_core_experts=2), routing, 0.5)
    with pytest.raises(InvalidArgument, match='no SpheroMoE layer'):
        prune_experts(timm.create_model('vit_tiny_patch16_224', img_size=64), routing, 0.5)


@pytest.fixture(scope='module')
def saved(tmp_path_factory):
    """A moejet_vit_test folder, its routing statistics written by inspect, and the digits as an image folder."""
    from benchmarks.digits.data import write_digits_image_folder

    root = tmp_path_factory.mktemp('prune_cli')
    save_hub_folder(_model(), root / 'model')
    write_digits_image_folder(str(root / 'digits'), image_size=IMAGES)
    assert main(['inspect', str(root / 'model'), '--images', str(root / 'digits'), '--limit', '20',
                 '--save-routing', str(root / 'routing.json')]) == 0
    return root


def test_prune_command_writes_a_folder_that_loads_and_inspects(saved, capsys):
    out = saved / 'half'
    assert main(['prune', str(saved / 'model'), '--routing', str(saved / 'routing.json'), '--keep-fraction', '0.5',
                 '--output', str(out)]) == 0
    assert 'experts per MoE layer (core+universal) 2+4, 2+4' in capsys.readouterr().out
    loaded = timm.create_model(f'local-dir:{out}', pretrained=True)
    assert load_routing(saved / 'routing.json').digest == loaded.pretrained_cfg['pruning']['statistics']['digest']
    assert main(['prune', str(saved / 'model'), '--images', str(saved / 'digits'), '--limit', '20',
                 '--keep-count', '1,3', '--output', str(saved / 'small')]) == 0
    assert json.loads((saved / 'small' / 'config.json').read_text())['model_args']['moe_experts_per_layer'] == \
        [[1, 3], [1, 3]]
    assert main(['inspect', str(out), '--random-images', '2']) == 0
    assert '2+4' in capsys.readouterr().out


@pytest.mark.parametrize('args, match', [
    (['--keep-fraction', '0'], 'keep no expert'), (['--keep-fraction', '1.5'], r'\(0, 1\]'),
    (['--keep-count', '0'], 'at least one'), (['--keep-fraction', '0.5,0.5,0.5'], 'one value or two'),
    (['--keep-count', 'half'], 'takes one int'), ([], 'say how many experts'),
])
def test_bad_keep_is_one_line_and_exit_2(saved, capsys, args, match):
    out = saved / 'never'
    assert main(['prune', str(saved / 'model'), '--routing', str(saved / 'routing.json'), *args,
                 '--output', str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and re.search(match, err), err
    assert not out.exists()


def test_statistics_of_another_model_and_a_dense_model_are_one_line_and_exit_2(saved, capsys, tmp_path):
    save_hub_folder(_model(seed=7), tmp_path / 'other')
    for model in (str(tmp_path / 'other'), 'vit_tiny_patch16_224'):
        assert main(['prune', model, '--routing', str(saved / 'routing.json'), '--keep-fraction', '0.5',
                     '--output', str(tmp_path / 'never')]) == 2
        err = capsys.readouterr().err
        assert err.count('\n') == 1 and ('router weights differ' in err or 'no SpheroMoE layer' in err), err
    assert not (tmp_path / 'never').exists()


@pytest.mark.parametrize('damage, fragment', [
    (lambda layer, data: layer['contribution'].__setitem__(0, 'a'), "contribution[0] must be a number >= 0, got 'a'"),
    (lambda layer, data: layer['contribution'].__setitem__(0, None), 'contribution[0] must be a number >= 0, got None'),
    (lambda layer, data: layer['contribution'].__setitem__(0, float('nan')), 'contribution[0] must be a number >= 0'),
    (lambda layer, data: layer.__setitem__('contribution', 'abcdefghijkl'), 'contribution must be a list of numbers'),
    (lambda layer, data: layer.__setitem__('block', 'x'), "block must be an int >= 0, got 'x'"),
    (lambda layer, data: layer.update(num_core=-1, num_univ=layer['num_univ'] + 5), 'num_core must be an int >= 0'),
    (lambda layer, data: data['layers'].pop(), 'do not match their recorded MoE configuration'),
    (lambda layer, data: data.__setitem__('layers', []), 'without layers or router hash'),
])
def test_damaged_routing_statistics_are_named_and_nothing_is_written(saved, tmp_path, capsys, damage, fragment):
    """Entries of the wrong type used to end in exit status 1 (a TypeError while sorting), and a NaN, a negative
    count or layers beside the recorded configuration were pruned by."""
    data = json.loads((saved / 'routing.json').read_text())
    damage(data['layers'][0] if data['layers'] else {}, data)
    damaged = tmp_path / 'routing.json'
    damaged.write_text(json.dumps(data))
    assert main(['prune', str(saved / 'model'), '--routing', str(damaged), '--keep-fraction', '0.5',
                 '--output', str(tmp_path / 'never')]) == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and fragment in err and str(damaged) in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ['routing.json']
    with pytest.raises(InvalidCheckpoint, match=re.escape(fragment)):
        load_routing(damaged)


def test_a_folder_given_as_routing_statistics_is_named_as_a_folder(saved, tmp_path):
    with pytest.raises(InvalidArgument, match='is a folder; name the JSON file'):
        load_routing(tmp_path)
