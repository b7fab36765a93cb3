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

Prints per-arm progress, the per-epoch mean test accuracy, a final table (mean and std over seeds) and, per
family, the two checks of the paper's claim; writes JSON and a PNG of the curves (a panel per family).

Examples::

    python -m benchmarks.convergence                                  # 3 seeds, 8 arms
    python -m benchmarks.convergence --arms convnext_scratch convnext_select convnext_moe_scratch convnext_jetpack
    python -m benchmarks.convergence --seeds 0 --epochs 10 --strategy upcycle
"""
import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from typing import Dict, List, Optional, Sequence

import torch

from benchmarks.digits.experiment import (
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
    epochs_to_reach,
    load_data,
    pretrain_donor,
    run_arm,
)
from benchmarks.digits.train_loop import FinetuneConfig
from timm_moejet.checkpoint_io import atomic_write_bytes
from timm_moejet.recycling import STRATEGIES


def _mean_std(values: Sequence[float]) -> Dict[str, float]:
    return {'mean': statistics.fmean(values), 'std': statistics.stdev(values) if len(values) > 1 else 0.}


def _family_checks(curves: Dict[str, List[List[float]]], mean_curves: Dict[str, List[float]],
                   final: Dict[str, Dict[str, float]], family: str) -> Dict[str, object]:
    """The paper's two checks for one family, from the arms of that family that ran."""
    by_role = {ARMS[a].role: a for a in curves if ARMS[a].family == family}
    checks: Dict[str, object] = {'arms': by_role}
    jetpack = by_role.get('moe_jetpack')
    scratch = by_role.get('moe_scratch')
    dense = by_role.get('dense_pretrained')
    if jetpack and scratch:
        epochs = len(mean_curves[scratch])
        target = final[scratch]['mean']
        reach = epochs_to_reach(mean_curves[jetpack], target)
        checks['speed'] = {
            'moe_scratch_final_mean': target,
            'moe_jetpack_epochs_to_reach_it': reach,
            'moe_scratch_epochs': epochs,
            'speedup': epochs / reach if reach else None,
            'per_seed_epochs_to_reach': [epochs_to_reach(j, s[-1]) for j, s in zip(curves[jetpack], curves[scratch])],
            'claim_at_most_half_the_epochs': reach is not None and reach <= epochs / 2,
        }
    if jetpack and dense:
        checks['accuracy'] = {
            'moe_jetpack_final_mean': final[jetpack]['mean'],
            'dense_pretrained_final_mean': final[dense]['mean'],
            'claim_at_or_above_dense_pretrained': final[jetpack]['mean'] >= final[dense]['mean'],
        }
    return checks


