""" Pruning experts by their measured routing, on real data: accuracy against the fraction of experts kept.

For each seed, the recycled MoE model of a family (``moe_jetpack``: V-JetMoE, ``convnext_jetpack``: C-JetMoE) is
built and fine-tuned on the downstream digits exactly as ``benchmarks/convergence.py`` does (same donors, recipe,
seed), then its routing is measured on the downstream training images (``timm_moejet.pruning.measure_routing``) and
it is pruned to 100%, 75%, 50% and 25% of the experts of every group (``timm_moejet.prune_experts``). Each pruned
model is tested as it is and after a short fine-tune (``SHORT``) on the same training images. The report gives,
per fraction, the paired difference of test accuracy to the unpruned model (mean and 95% t-interval over seeds,
``benchmarks/paired.py``), the parameters and GMACs (``timm_moejet/cost.py``), and the share of the measured output
mass the kept experts carried.

``--cpu-time`` times the eval forward of an untrained ``moejet_vit_tiny`` against the same model pruned to 50% on
this machine's CPU, interleaved in one run (the expert counts, not the weights, set the time).

Examples::

    python -m benchmarks.pruning --family vit --seeds 0 1 2 3 4 5 6 7 8 9
    python -m benchmarks.pruning --family convnext --seeds 0 1 2
    python -m benchmarks.pruning --cpu-time
    python -m benchmarks.pruning --report-only
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

from benchmarks.convergence import _donor, _save_runs
from benchmarks.digits.experiment import ARMS, FAMILIES, PRETRAIN, load_data, pretrain_donor, run_arm
from benchmarks.digits.train_loop import FinetuneConfig, evaluate, train_classifier
from benchmarks.paired import paired_difference
from timm_moejet import prune_experts
from timm_moejet.checkpoint_io import write_json
from timm_moejet.cost import count_macs, count_params
from timm_moejet.pruning import measure_routing

FRACTIONS = (1.0, 0.75, 0.5, 0.25)
ARM_OF = {'vit': 'moe_jetpack', 'convnext': 'convnext_jetpack'}
# the short fine-tune after pruning: the downstream recipe's lr and layer decay, 5 epochs, 1 of warmup
SHORT = FinetuneConfig(epochs=5, batch_size=32, lr=1e-3, warmup_epochs=1, layer_decay=0.6)
# the MoE arms train with drop path 0.1 (benchmarks/digits/experiment.py); the pruned model's short fine-tune too
DROP_PATH = 0.1
RUNS_FORMAT = 1


def _recipe() -> Dict[str, object]:
    return {'fractions': list(FRACTIONS), 'short_finetune': vars(SHORT), 'arms': ARM_OF,
            'routing_images': 'downstream training images (digits 5-9, 20% of each class)'}


def _load(path: str) -> Dict[str, object]:
    if not os.path.exists(path):
        return {'format': RUNS_FORMAT, 'recipe': json.loads(json.dumps(_recipe())), 'runs': {}, 'donors': {},
                'sessions': []}
    with open(path) as f:
        runs = json.load(f)
    if runs.get('recipe') != json.loads(json.dumps(_recipe())):
        raise SystemExit(f'{path} holds runs of another recipe; pass another --out-dir.')
    return runs


def _batches(images: torch.Tensor, size: int = 128) -> List[torch.Tensor]:
    return [images[i:i + size] for i in range(0, len(images), size)]


def _short_donor(name: str, data, seed: int, epochs: int, cache: Optional[str]) -> torch.nn.Module:
    """A donor pre-trained upstream for ``epochs`` instead of the convergence recipe's (kept in ``cache``)."""
    from safetensors.torch import load_file

    from benchmarks.digits.experiment import DONORS, UPSTREAM_CLASSES, dense_model
    from timm_moejet.checkpoint_io import save_safetensors_atomic

    cached = os.path.join(cache, f'{name}_seed{seed}_epochs{epochs}.safetensors') if cache else None
    if cached and os.path.exists(cached):
        model = dense_model(name, num_classes=len(UPSTREAM_CLASSES))
        model.load_state_dict(load_file(cached))
        return model.eval()
    model, acc = pretrain_donor(name, data[DONORS[name].family], seed,
                                cfg=FinetuneConfig(**dict(vars(PRETRAIN), epochs=epochs)))
    if cached:
        os.makedirs(cache, exist_ok=True)
        save_safetensors_atomic({k: v.contiguous() for k, v in model.state_dict().items()}, cached)
    print(f'[seed {seed}] donor {name} pre-trained upstream for {epochs} epochs: test acc {acc:.1f}%', flush=True)
    return model


