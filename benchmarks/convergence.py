""" Convergence on real data: the paper's comparison (Fig. 5, Table 1) in miniature, on scikit-learn's digits.

Arms of each family are fine-tuned on the same downstream data with the same recipe and epochs:

* V-JetMoE (ViT): ``dense_scratch`` (the narrow dense ViT from random init), ``dense_donor`` (from the narrow donor
  pre-trained upstream), ``moe_scratch`` (the SpheroMoE ViT from random init), ``moe_jetpack`` (recycled: trunk
  from the narrow donor, experts cut from the wide donor's MLPs);
* C-JetMoE (ConvNeXt): ``convnext_scratch`` (the narrow dense ConvNeXt from random init), ``convnext_select`` (by
  Weight Selection from the wide donor: the paper's "Dense (21k)"), ``convnext_moe_scratch``, ``convnext_jetpack``
  (trunk by Weight Selection from the wide donor, experts cut from its MLPs).

Experts are cut with the ``importance`` strategy over activation statistics of upstream images by default. For each
seed, the donors are first pre-trained on the upstream classes (digits 0-4); the arms then train on the
downstream classes (digits 5-9, 20% of the images labelled, the rest held out for testing). Sizes and the split
are in ``benchmarks/digits/experiment.py`` and ``docs/benchmarks.md``.

Ablation arms (``--arms recycling``, ``--arms spheromoe``) change one knob of a family's recycled arm: the
recycling strategy (graph, uniform, random, upcycle), core or universal experts only, softmax combine, MoE in the
last third of the blocks. All arms of one seed share its donors, recycling seed and data order, so the report
compares them seed by seed: the paired difference with its 95% t-interval (``benchmarks/paired.py``), and each of
the paper's claims as held, not held or undecided.

Every finished run goes into ``convergence_runs.json`` at once; a later call adds the runs it lacks (another arm or
seed) and reports over all of them. ``--donor-cache DIR`` keeps the pre-trained donors for later calls.

Examples::

    python -m benchmarks.convergence                                   # main arms, seeds 0-4
    python -m benchmarks.convergence --arms all --seeds 0 1 2 3 4      # main arms and every ablation
    python -m benchmarks.convergence --arms moe_jetpack_upcycle --seeds 5 6 7   # one ablation (and its default)
    python -m benchmarks.convergence --report-only                     # tables and plots of the runs there
"""
import argparse
import json
import os
import platform
import statistics
import sys
import time
from typing import Dict, List, Optional, Sequence

import torch

from benchmarks.digits.experiment import (
    ARM_GROUPS,
    ARMS,
    CONVNEXT_MOE,
    DONORS,
    DOWNSTREAM,
    DOWNSTREAM_CLASSES,
    FAMILIES,
    MOE,
    PRETRAIN,
    PRETRAINED_LAYER_DECAY,
    UPSTREAM_CLASSES,
    dense_model,
    load_data,
    pretrain_donor,
    run_arm,
)
from benchmarks.digits.train_loop import FinetuneConfig
from benchmarks.paired import paired_difference, seeds_needed, verdict
from timm_moejet.checkpoint_io import atomic_write_bytes

RUNS_FORMAT = 1
DEFAULT_STRATEGY = 'importance'


def _mean_std(values: Sequence[float]) -> Dict[str, float]:
    return {'mean': statistics.fmean(values), 'std': statistics.stdev(values) if len(values) > 1 else 0.}


