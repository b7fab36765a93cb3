""" The convergence benchmark's statistics: paired t-intervals against scipy, claim verdicts, seeds needed, and the
comparison of a runs file (synthetic runs: no training, fast). """
import math

import pytest
from scipy import stats

from benchmarks.convergence import compare, markdown_tables
from benchmarks.digits.experiment import ARMS
from benchmarks.paired import HELD, NOT_HELD, UNDECIDED, paired_difference, seeds_needed, t_quantile, verdict

A = [67.4, 66.1, 69.0, 68.2, 65.9, 70.3]
B = [66.0, 66.5, 67.1, 66.0, 65.2, 68.8]


@pytest.mark.parametrize('df', [1, 2, 4, 9, 30, 200])
@pytest.mark.parametrize('p', [0.5, 0.6, 0.9, 0.975, 0.995, 0.025])
def test_t_quantile_matches_scipy(p, df):
    assert t_quantile(p, df) == pytest.approx(stats.t.ppf(p, df), rel=1e-9, abs=1e-9)


def test_paired_interval_matches_scipy():
    d = paired_difference(A, B)
    diffs = [a - b for a, b in zip(A, B)]
    low, high = stats.t.interval(0.95, len(diffs) - 1, loc=stats.tmean(diffs), scale=stats.sem(diffs))
    assert (d.n, d.confidence) == (6, 0.95)
    assert d.mean == pytest.approx(sum(diffs) / 6, abs=1e-12)
    assert d.sd == pytest.approx(stats.tstd(diffs), abs=1e-12)
    assert (d.low, d.high) == (pytest.approx(low, abs=1e-9), pytest.approx(high, abs=1e-9))
    # scipy's paired t-test agrees on significance: its p < 0.05 exactly when the interval excludes zero
    assert (stats.ttest_rel(A, B).pvalue < 0.05) == (d.low > 0 or d.high < 0)


def test_pairing_removes_the_shared_seed_effect():
    # the same seed effect in both arms, a constant +1 between them: unpaired stds are large, the paired interval
    # is a point
    seed_effect = [-6., 3., 0., 5., -2.]
    d = paired_difference([60 + s + 1 for s in seed_effect], [60 + s for s in seed_effect])
    assert d.mean == pytest.approx(1.) and d.sd == pytest.approx(0., abs=1e-12)
    assert verdict(d) == HELD


def test_verdicts():
    above = paired_difference([2., 3., 2.5, 2.2], [0., 0., 0., 0.])
    around = paired_difference([1., -1., 0.5, -0.4], [0., 0., 0., 0.])
    below = paired_difference([-2., -3., -2.5, -2.2], [0., 0., 0., 0.])
    assert [verdict(x) for x in (above, around, below)] == [HELD, UNDECIDED, NOT_HELD]
    assert [verdict(x, -1) for x in (above, around, below)] == [NOT_HELD, UNDECIDED, HELD]
    with pytest.raises(ValueError):
        verdict(above, 0)


@pytest.mark.parametrize('a, b', [([1.], [2.]), ([1., 2.], [1.]), ([], [])])
def test_paired_difference_rejects_bad_input(a, b):
    with pytest.raises(ValueError):
        paired_difference(a, b)


@pytest.mark.parametrize('sd, delta', [(2.0, 0.5), (1.0, 1.0), (3.0, 0.3), (0.5, 2.0)])
def test_seeds_needed_is_the_fewest(sd, delta):
    n = seeds_needed(sd, delta)
    half = lambda k: stats.t.ppf(0.975, k - 1) * sd / math.sqrt(k)  # noqa: E731
    assert half(n) < delta
    assert n == 2 or half(n - 1) >= delta


@pytest.mark.parametrize('confidence', [0.8, 0.9, 0.99])
@pytest.mark.parametrize('sd, delta', [(2.0, 0.1), (1.0, 0.05), (3.0, 1.0), (0.5, 2.0)])
def test_seeds_needed_is_the_fewest_at_every_confidence(sd, delta, confidence):
    n = seeds_needed(sd, delta, confidence=confidence)
    half = lambda k: stats.t.ppf((1 + confidence) / 2, k - 1) * sd / math.sqrt(k)  # noqa: E731
    assert half(n) < delta, (n, half(n))
    assert n == 2 or half(n - 1) >= delta, f'{n - 1} seeds suffice already'


@pytest.mark.parametrize('bad', [math.nan, math.inf, -math.inf])
def test_paired_difference_refuses_runs_that_are_not_finite(bad):
    from timm_moejet.errors import InvalidArgument

    with pytest.raises(InvalidArgument, match=r'b\[2\] is (nan|inf|-inf).*rerun that seed'):
        paired_difference(A, B[:2] + [bad] + B[3:])


@pytest.mark.parametrize('bad', [None, '66.0', [66.0]])
def test_paired_difference_refuses_runs_that_are_not_numbers(bad):
    from timm_moejet.errors import InvalidArgumentType

    with pytest.raises(InvalidArgumentType, match=r'a\[1\] is .* not a number'):
        paired_difference(A[:1] + [bad] + A[2:], B)


