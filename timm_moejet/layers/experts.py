""" Batched experts: many same-shaped MLPs applied with one matmul per linear layer. """
import contextlib
import threading
from typing import Any, Dict, Iterator, Optional, Type

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_

try:
    from torch.fx._symbolic_trace import is_fx_symbolic_tracing
except ImportError:  # torch < 2.9: one flag for every fx tracer (make_fx too), which only costs the fast paths there
    from torch.fx._symbolic_trace import is_fx_tracing as is_fx_symbolic_tracing

from ..errors import InvalidArgument

__all__ = [
    'BatchedLinear', 'BatchedExperts', 'ExpertDropout', 'batched_linear', 'cast_experts', 'experts_to_be_loaded',
]

_construction = threading.local()


@contextlib.contextmanager
def experts_to_be_loaded() -> Iterator[None]:
    """Within: expert weights are allocated but not initialised, because a checkpoint is about to overwrite them
    (drawing 260M random values, or even zeroing them, costs seconds). Everything else initialises as usual. Whoever
    uses this must fill every expert: the pretrained filter checks that a checkpoint holds them all."""
    previous = getattr(_construction, 'to_be_loaded', False)
    _construction.to_be_loaded = True
    try:
        yield
    finally:
        _construction.to_be_loaded = previous


def _batched_linear_ops(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    w = weight.transpose(1, 2)
    if bias is None:
        return torch.bmm(x, w)
    return torch.baddbmm(bias.unsqueeze(1), x, w)


def _batched_linear_in_weight_dtype(
        x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    if weight.dtype == x.dtype:
        return _batched_linear_ops(x, weight, bias)
    # experts kept in a lower precision (cast_experts): compute in theirs, answer in the caller's
    return _batched_linear_ops(x.to(weight.dtype), weight, bias).to(x.dtype)


class GradRecycler:
    """Keeps the memory of one weight's gradient between train steps on CPU, and hands it back to the next backward.

    timm's ``train.py`` sets gradients to None before every step, so each backward allocates the expert weight
    gradients afresh (174 MB per ViT-T MoE layer). On CPU such allocations come straight from the OS (glibc serves
    blocks over 32 MB with ``mmap``) and every page faults on first touch: measured here, 27 ms per 58 MB gradient,
    about as long as computing it. CUDA's caching allocator already reuses freed memory, so only CPU recycles.

    The storage is reused only while nothing else holds it (``p.grad`` was set to None and no other tensor views it),
    so a gradient a caller kept from an earlier step never changes. With ``p.grad`` present (gradient accumulation) a
    second storage receives the new gradient, which autograd then adds into ``p.grad``. ``BatchedLinear.train(False)``
    and moving the module release both.
    """

    def __init__(self) -> None:
        self._storages: Dict[bool, torch.UntypedStorage] = {}

    def clear(self) -> None:
        self._storages.clear()

    def buffer(self, weight: torch.Tensor) -> torch.Tensor:
        """A tensor of ``weight``'s shape for its next gradient: recycled memory where free, else fresh."""
        accumulating = weight.grad is not None
        storage = self._storages.get(accumulating)
        nbytes = weight.numel() * weight.element_size()
        if (storage is not None and storage.nbytes() == nbytes and storage.device == weight.device
                and torch._C._storage_Use_Count(storage._cdata) == 1):
            return torch.empty(0, dtype=weight.dtype, device=weight.device).set_(storage, 0, weight.shape)
        out = torch.empty_like(weight, memory_format=torch.contiguous_format)
        self._storages[accumulating] = out.untyped_storage()
        return out

    def __deepcopy__(self, memo: Dict[int, Any]) -> 'GradRecycler':
        return GradRecycler()  # memory, not state: a copy starts empty

    def __getstate__(self) -> Dict[str, Any]:
        return {'_storages': {}}


_RECYCLING = hasattr(torch._C, '_storage_Use_Count')


class _BatchedLinearFunction(torch.autograd.Function):
    """x @ W^T + b per expert, with the weight gradient computed straight in W's [E, out, in] layout.

    Autograd's own bmm backward yields the gradient of W^T ([E, in, out]) and then copies it into W's layout:
    a full transpose of every expert weight on every step (measured: the largest single cost of a train step).
    With a :class:`GradRecycler` the weight gradient is written into recycled memory.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                recycler: Optional[GradRecycler]) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        ctx.recycler = recycler
        return _batched_linear_ops(x, weight, bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad_x = torch.bmm(grad, weight) if ctx.needs_input_grad[0] else None
        grad_w = None
        if ctx.needs_input_grad[1]:
            if ctx.recycler is not None:
                grad_w = torch.bmm(grad.transpose(1, 2), x, out=ctx.recycler.buffer(weight))
            else:
                grad_w = torch.bmm(grad.transpose(1, 2), x)
        grad_b = grad.sum(1) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b, None


@torch.jit.unused
def fx_tracing(x: torch.Tensor) -> bool:
    """True while any torch.fx tracer (torch.fx, timm's, torchvision's feature extraction) runs this code."""
    return isinstance(x, torch.fx.Proxy) or is_fx_symbolic_tracing()


# device types with autocast, found once at import: the query behind it (torch._C._is_autocast_available) is not
# traceable by torch.compile, while is_autocast_enabled / get_autocast_dtype of a known device type are
_AUTOCAST_DEVICE_TYPES = frozenset(
    d for d in ('cpu', 'cuda', 'xpu', 'mps', 'hpu', 'mtia', 'xla', 'ipu') if torch.amp.is_autocast_available(d))


@torch.jit.unused
def autocast_dtype(x: torch.Tensor) -> Optional[torch.dtype]:
    """The dtype autocast computes ``x``'s matmuls in, or None where autocast is off for its device (traceable)."""
    device_type = x.device.type
    if device_type in _AUTOCAST_DEVICE_TYPES and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


@torch.jit.unused
def _batched_linear_eager(
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: Optional[torch.Tensor],
        recycler: Optional[GradRecycler] = None,
) -> torch.Tensor:
    if fx_tracing(x):
        return _batched_linear_ops(x, weight, bias)  # fx records plain ops
    if not torch.is_grad_enabled():
        return _batched_linear_in_weight_dtype(x, weight, bias)  # no autograd: the custom backward has nothing to do
    device_type = x.device.type
    dtype = autocast_dtype(x)
    if dtype is not None:
        # cast as autocast would for bmm/baddbmm, then run the fast backward on the low-precision operands; the
        # casts are ordinary ops, so the weight gradient reaches the float32 parameter as autocast's would
        with torch.autocast(device_type=device_type, enabled=False):
            return _BatchedLinearFunction.apply(
                x.to(dtype), weight.to(dtype), bias.to(dtype) if bias is not None else None, None)
    if weight.dtype != x.dtype:
        # experts kept in a lower precision (cast_experts): compute in theirs, answer in the caller's
        return _BatchedLinearFunction.apply(x.to(weight.dtype), weight, bias, None).to(x.dtype)
    if recycler is not None and (device_type != 'cpu' or not _RECYCLING or torch.compiler.is_compiling()
                                 or not weight.is_leaf):
        recycler = None
    return _BatchedLinearFunction.apply(x, weight, bias, recycler)


def batched_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-expert linear layer: x [E, M, in], weight [E, out, in], bias [E, out] -> [E, M, out]."""
    if torch.jit.is_scripting():
        return _batched_linear_in_weight_dtype(x, weight, bias)
    return _batched_linear_eager(x, weight, bias)


_LANE_VALUES = 1 << 16  # a keep decision per 16-bit lane: four per 64-bit random word


@torch.jit.unused
def _lane_dropout(x: torch.Tensor, p: float) -> Optional[torch.Tensor]:
    """Lane-mask dropout of ``x`` on CPU; None where ``F.dropout`` applies (other devices, fx, compiled graphs,
    which fuse their own, and p beyond the lanes' resolution)."""
    if (fx_tracing(x) or torch.compiler.is_compiling() or x.device.type != 'cpu'
            or not 0 < round(p * _LANE_VALUES) < _LANE_VALUES):
        return None
    return x * lane_dropout_scale(x, p)


@torch.jit.unused
def lane_dropout_scale(x: torch.Tensor, p: float) -> torch.Tensor:
    """Dropout's multiplier for ``x``: 0 with probability ``p``, else the inverse of the keep probability.

    Drawn as 16-bit lanes of 64-bit random words: each lane is uniform on 65536 values and drops below
    ``round(p * 65536)``, so the drop probability is ``p`` to within 2**-17, and kept values are scaled by the inverse
    of the exact keep probability (the expectation stays exact). A 64-bit word feeds four decisions: about 6x fewer
    generator calls than ``torch.rand`` (one 32-bit draw and a float conversion per element) on CPU, where the
    generator runs on one core. The multiplier is built in float (a bool mask is ~5x slower to multiply by here).
    """
    n = x.numel()
    drop_below = round(p * _LANE_VALUES)
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device).random_(-2 ** 63, None)
    lanes = words.view(torch.int16)[:n].view(x.shape)
    # compared in float32, which holds every lane exactly (bfloat16 would round them)
    keep = lanes.float().ge_(drop_below - _LANE_VALUES // 2).mul_(_LANE_VALUES / (_LANE_VALUES - drop_below))
    return keep if x.dtype == torch.float32 else keep.to(x.dtype)


class ExpertDropout(nn.Dropout):
    """``nn.Dropout`` whose CPU mask comes from 16-bit lanes of 64-bit random words (:func:`lane_dropout_scale`).

    Same distribution (keep with probability 1 - p, to within 2**-17; kept values scaled by the inverse of the exact
    keep probability); on CPU the generator is the bottleneck of expert dropout, which runs on every hidden unit
    and output of every expert (about 11 M decisions per layer at batch 64). The random stream differs from
    ``nn.Dropout``'s. Other devices (and TorchScript, fx) use ``F.dropout``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.:
            return x
        if not torch.jit.is_scripting():
            out = _lane_dropout(x, self.p)
            if out is not None:
                return out
        return F.dropout(x, self.p, True, self.inplace)


class BatchedLinear(nn.Module):
    """``num_experts`` independent linear layers, weights stacked as [E, out, in] (nn.Linear's layout per expert).

    Input is expert-major, [E, M, in]; one ``baddbmm`` computes all experts. Per-expert weights keep
    ``nn.Linear``'s [out, in] layout so a dense ``fc`` weight slice copies straight in, and the transposed
    view is handed to BLAS without a copy.
    """

    def __init__(
            self,
            num_experts: int,
            in_features: int,
            out_features: int,
            bias: bool = True,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.num_experts = num_experts
        self.in_features = in_features
        self.out_features = out_features
        to_be_loaded = getattr(_construction, 'to_be_loaded', False)
        self.weight = nn.Parameter(torch.empty(num_experts, out_features, in_features, **dd))
        self.bias = nn.Parameter(torch.zeros(num_experts, out_features, **dd)) if bias else None
        self.grad_recycler = GradRecycler()
        if not to_be_loaded:
            self.reset_parameters()

    def reset_parameters(self) -> None:
        """trunc-normal(0.02) weights, zero biases. Called once, at construction; timm's init pass leaves it alone
        (it calls ``reset_parameters`` only when asked to reset a built model)."""
        # per-expert fan-in (the official kaiming init on the 3-D tensor used fan_in = out * in, far too small)
        if self.weight.is_meta:
            return
        trunc_normal_(self.weight, std=.02)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            return batched_linear(x, self.weight, self.bias)
        return self._forward_eager(x)

    @torch.jit.unused
    def _forward_eager(self, x: torch.Tensor) -> torch.Tensor:
        return _batched_linear_eager(x, self.weight, self.bias, self.grad_recycler)

    def train(self, mode: bool = True) -> 'BatchedLinear':
        if not mode:
            self.grad_recycler.clear()  # eval keeps no gradient memory
        return super().train(mode)

    def _apply(self, fn, recurse: bool = True):
        self.grad_recycler.clear()  # the recycled memory belongs to the old device and dtype
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        return f'num_experts={self.num_experts}, in_features={self.in_features}, ' \
               f'out_features={self.out_features}, bias={self.bias is not None}'


def cast_experts(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> int:
    """Keep every expert weight and bias of ``model`` in ``dtype`` (an opt-in inference mode; default bfloat16).

    The expert GEMMs then read half the bytes (their weights are nearly all of a MoE model's) and run in ``dtype``;
    their inputs are cast to it and their outputs back, so routing, attention and everything else stay in the
    model's precision. Measured error against float32 is in ``docs/benchmarks.md``; on hardware without native
    bfloat16 GEMMs (many CPUs) this saves memory, not time. ``cast_experts(model, torch.float32)`` undoes it.

    Returns:
        The number of expert linear layers cast.

    Raises:
        InvalidArgument: ``dtype`` is not a floating-point type, or ``model`` holds no experts.
    """
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise InvalidArgument(f'cast_experts needs a floating-point torch.dtype, got {dtype!r}')
    layers = [m for m in model.modules() if isinstance(m, BatchedLinear)]
    if not layers:
        raise InvalidArgument(f'{type(model).__name__} has no experts to cast (no BatchedLinear inside)')
    for layer in layers:
        layer.to(dtype)
    return len(layers)


class BatchedExperts(nn.Module):
    """A group of same-sized expert MLPs: fc1 -> act -> dropout -> fc2 -> dropout, batched over experts."""

    def __init__(
            self,
            num_experts: int,
            dim: int,
            hidden_features: int,
            slots_per_expert: int = 1,
            act_layer: Type[nn.Module] = nn.GELU,
            drop: float = 0.,
            bias: bool = True,
            device=None,
            dtype=None,
    ) -> None:
        """
        Args:
            num_experts: Number of experts in the group.
            dim: Input and output channels.
            hidden_features: Hidden units per expert.
            slots_per_expert: Slots each expert processes.
            act_layer: Activation between the two linear layers.
            drop: Dropout after the activation and after fc2 (as the released code).
            bias: Use biases.
        """
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.num_experts = num_experts
        self.hidden_features = hidden_features
        self.slots_per_expert = slots_per_expert
        self.fc1 = BatchedLinear(num_experts, dim, hidden_features, bias=bias, **dd)
        self.act = act_layer()
        self.drop1 = ExpertDropout(drop)
        self.fc2 = BatchedLinear(num_experts, hidden_features, dim, bias=bias, **dd)
        self.drop2 = ExpertDropout(drop)

    def forward_expert_major(self, x: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x: Expert-major slot inputs [E, M, dim].

        Returns:
            Expert outputs [E, M, dim].
        """
        x = self.drop1(self.act(self.fc1(x)))
        return self.drop2(self.fc2(x))

    def to_expert_major(self, slots: torch.Tensor) -> torch.Tensor:
        """[B, E * slots_per_expert, D] -> [E, B * slots_per_expert, D]; a strided view (no copy) when s == 1."""
        b, es, d = slots.shape
        s = self.slots_per_expert
        return slots.reshape(b, es // s, s, d).transpose(0, 1).reshape(es // s, b * s, d)

    def from_expert_major(self, h: torch.Tensor, batch_size: int) -> torch.Tensor:
        """[E, B * s, D] -> [B, E * s, D]; a strided view (no copy) when s == 1, which bmm consumes as is."""
        e, bs, d = h.shape
        s = self.slots_per_expert
        if s == 1:
            return h.transpose(0, 1)
        return h.reshape(e, batch_size, s, d).transpose(0, 1).reshape(batch_size, e * s, d)

    def forward(self, slots: torch.Tensor) -> torch.Tensor:
        """
        Args:
            slots: Slot inputs [B, E * slots_per_expert, dim], expert-major within the slot axis.

        Returns:
            Slot outputs of the same shape (a strided view of the expert-major result when s == 1).
        """
        h = self.forward_expert_major(self.to_expert_major(slots))
        return self.from_expert_major(h, slots.shape[0])
