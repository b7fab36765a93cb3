""" One-command demo: MoE Jetpack end to end on real data, on the CPU, in a few minutes.

    python -m benchmarks.digits.demo

1. Pre-trains two small dense ViT donors (narrow: width 32, wide: width 64) on the upstream digits 0-4.
2. Measures activation statistics of the wide donor on upstream images and recycles both donors into a SpheroMoE
   ViT (trunk from the narrow donor, 8 core + 16 universal experts per MoE layer cut from the wide donor's MLPs).
3. Fine-tunes it on the downstream digits 5-9 (180 labelled images) next to a SpheroMoE ViT from random init and
   the narrow dense donor, with the same recipe, and prints the accuracy after every epoch.

With ``--out-dir`` the donors, the statistics and the recycled and fine-tuned MoE models are kept as safetensors.
"""
import argparse
import os
import sys
import tempfile
import time
from typing import Dict, List, Optional, Sequence

import torch

from timm_moejet.checkpoint_io import save_safetensors_atomic
from timm_moejet.cost import count_params
from timm_moejet.recycling import ActivationStats, RecyclingRecipe, collect_statistics, recycle_into

from .experiment import (
    ARMS,
    DOWNSTREAM,
    DOWNSTREAM_CLASSES,
    MOE,
    PRETRAIN,
    PRETRAINED_LAYER_DECAY,
    UPSTREAM_CLASSES,
    _calibration_batches,
    load_data,
    moe_model,
    pretrain_donor,
    run_arm,
)
from .train_loop import FinetuneConfig, evaluate

DEMO_ARMS = ('moe_jetpack', 'moe_scratch', 'dense_donor')


def _log(msg: str, start: float) -> None:
    print(f'[{time.perf_counter() - start:6.1f}s] {msg}', flush=True)


