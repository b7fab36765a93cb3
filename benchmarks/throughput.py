""" Throughput of MoE models and layers as ratios to their dense twins, measured in one run, with a roofline floor.

For each pair (a MoE model or layer and its dense twin) and batch size this prints, and optionally writes as JSON:
total and active parameters; MACs per image with routing counted (torch's FLOP counter); eval images/s,
train-step time (forward + backward) and the full step with an optimizer (forward, backward, optimizer step;
``--optimizers``), each the median of repeats that interleave MoE and dense (order alternating; a repeat averages
enough steps to last ``--min-time``), with the MoE/dense ratio taken as the median of the per-repeat ratios; the
ratio of a gradient-accumulated step to ``--accumulate-to`` images (derived from the measured parts); the peak
memory of one train step; and the roofline floor of eval and train step (``benchmarks/roofline.py``: this
machine's GEMM rate and bandwidth, measured first, and every big op's MACs and bytes) with each measured time as a
multiple of its own floor.

Gradients are set to None before each step, as timm's ``train.py`` does. Peak memory is the parameters plus the
peak of what one train step allocates (CUDA: the allocator's peak; CPU: the profiler's allocation events).

Examples::

    python -m benchmarks.throughput                                   # CPU, 2 threads, default pairs and batches
    python -m benchmarks.throughput --pairs layer tiny --batch-sizes 16 64 128 --json benchmarks/results/cpu.json
    python -m benchmarks.throughput --device cuda --dtype bfloat16 --batch-sizes 256 --pairs tiny --compile
    python -m benchmarks.throughput --compiled-vs-eager --pairs layer tiny --batch-sizes 16 [--cpu-time]

``--compiled-vs-eager`` measures something else: the MoE member of each pair (no dense twin) trained eagerly and
through ``torch.compile`` (Inductor), the forward + backward step of the same module interleaved, and prints the
median times, their range and the compiled/eager ratio (median of the per-repeat ratios, with its range).
"""
import argparse
import dataclasses
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager, nullcontext
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Mlp
from timm.optim import create_optimizer_v2
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import timm_moejet  # noqa: F401  (registers the moejet_* models)
from benchmarks.roofline import MachineRates, count_big_ops, measure_rates
from timm_moejet.checkpoint_io import write_json
from timm_moejet.cost import num_params
from timm_moejet.layers import SpheroMoE

LAYER_TOKENS, LAYER_DIM, LAYER_HIDDEN = 197, 192, 768


@dataclasses.dataclass(frozen=True)
class Pair:
    """A MoE model or layer and its dense twin. Layers use ViT-T shapes (197 tokens, width 192, MLP hidden 768)."""
    kind: str  # 'layer' or 'model'
    batch_sizes: Tuple[int, ...]
    moe: str = ''
    dense: str = ''
    moe_kwargs: Dict[str, Any] = dataclasses.field(default_factory=dict)


PAIRS: Dict[str, Pair] = {
    'layer': Pair('layer', (64,)),
    'layer_softmax': Pair('layer', (64,), moe_kwargs=dict(moe_combine='softmax')),
    'tiny': Pair('model', (16, 64), moe='moejet_vit_tiny', dense='vit_tiny_patch16_224'),
    'small': Pair('model', (16,), moe='moejet_vit_small', dense='vit_small_patch16_224'),
    'convnext_femto': Pair('model', (16,), moe='moejet_convnext_femto', dense='convnext_femto'),
    # moejet_vit_tiny with half its experts in each group of its 6 MoE blocks, as weights-tools prune leaves it
    'tiny_pruned50': Pair('model', (16,), moe='moejet_vit_tiny', dense='vit_tiny_patch16_224',
                          moe_kwargs=dict(moe_experts_per_layer=((49, 98),) * 6)),
}
DEFAULT_PAIRS = ('layer', 'layer_softmax', 'tiny')

