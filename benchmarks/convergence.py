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
    epochs_to_reach,
    load_data,
    pretrain_donor,
    run_arm,
)
from benchmarks.digits.train_loop import FinetuneConfig
from timm_moejet.checkpoint_io import atomic_write_bytes

RUNS_FORMAT = 1
DEFAULT_STRATEGY = 'importance'


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
    print(f'{sum(len(v) for v in runs["runs"].values())} runs in {out_dir}')
    return runs


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
    main()
