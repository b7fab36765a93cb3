""" Batched experts: many same-shaped MLPs applied with one matmul per linear layer. """
import contextlib
import threading
from typing import Iterator, Optional, Type

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_

from ..errors import InvalidArgument
from . import cpu_fast_path
from .expert_ops import (
    batched_linear_in_weight_dtype,
    batched_linear_ops,
    batched_linear_with_grad,
    expert_dtypes,
    fx_tracing,
)

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


def batched_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-expert linear layer: x [E, M, in], weight [E, out, in], bias [E, out] -> [E, M, out]."""
    if torch.jit.is_scripting():
        return batched_linear_in_weight_dtype(x, weight, bias)
    return _batched_linear_eager(x, weight, bias)


@torch.jit.unused
def _batched_linear_eager(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                          recycler: Optional[cpu_fast_path.GradRecycler] = None) -> torch.Tensor:
    if fx_tracing(x):
        return batched_linear_ops(x, weight, bias)  # fx records plain ops (a dtype test would need a value)
    # eager and compiled alike: under torch.compile the custom backward keeps the weight gradient in its layout too
    return batched_linear_with_grad(x, weight, bias, cpu_fast_path.grad_recycler(x, weight, recycler))


class ExpertDropout(nn.Dropout):
    """``nn.Dropout`` for the experts: on the CPU its mask comes from :func:`cpu_fast_path.dropout` (same
    distribution, a cheaper generator; the random stream differs), elsewhere from ``F.dropout``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.:
            return x
        if not torch.jit.is_scripting():
            out = cpu_fast_path.dropout(x, self.p)
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
        self.grad_recycler = cpu_fast_path.GradRecycler()  # CPU training only
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
            self.grad_recycler.clear()  # eval keeps no gradient memory (CPU fast path)
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
    each expert group casts its input to it once and its output back once (the hidden activations stay in
    ``dtype``), so routing, attention and everything else stay in the model's precision. Measured error against
    float32 is in ``docs/benchmarks.md``; on hardware without native bfloat16 GEMMs (many CPUs) this saves memory,
    not time. ``cast_experts(model, torch.float32)`` undoes it.

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
        if torch.jit.is_scripting() or fx_tracing(x):
            return self._mlp(x)
        return self._forward_cast_once(x)

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop1(self.act(self.fc1(x)))
        return self.drop2(self.fc2(x))

    @torch.jit.unused
    def _forward_cast_once(self, x: torch.Tensor) -> torch.Tensor:
        # the slots go to the experts' compute dtype once and the outputs come back once: no cast back and forth
        # between fc1 and fc2 (under autocast both are autocast's dtype, and nothing is cast back)
        dtype, answer, _ = expert_dtypes(x, self.fc1.weight)
        return self._mlp(x.to(dtype)).to(answer)

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
