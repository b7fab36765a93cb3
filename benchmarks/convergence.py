""" Convergence on real data: the paper's comparison (Fig. 5) in miniature, on scikit-learn's digits.

Four arms are fine-tuned on the same downstream data with the same recipe and epochs:

* ``dense_scratch``: the narrow dense ViT from random init;
* ``dense_donor``: the narrow dense ViT from the donor pre-trained upstream (the usual transfer baseline);
* ``moe_scratch``: the SpheroMoE ViT from random init;
* ``moe_jetpack``: the SpheroMoE ViT recycled from the donors (trunk from the narrow donor, experts cut from the
  wide donor's MLPs with the ``importance`` strategy over activation statistics of upstream images).

For each seed, both donors are first pre-trained on the upstream classes (digits 0-4); the arms then train on the
downstream classes (digits 5-9, 20% of the images labelled, the rest held out for testing). Sizes and the split are
in ``benchmarks/digits/experiment.py`` and the README ("Convergence on real data").

Prints per-arm progress, the per-epoch mean test accuracy, a final table (mean and std over seeds) and the two
checks of the paper's claim; writes JSON and a PNG of the curves.

Examples::

    python -m benchmarks.convergence                                  # 3 seeds, about 10 minutes on 2 CPU cores
    python -m benchmarks.convergence --seeds 0 1 2 3 4 --out-dir /tmp/conv
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
    ARM_LABELS,
    ARMS,
    DOWNSTREAM,
    DOWNSTREAM_CLASSES,
    MOE,
    NARROW,
    PRETRAIN,
    PRETRAINED_LAYER_DECAY,
    UPSTREAM_CLASSES,
    WIDE,
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


def summarize(curves: Dict[str, List[List[float]]]) -> Dict[str, object]:
    """Mean curves, final accuracy stats and the paper's two checks, from ``curves[arm][seed][epoch]``."""
    mean_curves = {arm: [statistics.fmean(c[e] for c in runs) for e in range(len(runs[0]))]
                   for arm, runs in curves.items()}
    final = {arm: _mean_std([c[-1] for c in runs]) for arm, runs in curves.items()}
    summary: Dict[str, object] = {'mean_curves': mean_curves, 'final': final}
    if 'moe_scratch' in curves and 'moe_jetpack' in curves:
        epochs = len(mean_curves['moe_scratch'])
        target = final['moe_scratch']['mean']
        reach = epochs_to_reach(mean_curves['moe_jetpack'], target)
        per_seed = [epochs_to_reach(j, s[-1]) for j, s in zip(curves['moe_jetpack'], curves['moe_scratch'])]
        summary['speed'] = {
            'moe_scratch_final_mean': target,
            'moe_jetpack_epochs_to_reach_it': reach,
            'moe_scratch_epochs': epochs,
            'speedup': epochs / reach if reach else None,
            'per_seed_epochs_to_reach': per_seed,
            'claim_at_most_half_the_epochs': reach is not None and reach <= epochs / 2,
        }
    if 'dense_donor' in curves and 'moe_jetpack' in curves:
        summary['accuracy'] = {
            'moe_jetpack_final_mean': final['moe_jetpack']['mean'],
            'dense_donor_final_mean': final['dense_donor']['mean'],
            'claim_at_or_above_dense_donor': final['moe_jetpack']['mean'] >= final['dense_donor']['mean'],
        }
    return summary


