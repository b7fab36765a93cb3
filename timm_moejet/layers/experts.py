""" Batched experts: many same-shaped MLPs applied with one matmul per linear layer. """
import contextlib
import threading
from typing import Iterator, Optional, Type

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch.fx._symbolic_trace import is_fx_symbolic_tracing

__all__ = ['BatchedLinear', 'BatchedExperts', 'ExpertDropout', 'batched_linear', 'experts_to_be_loaded']

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


class _BatchedLinearFunction(torch.autograd.Function):
    """x @ W^T + b per expert, with the weight gradient computed straight in W's [E, out, in] layout.

    Autograd's own bmm backward yields the gradient of W^T ([E, in, out]) and then copies it into W's layout:
    a full transpose of every expert weight on every step (measured: the largest single cost of a train step).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _batched_linear_ops(x, weight, bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad_x = torch.bmm(grad, weight) if ctx.needs_input_grad[0] else None
        grad_w = torch.bmm(grad.transpose(1, 2), x) if ctx.needs_input_grad[1] else None
        grad_b = grad.sum(1) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b


@torch.jit.unused
def fx_tracing(x: torch.Tensor) -> bool:
    """True while any torch.fx tracer (torch.fx, timm's, torchvision's feature extraction) runs this code."""
    return isinstance(x, torch.fx.Proxy) or is_fx_symbolic_tracing()


@torch.jit.unused
def _batched_linear_eager(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    if fx_tracing(x) or not torch.is_grad_enabled():
        # fx records plain ops; without autograd the custom backward has nothing to do
        return _batched_linear_ops(x, weight, bias)
    device_type = x.device.type
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        # cast as autocast would for bmm/baddbmm, then run the fast backward on the low-precision operands; the
        # casts are ordinary ops, so the weight gradient reaches the float32 parameter as autocast's would
        dtype = torch.get_autocast_dtype(device_type)
        with torch.autocast(device_type=device_type, enabled=False):
            return _BatchedLinearFunction.apply(
                x.to(dtype), weight.to(dtype), bias.to(dtype) if bias is not None else None)
    return _BatchedLinearFunction.apply(x, weight, bias)


def batched_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-expert linear layer: x [E, M, in], weight [E, out, in], bias [E, out] -> [E, M, out]."""
    if torch.jit.is_scripting():
        return _batched_linear_ops(x, weight, bias)
    return _batched_linear_eager(x, weight, bias)


@torch.jit.unused
def _rand_mask_dropout_ok(x: torch.Tensor) -> bool:
    return not fx_tracing(x) and x.device.type == 'cpu'


class ExpertDropout(nn.Dropout):
    """``nn.Dropout`` whose CPU mask comes from ``torch.rand`` >= p instead of ``bernoulli_``.

    Same distribution (keep with probability 1 - p, scale by 1 / (1 - p)); on CPU ``bernoulli_`` is about 3x
    slower than drawing uniforms, and expert dropout runs on every hidden unit of every expert. Other devices
    (and TorchScript, fx) use ``F.dropout``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.:
            return x
        if torch.jit.is_scripting() or self.p == 1. or not _rand_mask_dropout_ok(x):
            return F.dropout(x, self.p, True, self.inplace)
        keep = torch.rand_like(x).ge_(self.p).mul_(1. / (1. - self.p))
        return x * keep


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
        return batched_linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f'num_experts={self.num_experts}, in_features={self.in_features}, ' \
               f'out_features={self.out_features}, bias={self.bias is not None}'


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
