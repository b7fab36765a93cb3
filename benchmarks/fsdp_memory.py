""" Training state per rank and bytes moved per step, DDP against FSDP2, from the models' real parameter counts.

    python -m benchmarks.fsdp_memory [--ranks 1 2 8 64] [--models ...]

Every model is built on the meta device (no memory, no weights) and counted; FSDP2's shards are those
``timm_moejet.training.plan_shards`` gives (the largest shard of every parameter). Per rank, AdamW in float32:

* DDP: weights 4P + gradients 4P + AdamW moments 8P, plus DDP's gradient buckets 4P (timm's train.py leaves
  ``gradient_as_bucket_view`` off) = 20P bytes on every rank, whatever the number of ranks.
* FSDP2: 16 bytes per local element (weights, gradients, moments of the shard), plus, while a unit runs, its gathered
  weights and gradients: at most about 3 units' worth (the unit, the next one prefetched, its unsharded gradient),
  which the table gives as 12 bytes per element of the largest unit.

Bytes sent per rank per step (ring collectives, N ranks, f = (N - 1) / N): DDP all-reduces the gradients,
2f x 4P; FSDP2 all-gathers the weights in the forward and again in the backward (reshard_after_forward) and
reduce-scatters the gradients, 3f x 4P (2f x 4P without resharding after the forward).
"""
import argparse
from typing import List, Sequence

import timm
import torch

import timm_moejet  # noqa: F401  (registers the models)
from timm_moejet.cost import num_params
from timm_moejet.training import plan_shards

MODELS = ('moejet_vit_tiny', 'moejet_vit_small', 'moejet_vit_base', 'moejet_convnext_femto')
RANKS = (1, 2, 8, 64)


def _gb(n: float) -> str:
    return f'{n / 1e9:.2f}' if n < 1e11 else f'{n / 1e9:.0f}'


def rows(models: Sequence[str], ranks: Sequence[int]) -> List[List[str]]:
    out = []
    for name in models:
        with torch.device('meta'):
            model = timm.create_model(name)
        total = num_params(model)
        for n in ranks:
            plan = plan_shards(model, n)
            local = plan.local_numel(model)
            unit = plan.largest_unit_numel(model)
            f = (n - 1) / n
            out.append([name, f'{total / 1e9:.3f}', str(n), _gb(20 * total), _gb(16 * local),
                        _gb(16 * local + 12 * unit), _gb(2 * f * 4 * total), _gb(2 * f * 2 * total),
                        _gb(3 * f * 4 * total), _gb(f * (2 + 2 + 4) * total)])
    return out


HEADER = ['model', 'params (B)', 'ranks', 'DDP state/rank', 'FSDP2 state/rank', 'FSDP2 peak/rank',
          'DDP sent/step', 'DDP bf16 hook sent/step', 'FSDP2 sent/step', 'FSDP2 bf16 sent/step']


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--models', nargs='+', default=list(MODELS))
    parser.add_argument('--ranks', nargs='+', type=int, default=list(RANKS))
    args = parser.parse_args()
    print('GB = 1e9 bytes per rank; AdamW, float32 state; sent = bytes each rank sends per optimizer step')
    print('| ' + ' | '.join(HEADER) + ' |')
    print('|' + '|'.join('---' for _ in HEADER) + '|')
    for row in rows(args.models, args.ranks):
        print('| ' + ' | '.join(row) + ' |')


if __name__ == '__main__':
    from benchmarks.entry import run_main
    run_main(main, 'python -m benchmarks.fsdp_memory')
