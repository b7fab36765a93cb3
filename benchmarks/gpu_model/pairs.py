""" The pairs of ``benchmarks.throughput`` recorded on fake CUDA tensors, and their modeled times and ratios. """
import collections
from typing import Any, Callable, Dict, List, Sequence, Tuple

import timm
import torch.nn as nn
from timm.layers import Mlp
from torch._subclasses.fake_tensor import FakeTensorMode

import timm_moejet  # noqa: F401  (registers the moejet_* models)
from benchmarks.throughput import LAYER_DIM, LAYER_HIDDEN, LAYER_TOKENS, PAIRS
from timm_moejet.layers import SpheroMoE

from .cost import Constants, Device, op_times, step_time
from .record import Op, fake_module, record_step

__all__ = ['MODES', 'ROLES', 'Records', 'record_pairs', 'modeled', 'top_ops', 'unknown_ops']

MODES = ('eval', 'train')
ROLES = ('moe', 'dense')
Records = Dict[Tuple[str, str, str], List[Op]]  # (pair, role, mode) -> ops


def _builders(name: str) -> List[Tuple[Callable[[], nn.Module], Tuple[int, ...], bool]]:
    """(build, input shape, is_model) of the MoE member, then of the dense member."""
    spec = PAIRS[name]
    if spec.kind == 'layer':
        shape = (LAYER_TOKENS, LAYER_DIM)
        return [(lambda: SpheroMoE(LAYER_DIM, **spec.moe_kwargs), shape, False),
                (lambda: Mlp(LAYER_DIM, LAYER_HIDDEN), shape, False)]
    out = []
    for model_name, kwargs in ((spec.moe, spec.moe_kwargs), (spec.dense, {})):
        cfg = timm.get_pretrained_cfg(model_name)
        out.append((lambda n=model_name, k=kwargs: timm.create_model(n, **k), tuple(cfg.input_size), True))
    return out


def record_pairs(names: Sequence[str], batch_size: int, modes: Sequence[str] = MODES) -> Records:
    """Record eval and/or train step of both members of each pair at ``batch_size`` (bf16 CUDA autocast)."""
    records: Records = {}
    for name in names:
        for role, (build, shape, is_model) in zip(ROLES, _builders(name)):
            fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
            module = fake_module(build, fake_mode)
            for mode in modes:
                records[name, role, mode] = record_step(module, shape, batch_size, mode == 'train', is_model,
                                                        fake_mode)
    return records


def modeled(records: Records, device: Device, c: Constants) -> Dict[Tuple[str, str], Dict[str, Any]]:
    """(pair, mode) -> moe and dense modeled step (seconds, device_s, host_s, kernels) and the MoE/dense ratio."""
    out = {}
    for (name, role, mode) in records:
        if role != 'moe' or (name, 'dense', mode) not in records:
            continue
        moe = step_time(records[name, 'moe', mode], device, c)
        dense = step_time(records[name, 'dense', mode], device, c)
        out[name, mode] = dict(moe=moe, dense=dense, ratio=moe['seconds'] / dense['seconds'])
    return out


def top_ops(ops: Sequence[Op], device: Device, c: Constants, n: int) -> List[Dict[str, Any]]:
    """The ``n`` op kinds (name, dtype) with the most modeled device time: count, kernels, GB moved, milliseconds."""
    acc: Dict[Tuple[str, str], List[float]] = collections.defaultdict(lambda: [0, 0, 0., 0.])
    for op, t in zip(ops, op_times(ops, device, c)):
        if op.kernels:
            row = acc[op.name, op.dtype]
            row[0] += 1
            row[1] += op.kernels
            row[2] += op.bytes
            row[3] += t
    rows = sorted(acc.items(), key=lambda kv: -kv[1][3])[:n]
    return [dict(op=k[0], dtype=k[1], count=v[0], kernels=v[1], gbytes=v[2] / 1e9, ms=v[3] * 1e3) for k, v in rows]


def unknown_ops(records: Records) -> List[str]:
    """Ops that are not aten ops (custom ops such as ``moejet::*``): charged as one fused kernel over their bytes."""
    return sorted({op.name for ops in records.values() for op in ops if not op.known})