# the recipe's optimizers: AdamW (paper, timm's ViT recipes) and SGD (timm's benchmark.py); weight decay as trained
OPTIMIZERS: Dict[str, Dict[str, Any]] = {
    'adamw': dict(opt='adamw', lr=1e-3, weight_decay=0.05),
    'sgd': dict(opt='sgd', lr=0.1, momentum=0.9, weight_decay=1e-4),
}
# how torch runs the update: one kernel per tensor and op, multi-tensor kernels, or one fused kernel per tensor
OPTIMIZER_IMPLS: Dict[str, Dict[str, bool]] = {
    'for-loop': dict(foreach=False),
    'foreach': dict(foreach=True),
    'fused': dict(fused=True),
}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--pairs', nargs='+', default=list(DEFAULT_PAIRS), choices=sorted(PAIRS),
                        help='pairs to measure (small builds a 1058M-parameter model, ~4.3 GB)')
    parser.add_argument('--device', default='cpu', choices=('cpu', 'cuda'))
    parser.add_argument('--dtype', default='float32', choices=('float32', 'bfloat16'),
                        help='bfloat16 runs the float32 models under autocast')
    parser.add_argument('--batch-sizes', type=int, nargs='+', default=None,
                        help='batch sizes for every pair, smallest first (default: 64 for layers, 16 and 64 for '
                             'ViT-T, 16 for ViT-S); a batch that would not fit in memory is skipped and said so')
    parser.add_argument('--compile', action='store_true', help='torch.compile both members of each pair')
    parser.add_argument('--compiled-vs-eager', action='store_true',
                        help='instead of MoE vs dense: the MoE member\'s train step (forward + backward) compiled vs '
                             'eager, interleaved')
    parser.add_argument('--cpu-time', action='store_true',
                        help='with --compiled-vs-eager on the CPU: time each step by the process\'s CPU time '
                             '(time.process_time), which waiting for a core on a shared machine does not pad')
    parser.add_argument('--threads', type=int, default=2, help='torch.set_num_threads (CPU)')
    parser.add_argument('--repeats', type=int, default=7, help='interleaved timed repeats (median is reported)')
    parser.add_argument('--warmup', type=int, default=2, help='untimed runs of each member before timing (>= 1)')
    parser.add_argument('--min-time', type=float, default=0.3,
                        help='seconds one timed sample lasts at least (the step is repeated and averaged)')
    parser.add_argument('--no-train', action='store_true', help='measure eval only')
    parser.add_argument('--optimizers', nargs='*', default=list(OPTIMIZERS), choices=list(OPTIMIZERS),
                        help='full train steps to time with these optimizers (none: forward + backward only)')
    parser.add_argument('--optimizer-impl', default='fused', choices=list(OPTIMIZER_IMPLS),
                        help='torch implementation of the optimizer step in the full step (default fused); every '
                             'implementation is also timed alone')
    parser.add_argument('--accumulate-to', type=int, default=1024,
                        help='effective batch of the gradient-accumulation ratio (default 1024)')
    parser.add_argument('--json', default=None, help='write the results to this JSON file')
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args(argv)
    for name in ('repeats', 'warmup', 'threads', 'accumulate_to'):
        if getattr(args, name) < 1:
            parser.error(f'--{name.replace("_", "-")} must be >= 1, got {getattr(args, name)}')
    if args.batch_sizes is not None:
        if any(b < 1 for b in args.batch_sizes):
            parser.error(f'--batch-sizes must be >= 1, got {args.batch_sizes}')
        args.batch_sizes = sorted(set(args.batch_sizes))
    if args.device == 'cuda' and not torch.cuda.is_available():
        parser.error('--device cuda was asked for, but torch.cuda.is_available() is False')
    if args.compiled_vs_eager and (args.compile or args.no_train):
        parser.error('--compiled-vs-eager compares the train step compiled and eager itself: leave out --compile '
                     'and --no-train')
    if args.cpu_time and (not args.compiled_vs_eager or args.device != 'cpu'):
        parser.error('--cpu-time applies to --compiled-vs-eager on --device cpu only')
    if args.no_train:
        args.optimizers = []
    return args


class _Member:
    """One side of a pair: a module, an input maker and a loss."""

    def __init__(self, name: str, module: nn.Module, input_shape: Tuple[int, ...], is_model: bool,
                 device: torch.device) -> None:
        self.name = name
        self.module = module
        self.input_shape = input_shape
        self.is_model = is_model
        self.device = device
        self.runner: Callable[[torch.Tensor], torch.Tensor] = module
        self.optimizer: Optional[torch.optim.Optimizer] = None

    def make_input(self, batch_size: int) -> torch.Tensor:
        return torch.randn(batch_size, *self.input_shape, device=self.device)