def plot_curves(curves: Dict[str, List[List[float]]], path: str, title: str) -> None:
    """Mean test accuracy per epoch with a +-1 std band, one line per arm."""
    import io

    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for arm, runs in curves.items():
        n = len(runs[0])
        x = list(range(1, n + 1))
        mean = [statistics.fmean(c[e] for c in runs) for e in range(n)]
        std = [statistics.stdev(c[e] for c in runs) if len(runs) > 1 else 0. for e in range(n)]
        ax.plot(x, mean, label=ARM_LABELS[arm], lw=2 if arm == 'moe_jetpack' else 1.5)
        ax.fill_between(x, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], alpha=0.15)
    ax.set_xlabel('fine-tuning epoch')
    ax.set_ylabel('downstream test accuracy (%)')
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc='lower right', fontsize=9)
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
    need_donors = any(ARMS[a][1] for a in args.arms)

    data = load_data()
    print(f'digits: upstream classes {UPSTREAM_CLASSES}, downstream classes {DOWNSTREAM_CLASSES}; sizes {data.sizes()}')
    start = time.perf_counter()
    curves: Dict[str, List[List[float]]] = {arm: [] for arm in args.arms}
    donor_acc: Dict[str, List[float]] = {'narrow': [], 'wide': []}
    for seed in args.seeds:
        donors = {}
        if need_donors:
            for width in ('narrow', 'wide'):
                donors[width], acc = pretrain_donor(width, data, seed)
                donor_acc[width].append(acc)
                print(f'[seed {seed}] {width} donor pre-trained upstream: test acc {acc:.1f}%  '
                      f'({time.perf_counter() - start:.0f}s)', flush=True)
        for arm in args.arms:
            curve = run_arm(arm, data, seed, donors=donors, strategy=args.strategy, cfg=cfg)
            curves[arm].append(curve)
            shown = ' '.join(f'{a:.0f}' for a in curve)
            print(f'[seed {seed}] {arm:<13} final {curve[-1]:5.1f}%  per epoch: {shown}  '
                  f'({time.perf_counter() - start:.0f}s)', flush=True)

    summary = summarize(curves)
    print('\nmean test accuracy (%) per epoch over seeds ' + str(args.seeds))
    print('epoch ' + ''.join(f'{a:>15}' for a in args.arms))
    for e in range(args.epochs):
        print(f'{e + 1:>5} ' + ''.join(f'{summary["mean_curves"][a][e]:>15.1f}' for a in args.arms))
    print(f'\n{"arm":<30} {"final acc (%)":>18} {"best epoch mean":>16}')
    for arm in args.arms:
        f = summary['final'][arm]
        best = max(summary['mean_curves'][arm])
        print(f'{ARM_LABELS[arm]:<30} {f["mean"]:>10.2f} +- {f["std"]:<5.2f} {best:>16.2f}')
    if 'speed' in summary:
        s = summary['speed']
        print(f'\nMoE Jetpack reaches SpheroMoE-from-scratch final accuracy ({s["moe_scratch_final_mean"]:.2f}%) at '
              f'epoch {s["moe_jetpack_epochs_to_reach_it"]} of {s["moe_scratch_epochs"]} (per seed: '
              f'{s["per_seed_epochs_to_reach"]}); at most half the epochs: {s["claim_at_most_half_the_epochs"]}')
    if 'accuracy' in summary:
        a = summary['accuracy']
        print(f'MoE Jetpack final {a["moe_jetpack_final_mean"]:.2f}% vs dense from donor '
              f'{a["dense_donor_final_mean"]:.2f}%; at or above: {a["claim_at_or_above_dense_donor"]}')

    result = {
        'seeds': args.seeds,
        'strategy': args.strategy,
        'data': {'upstream_classes': UPSTREAM_CLASSES, 'downstream_classes': DOWNSTREAM_CLASSES, **data.sizes()},
        'models': {'narrow': NARROW, 'wide': WIDE, 'moe': MOE},
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
    plot_curves(curves, png_path, f'Digits 5-9 ({data.sizes()["downstream_train"]} labelled images), '
                                  f'mean +- std over {len(args.seeds)} seeds')
    print(f'\nwrote {json_path} and {png_path} ({result["seconds"]:.0f}s)')
    if any(math.isnan(c[-1]) for runs in curves.values() for c in runs):
        raise SystemExit('a run produced NaN accuracy')
    return result


if __name__ == '__main__':
    main()
