""" Throughput of MoE models and layers as ratios to their dense twins, measured in one run.

For each pair (a MoE model or layer and its dense twin) this prints, and optionally writes as JSON: total and
active parameters; MACs per image with routing counted (torch's FLOP counter); eval images/s and train-step time,
each the median of repeats that interleave MoE and dense (order alternating; a repeat averages enough steps to
last ``--min-time``), with the MoE/dense ratio taken as the median of the per-repeat ratios; and the peak memory of
one train step.

A train step is forward + backward (gradients set to None before it), no optimizer step: the optimizer's cost
scales with the total parameter count, not with what the routing does. Peak memory is the parameters plus the
peak of what one train step allocates (CUDA: the allocator's peak; CPU: the profiler's allocation events).

Examples::

    python -m benchmarks.throughput                                   # CPU, 2 threads, all default pairs
    python -m benchmarks.throughput --pairs layer layer_softmax tiny --json benchmarks/results/cpu.json
    python -m benchmarks.throughput --device cuda --dtype bfloat16 --batch-size 256 --pairs tiny --compile
"""
import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from typing import Any, Callable, Dict, List, Optional, Sequence

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Mlp
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import timm_moejet  # noqa: F401  (registers the moejet_* models)
from timm_moejet.layers import SpheroMoE

# name -> what to build; 'layer' pairs use ViT-T shapes (197 tokens, width 192, MLP hidden 768)
PAIRS: Dict[str, Dict[str, Any]] = {
    'layer': dict(kind='layer', moe_kwargs=dict(), batch_size=32),
    'layer_softmax': dict(kind='layer', moe_kwargs=dict(combine='softmax'), batch_size=32),
    'tiny': dict(kind='model', moe='moejet_vit_tiny', dense='vit_tiny_patch16_224', batch_size=16),
    'small': dict(kind='model', moe='moejet_vit_small', dense='vit_small_patch16_224', batch_size=16),
}
DEFAULT_PAIRS = ('layer', 'layer_softmax', 'tiny', 'small')
LAYER_TOKENS, LAYER_DIM, LAYER_HIDDEN = 197, 192, 768


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--pairs', nargs='+', default=list(DEFAULT_PAIRS), choices=sorted(PAIRS),
                        help='pairs to measure (small builds a 1058M-parameter model, ~4.3 GB)')
    parser.add_argument('--device', default='cpu', choices=('cpu', 'cuda'))
    parser.add_argument('--dtype', default='float32', choices=('float32', 'bfloat16'),
                        help='bfloat16 runs the float32 models under autocast')
    parser.add_argument('--batch-size', type=int, default=None,
                        help='batch size for every pair (default: 32 for layers, 16 for models)')
    parser.add_argument('--compile', action='store_true', help='torch.compile both members of each pair')
    parser.add_argument('--threads', type=int, default=2, help='torch.set_num_threads (CPU)')
    parser.add_argument('--repeats', type=int, default=7, help='interleaved timed repeats (median is reported)')
    parser.add_argument('--warmup', type=int, default=2, help='untimed runs of each member before timing (>= 1)')
    parser.add_argument('--min-time', type=float, default=0.3,
                        help='seconds one timed sample lasts at least (the step is repeated and averaged)')
    parser.add_argument('--no-train', action='store_true', help='measure eval only')
    parser.add_argument('--json', default=None, help='write the results to this JSON file')
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args(argv)
    if args.batch_size is not None and args.batch_size < 1:
        parser.error(f'--batch-size must be >= 1, got {args.batch_size}')
    if args.repeats < 1:
        parser.error(f'--repeats must be >= 1, got {args.repeats}')
    if args.warmup < 1:
        parser.error(f'--warmup must be >= 1, got {args.warmup}')
    if args.threads < 1:
        parser.error(f'--threads must be >= 1, got {args.threads}')
    if args.device == 'cuda' and not torch.cuda.is_available():
        parser.error('--device cuda was asked for, but torch.cuda.is_available() is False')
    return args


class _Member:
    """One side of a pair: a module, an input maker and a loss."""

    def __init__(self, name: str, module: nn.Module, make_input: Callable[[], torch.Tensor], is_model: bool):
        self.name = name
        self.module = module
        self.make_input = make_input
        self.is_model = is_model
        self.runner: Callable[[torch.Tensor], torch.Tensor] = module