def build_pair(name: str, device: torch.device) -> List[_Member]:
    spec = PAIRS[name]
    if spec.kind == 'layer':
        shape = (LAYER_TOKENS, LAYER_DIM)
        return [
            _Member(f'SpheroMoE({spec.moe_kwargs or "defaults"})', SpheroMoE(LAYER_DIM, **spec.moe_kwargs).to(device),
                    shape, False, device),
            _Member('Mlp', Mlp(LAYER_DIM, LAYER_HIDDEN).to(device), shape, False, device),
        ]
    members = []
    for model_name, kwargs in ((spec.moe, spec.moe_kwargs), (spec.dense, {})):
        model = timm.create_model(model_name, **kwargs).to(device)
        members.append(_Member(model_name, model, tuple(model.pretrained_cfg['input_size']), True, device))
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


def _forward_backward(member: _Member, x: torch.Tensor, dtype: str) -> None:
    member.module.train()
    member.module.zero_grad(set_to_none=True)
    with _autocast(x.device, dtype):
        loss = _loss(member, member.runner(x))
    loss.backward()


def _timed(fn: Callable[[], Any], device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def eval_step(member: _Member, x: torch.Tensor, dtype: str) -> float:
    member.module.eval()

    def run() -> None:
        with torch.no_grad(), _autocast(x.device, dtype):
            member.runner(x)
    return _timed(run, x.device)


def train_step(member: _Member, x: torch.Tensor, dtype: str) -> float:
    """Forward and backward, gradients set to None first (no optimizer step)."""
    return _timed(lambda: _forward_backward(member, x, dtype), x.device)


def full_step(member: _Member, x: torch.Tensor, dtype: str) -> float:
    """Forward, backward and ``member.optimizer.step()``, as one iteration of timm's ``train.py``."""
    def run() -> None:
        _forward_backward(member, x, dtype)
        member.optimizer.step()
    return _timed(run, x.device)


def optimizer_step(member: _Member, x: torch.Tensor, dtype: str) -> float:
    """``member.optimizer.step()`` alone, on the gradients of the last backward."""
    return _timed(member.optimizer.step, x.device)


def make_optimizer(module: nn.Module, name: str, impl: str) -> torch.optim.Optimizer:
    """timm's optimizer factory with the recipe's settings and the given torch implementation."""
    return create_optimizer_v2(module, **OPTIMIZERS[name], **OPTIMIZER_IMPLS[impl])


def macs_per_image(member: _Member) -> float:
    """Eval MACs of one image, every matmul/conv/attention op counted (routing included).

    Attention runs through SDPA's math backend while counting: the counter has no formula for the fused CPU
    kernel, and would silently skip timm's attention and the SDPA routing path.
    """
    member.module.eval()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), counter:
        member.module(member.make_input(1))
    return counter.get_total_flops() / 2


def param_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))


@contextmanager
def _quiet_native_stderr() -> Iterator[None]:
    """Silence what native code writes to file descriptor 2 (the CPU profiler's log lines) for the duration."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, 'w') as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_train_bytes(member: _Member, x: torch.Tensor, dtype: str) -> int:
    """Parameters and buffers plus the peak of what one forward + backward allocates on the device."""
    device = x.device
    member.module.zero_grad(set_to_none=True)
    if device.type == 'cuda':
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        train_step(member, x, dtype)
        return torch.cuda.max_memory_allocated(device)
    from torch.profiler import ProfilerActivity, profile
    with _quiet_native_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        train_step(member, x, dtype)
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == '[memory]'),
                    key=lambda e: e.start_ns())
    cur = peak = 0
    for e in events:
        cur += e.nbytes()
        peak = max(peak, cur)
    return param_bytes(member.module) + peak


def available_bytes(device: torch.device) -> Optional[int]:
    """Memory free for a new batch (CUDA: the device's free memory; CPU: MemAvailable), None if unknown."""
    if device.type == 'cuda':
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open('/proc/meminfo') as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith('MemAvailable:'))
    except (OSError, StopIteration, ValueError):
        return None


def active_params(module: nn.Module) -> int:
    """Parameters that received a non-zero gradient in the last train step."""
    return sum(p.numel() for p in module.parameters() if p.grad is not None and bool(p.grad.ne(0).any()))