# The paper's claims, as "the difference is above zero" (+1) or "below zero" (-1), and where the paper makes them.
# Main comparison: MoE Jetpack minus each baseline of its family.
MAIN_CLAIMS = {
    'dense_scratch': (1, 'above the dense model trained from scratch (Table 1: "Dense")'),
    'dense_pretrained': (1, 'above the dense model from the pre-trained donor (Table 1: "Dense (21k)")'),
    'moe_scratch': (1, 'above the same MoE trained from scratch (Table 1: "Soft MoE"; Table 2)'),
}
# Ablations: the ablation arm minus the default recipe; None where the paper compares nothing.
ABLATION_CLAIMS = {
    'strategy=graph': (-1, 'importance above graph partitioning (Table 3: 79.9 vs 79.8)'),
    'strategy=uniform': (-1, 'importance above uniform selection (Table 3: 79.9 vs 79.6)'),
    'strategy=random': (-1, 'importance above random sampling (Table 3: 79.9 vs 79.5)'),
    'strategy=upcycle': (-1, 'importance above sparse upcycling (Table 3: 79.9 vs 79.1)'),
    'num_univ_experts=0': (-1, 'core + universal above core only (Fig. 4: a core share of 1/3 is best)'),
    'num_core_experts=0': (-1, 'core + universal above universal only (Fig. 4)'),
    'moe_combine=softmax': (None, 'no comparison in the paper (its text has softmax, its code entmax-1.5)'),
    'moe_blocks=last third': (-1, 'MoE in the last half above the last third (Table 4: 7:12 88.4 vs 9:12 87.8)'),
}


def _curves(runs: Dict[str, object], arm: str) -> Dict[int, List[float]]:
    return {int(seed): r['curve'] for seed, r in runs['runs'].get(arm, {}).items()}


def _paired(a: Dict[int, List[float]], b: Dict[int, List[float]], epoch_a: int, epoch_b: int,
            direction: Optional[int]) -> Optional[Dict[str, object]]:
    """``a`` at ``epoch_a`` minus ``b`` at ``epoch_b`` (1-based) over the seeds both ran, with its verdict."""
    seeds = sorted(set(a) & set(b))
    if len(seeds) < 2:
        return None
    diff = paired_difference([a[s][epoch_a - 1] for s in seeds], [b[s][epoch_b - 1] for s in seeds])
    out = dict(diff.as_dict(), seeds=seeds, seeds_needed=seeds_needed(diff.sd, diff.mean))
    out['verdict'] = verdict(diff, direction) if direction else ('above' if diff.low > 0 else 'below'
                                                                if diff.high < 0 else 'unresolved')
    return out


def compare(runs: Dict[str, object]) -> Dict[str, object]:
    """Paired differences of the runs: MoE Jetpack against each baseline, and each ablation against its default."""
    epochs = runs['recipe']['downstream']['epochs']
    quarter = epochs // 4
    main, ablations = [], []
    for family in FAMILIES:
        by_role = {spec.role: arm for arm, spec in ARMS.items() if spec.family == family}
        jetpack = _curves(runs, by_role['moe_jetpack'])
        for role, (direction, claim) in MAIN_CLAIMS.items():
            other = _curves(runs, by_role[role])
            row = {'family': family, 'arm': by_role['moe_jetpack'], 'baseline': by_role[role], 'claim': claim,
                   'final': _paired(jetpack, other, epochs, epochs, direction),
                   'quarter': _paired(jetpack, other, quarter, quarter, direction)}
            if row['final']:
                main.append(row)
        speed = _paired(jetpack, _curves(runs, by_role['moe_scratch']), quarter, epochs, 1)
        if speed:
            main.append({'family': family, 'arm': by_role['moe_jetpack'], 'baseline': by_role['moe_scratch'],
                         'claim': f'at epoch {quarter} of {epochs}, at or above the scratch MoE\'s final accuracy '
                                  f'(Fig. 5: 2x faster on ImageNet, 8x on CIFAR-100)', 'final': None, 'speed': speed})
    for arm, spec in ARMS.items():
        if spec.role != 'ablation':
            continue
        direction, claim = ABLATION_CLAIMS.get(spec.knob, (None, ''))
        mine, ref = _curves(runs, arm), _curves(runs, spec.reference)
        final = _paired(mine, ref, epochs, epochs, direction)
        if final:
            ablations.append({'family': spec.family, 'arm': arm, 'reference': spec.reference, 'knob': spec.knob,
                              'group': spec.group, 'claim': claim, 'final': final,
                              'quarter': _paired(mine, ref, quarter, quarter, direction)})
    return {'epochs': epochs, 'quarter_epoch': quarter, 'main': main, 'ablations': ablations}