@pytest.mark.parametrize('kwargs', [dict(sd=math.nan), dict(sd=math.inf), dict(sd=-1.), dict(delta=math.nan),
                                    dict(delta=-math.inf), dict(confidence=math.nan), dict(confidence=1.),
                                    dict(max_seeds=1)])
def test_seeds_needed_refuses_values_that_are_not_finite(kwargs):
    from timm_moejet.errors import InvalidArgument

    name = next(iter(kwargs))
    with pytest.raises(InvalidArgument, match=f'^{name} must be'):
        seeds_needed(**dict(dict(sd=1., delta=0.5), **kwargs))


def test_seeds_needed_edge_cases():
    assert seeds_needed(1.0, 0.) is None
    assert seeds_needed(0., 0.1) == 2
    assert seeds_needed(10., 1e-4, max_seeds=1000) is None
    assert seeds_needed(1e300, 1e-300) is None  # no overflow on the way


def _synthetic_runs(epochs=8, seeds=range(5)):
    """Every arm: a linear curve to a final accuracy set per arm, plus a per-seed effect shared by all arms."""
    final = {arm: 70. for arm in ARMS}
    final.update(dense_scratch=40., dense_donor=65., moe_scratch=41., moe_jetpack=70.,
                 moe_jetpack_upcycle=68., moe_jetpack_core_only=70.)
    runs = {'recipe': {'downstream': {'epochs': epochs}}, 'runs': {}, 'donors': {}, 'sessions': []}
    for arm in ARMS:
        runs['runs'][arm] = {}
        for s in seeds:
            noise = (s - 2) * 3. + (0.3 * (-1) ** s if arm == 'moe_jetpack_core_only' else 0.)
            curve = [final[arm] * (e + 1) / epochs + noise for e in range(epochs)]
            runs['runs'][arm][str(s)] = {'curve': curve, 'seconds': 1.}
    return runs


def test_compare_pairs_seeds_and_states_claims():
    c = compare(_synthetic_runs())
    assert c['quarter_epoch'] == 2
    main = {(r['family'], r['baseline']): r for r in c['main'] if r.get('final')}
    vit = main[('vit', 'dense_donor')]
    assert vit['final']['mean'] == pytest.approx(5.) and vit['final']['n'] == 5
    assert vit['final']['verdict'] == HELD
    assert vit['quarter']['mean'] == pytest.approx(5. / 4)
    # ConvNeXt arms all at 70: the difference is exactly zero, so "above" is undecided
    assert main[('convnext', 'convnext_select')]['final']['verdict'] == UNDECIDED
    speed = [r for r in c['main'] if 'speed' in r and r['family'] == 'vit'][0]['speed']
    assert speed['mean'] == pytest.approx(70. / 4 - 41.) and speed['verdict'] == NOT_HELD
    ablations = {r['arm']: r for r in c['ablations']}
    assert ablations['moe_jetpack_upcycle']['final']['mean'] == pytest.approx(-2.)
    assert ablations['moe_jetpack_upcycle']['final']['verdict'] == HELD  # importance above upcycle
    assert ablations['moe_jetpack_core_only']['final']['verdict'] == UNDECIDED
    assert ablations['moe_jetpack_softmax']['claim'].startswith('no comparison')
    assert ablations['moe_jetpack_softmax']['final']['verdict'] == 'unresolved'
    table = markdown_tables(c, _synthetic_runs())
    assert '| V-JetMoE (ViT) | Dense from pre-trained donor | 5 | +5.00 [+5.00, +5.00]' in table


def test_compare_uses_only_the_seeds_both_arms_ran():
    runs = _synthetic_runs()
    del runs['runs']['dense_donor']['4']
    del runs['runs']['moe_jetpack']['0']
    vit = [r for r in compare(runs)['main'] if r['family'] == 'vit' and r['baseline'] == 'dense_donor'][0]
    assert vit['final']['seeds'] == [1, 2, 3]


def test_convergence_cli_saves_resumes_and_refuses_another_recipe(tmp_path):
    import json

    from benchmarks.convergence import main
    out = str(tmp_path)
    main(['--arms', 'dense_scratch', '--seeds', '0', '1', '--epochs', '4', '--out-dir', out])
    runs = json.loads((tmp_path / 'convergence_runs.json').read_text())
    first = runs['runs']['dense_scratch']
    assert sorted(first) == ['0', '1'] and all(len(r['curve']) == 4 for r in first.values())
    # a second call runs only what is missing, and keeps the runs already there unchanged
    main(['--arms', 'dense_scratch', '--seeds', '0', '1', '2', '--epochs', '4', '--out-dir', out])
    runs = json.loads((tmp_path / 'convergence_runs.json').read_text())
    assert [s['runs'] for s in runs['sessions']] == [2, 1]
    assert {k: runs['runs']['dense_scratch'][k] for k in ('0', '1')} == first
    with pytest.raises(SystemExit, match='another recipe'):
        main(['--arms', 'dense_scratch', '--seeds', '0', '--epochs', '5', '--out-dir', out])
    assert (tmp_path / 'convergence.json').is_file() and (tmp_path / 'convergence.png').is_file()
