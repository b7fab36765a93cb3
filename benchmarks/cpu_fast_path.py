""" What the CPU fast paths are worth: one eager train step (forward + backward) of a MoE model, three ways.

- ``on``: the defaults (recycled gradient memory and lane-mask dropout on the CPU, weight gradient in its layout);
- ``switch off``: ``TIMM_MOEJET_CPU_FAST_PATH=0`` (what every other device runs: fresh gradient memory,
  ``F.dropout``), the weight gradient still in its layout;
- ``plain``: also autograd's own ``bmm`` backward for the experts (the gradient of ``W^T``, then a transposed copy).

Each is timed against the dense twin in the same run, interleaved (dense, on, switch off, plain, repeated), and
reported as the median with its range and as a ratio to the dense median.

    python -m benchmarks.cpu_fast_path [--model moejet_vit_tiny] [--dense vit_tiny_patch16_224] [--batch-sizes 16 64]
"""
import argparse
import statistics
import time
from typing import Callable, Dict, List

import timm
import torch
import torch.nn as nn

import timm_moejet  # noqa: F401  (registers the models)
from timm_moejet.layers import cpu_fast_path, expert_ops, experts

MODES = ('on', 'switch off', 'plain')


def _plain_linear(x: torch.Tensor, weight: torch.Tensor, bias, recycler=None) -> torch.Tensor:
    return expert_ops.batched_linear_in_weight_dtype(x, weight, bias)


def _set_mode(mode: str) -> None:
    cpu_fast_path.set_enabled(mode == 'on')
    experts.batched_linear_with_grad = _plain_linear if mode == 'plain' else expert_ops.batched_linear_with_grad


def _step_fn(model: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        model.zero_grad(set_to_none=True)  # as timm's train.py does before every step
        model(x).float().mean().backward()
    return step


def measure(model_name: str, dense_name: str, batch_size: int, repeats: int) -> Dict[str, List[float]]:
    """Seconds per step for the dense model and each mode of the MoE model, ``repeats`` interleaved rounds."""
    torch.manual_seed(0)
    moe, dense = timm.create_model(model_name).train(), timm.create_model(dense_name).train()
    x = torch.randn(batch_size, 3, *moe.pretrained_cfg['input_size'][1:])
    runs = [('dense', None, _step_fn(dense, x))] + [(m, m, _step_fn(moe, x)) for m in MODES]
    times: Dict[str, List[float]] = {name: [] for name, _, _ in runs}
    try:
        for name, mode, step in runs:  # warm-up: allocator, kernels, recycled memory
            _set_mode(mode or 'on')
            step()
        for _ in range(repeats):
            for name, mode, step in runs:
                _set_mode(mode or 'on')
                start = time.perf_counter()
                step()
                times[name].append(time.perf_counter() - start)
    finally:
        _set_mode('on')
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--model', default='moejet_vit_tiny')
    parser.add_argument('--dense', default='vit_tiny_patch16_224', help='the dense twin, timed in the same run')
    parser.add_argument('--batch-sizes', type=int, nargs='+', default=[16, 64])
    parser.add_argument('--repeats', type=int, default=5)
    parser.add_argument('--threads', type=int, default=2)
    args = parser.parse_args()
    for name in ('repeats', 'threads'):
        if getattr(args, name) < 1:
            parser.error(f'--{name} must be >= 1, got {getattr(args, name)}')
    if any(b < 1 for b in args.batch_sizes):
        parser.error(f'--batch-sizes must be >= 1, got {args.batch_sizes}')
    for flag, name in (('--model', args.model), ('--dense', args.dense)):
        if not timm.is_model(name):
            parser.error(f'{flag}: no timm model named {name!r}')
    torch.set_num_threads(args.threads)
    print(f'{args.model} against {args.dense}, eager forward+backward, float32, {args.threads} threads, '
          f'median of {args.repeats} interleaved rounds (range)\n')
    print('| batch | dense ms | ' + ' | '.join(f'{m} ms | {m} ratio' for m in MODES) + ' |')
    print('|---' * (2 + 2 * len(MODES)) + '|')
    for b in args.batch_sizes:
        times = measure(args.model, args.dense, b, args.repeats)
        med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        cells = [f'{med[m]:.0f} ({min(times[m]) * 1e3:.0f}-{max(times[m]) * 1e3:.0f}) | {med[m] / med["dense"]:.2f}x'
                 for m in MODES]
        print(f'| {b} | {med["dense"]:.0f} | ' + ' | '.join(cells) + ' |', flush=True)


if __name__ == '__main__':
    from benchmarks.entry import run_main
    run_main(main, 'python -m benchmarks.cpu_fast_path')