def _interval(d: Optional[Dict[str, object]]) -> str:
    if not d:
        return '-'
    return f'{d["mean"]:+.2f} [{d["low"]:+.2f}, {d["high"]:+.2f}]'


def _needed(d: Optional[Dict[str, object]]) -> str:
    return '-' if not d else str(d['seeds_needed']) if d['seeds_needed'] else '> 100000'


def markdown_tables(comparison: Dict[str, object], runs: Dict[str, object]) -> str:
    """The paired tables as Markdown (the docs show them as printed)."""
    q, e = comparison['quarter_epoch'], comparison['epochs']
    lines = ['Paired differences in test accuracy (points), mean [95% t-interval] over the seeds both arms ran; '
             '"seeds" is how many paired seeds would resolve a difference of the observed size at the observed '
             'spread.', '',
             f'| family | MoE Jetpack minus | n | final (epoch {e}) | epoch {q} | the paper\'s claim | verdict '
             f'(final) | verdict (epoch {q}) | seeds |', '|---|---|---|---|---|---|---|---|---|']
    for row in comparison['main']:
        fam = FAMILIES[row['family']].label
        if 'speed' in row:
            s = row['speed']
            lines.append(f'| {fam} | {ARMS[row["baseline"]].label} at epoch {e}, MoE Jetpack at epoch {q} | {s["n"]} | '
                         f'- | {_interval(s)} | {row["claim"]} | - | {s["verdict"]} | {_needed(s)} |')
            continue
        f, qq = row['final'], row['quarter']
        lines.append(f'| {fam} | {ARMS[row["baseline"]].label} | {f["n"]} | {_interval(f)} | {_interval(qq)} | '
                     f'{row["claim"]} | {f["verdict"]} | {qq["verdict"] if qq else "-"} | {_needed(f)} |')
    lines += ['', f'| family | ablation (one knob changed) minus the default recipe | n | final (epoch {e}) | '
                  f'epoch {q} | the paper\'s claim | verdict (final) | seeds |', '|---|---|---|---|---|---|---|---|']
    for row in comparison['ablations']:
        f = row['final']
        lines.append(f'| {FAMILIES[row["family"]].label} | {row["knob"]} | {f["n"]} | {_interval(f)} | '
                     f'{_interval(row["quarter"])} | {row["claim"]} | {f["verdict"]} | {_needed(f)} |')
    lines += ['', f'| arm | seeds | final accuracy (%), mean +- std | epoch {q} |', '|---|---|---|---|']
    for arm in ARMS:
        curves = _curves(runs, arm)
        if curves:
            final = _mean_std([c[-1] for c in curves.values()])
            at_q = _mean_std([c[q - 1] for c in curves.values()])
            lines.append(f'| {ARMS[arm].label} | {len(curves)} | {final["mean"]:.2f} +- {final["std"]:.2f} | '
                         f'{at_q["mean"]:.2f} +- {at_q["std"]:.2f} |')
    return '\n'.join(lines)


def plot_differences(comparison: Dict[str, object], path: str) -> None:
    """The paired differences of final accuracy with their 95% intervals, one row per comparison."""
    import io

    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    rows = [(f'{FAMILIES[r["family"]].label.split()[0]}: Jetpack - {ARMS[r["baseline"]].label}', r['final'], 'C0')
            for r in comparison['main'] if r.get('final')]
    rows += [(f'{FAMILIES[r["family"]].label.split()[0]}: {r["knob"]} - default', r['final'],
              'C1' if r['group'] == 'recycling' else 'C2') for r in comparison['ablations']]
    fig, ax = plt.subplots(figsize=(8, 0.32 * len(rows) + 1.2), dpi=120)
    for i, (label, d, color) in enumerate(rows):
        y = len(rows) - 1 - i
        ax.plot([d['low'], d['high']], [y, y], color=color, lw=2)
        ax.plot([d['mean']], [y], 'o', color=color)
    ax.axvline(0., color='k', lw=0.8)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([r[0] for r in reversed(rows)], fontsize=8)
    ax.set_xlabel('paired difference of final test accuracy (points), mean and 95% t-interval')
    ax.grid(axis='x', alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format='png')
    plt.close(fig)
    atomic_write_bytes(buf.getvalue(), path)