def run_seed(family: str, seed: int, data, donors: Dict[str, torch.nn.Module]) -> Dict[str, object]:
    """Fine-tune the family's recycled arm, measure its routing, prune it to each fraction; the figures."""
    arm = ARM_OF[family]
    start = time.perf_counter()
    torch.manual_seed(seed)
    model = ARMS[arm].build(data, seed, donors, 'importance')
    curve = run_arm(arm, data, seed, donors=donors, model=model)
    routing = measure_routing(model, _batches(data.downstream_train[0]), name=f'digits {arm} seed {seed}',
                              images_described='digits 5-9, downstream training images', seed=seed)
    size = (3, FAMILIES[family].image_size, FAMILIES[family].image_size)
    record: Dict[str, object] = {'unpruned': curve[-1], 'curve': curve, 'fractions': {}}
    for fraction in FRACTIONS:
        pruned = prune_experts(model, routing, keep=fraction, drop_path_rate=DROP_PATH)
        before = evaluate(pruned, *data.downstream_test)
        params = count_params(pruned)
        gmacs = count_macs(pruned, size)['gmacs']
        share = statistics.fmean(layer['kept_share'] for layer in pruned.pretrained_cfg['pruning']['layers'])
        after = train_classifier(pruned, data.downstream_train, data.downstream_test, SHORT, seed=seed)[-1]
        record['fractions'][str(fraction)] = {
            'before': before, 'after': after, 'params': params['total'], 'expert_params': params['experts'],
            'gmacs': gmacs, 'kept_share': share,
            'experts': [[len(layer['kept_core']), len(layer['kept_univ'])]
                        for layer in pruned.pretrained_cfg['pruning']['layers']]}
    record['seconds'] = time.perf_counter() - start
    return record


def compare(runs: Dict[str, object]) -> Dict[str, object]:
    """Per family and fraction: paired differences to the unpruned model (before and after the short fine-tune),
    and to the unpruned model given the same short fine-tune (fraction 1.0 after it)."""
    out = {}
    for family, by_seed in runs['runs'].items():
        seeds = sorted(by_seed, key=int)
        if not seeds:
            continue
        unpruned = [by_seed[s]['unpruned'] for s in seeds]
        rows = []
        for fraction in FRACTIONS:
            f = str(fraction)
            before = [by_seed[s]['fractions'][f]['before'] for s in seeds]
            after = [by_seed[s]['fractions'][f]['after'] for s in seeds]
            control = [by_seed[s]['fractions']['1.0']['after'] for s in seeds]
            first = by_seed[seeds[0]]['fractions'][f]
            row = {'fraction': fraction, 'n': len(seeds), 'experts': first['experts'], 'params': first['params'],
                   'gmacs': first['gmacs'], 'kept_share': statistics.fmean(by_seed[s]['fractions'][f]['kept_share']
                                                                          for s in seeds),
                   'before_mean': statistics.fmean(before), 'after_mean': statistics.fmean(after)}
            if len(seeds) > 1:
                row['before'] = paired_difference(before, unpruned).as_dict()
                row['after'] = paired_difference(after, unpruned).as_dict()
                row['after_vs_finetuned'] = paired_difference(after, control).as_dict()
            rows.append(row)
        out[family] = {'seeds': [int(s) for s in seeds], 'unpruned_mean': statistics.fmean(unpruned),
                       'rows': rows}
    return out


def _interval(d: Optional[Dict[str, float]]) -> str:
    return '-' if not d else f'{d["mean"]:+.2f} [{d["low"]:+.2f}, {d["high"]:+.2f}]'


