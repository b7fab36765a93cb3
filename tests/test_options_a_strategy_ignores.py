""" Recipe options the chosen strategy does not read are refused, however they are given; records tell what was used.

Every recipe field that some strategies read and others ignore (the statistics file, the importance metric, the
graph partitioner and its parts) is tried with every strategy that ignores it: as a ``weights-tools recycle`` flag
(one line, exit status 2, nothing written), as a ``--model-kwargs recycle_*`` entry, as a ``create_model`` kwarg
(also at its default value) and as a ``RecyclingRecipe`` field. The cases come from the strategies' own table, so a
strategy or field added later is covered too.
"""
import pytest
import timm
import torch

import timm_moejet  # noqa: F401  (registers the models)
from timm_moejet.errors import InvalidArgument
from timm_moejet.recycling import STRATEGIES, RecyclingRecipe
from weights_tools.cli import main

# a value of each field other than its default, as the command line writes it and as Python passes it
_VALUES = {'stats': ('stats.safetensors', 'stats.safetensors'), 'metric': ('l1', 'l1'),
           'graph_method': ('spectral', 'spectral'), 'graph_parts': ('4', 4)}


def _reads(strategy) -> set:
    return set(strategy.recipe_fields) | ({'stats'} if strategy.needs_stats else set())


def _ignored():
    """(strategy, field) for every strategy-specific field and every strategy that does not read it."""
    specific = set().union(*map(_reads, STRATEGIES.values())) - set.intersection(*map(_reads, STRATEGIES.values()))
    assert specific == set(_VALUES), f'a new strategy-specific field: give it a value in _VALUES ({specific})'
    return [(name, field) for name, s in STRATEGIES.items() for field in sorted(specific - _reads(s))]


@pytest.mark.parametrize('strategy, field', _ignored())
def test_a_flag_the_strategy_ignores_is_refused(dense_folder, tmp_path, capsys, monkeypatch, strategy, field):
    monkeypatch.chdir(tmp_path)
    flag = '--' + field.replace('_', '-')
    status = main(['recycle', '--model', 'moejet_vit_test', '--trunk', str(dense_folder / 'donor.safetensors'),
                   '--strategy', strategy, flag, _VALUES[field][0], '--output', 'moe'])
    err = capsys.readouterr().err.strip()
    assert status == 2 and len(err.splitlines()) == 1, err
    assert f'strategy {strategy!r} ignores {flag} (read only by' in err and 'leave it out' in err, err
    assert not (tmp_path / 'moe').exists()


@pytest.mark.parametrize('strategy, field', _ignored())
def test_a_recycle_kwarg_the_strategy_ignores_is_refused(strategy, field):
    kwarg = f'recycle_{field}'
    with pytest.raises(InvalidArgument, match=f'ignores {kwarg} '):
        timm.create_model('moejet_vit_test', recycle_strategy=strategy, **{kwarg: _VALUES[field][1]})
    with pytest.raises(InvalidArgument, match=f'ignores {kwarg} '):
        RecyclingRecipe(strategy=strategy, **{field: _VALUES[field][1]})


def test_model_kwargs_the_strategy_ignores_are_refused_as_given(dense_folder, tmp_path, capsys):
    status = main(['recycle', '--model', 'moejet_vit_test', '--trunk', str(dense_folder / 'donor.safetensors'),
                   '--strategy', 'uniform', '--model-kwargs', 'recycle_metric="l2"', '--output', str(tmp_path / 'm')])
    assert status == 2 and 'ignores --model-kwargs recycle_metric' in capsys.readouterr().err
    assert not (tmp_path / 'm').exists()


def test_a_default_value_given_explicitly_is_refused_too():
    """``recycle_graph_parts=32`` is the default, but given with ``uniform`` it was meant for another strategy."""
    with pytest.raises(InvalidArgument, match='ignores recycle_graph_parts'):
        timm.create_model('moejet_vit_test', recycle_strategy='uniform', recycle_graph_parts=32)
    timm.create_model('moejet_vit_test', recycle_strategy='graph', recycle_graph_parts=32)  # read: accepted


def test_statistics_passed_to_a_strategy_that_reads_none_are_refused():
    from hub_cache import small_dense_vit

    from timm_moejet.recycling import collect_statistics, recycle_state_dict

    donor = small_dense_vit(0)
    stats = collect_statistics(donor, [torch.randn(2, 3, 64, 64)], progress=False)
    model = timm.create_model('moejet_vit_test', img_size=64, num_classes=3)
    with pytest.raises(InvalidArgument, match="strategy 'uniform' reads no activation statistics"):
        recycle_state_dict(model, donor.state_dict(), recipe=RecyclingRecipe(strategy='uniform'), stats=stats)


def test_the_recorded_graph_parts_are_the_parts_used(dense_folder, tmp_path):
    """The co-activation graph of a 256-unit MLP has at most 256 parts: asking for 1000 records 256."""
    import json

    pytest.importorskip('sklearn')
    out = tmp_path / 'm'
    assert main(['recycle', '--model', 'moejet_vit_test', '--trunk', str(dense_folder / 'donor.safetensors'),
                 '--strategy', 'graph', '--graph-method', 'spectral', '--graph-parts', '1000', '--model-kwargs',
                 'num_core_experts=2', 'num_univ_experts=2', '--output', str(out)]) == 0
    record = json.loads((out / 'config.json').read_text())['pretrained_cfg']['recycling']
    assert record['graph_parts'] == 256, record


@pytest.mark.parametrize('argv, says', [
    (['--strategy', 'importance', '--stats', 'STATS'], ', statistics STATS to'),
    (['--strategy', 'importance'], ', statistics: the data-free weight proxy to'),
    (['--strategy', 'uniform'], ' to '),
])
def test_the_final_line_names_the_statistics_used(dense_folder, tmp_path, capsys, argv, says):
    from timm_moejet.recycling import collect_statistics

    stats = tmp_path / 'stats.safetensors'
    donor = timm.create_model('local-dir:' + str(dense_folder / 'donor'), pretrained=True)
    collect_statistics(donor, [torch.randn(2, 3, 64, 64)], progress=False).save(stats)
    argv = [str(stats) if a == 'STATS' else a for a in argv]
    assert main(['recycle', '--model', 'moejet_vit_test', '--trunk', str(dense_folder / 'donor' / 'model.safetensors'),
                 *argv, '--output', str(tmp_path / 'm')]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert says.replace('STATS', str(stats)) in line, line
    assert ('statistic' in line) == ('statistic' in says), line