def conclusions(curves: Dict[str, List[float]]) -> List[str]:
    """What the demo shows, checked on this run's curves: the part of the output that should not depend on the CPU.

    The accuracies, and so the epoch at which MoE Jetpack passes the SpheroMoE trained from scratch, differ between
    CPUs (the order of float sums follows the vector instructions); what should hold everywhere is checked: the
    ranking of the final accuracies, and MoE Jetpack passing the scratch MoE's final accuracy within half the epochs.
    """
    epochs = len(curves['moe_jetpack'])
    ranked = sorted(curves, key=lambda arm: curves[arm][-1], reverse=True)
    expected = ('moe_jetpack', 'dense_donor', 'moe_scratch')
    ranking = ' > '.join(f'{ARMS[arm].label} {curves[arm][-1]:.1f}%' for arm in ranked)
    lines = ['\nconclusions (the accuracies and the epoch vary between CPUs; both checks should say yes):',
             f'- final accuracy, highest first: {ranking}',
             f'  MoE Jetpack first and the MoE from scratch last: {"yes" if tuple(ranked) == expected else "no"}']
    scratch_final = curves['moe_scratch'][-1]
    reach = next((i + 1 for i, a in enumerate(curves['moe_jetpack']) if a >= scratch_final), None)
    if reach is None:
        lines += [f'- MoE Jetpack did not reach the final accuracy of the MoE from scratch ({scratch_final:.1f}%) '
                  f'in {epochs} epochs', '  within half the epochs, as the paper claims: no']
    else:
        lines += [f'- MoE Jetpack reached the final accuracy of the MoE from scratch ({scratch_final:.1f}%) at '
                  f'epoch {reach} of {epochs}',
                  f'  within half the epochs, as the paper claims: {"yes" if reach <= epochs / 2 else "no"}']
    return lines


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, List[float]]:
    parser = argparse.ArgumentParser(
        prog='python -m benchmarks.digits.demo', description='MoE Jetpack on the scikit-learn digits, end to end.')
    parser.add_argument('--epochs', type=int, default=15, help='downstream fine-tuning epochs (default 15)')
    parser.add_argument('--donor-epochs', type=int, default=PRETRAIN.epochs,
                        help=f'upstream pre-training epochs of each donor (default {PRETRAIN.epochs})')
    parser.add_argument('--seed', type=int, default=0)
    # one thread: these models are tiny, and extra threads only spin when the CPU is shared (10x slower measured)
    parser.add_argument('--threads', type=int, default=1, help='torch CPU threads (default 1)')
    parser.add_argument('--out-dir', default=None, help='keep donors, statistics and MoE weights here')
    args = parser.parse_args(argv)
    for name in ('epochs', 'donor_epochs'):
        if getattr(args, name) < 1:
            parser.error(f'--{name.replace("_", "-")} must be >= 1, got {getattr(args, name)}.')
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    out_dir = args.out_dir or tempfile.mkdtemp(prefix='moejet-demo-')
    os.makedirs(out_dir, exist_ok=True)

    data = load_data()
    sizes = data.sizes()
    _log(f'digits (scikit-learn, real 8x8 scans): upstream classes {UPSTREAM_CLASSES} '
         f'({sizes["upstream_train"]} train / {sizes["upstream_test"]} test), downstream classes '
         f'{DOWNSTREAM_CLASSES} ({sizes["downstream_train"]} labelled / {sizes["downstream_test"]} test)', start)

    # 1. donors
    donors, paths = {}, {}
    donor_cfg = FinetuneConfig(**dict(vars(PRETRAIN), epochs=args.donor_epochs))
    for width in ('narrow', 'wide'):
        def progress(epoch: int, loss: float, acc: float, width: str = width) -> None:
            if (epoch + 1) % 10 == 0 or epoch + 1 == args.donor_epochs:
                _log(f'  {width} donor epoch {epoch + 1}: loss {loss:.3f}, upstream test acc {acc:.1f}%', start)
        _log(f'1. pre-training the {width} dense donor upstream ...', start)
        donors[width], acc = pretrain_donor(width, data, args.seed, on_epoch=progress, cfg=donor_cfg)
        paths[width] = path = os.path.join(out_dir, f'donor_{width}.safetensors')
        save_safetensors_atomic(donors[width].state_dict(), path, overwrite=True)
        _log(f'  {width} donor: {count_params(donors[width])["total"] / 1e3:.0f}k params, upstream test acc '
             f'{acc:.1f}% -> {path}', start)

    # 2. recycling
    _log('2. activation statistics of the wide donor on upstream images (no downstream data) ...', start)
    stats = collect_statistics(donors['wide'], _calibration_batches(data.upstream_train[0]), progress=False,
                               donor_id='demo-wide-donor', coactivation=False)
    stats_path = os.path.join(out_dir, 'wide_donor_stats.safetensors')
    stats.save(stats_path)
    stats = ActivationStats.load(stats_path, donor_model=donors['wide'])
    torch.manual_seed(args.seed)
    moe = recycle_into(moe_model(), donors['narrow'].state_dict(), donors['wide'].state_dict(),
                       RecyclingRecipe(strategy='importance', seed=args.seed), stats=stats, trunk_id=paths['narrow'],
                       expert_id=paths['wide'])
    params = count_params(moe)
    layer = moe.blocks[MOE['moe_blocks'][0]].mlp
    _log(f'  recycled SpheroMoE ViT: {params["total"] / 1e3:.0f}k params ({params["experts"] / 1e3:.0f}k in experts), '
         f'MoE in blocks {list(MOE["moe_blocks"])}, {layer.num_core} core experts (hidden '
         f'{layer.core.fc1.weight.shape[1]}) + {layer.num_univ} universal (hidden {layer.univ.fc1.weight.shape[1]}) '
         f'per layer, cut from the wide donor\'s hidden {donors["wide"].blocks[0].mlp.fc1.out_features} x width '
         f'{donors["wide"].embed_dim}', start)
    _log(f'  recipe: {moe.pretrained_cfg["recycling"]}', start)
    save_safetensors_atomic(moe.state_dict(), os.path.join(out_dir, 'moe_recycled.safetensors'), overwrite=True)
    before = evaluate(moe, *data.downstream_test)
    _log(f'  downstream test acc before fine-tuning (new random head): {before:.1f}% (chance 20%)', start)

    # 3. fine-tuning
    cfg = FinetuneConfig(**dict(vars(DOWNSTREAM), epochs=args.epochs))
    _log(f'3. fine-tuning on digits 5-9 for {args.epochs} epochs (AdamW lr {cfg.lr}, cosine, warmup '
         f'{cfg.warmup_epochs}, label smoothing {cfg.label_smoothing}; pre-trained models with layer decay '
         f'{PRETRAINED_LAYER_DECAY}, MoE layers at full lr) ...', start)
    curves: Dict[str, List[float]] = {}
    for arm in DEMO_ARMS:
        def progress(epoch: int, loss: float, acc: float, arm: str = arm) -> None:
            _log(f'  {ARMS[arm].label:<30} epoch {epoch + 1:>3}: train loss {loss:.3f}, test acc {acc:5.1f}%', start)
        curves[arm] = run_arm(arm, data, args.seed, donors=donors, cfg=cfg, on_epoch=progress,
                              model=moe if arm == 'moe_jetpack' else None)
    save_safetensors_atomic(moe.state_dict(), os.path.join(out_dir, 'moe_finetuned.safetensors'), overwrite=True)

    print('\nsummary (downstream test accuracy, %):')
    print(f'{"model":<32}{"epoch 1":>9}{"best":>8}{"final":>8}')
    for arm, curve in curves.items():
        print(f'{ARMS[arm].label:<32}{curve[0]:>9.1f}{max(curve):>8.1f}{curve[-1]:>8.1f}')
    for line in conclusions(curves):
        print(line)
    print(f'files in {out_dir}: {", ".join(sorted(os.listdir(out_dir)))}')
    print(f'done in {time.perf_counter() - start:.0f}s. Full comparison over seeds: python -m benchmarks.convergence')
    return curves


if __name__ == '__main__':
    from benchmarks.entry import run_main
    sys.exit(0 if run_main(main, 'python -m benchmarks.digits.demo') else 1)