def interleaved(members: Sequence[_Member], step: Callable[[_Member, torch.Tensor, str], float], x: torch.Tensor,
                args: argparse.Namespace) -> Dict[str, Any]:
    """Median times of ``step`` for both members over interleaved repeats, and the median per-repeat ratio."""
    inner = []
    for m in members:
        for _ in range(args.warmup):
            t = step(m, x, args.dtype)
        # one timed sample runs the step often enough to last --min-time: short steps are noisy alone
        inner.append(max(1, math.ceil(args.min_time / max(t, 1e-6))))
    times: List[List[float]] = [[], []]
    for r in range(args.repeats):
        for i in ((0, 1) if r % 2 == 0 else (1, 0)):
            times[i].append(sum(step(members[i], x, args.dtype) for _ in range(inner[i])) / inner[i])
    return dict(times_s=times, median_s=[statistics.median(t) for t in times],
                ratio=statistics.median(a / b for a, b in zip(*times)))


def floors(members: Sequence[_Member], x: torch.Tensor, args: argparse.Namespace,
           rates: MachineRates) -> Dict[str, Any]:
    """Roofline floor (seconds) and the big ops' MACs and bytes of an eval step and a train step, per member."""
    out: Dict[str, Any] = {}
    modes = [('eval', eval_step)] + ([] if args.no_train else [('train', train_step)])
    for mode, step in modes:
        for m in members:
            runner, m.runner = m.runner, m.module  # count the eager ops (a compiled graph hides them)
            try:
                ops = count_big_ops(lambda: step(m, x, args.dtype))
            finally:
                m.runner = runner
            out.setdefault(f'{mode}_floor_s', []).append(ops.floor_s(rates))
            out.setdefault(f'{mode}_big_ops', []).append(ops.totals())
    return out


def measure_batch(members: Sequence[_Member], batch_size: int, args: argparse.Namespace,
                  rates: MachineRates) -> Dict[str, Any]:
    x = members[0].make_input(batch_size)
    result: Dict[str, Any] = dict(batch_size=batch_size)
    result.update(floors(members, x, args, rates))
    result['eval'] = interleaved(members, eval_step, x, args)
    if args.no_train:
        return result
    result['train'] = interleaved(members, train_step, x, args)
    result['active_params'] = [active_params(m.module) for m in members]
    result['peak_train_bytes'] = [peak_train_bytes(m, x, args.dtype) for m in members]
    for name in args.optimizers:
        # the optimizer step alone, each torch implementation; then the full step with the chosen one
        alone = {}
        for impl in OPTIMIZER_IMPLS:
            for m in members:
                m.optimizer = make_optimizer(m.module, name, impl)
                _forward_backward(m, x, args.dtype)
            alone[impl] = interleaved(members, optimizer_step, x, args)
        for m in members:
            m.optimizer = make_optimizer(m.module, name, args.optimizer_impl)
        full = interleaved(members, full_step, x, args)
        # accumulation: k forward + backward passes, one optimizer step (train.py --grad-accum-steps k)
        k = max(1, math.ceil(args.accumulate_to / batch_size))
        acc = [k * fb + (st - fb) for fb, st in zip(result['train']['median_s'], full['median_s'])]
        result[f'step_{name}'] = dict(full, optimizer_alone=alone, accumulation_steps=k,
                                      accumulated_s=acc, accumulated_ratio=acc[0] / acc[1])
        for m in members:
            m.optimizer = None
    return result


def measure_pair(name: str, args: argparse.Namespace, device: torch.device, rates: MachineRates) -> Dict[str, Any]:
    torch.manual_seed(args.seed)
    members = build_pair(name, device)
    if args.compile:
        for m in members:
            m.runner = torch.compile(m.module)
    result: Dict[str, Any] = dict(pair=name, members=[m.name for m in members],
                                  params=[num_params(m.module) for m in members],
                                  macs_per_image=[macs_per_image(m) for m in members], batches=[], skipped=[])
    per_image: Optional[float] = None
    for b in args.batch_sizes or PAIRS[name].batch_sizes:
        free = available_bytes(device)
        if per_image is not None and free is not None:
            # the step's activations grow with the batch; weights, gradients and optimizer state do not
            need = per_image * b + 4 * max(param_bytes(m.module) for m in members)
            if need > 0.9 * free:
                msg = f'{name} batch {b}: skipped, needs about {need / 2 ** 30:.1f} GiB, {free / 2 ** 30:.1f} GiB free'
                print(msg, file=sys.stderr, flush=True)
                result['skipped'].append(msg)
                continue
        t0 = time.perf_counter()
        batch = measure_batch(members, b, args, rates)
        result['batches'].append(batch)
        if 'peak_train_bytes' in batch:
            per_image = max((peak - param_bytes(m.module)) / b for peak, m in zip(batch['peak_train_bytes'], members))
        print(f'[{name} batch {b}: {time.perf_counter() - t0:.0f}s]', file=sys.stderr, flush=True)
    del members
    return result