def summarize(curves: Dict[str, List[List[float]]]) -> Dict[str, object]:
    """Mean curves, final accuracy stats and, per family, the paper's two checks, from ``curves[arm][seed][epoch]``."""
    mean_curves = {arm: [statistics.fmean(c[e] for c in runs) for e in range(len(runs[0]))]
                   for arm, runs in curves.items()}
    final = {arm: _mean_std([c[-1] for c in runs]) for arm, runs in curves.items()}
    families = sorted({ARMS[a].family for a in curves}, key=list(FAMILIES).index)
    return {'mean_curves': mean_curves, 'final': final,
            'families': {f: _family_checks(curves, mean_curves, final, f) for f in families}}


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


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    parser.add_argument('--epochs', type=int, default=DOWNSTREAM.epochs, help='downstream epochs of every arm')
    parser.add_argument('--arms', nargs='+', default=list(ARMS), choices=list(ARMS))
    parser.add_argument('--strategy', default='importance', choices=list(STRATEGIES), help='recycling strategy')
    # one thread: these models are tiny, and extra threads only spin when the CPU is shared (10x slower measured)
    parser.add_argument('--threads', type=int, default=1, help='torch CPU threads (default 1)')
    parser.add_argument('--out-dir', default=os.path.join('benchmarks', 'results'),
                        help='where convergence.json and convergence.png go')
    args = parser.parse_args(argv)
    if args.epochs < 2:
        parser.error(f'--epochs must be >= 2, got {args.epochs}.')
    if len(set(args.seeds)) != len(args.seeds):
        parser.error(f'--seeds has repeats: {args.seeds}.')
    torch.set_num_threads(args.threads)
    cfg = FinetuneConfig(**dict(vars(DOWNSTREAM), epochs=args.epochs))
    donor_names = [d for d in DONORS if any(d in ARMS[a].donors for a in args.arms)]

    families = [f for f in FAMILIES if any(ARMS[a].family == f for a in args.arms)]
    datasets = {f: load_data(image_size=FAMILIES[f].image_size) for f in families}
    sizes = datasets[families[0]].sizes()  # the same images at every size
    print(f'digits: upstream classes {UPSTREAM_CLASSES}, downstream classes {DOWNSTREAM_CLASSES}; sizes {sizes}; '
          + ', '.join(f'{FAMILIES[f].label} at {FAMILIES[f].image_size} px' for f in families))
    start = time.perf_counter()
    curves: Dict[str, List[List[float]]] = {arm: [] for arm in args.arms}
    donor_acc: Dict[str, List[float]] = {d: [] for d in donor_names}
    width = max(len(a) for a in args.arms)
    for seed in args.seeds:
        donors = {}
        for name in donor_names:
            donors[name], acc = pretrain_donor(name, datasets[DONORS[name].family], seed)
            donor_acc[name].append(acc)
            print(f'[seed {seed}] donor {name} pre-trained upstream: test acc {acc:.1f}%  '
                  f'({time.perf_counter() - start:.0f}s)', flush=True)
        for arm in args.arms:
            curve = run_arm(arm, datasets[ARMS[arm].family], seed, donors=donors, strategy=args.strategy, cfg=cfg)
            curves[arm].append(curve)
            shown = ' '.join(f'{a:.0f}' for a in curve)
            print(f'[seed {seed}] {arm:<{width}} final {curve[-1]:5.1f}%  per epoch: {shown}  '
                  f'({time.perf_counter() - start:.0f}s)', flush=True)

    summary = summarize(curves)
    print('\nmean test accuracy (%) per epoch over seeds ' + str(args.seeds))
    column = max(15, width + 2)
    print('epoch ' + ''.join(f'{a:>{column}}' for a in args.arms))
    for e in range(args.epochs):
        print(f'{e + 1:>5} ' + ''.join(f'{summary["mean_curves"][a][e]:>{column}.1f}' for a in args.arms))
    print(f'\n{"arm":<30} {"final acc (%)":>18} {"best epoch mean":>16}')
    for arm in args.arms:
        f = summary['final'][arm]
        best = max(summary['mean_curves'][arm])
        print(f'{ARMS[arm].label:<30} {f["mean"]:>10.2f} +- {f["std"]:<5.2f} {best:>16.2f}')
    for family, checks in summary['families'].items():
        arms = checks['arms']
        if 'speed' in checks:
            s = checks['speed']
            print(f'\n{FAMILIES[family].label}: {ARMS[arms["moe_jetpack"]].label} reaches the final accuracy of '
                  f'{ARMS[arms["moe_scratch"]].label} ({s["moe_scratch_final_mean"]:.2f}%) at epoch '
                  f'{s["moe_jetpack_epochs_to_reach_it"]} of {s["moe_scratch_epochs"]} (per seed: '
                  f'{s["per_seed_epochs_to_reach"]}); at most half the epochs: {s["claim_at_most_half_the_epochs"]}')
        if 'accuracy' in checks:
            a = checks['accuracy']
            print(f'{FAMILIES[family].label}: {ARMS[arms["moe_jetpack"]].label} final '
                  f'{a["moe_jetpack_final_mean"]:.2f}% vs {ARMS[arms["dense_pretrained"]].label} '
                  f'{a["dense_pretrained_final_mean"]:.2f}%; at or above: {a["claim_at_or_above_dense_pretrained"]}')

    result = {
        'seeds': args.seeds,
        'strategy': args.strategy,
        'data': {'upstream_classes': UPSTREAM_CLASSES, 'downstream_classes': DOWNSTREAM_CLASSES, **sizes,
                 'image_size': {f: FAMILIES[f].image_size for f in families}},
        'models': {**{name: {'model': d.model_name, **d.kwargs} for name, d in DONORS.items()},
                   'vit_moe': MOE, 'convnext_moe': CONVNEXT_MOE},
        'recipe': {'pretrain': vars(PRETRAIN), 'downstream': vars(cfg),
                   'pretrained_arms_layer_decay': PRETRAINED_LAYER_DECAY},
        'donor_upstream_acc': {k: _mean_std(v) for k, v in donor_acc.items() if v},
        'curves': curves,
        'summary': summary,
        'seconds': time.perf_counter() - start,
        'environment': {'torch': torch.__version__, 'threads': args.threads, 'python': sys.version.split()[0],
                        'machine': platform.machine()},
    }
    os.makedirs(args.out_dir, exist_ok=True)
    json_path = os.path.join(args.out_dir, 'convergence.json')
    atomic_write_bytes(json.dumps(result, indent=1, default=list).encode(), json_path)
    png_path = os.path.join(args.out_dir, 'convergence.png')
    plot_curves(curves, png_path, f'Digits 5-9 ({sizes["downstream_train"]} labelled images), '
                                  f'mean +- std over {len(args.seeds)} seeds')
    print(f'\nwrote {json_path} and {png_path} ({result["seconds"]:.0f}s)')
    if any(math.isnan(c[-1]) for runs in curves.values() for c in runs):
        raise SystemExit('a run produced NaN accuracy')
    return result


if __name__ == '__main__':
    from benchmarks.entry import run_main
    run_main(main, 'python -m benchmarks.convergence', needs=[('matplotlib.pyplot', 'plot', 'the convergence plot')])
