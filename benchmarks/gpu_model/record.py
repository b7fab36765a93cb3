""" Record the aten ops of one eager step as a CUDA device would run them, on a machine without a GPU.

The model is built on the meta device and moved, inside a ``FakeTensorMode``, to fake tensors: each has its full
shape and dtype but no data, so a ViT-S step at batch 256 records in seconds and allocates nothing; FLOPs and bytes
are exact at any batch, nothing is extrapolated from a small one. The step runs under the CPU's autocast with CUDA's
dtype rules put in its place (:func:`cuda_autocast_rules`): CUDA's and the CPU's autocast agree on the matmuls,
linears, convolutions and attention (bfloat16) but not on the rest, where CUDA runs LayerNorm, softmax, sums, exp,
pow and the losses in float32 and widens the mixed inputs of addcmul and its kind. (Fake CUDA tensors would get
CUDA's own autocast, but autograd's engine asks the CUDA driver for streams in the backward, so they cannot train
on a machine without one.) The layer's CPU fast paths are switched off: the CPU runs what every other device runs.
"""
import dataclasses
import math
import warnings
from contextlib import contextmanager, nullcontext
from typing import Callable, Iterator, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.library import Library
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map
from torch.utils.flop_counter import flop_registry

from benchmarks.roofline import _distinct_bytes

try:
    from timm_moejet.layers import cpu_fast_path
except ImportError:  # an older checkout (--ref) without CPU fast paths
    cpu_fast_path = None

__all__ = ['Op', 'Recorder', 'cuda_autocast_rules', 'fake_module', 'record_step', 'cpu_fast_path_off',
           'CUDA_FP32_OPS']

# CUDA autocast's float32 lists (torch/amp docs, "CUDA Ops that can autocast to float32"), where the CPU's differ:
# inputs cast to float32
CUDA_FP32_OPS = (
    'acos', 'asin', 'cosh', 'erfinv', 'exp', 'expm1', 'log', 'log10', 'log2', 'log1p', 'reciprocal', 'rsqrt', 'sinh',
    'tan', 'pow.Tensor_Scalar', 'pow.Tensor_Tensor', 'pow.Scalar', 'softplus', 'layer_norm', 'native_layer_norm',
    'group_norm', 'frobenius_norm.dim', 'cosine_similarity', 'nll_loss', 'nll_loss2d', 'kl_div', 'l1_loss',
    'smooth_l1_loss', 'huber_loss', 'mse_loss', 'binary_cross_entropy_with_logits', 'dist', 'pdist', 'cdist',
    'renorm', 'logsumexp', 'norm.Scalar', 'norm.ScalarOpt_dim',
)
# run with dtype=float32 where no dtype is given (as CUDA autocast passes it; sum reads bfloat16 without a cast)
CUDA_FP32_DTYPE_OPS = ('softmax.int', 'log_softmax.int', 'sum', 'sum.dim_IntList', 'prod', 'prod.dim_int', 'cumsum',
                       'cumprod', 'linalg_vector_norm')
# inputs cast to the widest floating dtype among them
CUDA_PROMOTE_OPS = ('addcdiv', 'addcmul', 'atan2', 'bilinear', 'cross', 'dot', 'vdot', 'index_put', 'tensordot',
                    'scatter_add')

# aten ops that make no kernel on CUDA: views, metadata, bare allocations (schema-aliasing ops are found below too)
NO_KERNEL_OPS = frozenset({
    'empty', 'empty_like', 'empty_strided', 'new_empty', 'new_empty_strided', 'detach', 'lift_fresh', 'alias',
    'set_', 'resize_', 'is_same_size', '_local_scalar_dense',
})
# the CPU attention kernels stand for CUDA's flash attention (bfloat16, head size <= 256): name and kernels on CUDA
CUDA_NAMES = {
    '_scaled_dot_product_flash_attention_for_cpu': ('_scaled_dot_product_flash_attention', 1),
    '_scaled_dot_product_flash_attention_for_cpu_backward': ('_scaled_dot_product_flash_attention_backward', 3),
    'native_layer_norm_backward': ('native_layer_norm_backward', 2),  # input gradient, then weight/bias reduction
}