def train_step_cpu_time(member: _Member, x: torch.Tensor, dtype: str) -> float:
    """:func:`train_step` timed by the process's CPU time (all threads) instead of the wall clock."""
    t0 = time.process_time()
    _forward_backward(member, x, dtype)
    return time.process_time() - t0


def measure_compiled_vs_eager(name: str, args: argparse.Namespace, device: torch.device) -> Dict[str, Any]:
    """The MoE member's train step, eager and compiled (the same module), interleaved, per batch size."""
    torch.manual_seed(args.seed)
    moe = build_pair(name, device)[0]
    compiled = _Member(f'{moe.name} compiled', moe.module, moe.input_shape, moe.is_model, device)
    compiled.runner = torch.compile(moe.module)
    result: Dict[str, Any] = dict(pair=name, member=moe.name, batches=[])
    for b in args.batch_sizes or PAIRS[name].batch_sizes:
        t0 = time.perf_counter()
        step = train_step_cpu_time if args.cpu_time else train_step
        timed = interleaved([moe, compiled], step, moe.make_input(b), args)
        ratios = [c / e for e, c in zip(*timed['times_s'])]
        timed['ratio'] = statistics.median(ratios)  # compiled / eager (interleaved() gives eager / compiled)
        result['batches'].append(dict(batch_size=b, train=timed, ratio_range=[min(ratios), max(ratios)]))
        print(f'[{name} batch {b} compiled vs eager: {time.perf_counter() - t0:.0f}s]', file=sys.stderr, flush=True)
    return result


def format_compiled_vs_eager(results: Sequence[Dict[str, Any]], clock: str) -> str:
    """Eager and compiled train-step times (median and range, ms) and the compiled/eager ratio (Markdown)."""
    def ms(times: Sequence[float]) -> str:
        return f'{statistics.median(times) * 1e3:.0f} ({min(times) * 1e3:.0f}-{max(times) * 1e3:.0f})'
    rows = []
    for r, bt in _rows(results):
        eager, compiled = bt['train']['times_s']
        lo, hi = bt['ratio_range']
        rows.append([r['pair'], r['member'], str(bt['batch_size']), ms(eager), ms(compiled),
                     f'**{bt["train"]["ratio"]:.2f}x** ({lo:.2f}-{hi:.2f})'])
    return _table(['pair', 'module', 'batch', f'eager fwd+bwd {clock} ms, median (range)',
                   f'compiled fwd+bwd {clock} ms', 'compiled / eager (range)'], rows)


def _rows(results: Sequence[Dict[str, Any]]) -> Iterator[Tuple[Dict[str, Any], Dict[str, Any]]]:
    for r in results:
        for batch in r['batches']:
            yield r, batch


def _table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
    lines += ['| ' + ' | '.join(row) + ' |' for row in rows]
    return '\n'.join(lines)


def _pair(values: Sequence[float], fmt: str) -> str:
    return ' / '.join(format(v, fmt) for v in values)