def plot_curves(curves: Dict[str, List[List[float]]], path: str, title: str) -> None:
    """Mean test accuracy per epoch with a +-1 std band, one line per arm, one panel per family."""
    import io

    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    families = sorted({ARMS[a].family for a in curves}, key=list(FAMILIES).index)
    fig, axes = plt.subplots(1, len(families), figsize=(6.5 * len(families), 4.5), dpi=120, squeeze=False,
                             sharey=True)
    for ax, family in zip(axes[0], families):
        for arm, runs in curves.items():
            if ARMS[arm].family != family:
                continue
            n = len(runs[0])
            x = list(range(1, n + 1))
            mean = [statistics.fmean(c[e] for c in runs) for e in range(n)]
            std = [statistics.stdev(c[e] for c in runs) if len(runs) > 1 else 0. for e in range(n)]
            ax.plot(x, mean, label=ARMS[arm].label, lw=2 if ARMS[arm].role == 'moe_jetpack' else 1.5)
            ax.fill_between(x, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], alpha=0.15)
        ax.set_xlabel('fine-tuning epoch')
        ax.set_title(FAMILIES[family].label, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(loc='lower right', fontsize=9)
    axes[0][0].set_ylabel('downstream test accuracy (%)')
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format='png')
    plt.close(fig)
    atomic_write_bytes(buf.getvalue(), path)


def _recipe(epochs: int) -> Dict[str, object]:
    """Everything a run depends on besides its arm and seed: runs of one file must share it to be paired."""
    return {
        'data': {'upstream_classes': list(UPSTREAM_CLASSES), 'downstream_classes': list(DOWNSTREAM_CLASSES),
                 'image_size': {f: FAMILIES[f].image_size for f in FAMILIES}},
        'models': {**{name: {'model': d.model_name, **d.kwargs} for name, d in DONORS.items()},
                   'vit_moe': MOE, 'convnext_moe': CONVNEXT_MOE},
        'pretrain': vars(PRETRAIN), 'downstream': dict(vars(DOWNSTREAM), epochs=epochs),
        'pretrained_arms_layer_decay': PRETRAINED_LAYER_DECAY, 'default_strategy': DEFAULT_STRATEGY,
    }


def _jsonable(obj: object) -> object:
    return json.loads(json.dumps(obj, default=list))


def load_runs(path: str, recipe: Dict[str, object]) -> Dict[str, object]:
    """The raw runs file (created empty if absent); its recipe must be ``recipe``, else runs would not pair."""
    if not os.path.exists(path):
        return {'format': RUNS_FORMAT, 'recipe': _jsonable(recipe), 'runs': {}, 'donors': {}, 'sessions': []}
    with open(path) as f:
        runs = json.load(f)
    if runs.get('format') != RUNS_FORMAT or runs.get('recipe') != _jsonable(recipe):
        raise SystemExit(f'{path} holds runs of another recipe (or --epochs); pass another --out-dir, or --fresh '
                         f'to replace it.')
    return runs


def _save_runs(runs: Dict[str, object], path: str) -> None:
    """Merge ``runs`` into the file under a lock (sweeps over other arms may write it meanwhile) and reload it."""
    import fcntl
    with open(path + '.lock', 'w') as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if os.path.exists(path):
            with open(path) as f:
                on_disk = json.load(f)
            for key in ('runs', 'donors'):
                for name, by_seed in on_disk[key].items():
                    for seed, record in by_seed.items():
                        runs[key].setdefault(name, {}).setdefault(seed, record)
            runs['sessions'] = on_disk['sessions'] + [s for s in runs['sessions'] if s not in on_disk['sessions']]
        atomic_write_bytes(json.dumps(runs, indent=1).encode(), path)


