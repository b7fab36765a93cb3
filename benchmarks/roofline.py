""" A roofline floor for a forward or train step: this machine's GEMM rate and bandwidth, and each big op's cost.

The floor of a step is the sum over its big ops (matmuls, convolutions, attention; forward and backward) of
``max(MACs / GEMM rate, bytes / bandwidth)``, where bytes are what the op must read and write (weights,
activations, weight gradients; an operand broadcast along a dimension counts once). Elementwise work (norms,
activations, softmax, dropout) is left out: it is what an implementation may fuse away, so the floor is a lower
bound that no implementation of the same matmuls beats. Rates are measured in the same run: a large square matmul
(sustained GEMM rate) and a large copy (read + write bandwidth).
"""
import math
import statistics
import time
from typing import Any, Callable, Dict, List, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import flop_registry

__all__ = ['MachineRates', 'measure_rates', 'BigOps', 'count_big_ops']

aten = torch.ops.aten


class MachineRates:
    """Sustained GEMM rate (MACs/s) and memory bandwidth (bytes/s) of one device and dtype."""

    def __init__(self, macs_per_s: float, bytes_per_s: float, gemm_size: int, copy_bytes: int) -> None:
        self.macs_per_s = macs_per_s
        self.bytes_per_s = bytes_per_s
        self.gemm_size = gemm_size
        self.copy_bytes = copy_bytes

    def describe(self, dtype: torch.dtype) -> str:
        n = self.gemm_size
        return (f'GEMM {self.macs_per_s / 1e9:.1f} GMAC/s ({n}x{n}x{n} {str(dtype).replace("torch.", "")} matmul), '
                f'bandwidth {self.bytes_per_s / 1e9:.1f} GB/s ({self.copy_bytes / 2 ** 20:.0f} MB copy)')

    def as_dict(self) -> Dict[str, float]:
        return dict(gmacs_per_s=self.macs_per_s / 1e9, gbytes_per_s=self.bytes_per_s / 1e9,
                    gemm_size=self.gemm_size, copy_mbytes=self.copy_bytes / 2 ** 20)


def _median_time(fn: Callable[[], Any], sync: Callable[[], None], repeats: int) -> float:
    fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _time_gemm(n: int, device: torch.device, dtype: torch.dtype, sync: Callable[[], None], repeats: int) -> float:
    a, b = torch.randn(2, n, n, device=device, dtype=dtype).unbind(0)
    out = torch.empty(n, n, device=device, dtype=dtype)
    return _median_time(lambda: torch.mm(a, b, out=out), sync, repeats)


def _time_copy(nbytes: int, device: torch.device, sync: Callable[[], None], repeats: int) -> float:
    src, dst = torch.empty(2, nbytes // 4, device=device, dtype=torch.float32).normal_().unbind(0)
    return _median_time(lambda: dst.copy_(src), sync, repeats)


def measure_rates(device: torch.device, dtype: torch.dtype, repeats: int = 5) -> MachineRates:
    """Time a large matmul and a large copy on ``device`` in ``dtype`` (median of ``repeats``)."""
    cuda = device.type == 'cuda'
    n = 8192 if cuda else 2048
    copy_bytes = (2 << 30) if cuda else (256 << 20)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    gemm_s = _time_gemm(n, device, dtype, sync, repeats)
    copy_s = _time_copy(copy_bytes, device, sync, repeats)
    return MachineRates(n ** 3 / gemm_s, 2 * copy_bytes / copy_s, n, copy_bytes)


def _distinct_bytes(t: torch.Tensor) -> int:
    """Bytes of the distinct elements a tensor view addresses (a broadcast dimension, stride 0, counts once)."""
    if t.layout != torch.strided:
        return t.numel() * t.element_size()
    return math.prod(s for s, st in zip(t.shape, t.stride()) if st != 0) * t.element_size()


def _sdpa_cpu_macs(q: torch.Tensor, k: torch.Tensor, backward: bool) -> float:
    # q [B, H, N, d], k [B, H, M, d]: QK^T and PV forward; backward recomputes QK^T and does four more
    b, h, n, d = q.shape
    return (5 if backward else 2) * b * h * n * k.shape[-2] * d


_SDPA_CPU = {
    getattr(aten, '_scaled_dot_product_flash_attention_for_cpu', None): False,
    getattr(aten, '_scaled_dot_product_flash_attention_for_cpu_backward', None): True,
}
_SDPA_CPU.pop(None, None)


class BigOps(TorchDispatchMode):
    """Records every matmul, convolution and attention op run inside it as (name, MACs, bytes)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: List[Tuple[str, float, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        packet = func._overloadpacket
        macs = None
        if packet in flop_registry:
            macs = flop_registry[packet](*args, **kwargs, out_val=out) / 2
        elif packet in _SDPA_CPU:
            macs = _sdpa_cpu_macs(args[0], args[1] if not _SDPA_CPU[packet] else args[2], _SDPA_CPU[packet])
        if macs is not None:
            seen, nbytes = set(), 0
            for t in tree_leaves((args, kwargs, out)):
                if isinstance(t, torch.Tensor) and (t.data_ptr(), t.shape, t.stride()) not in seen:
                    seen.add((t.data_ptr(), t.shape, t.stride()))
                    nbytes += _distinct_bytes(t)
            self.ops.append((str(packet).replace('aten.', ''), macs, nbytes))
        return out

    def floor_s(self, rates: MachineRates) -> float:
        """Sum over the recorded ops of max(MACs / GEMM rate, bytes / bandwidth)."""
        return sum(max(m / rates.macs_per_s, b / rates.bytes_per_s) for _, m, b in self.ops)

    def totals(self) -> Dict[str, float]:
        return dict(macs=sum(m for _, m, _ in self.ops), bytes=sum(b for _, _, b in self.ops), ops=len(self.ops))


def count_big_ops(step: Callable[[], Any]) -> BigOps:
    """Run ``step`` once under :class:`BigOps` and return the record."""
    mode = BigOps()
    with mode:
        step()
    return mode