def format_tables(results: Sequence[Dict[str, Any]], args: argparse.Namespace) -> str:
    """The throughput table, the roofline table and, with optimizers, the train-step table (Markdown)."""
    rows = []
    for r, bt in _rows(results):
        b = bt['batch_size']
        g = [m / 1e9 for m in r['macs_per_image']]
        row = [r['pair'], str(b), _pair([p / 1e6 for p in r['params']], '.1f'), _pair(g, '.4f'),
               f'{g[0] / g[1]:.2f}x', _pair([b / t for t in bt['eval']['median_s']], '.1f'),
               f'**{bt["eval"]["ratio"]:.2f}x**']
        if 'train' in bt:
            row += [_pair([t * 1e3 for t in bt['train']['median_s']], '.0f'), f'**{bt["train"]["ratio"]:.2f}x**',
                    _pair([m / 2 ** 20 for m in bt['peak_train_bytes']], '.0f')]
        else:
            row += ['-', '-', '-']
        rows.append(row)
    out = [_table(['pair', 'batch', 'params M (moe / dense)', 'GMACs/img (moe / dense)', 'MACs ratio',
                   'eval img/s (moe / dense)', 'eval ratio', 'fwd+bwd ms (moe / dense)', 'fwd+bwd ratio',
                   'peak fwd+bwd MB'], rows)]

    rows = []
    for r, bt in _rows(results):
        row = [r['pair'], str(bt['batch_size'])]
        for mode in ('eval', 'train'):
            if mode not in bt:
                row += ['-', '-', '-']
                continue
            fl = bt[f'{mode}_floor_s']
            row += [_pair([f * 1e3 for f in fl], '.1f'), f'{fl[0] / fl[1]:.2f}x',
                    _pair([t / f for t, f in zip(bt[mode]['median_s'], fl)], '.2f')]
        rows.append(row)
    out.append(_table(['pair', 'batch', 'eval floor ms (moe / dense)', 'floor ratio', 'eval measured / floor',
                       'fwd+bwd floor ms (moe / dense)', 'floor ratio', 'fwd+bwd measured / floor'], rows))

    rows = []
    for r, bt in _rows(results):
        for name in args.optimizers:
            st = bt.get(f'step_{name}')
            if st is None:
                continue
            alone = st['optimizer_alone']
            rows.append([r['pair'], str(bt['batch_size']), name, f'{bt["train"]["ratio"]:.2f}x',
                         _pair([t * 1e3 for t in st['median_s']], '.0f'), f'**{st["ratio"]:.2f}x**',
                         f'{st["accumulation_steps"]} x {bt["batch_size"]}', f'**{st["accumulated_ratio"]:.2f}x**']
                        + [_pair([t * 1e3 for t in alone[impl]['median_s']], '.0f') for impl in OPTIMIZER_IMPLS])
    if rows:
        out.append(_table(['pair', 'batch', 'optimizer', 'fwd+bwd ratio',
                           f'full step ms, {args.optimizer_impl} (moe / dense)', 'full step ratio',
                           f'accumulated to {args.accumulate_to}', 'accumulated ratio']
                          + [f'{impl} step alone ms (moe / dense)' for impl in OPTIMIZER_IMPLS], rows))
    return '\n\n'.join(out)


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
    load = os.getloadavg()[0] if hasattr(os, 'getloadavg') else None
    return dict(
        torch=torch.__version__, timm=timm.__version__, python=platform.python_version(), cpu=cpu,
        gpu=torch.cuda.get_device_name(device) if device.type == 'cuda' else None,
        threads=torch.get_num_threads(), device=device.type, dtype=args.dtype, compile=args.compile,
        repeats=args.repeats, load_average=None if load is None else round(load, 2), commit=commit,
        date=time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime()),
    )


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    env = environment(args, device)
    if args.compiled_vs_eager:
        results = [measure_compiled_vs_eager(name, args, device) for name in args.pairs]
        print(', '.join(f'{k} {v}' for k, v in env.items() if v is not None))
        print(format_compiled_vs_eager(results, 'CPU-time' if args.cpu_time else 'wall'))
        _write_json(args, dict(environment=env, compiled_vs_eager=results))
        return 0 if all(math.isfinite(bt['train']['ratio']) for _, bt in _rows(results)) else 1
    dtype = torch.bfloat16 if args.dtype == 'bfloat16' else torch.float32
    rates = measure_rates(device, dtype)
    results = []
    for name in args.pairs:
        results.append(measure_pair(name, args, device, rates))
    print(', '.join(f'{k} {v}' for k, v in env.items() if v is not None))
    print(f'roofline: {rates.describe(dtype)}\n')
    print(format_tables(results, args))
    _write_json(args, dict(environment=env, rates=rates.as_dict(), optimizer_impl=args.optimizer_impl,
                           accumulate_to=args.accumulate_to, results=results))
    return 0 if all(math.isfinite(bt['eval']['ratio']) for _, bt in _rows(results)) else 1


def _write_json(args: argparse.Namespace, payload: Dict[str, Any]) -> None:
    if args.json:
        write_json(payload, args.json)  # makes the folder; a NaN ratio is written as null


if __name__ == '__main__':
    from benchmarks.entry import run_main
    sys.exit(run_main(main, 'python -m benchmarks.throughput'))