def _donor(name: str, datasets: Dict[str, object], seed: int, runs: Dict[str, object],
           cache: Optional[str]) -> torch.nn.Module:
    """The donor of ``seed``: from the cache folder if there, else pre-trained (the same weights: one thread)."""
    family = DONORS[name].family
    cached = os.path.join(cache, f'{name}_seed{seed}.safetensors') if cache else None
    if cached and os.path.exists(cached):
        from safetensors.torch import load_file
        model = dense_model(name, num_classes=len(UPSTREAM_CLASSES))
        model.load_state_dict(load_file(cached))
        return model.eval()
    start = time.perf_counter()
    model, acc = pretrain_donor(name, datasets[family], seed)
    seconds = time.perf_counter() - start
    record = runs['donors'].setdefault(name, {}).get(str(seed))
    if record is not None and abs(record['upstream_acc'] - acc) > 1e-9:
        print(f'warning: donor {name} seed {seed} pre-trained to {acc:.2f}%, the recorded runs had '
              f'{record["upstream_acc"]:.2f}% (another machine or thread count?)', flush=True)
    runs['donors'][name][str(seed)] = {'upstream_acc': acc, 'seconds': seconds}
    if cached:
        from timm_moejet.checkpoint_io import save_safetensors_atomic
        os.makedirs(cache, exist_ok=True)
        save_safetensors_atomic({k: v.contiguous() for k, v in model.state_dict().items()}, cached)
    print(f'[seed {seed}] donor {name} pre-trained upstream: test acc {acc:.1f}%  ({seconds:.0f}s)', flush=True)
    return model


def expand_arms(names: Sequence[str]) -> List[str]:
    """Arm names and group names (``main``, ``recycling``, ``spheromoe``, ``all``) as arm names, in table order."""
    wanted = set()
    for name in names:
        if name == 'all':
            wanted.update(ARMS)
        elif name in ARM_GROUPS:
            wanted.update(ARM_GROUPS[name])
        else:
            wanted.add(name)
    # an ablation is a difference to its default-recipe arm: that arm runs too
    wanted.update(ARMS[a].reference for a in list(wanted) if ARMS[a].reference)
    return [a for a in ARMS if a in wanted]