def markdown_table(comparison: Dict[str, object]) -> str:
    lines = []
    for family, c in comparison.items():
        rows = c['rows']
        base = rows[0]
        lines += [f'{FAMILIES[family].label}: {len(c["seeds"])} seeds ({", ".join(map(str, c["seeds"]))}); unpruned '
                  f'test accuracy {c["unpruned_mean"]:.2f}% (mean).', '',
                  '| experts kept | experts per layer (core+univ) | params | GMACs | output mass kept | accuracy '
                  '(pruned) | minus unpruned | after short fine-tune | minus unpruned | minus unpruned + same '
                  'fine-tune |', '|---|---|---|---|---|---|---|---|---|---|']
        for r in rows:
            experts = ', '.join(f'{a}+{b}' for a, b in r['experts'])
            lines.append(
                f'| {r["fraction"]:.0%} | {experts} | {r["params"] / 1e3:.1f}K ({r["params"] / base["params"]:.0%}) '
                f'| {r["gmacs"] * 1e3:.2f}M ({r["gmacs"] / base["gmacs"]:.0%}) | {r["kept_share"]:.1%} | '
                f'{r["before_mean"]:.2f}% | {_interval(r.get("before"))} | {r["after_mean"]:.2f}% | '
                f'{_interval(r.get("after"))} | {_interval(r.get("after_vs_finetuned"))} |')
        lines.append('')
    return '\n'.join(lines)


def plot(comparison: Dict[str, object], path: str) -> None:
    """Paired accuracy difference to the unpruned model against the fraction kept, before and after fine-tuning."""
    from timm_moejet.plotting import new_figure, save_png

    families = [f for f in comparison if all('before' in r for r in comparison[f]['rows'])]
    fig = new_figure('the pruning plot', (6 * max(1, len(families)), 4.2))
    axes = fig.subplots(1, max(1, len(families)), squeeze=False, sharey=True)
    for ax, family in zip(axes[0], families):
        rows = comparison[family]['rows']
        x = [100 * r['fraction'] for r in rows]
        for key, label, offset in (('before', 'pruned, as is', -0.8), ('after', 'pruned + short fine-tune', 0.8)):
            mean = [r[key]['mean'] for r in rows]
            err = [[r[key]['mean'] - r[key]['low'] for r in rows], [r[key]['high'] - r[key]['mean'] for r in rows]]
            ax.errorbar([v + offset for v in x], mean, yerr=err, marker='o', capsize=3, label=label)
        ax.axhline(0., color='k', lw=0.8)
        ax.axhline(-1., color='grey', lw=0.8, ls='--')
        ax.set_xlabel('experts kept per group (%)')
        ax.set_xticks(x)
        ax.set_title(f'{FAMILIES[family].label}, {len(comparison[family]["seeds"])} seeds', fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc='lower right')
    axes[0][0].set_ylabel('test accuracy minus unpruned (points), 95% CI')
    save_png(fig, path, dpi=120)