def build_pair(name: str, device: torch.device, batch_size: Optional[int]) -> List[_Member]:
    spec = PAIRS[name]
    b = batch_size or spec['batch_size']
    if spec['kind'] == 'layer':
        moe = SpheroMoE(LAYER_DIM, **spec['moe_kwargs'])
        dense = Mlp(LAYER_DIM, LAYER_HIDDEN)

        def make_input() -> torch.Tensor:
            return torch.randn(b, LAYER_TOKENS, LAYER_DIM, device=device)

        return [
            _Member(f'SpheroMoE({spec["moe_kwargs"] or "defaults"})', moe.to(device), make_input, False),
            _Member('Mlp', dense.to(device), make_input, False),
        ]
    members = []
    for model_name in (spec['moe'], spec['dense']):
        model = timm.create_model(model_name).to(device)
        input_size = model.pretrained_cfg['input_size']

        def make_input(input_size=input_size) -> torch.Tensor:
            return torch.randn(b, *input_size, device=device)

        members.append(_Member(model_name, model, make_input, True))
    return members


def _sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def _autocast(device: torch.device, dtype: str):
    if dtype == 'bfloat16':
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()


def _loss(member: _Member, out: torch.Tensor) -> torch.Tensor:
    if member.is_model:
        target = torch.arange(out.shape[0], device=out.device) % out.shape[-1]
        return F.cross_entropy(out.float(), target)
    return out.float().pow(2).mean()


def eval_step(member: _Member, x: torch.Tensor, device: torch.device, dtype: str) -> float:
    member.module.eval()
    _sync(device)
    t0 = time.perf_counter()
    with torch.no_grad(), _autocast(device, dtype):
        member.runner(x)
    _sync(device)
    return time.perf_counter() - t0


def train_step(member: _Member, x: torch.Tensor, device: torch.device, dtype: str) -> float:
    member.module.train()
    member.module.zero_grad(set_to_none=True)
    _sync(device)
    t0 = time.perf_counter()
    with _autocast(device, dtype):
        loss = _loss(member, member.runner(x))
    loss.backward()
    _sync(device)
    return time.perf_counter() - t0


def macs_per_image(member: _Member, device: torch.device) -> float:
    """Eval MACs of one image, every matmul/conv/attention op counted (routing included).

    Attention runs through SDPA's math backend while counting: the counter has no formula for the fused CPU
    kernel, and would silently skip timm's attention and the SDPA routing path.
    """
    member.module.eval()
    x = member.make_input()[:1]
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), counter:
        member.module(x)
    return counter.get_total_flops() / 2


def param_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))


def peak_train_bytes(member: _Member, x: torch.Tensor, device: torch.device, dtype: str) -> int:
    """Parameters and buffers plus the peak of what one train step allocates on ``device``."""
    if device.type == 'cuda':
        member.module.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        train_step(member, x, device, dtype)
        return torch.cuda.max_memory_allocated(device)
    from torch.profiler import ProfilerActivity, profile
    member.module.zero_grad(set_to_none=True)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        train_step(member, x, device, dtype)
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == '[memory]'),
                    key=lambda e: e.start_ns())
    cur = peak = 0
    for e in events:
        cur += e.nbytes()
        peak = max(peak, cur)
    return param_bytes(member.module) + peak


def active_params(module: nn.Module) -> int:
    """Parameters that received a non-zero gradient in the last train step."""
    return sum(p.numel() for p in module.parameters() if p.grad is not None and bool(p.grad.ne(0).any()))