def report(runs: Dict[str, object], out_dir: str) -> Dict[str, object]:
    """Print and write the paired comparison of ``runs``: convergence.json, convergence.png (mean curves of the
    main arms) and convergence_differences.png (the intervals)."""
    comparison = compare(runs)
    tables = markdown_tables(comparison, runs)
    print(tables)
    curves = {arm: [c for _, c in sorted(_curves(runs, arm).items())] for arm in ARMS
              if ARMS[arm].group == 'main' and _curves(runs, arm)}
    mean_curves = {arm: [statistics.fmean(c[e] for c in cs) for e in range(len(cs[0]))] for arm, cs in curves.items()}
    result = {'comparison': comparison, 'mean_curves': mean_curves,
              'seeds': {arm: sorted(_curves(runs, arm)) for arm in ARMS if _curves(runs, arm)},
              'sweep_seconds': sum(s['seconds'] for s in runs['sessions']),
              'runs_file': 'convergence_runs.json'}
    atomic_write_bytes(json.dumps(result, indent=1).encode(), os.path.join(out_dir, 'convergence.json'))
    if curves:
        n = min(len(c) for c in curves.values())
        plot_curves(curves, os.path.join(out_dir, 'convergence.png'),
                    f'Digits 5-9 (179 labelled images), mean +- std over {n}+ seeds')
    if comparison['main'] or comparison['ablations']:
        plot_differences(comparison, os.path.join(out_dir, 'convergence_differences.png'))
    print(f'\nwrote {out_dir}/convergence.json, convergence.png and convergence_differences.png')
    return result


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--seeds', type=int, nargs='+', default=list(range(5)))
    parser.add_argument('--epochs', type=int, default=DOWNSTREAM.epochs, help='downstream epochs of every arm')
    parser.add_argument('--arms', nargs='+', default=['main'], choices=list(ARMS) + list(ARM_GROUPS) + ['all'],
                        metavar='ARM', help='arms or groups: main (default), recycling, spheromoe, all, or arm '
                        'names (an ablation brings its default-recipe arm)')
    # one thread: these models are tiny, and extra threads only spin when the CPU is shared (10x slower measured)
    parser.add_argument('--threads', type=int, default=1, help='torch CPU threads (default 1)')
    parser.add_argument('--out-dir', default=os.path.join('benchmarks', 'results'),
                        help='where convergence_runs.json (raw runs, resumed), convergence.json and '
                             'convergence.png go')
    parser.add_argument('--donor-cache', default=None,
                        help='folder keeping the pre-trained donors, so that a later call skips their pre-training')
    parser.add_argument('--fresh', action='store_true', help='discard the runs already in --out-dir')
    parser.add_argument('--report-only', action='store_true', help='run nothing: report the runs already there')
    args = parser.parse_args(argv)
    if args.epochs < 4:
        parser.error(f'--epochs must be >= 4 (a quarter of them is reported), got {args.epochs}.')
    if len(set(args.seeds)) != len(args.seeds):
        parser.error(f'--seeds has repeats: {args.seeds}.')
    torch.set_num_threads(args.threads)
    arms = expand_arms(args.arms)
    os.makedirs(args.out_dir, exist_ok=True)
    runs_path = os.path.join(args.out_dir, 'convergence_runs.json')
    recipe = _recipe(args.epochs)
    if args.fresh and os.path.exists(runs_path):
        os.remove(runs_path)
    runs = load_runs(runs_path, recipe)
    cfg = FinetuneConfig(**dict(vars(DOWNSTREAM), epochs=args.epochs))

    todo = [(seed, arm) for seed in args.seeds for arm in arms if str(seed) not in runs['runs'].get(arm, {})]
    session_start = time.perf_counter()
    if todo and not args.report_only:
        families = [f for f in FAMILIES if any(ARMS[a].family == f for _, a in todo)]
        datasets = {f: load_data(image_size=FAMILIES[f].image_size) for f in families}
        print(f'digits: upstream classes {UPSTREAM_CLASSES}, downstream classes {DOWNSTREAM_CLASSES}; sizes '
              f'{datasets[families[0]].sizes()}; {len(todo)} runs to do ({sum(len(v) for v in runs["runs"].values())} '
              f'already in {runs_path})', flush=True)
        width = max(len(a) for a in arms)
        donors: Dict[str, torch.nn.Module] = {}
        donors_seed = None
        for seed, arm in todo:
            if str(seed) in load_runs(runs_path, recipe)['runs'].get(arm, {}):
                continue  # another call over the same file ran it meanwhile
            if donors_seed != seed:
                donors, donors_seed = {}, seed
            for name in ARMS[arm].donors:
                if name not in donors:
                    donors[name] = _donor(name, datasets, seed, runs, args.donor_cache)
            start = time.perf_counter()
            curve = run_arm(arm, datasets[ARMS[arm].family], seed, donors=donors, strategy=DEFAULT_STRATEGY, cfg=cfg)
            runs['runs'].setdefault(arm, {})[str(seed)] = {'curve': curve, 'seconds': time.perf_counter() - start}
            _save_runs(runs, runs_path)  # after every run: an interrupted sweep resumes where it stopped
            shown = ' '.join(f'{a:.0f}' for a in curve)
            print(f'[seed {seed}] {arm:<{width}} final {curve[-1]:5.1f}%  per epoch: {shown}  '
                  f'({time.perf_counter() - start:.0f}s)', flush=True)
        runs['sessions'].append({'runs': len(todo), 'arms': arms, 'seeds': args.seeds,
                                 'seconds': time.perf_counter() - session_start,
                                 'threads': args.threads, 'torch': torch.__version__,
                                 'python': sys.version.split()[0], 'machine': platform.machine()})
        _save_runs(runs, runs_path)
    return report(runs, args.out_dir)


if __name__ == '__main__':
    from benchmarks.entry import run_main
    run_main(main, 'python -m benchmarks.convergence', needs=[('matplotlib.pyplot', 'plot', 'the convergence plot')])
