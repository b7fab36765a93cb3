""" Operations per MoE layer: aten ops (any device) and CUDA kernels (on a GPU) of one forward+backward.

A ``TorchDispatchMode`` counts every aten op that one call runs, forward and backward, for the ``SpheroMoE`` layer at
the ViT-T shape (width 192, 197 tokens, 98 core + 196 universal experts) and for the timm ``Mlp`` it replaces. Each
eager aten op is at least one kernel launch on a GPU, so the count is the device-independent proxy for launch
overhead; on CUDA, ``torch.profiler`` also counts the kernels actually launched.

    python -m benchmarks.op_count [--device cuda] [--dtype bfloat16] [--batch-size 8]
"""
import argparse
import collections
from typing import Counter, Dict

import torch
import torch.nn as nn
from timm.layers import Mlp
from torch.utils._python_dispatch import TorchDispatchMode

from timm_moejet.layers import SpheroMoE

# ops that only make a view or set metadata: no kernel on any device
METADATA_OPS = frozenset({
    'view', '_unsafe_view', 'reshape', 'transpose', 't', 'permute', 'expand', 'unsqueeze', 'squeeze', 'select',
    'slice', 'split', 'split_with_sizes', 'unbind', 'detach', 'alias', 'as_strided', 'set_', 'empty', 'empty_like',
    'movedim', 'flatten', 'unflatten', 'narrow', 'diagonal',
})


def compute_ops(counts: Counter[str]) -> int:
    """Ops that run a kernel (views, metadata and bare allocations left out)."""
    return sum(n for op, n in counts.items() if op not in METADATA_OPS)


class OpCounter(TorchDispatchMode):
    """Counts aten ops by name (the overload stripped)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def _step(module: nn.Module, x: torch.Tensor, amp: torch.dtype, train: bool) -> None:
    with torch.autocast(x.device.type, dtype=amp, enabled=amp != torch.float32):
        out = module(x)
    if train:
        out.float().sum().backward()


def count_ops(module: nn.Module, x: torch.Tensor, amp: torch.dtype = torch.float32,
              train: bool = True) -> Counter[str]:
    """aten ops of one call (forward, and backward when ``train``), after a warm-up call."""
    _step(module, x, amp, train)
    module.zero_grad(set_to_none=True)
    with OpCounter() as counter:
        _step(module, x, amp, train)
    return counter.counts


def count_kernels(module: nn.Module, x: torch.Tensor, amp: torch.dtype = torch.float32, train: bool = True) -> int:
    """CUDA kernels launched by one call (torch.profiler), after a warm-up call."""
    from torch.profiler import ProfilerActivity, profile
    _step(module, x, amp, train)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        _step(module, x, amp, train)
        torch.cuda.synchronize()
    return sum(e.count for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA)


def layer_pair(width: int = 192, num_core: int = 98, num_univ: int = 196, device: str = 'cpu') -> Dict[str, nn.Module]:
    """The MoE layer and the timm Mlp it replaces (ViT-T shape by default), in train mode."""
    torch.manual_seed(0)
    return {
        'SpheroMoE': SpheroMoE(width, num_core_experts=num_core, num_univ_experts=num_univ).to(device).train(),
        'Mlp': Mlp(width, 4 * width).to(device).train(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16'],
                        help='autocast dtype (float32: autocast off)')
    parser.add_argument('--batch-size', type=int, default=8)
    parser.add_argument('--tokens', type=int, default=197)
    parser.add_argument('--top', type=int, default=12, help='most frequent ops of the MoE layer to list')
    args = parser.parse_args()
    amp = getattr(torch, args.dtype)
    cuda = args.device.startswith('cuda')
    print(f'| module | mode | aten ops | of which compute{" | CUDA kernels" if cuda else ""} |')
    print(f'|---|---|---|---{"|---" if cuda else ""}|')
    counts = {}
    for name, module in layer_pair(device=args.device).items():
        x = torch.randn(args.batch_size, args.tokens, 192, device=args.device)
        for train in (False, True):
            module.train(train)
            c = count_ops(module, x, amp, train)
            counts[name, train] = c
            kernels = f' | {count_kernels(module, x, amp, train)}' if cuda else ''
            mode = 'forward+backward' if train else 'eval forward'
            print(f'| {name} | {mode} | {sum(c.values())} | {compute_ops(c)}{kernels} |')
    top = [(op, n) for op, n in counts['SpheroMoE', True].most_common() if op not in METADATA_OPS][:args.top]
    print('\nSpheroMoE forward+backward, most frequent compute ops: ' + ', '.join(f'{n} {k}' for n, k in top))


if __name__ == '__main__':
    from benchmarks.entry import run_main
    run_main(main, 'python -m benchmarks.op_count')