def measure_pair(name: str, args: argparse.Namespace, device: torch.device) -> Dict[str, Any]:
    torch.manual_seed(args.seed)
    members = build_pair(name, device, args.batch_size)
    if args.compile:
        for m in members:
            m.runner = torch.compile(m.module)
    x = members[0].make_input()
    result: Dict[str, Any] = dict(pair=name, batch_size=x.shape[0], members=[m.name for m in members])
    for m in members:
        result.setdefault('params', []).append(sum(p.numel() for p in m.module.parameters()))
        result.setdefault('macs_per_image', []).append(macs_per_image(m, device))

    modes = [('eval', eval_step)] + ([] if args.no_train else [('train', train_step)])
    for mode, step in modes:
        inner = []
        for m in members:
            for _ in range(args.warmup):
                t = step(m, x, device, args.dtype)
            # one timed sample runs the step often enough to last --min-time: short steps are noisy alone
            inner.append(max(1, math.ceil(args.min_time / max(t, 1e-6))))
        times: List[List[float]] = [[], []]
        for r in range(args.repeats):
            order = (0, 1) if r % 2 == 0 else (1, 0)
            for i in order:
                times[i].append(sum(step(members[i], x, device, args.dtype) for _ in range(inner[i])) / inner[i])
        result[f'{mode}_times_s'] = times
        result[f'{mode}_median_s'] = [statistics.median(t) for t in times]
        result[f'{mode}_ratio'] = statistics.median(a / b for a, b in zip(*times))
        if mode == 'train':
            result['active_params'] = [active_params(m.module) for m in members]
            result['peak_train_bytes'] = [peak_train_bytes(m, x, device, args.dtype) for m in members]
    del members
    return result


def format_table(results: Sequence[Dict[str, Any]]) -> str:
    head = ('| pair | batch | params M (moe / dense) | active M | GMACs/img (moe / dense) | MACs ratio '
            '| eval img/s (moe / dense) | eval ratio | train step ms (moe / dense) | train ratio | peak train MB |')
    lines = [head, '|' + '---|' * head.count(' | ') + '---|']
    for r in results:
        b = r['batch_size']
        p = r['params']
        g = [m / 1e9 for m in r['macs_per_image']]
        ev = [b / t for t in r['eval_median_s']]
        cells = [
            r['pair'], str(b), f'{p[0] / 1e6:.1f} / {p[1] / 1e6:.2f}',
            ' / '.join(f'{a / 1e6:.1f}' for a in r['active_params']) if 'active_params' in r else '-',
            f'{g[0]:.4f} / {g[1]:.4f}', f'{g[0] / g[1]:.2f}x',
            f'{ev[0]:.1f} / {ev[1]:.1f}', f'**{r["eval_ratio"]:.2f}x**',
        ]
        if 'train_median_s' in r:
            tr = r['train_median_s']
            mem = r['peak_train_bytes']
            cells += [f'{tr[0] * 1e3:.0f} / {tr[1] * 1e3:.0f}', f'**{r["train_ratio"]:.2f}x**',
                      f'{mem[0] / 2 ** 20:.0f} / {mem[1] / 2 ** 20:.0f}']
        else:
            cells += ['-', '-', '-']
        lines.append('| ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def environment(args: argparse.Namespace, device: torch.device) -> Dict[str, Any]:
    cpu = platform.processor()
    try:
        with open('/proc/cpuinfo') as f:
            cpu = next(line.split(':', 1)[1].strip() for line in f if line.startswith('model name'))
    except (OSError, StopIteration):
        pass
    try:
        commit = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], capture_output=True, text=True,
                                cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except OSError:
        commit = ''
    return dict(
        torch=torch.__version__, timm=timm.__version__, python=platform.python_version(), cpu=cpu,
        gpu=torch.cuda.get_device_name(device) if device.type == 'cuda' else None,
        threads=torch.get_num_threads(), device=device.type, dtype=args.dtype, compile=args.compile,
        repeats=args.repeats, commit=commit, date=time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime()),
    )


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    env = environment(args, device)
    results = []
    for name in args.pairs:
        t0 = time.perf_counter()
        results.append(measure_pair(name, args, device))
        print(f'[{name}: {time.perf_counter() - t0:.0f}s]', file=sys.stderr, flush=True)
    print(', '.join(f'{k} {v}' for k, v in env.items() if v is not None))
    print(format_table(results))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        tmp = f'{args.json}.tmp'
        with open(tmp, 'w') as f:
            json.dump(dict(environment=env, results=results), f, indent=1)
        os.replace(tmp, args.json)
    return 0 if all(math.isfinite(r['eval_ratio']) for r in results) else 1


if __name__ == '__main__':
    sys.exit(main())