@dataclasses.dataclass
class Op:
    """One recorded op: its name (CUDA's), kernels launched, FLOPs (GEMM-like ops only), bytes read and written, the
    dtype of its first floating output (or input), the dtype a GEMM-like op multiplies in, and whether it is an
    aten op (any other, a ``moejet::*`` op for one, is charged as one fused kernel over its bytes)."""
    name: str
    kernels: int
    flops: float
    bytes: int
    dtype: str
    gemm_dtype: Optional[str]
    known: bool


def _is_view(func) -> bool:
    returns = func._schema.returns
    return bool(returns) and all(r.alias_info is not None and not r.alias_info.is_write for r in returns)


def _tensor_bytes(args, kwargs, out) -> int:
    seen, total = set(), 0
    for t in tree_leaves((args, kwargs, out)):
        if isinstance(t, torch.Tensor) and id(t) not in seen:
            seen.add(id(t))
            total += _distinct_bytes(t)
    return total


def _dtype_name(tensors: List[torch.Tensor]) -> str:
    floating = [t for t in tensors if t.is_floating_point()]
    return str((floating or tensors)[0].dtype).replace('torch.', '') if tensors else '-'


def _attention_flops(name: str, args) -> float:
    # q [B, H, N, d], k [B, H, M, d]: QK^T and PV forward; the backward recomputes QK^T and does four more
    q, k = (args[1], args[2]) if name.endswith('backward') else (args[0], args[1])
    b, h, n, d = q.shape
    return 2 * (5 if name.endswith('backward') else 2) * b * h * n * k.shape[-2] * d


def _arg(func, args, kwargs, name: str):
    index = [a.name for a in func._schema.arguments].index(name)
    return args[index] if index < len(args) else kwargs[name]


