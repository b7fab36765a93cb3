""" Charge recorded ops on a GPU: each kernel max(FLOPs / GEMM rate, bytes / bandwidth) plus a kernel floor, issued
by a host that spends a launch cost per op; eager GPU work is asynchronous, so a kernel starts when both the host
has issued it and the previous kernel has finished.

The step time is the finish time of that two-stage pipeline (host issue -> device queue). Where kernels are long
(big GEMMs) the host cost hides behind them; where they are short (elementwise ops on small tensors) the step is
the host's launches, which is what an eager step of a small model at a large batch is on an H100/H200.
"""
import dataclasses
from typing import Dict, List, Sequence

from .record import Op

__all__ = ['Device', 'Constants', 'DEVICES', 'FITTED', 'COPY_OPS', 'op_times', 'step_time']


@dataclasses.dataclass(frozen=True)
class Device:
    """Peak rates of one GPU (dense, no sparsity), from the vendor's data sheet."""
    name: str
    bf16_flops: float   # tensor-core bfloat16/float16 FLOP/s
    tf32_flops: float   # tensor-core TF32 FLOP/s (float32 matmuls only where torch allows TF32; off by default)
    fp32_flops: float   # CUDA-core float32 FLOP/s: what a float32 matmul gets with TF32 off (torch's default)
    bandwidth: float    # HBM bytes/s


DEVICES: Dict[str, Device] = {
    'h200': Device('NVIDIA H200 SXM (141 GB HBM3e)', 989.4e12, 494.7e12, 66.9e12, 4.8e12),
    'h100': Device('NVIDIA H100 SXM (80 GB HBM3)', 989.4e12, 494.7e12, 66.9e12, 3.35e12),
}


@dataclasses.dataclass(frozen=True)
class Constants:
    """The model's fitted constants (``python -m benchmarks.gpu_model --fit``)."""
    gemm_efficiency: float   # sustained fraction of the GEMM peak
    bandwidth_efficiency: float  # sustained fraction of the HBM bandwidth
    grouped_conv_efficiency: float  # fraction of the HBM bandwidth a grouped (depthwise) convolution sustains
    launch_s: float          # host time to issue one kernel (Python, dispatcher, launch)
    view_s: float            # host time of an op that launches nothing (a view, an allocation)
    kernel_floor_s: float    # device time of the smallest kernel


# fitted (python -m benchmarks.gpu_model --fit) to the H200 measurements in measured.py, on main at 8ec7ef1 (the
# code measured there), before any optimisation; grouped_conv_efficiency rests on the two ConvNeXt ratios alone
FITTED = Constants(gemm_efficiency=0.31, bandwidth_efficiency=0.37, grouped_conv_efficiency=0.0144, launch_s=9.3e-6,
                   view_s=4.7e-6, kernel_floor_s=2.17e-6)


# ops that only move or convert data: autocast's casts, .to(), .contiguous(), clones
COPY_OPS = frozenset({'_to_copy', 'copy_', 'clone', '_copy_from', '_copy_from_and_resize'})


def _gemm_rate(device: Device, dtype: str) -> float:
    return device.bf16_flops if dtype in ('bfloat16', 'float16') else device.fp32_flops


def op_times(ops: Sequence[Op], device: Device, c: Constants) -> List[float]:
    """Device seconds of each op: max(FLOPs / GEMM rate, bytes / bandwidth) + the kernel floor per kernel."""
    times = []
    for op in ops:
        if op.kernels == 0:
            times.append(0.)
            continue
        compute = op.flops / (_gemm_rate(device, op.gemm_dtype or '') * c.gemm_efficiency) if op.flops else 0.
        grouped = op.name.startswith('convolution_grouped')
        memory = op.bytes / (device.bandwidth * (c.grouped_conv_efficiency if grouped else c.bandwidth_efficiency))
        times.append(max(compute, memory) + op.kernels * c.kernel_floor_s)
    return times


def step_time(ops: Sequence[Op], device: Device, c: Constants) -> Dict[str, float]:
    """The modeled step: ``seconds`` (pipeline finish), ``device_s`` (sum of kernel times), ``host_s`` (sum of
    issue costs), ``kernels``, and the kernels and device seconds of copies and dtype casts (``copy_kernels``,
    ``copy_s``)."""
    host = gpu = busy = copy_s = 0.
    kernels = copy_kernels = 0
    for op, t in zip(ops, op_times(ops, device, c)):
        if op.kernels == 0:
            host += c.view_s
            continue
        host += op.kernels * c.launch_s
        gpu = max(gpu, host) + t
        busy += t
        kernels += op.kernels
        if op.name in COPY_OPS:
            copy_s += t
            copy_kernels += op.kernels
    return dict(seconds=max(gpu, host), device_s=busy, host_s=host, kernels=kernels, copy_kernels=copy_kernels,
                copy_s=copy_s)