def cpu_time(repeats: int = 7, batch_size: int = 8, threads: int = 1) -> Dict[str, object]:
    """Eval forward time of an untrained ``moejet_vit_tiny`` and of it pruned to 50%, interleaved, on the CPU."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model('moejet_vit_tiny').eval()
    images = torch.randn(batch_size, 3, 224, 224)
    routing = measure_routing(model, images, name='moejet_vit_tiny (untrained)',
                              images_described=f'{batch_size} Gaussian images', seed=0)
    pruned = prune_experts(model, routing, keep=0.5)
    models = {'unpruned': model, 'pruned_50': pruned}
    times: Dict[str, List[float]] = {k: [] for k in models}
    with torch.inference_mode():
        for m in models.values():
            m(images)  # warm-up
        for _ in range(repeats):
            for name, m in models.items():
                start = time.perf_counter()
                m(images)
                times[name].append(time.perf_counter() - start)
    out = {'threads': threads, 'batch_size': batch_size, 'repeats': repeats, 'machine': platform.machine(),
           'torch': torch.__version__}
    for name, m in models.items():
        out[name] = {'params': count_params(m)['total'], 'gmacs': count_macs(m)['gmacs'],
                     'median_s': statistics.median(times[name]), 'min_s': min(times[name]),
                     'max_s': max(times[name]), 'times_s': times[name]}
    out['time_ratio'] = out['pruned_50']['median_s'] / out['unpruned']['median_s']
    out['params_ratio'] = out['pruned_50']['params'] / out['unpruned']['params']
    return out


def report(runs: Dict[str, object], out_dir: str) -> Dict[str, object]:
    comparison = compare(runs)
    print(markdown_table(comparison))
    result = {'comparison': comparison, 'runs_file': 'pruning_runs.json'}
    cpu_path = os.path.join(out_dir, 'pruning_cpu_time.json')
    if os.path.exists(cpu_path):
        with open(cpu_path) as f:
            result['cpu_time'] = json.load(f)
    write_json(result, os.path.join(out_dir, 'pruning.json'))
    if any(all('before' in r for r in c['rows']) for c in comparison.values()):
        plot(comparison, os.path.join(out_dir, 'pruning.png'))
        print(f'wrote {out_dir}/pruning.json and pruning.png')
    else:
        print(f'wrote {out_dir}/pruning.json')
    return result


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--family', choices=list(ARM_OF), default='vit')
    parser.add_argument('--seeds', type=int, nargs='+', default=list(range(10)))
    parser.add_argument('--threads', type=int, default=1, help='torch CPU threads (default 1)')
    parser.add_argument('--out-dir', default=os.path.join('benchmarks', 'results'))
    parser.add_argument('--donor-cache', default=None, help='folder keeping the pre-trained donors')
    parser.add_argument('--pretrain-epochs', type=int, default=PRETRAIN.epochs,
                        help='upstream epochs of the donors (default: the convergence recipe\'s; fewer saves time, '
                             'and is recorded with each run)')
    parser.add_argument('--cpu-time', action='store_true', help='time moejet_vit_tiny pruned to 50%% vs unpruned')
    parser.add_argument('--report-only', action='store_true', help='run nothing: report the runs already there')
    args = parser.parse_args(argv)
    if args.threads < 1 or min(args.seeds) < 0:
        parser.error('--threads must be at least 1 and every --seed at least 0')
    path = os.path.join(args.out_dir, 'pruning_runs.json')
    if args.report_only and not os.path.exists(path):
        parser.error(f'--report-only: {path} does not exist (no runs to report; check --out-dir)')
    torch.set_num_threads(args.threads)
    os.makedirs(args.out_dir, exist_ok=True)
    if args.cpu_time:
        result = cpu_time(threads=args.threads)
        write_json(result, os.path.join(args.out_dir, 'pruning_cpu_time.json'))
        print(json.dumps({k: v for k, v in result.items() if k not in ('unpruned', 'pruned_50')}),
              {k: {m: result[k][m] for m in ('params', 'gmacs', 'median_s', 'min_s', 'max_s')}
               for k in ('unpruned', 'pruned_50')})
        return result
    runs = _load(path)
    todo = [s for s in args.seeds if str(s) not in runs['runs'].get(args.family, {})]
    if todo and not args.report_only:
        session = time.perf_counter()
        data = {args.family: load_data(image_size=FAMILIES[args.family].image_size)}
        for seed in todo:
            donors = {name: _donor(name, data, seed, runs, args.donor_cache) if args.pretrain_epochs == PRETRAIN.epochs
                      else _short_donor(name, data, seed, args.pretrain_epochs, args.donor_cache)
                      for name in ARMS[ARM_OF[args.family]].donors}
            record = dict(run_seed(args.family, seed, data[args.family], donors), pretrain_epochs=args.pretrain_epochs)
            runs['runs'].setdefault(args.family, {})[str(seed)] = record
            _save_runs(runs, path)
            shown = '  '.join(f'{f}: {r["before"]:.1f}/{r["after"]:.1f}' for f, r in record['fractions'].items())
            print(f'[{args.family} seed {seed}] unpruned {record["unpruned"]:.1f}%  kept fraction: pruned/fine-tuned '
                  f'{shown}  ({record["seconds"]:.0f}s)', flush=True)
        runs['sessions'].append({'family': args.family, 'seeds': todo, 'seconds': time.perf_counter() - session,
                                 'threads': args.threads, 'torch': torch.__version__,
                                 'python': sys.version.split()[0]})
        _save_runs(runs, path)
    return report(_load(path), args.out_dir)


if __name__ == '__main__':
    from benchmarks.entry import run_main
    run_main(main, 'python -m benchmarks.pruning', needs=[('matplotlib.pyplot', 'plot', 'the pruning plot')])