def _conv_backward_flops(args) -> float:
    # torch's flop counter ignores groups in convolution_backward (a depthwise 7x7 comes out ~C times too big):
    # each requested gradient costs what the forward costs, 2 x output elements x (C_in / groups) x kernel area
    grad_out, weight, transposed, mask = args[0], args[2], args[7], args[10]
    per_output = 2. * weight.shape[1] * math.prod(weight.shape[2:])
    forward = per_output * (args[1].numel() // args[1].shape[1] * weight.shape[0] if transposed else grad_out.numel())
    return forward * (int(mask[0]) + int(mask[1]))


class Recorder(TorchDispatchMode):
    """Records every op that reaches the dispatcher inside it as an :class:`Op`."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: List[Op] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.ops.append(self._op(func, args, kwargs, out))
        return out

    @staticmethod
    def _op(func, args, kwargs, out) -> Op:
        namespace, name = func.namespace, func._overloadpacket.__name__
        known = namespace in ('aten', 'prims', 'prim')
        outs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        ins = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        dtype = _dtype_name(outs or ins)
        if namespace == 'prim' or (known and (name in NO_KERNEL_OPS or _is_view(func))):
            return Op(name, 0, 0., 0, dtype, None, True)
        flops, gemm_dtype = 0., None
        if name in CUDA_NAMES and 'attention' in name:
            flops, gemm_dtype = _attention_flops(name, args), _dtype_name(ins)
        elif name == 'convolution_backward':
            flops, gemm_dtype = _conv_backward_flops(args), _dtype_name(ins)
        elif known and func._overloadpacket in flop_registry:
            flops, gemm_dtype = float(flop_registry[func._overloadpacket](*args, **kwargs, out_val=out)), \
                _dtype_name(ins)
        label, kernels = CUDA_NAMES.get(name, (name if known else f'{namespace}::{name}', 1))
        if name in ('convolution', 'convolution_backward') and _arg(func, args, kwargs, 'groups') != 1:
            label = label.replace('convolution', 'convolution_grouped')  # depthwise: its own efficiency
        return Op(label, kernels, flops, _tensor_bytes(args, kwargs, out), dtype, gemm_dtype, known)


def _floating(a) -> bool:
    return isinstance(a, torch.Tensor) and a.is_floating_point() and a.dtype != torch.float64


def _cast_kernel(op, to: Optional[torch.dtype]) -> Callable:
    """An autocast kernel: floating inputs cast to ``to`` (None: the widest among them), then ``op`` without
    autocast, as CUDA's autocast does for its float32 and promote lists."""
    def kernel(*args, **kwargs):
        dtype = to
        if dtype is None:
            dtypes = [a.dtype for a in tree_leaves((args, kwargs)) if _floating(a)]
            dtype = torch.float32 if torch.float32 in dtypes else (dtypes[0] if dtypes else None)
        with torch.autocast('cpu', enabled=False):
            if dtype is not None:
                args, kwargs = tree_map(lambda a: a.to(dtype) if _floating(a) else a, (args, kwargs))
            return op(*args, **kwargs)
    return kernel


def _dtype_kernel(op) -> Callable:
    """An autocast kernel that runs ``op`` with dtype=float32 where the caller gave none and the input is floating."""
    position = [a.name for a in op._schema.arguments].index('dtype')

    def kernel(*args, **kwargs):
        with torch.autocast('cpu', enabled=False):
            if _floating(args[0]) and kwargs.get('dtype') is None and \
                    (len(args) <= position or args[position] is None):
                args = args[:position] if len(args) > position else args
                kwargs = dict(kwargs, dtype=torch.float32)
            return op(*args, **kwargs)
    return kernel


def _aten(qualified: str):
    name, _, overload = qualified.partition('.')
    return getattr(getattr(torch.ops.aten, name), overload or 'default')


@contextmanager
def cuda_autocast_rules(dtype: torch.dtype = torch.bfloat16) -> Iterator[None]:
    """The CPU's autocast in ``dtype``, with CUDA's rules for the ops where the two differ (the CPU's own kernels
    for those ops are replaced inside this context only)."""
    lib = Library('aten', 'IMPL')
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')  # "overriding a previously registered kernel": meant, and undone below
            for qualified in CUDA_FP32_OPS:
                lib.impl(qualified, _cast_kernel(_aten(qualified), torch.float32), 'AutocastCPU')
            for qualified in CUDA_FP32_DTYPE_OPS:
                lib.impl(qualified, _dtype_kernel(_aten(qualified)), 'AutocastCPU')
            for qualified in CUDA_PROMOTE_OPS:
                lib.impl(qualified, _cast_kernel(_aten(qualified), None), 'AutocastCPU')
        with torch.autocast('cpu', dtype=dtype):
            yield
    finally:
        lib._destroy()


def fake_module(build: Callable[[], nn.Module], fake_mode: FakeTensorMode) -> nn.Module:
    """``build()`` on the meta device, then its parameters and buffers as fake (CPU) tensors of ``fake_mode``."""
    with torch.device('meta'):
        module = build()
    with fake_mode:
        module.to_empty(device='cpu')
    return module


def _loss(out: torch.Tensor, is_model: bool) -> torch.Tensor:
    # the losses of benchmarks.throughput: cross-entropy on the logits, or the mean square of a layer's output
    if is_model:
        target = torch.arange(out.shape[0], device=out.device) % out.shape[-1]
        return F.cross_entropy(out.float(), target)
    return out.float().pow(2).mean()


def record_step(module: nn.Module, input_shape: Tuple[int, ...], batch_size: int, train: bool, is_model: bool,
                fake_mode: FakeTensorMode, amp: Optional[torch.dtype] = torch.bfloat16) -> List[Op]:
    """The ops of one eager eval forward (``train=False``, under ``no_grad``) or one forward + backward with the
    loss of ``benchmarks.throughput`` (gradients set to None first, as timm's ``train.py`` does), under CUDA's
    autocast rules in ``amp`` (None: float32, no autocast)."""
    module.train(train)
    module.zero_grad(set_to_none=True)
    with fake_mode:
        x = torch.empty(batch_size, *input_shape)
    recorder = Recorder()
    rules = cuda_autocast_rules(amp) if amp is not None else nullcontext()
    with cpu_fast_path_off(), fake_mode, recorder, torch.set_grad_enabled(train):
        with rules:
            out = module(x)
            loss = _loss(out, is_model) if train else None
        if loss is not None:
            loss.backward()
    return recorder.ops


@contextmanager
def cpu_fast_path_off() -> Iterator[None]:
    """The layer's CPU fast paths off, so the CPU runs the ops every other device runs."""
    if cpu_fast_path is None:
        yield
        return
    fast = cpu_fast_path.set_enabled(False)
    try:
        yield
    finally:
        cpu_fast_path.set_enabled(fast)
