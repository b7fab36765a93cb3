""" The batched-linear math of the experts (plain, and with its weight gradient in place) and the tracing queries
that the experts and their CPU fast path share. """
from typing import Any, Optional

import torch

try:
    from torch.fx._symbolic_trace import is_fx_symbolic_tracing
except ImportError:  # torch < 2.9: one flag for every fx tracer (make_fx too), which only costs the fast paths there
    from torch.fx._symbolic_trace import is_fx_tracing as is_fx_symbolic_tracing

__all__ = ['batched_linear_ops', 'batched_linear_in_weight_dtype', 'batched_linear_with_grad', 'fx_tracing',
           'autocast_dtype']


def batched_linear_ops(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """x [E, M, in] @ weight [E, out, in]^T + bias [E, out]: one ``bmm``/``baddbmm`` over all experts; the
    transposed weight goes to BLAS as a view."""
    w = weight.transpose(1, 2)
    if bias is None:
        return torch.bmm(x, w)
    return torch.baddbmm(bias.unsqueeze(1), x, w)


def batched_linear_in_weight_dtype(
        x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """:func:`batched_linear_ops`, computed in the weight's dtype where it differs from the input's (experts kept
    in a lower precision by ``cast_experts``), answered in the input's."""
    if weight.dtype == x.dtype:
        return batched_linear_ops(x, weight, bias)
    return batched_linear_ops(x.to(weight.dtype), weight, bias).to(x.dtype)


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


class _WeightGradInLayout(torch.autograd.Function):
    """x @ W^T + b per expert, with the weight gradient computed straight in W's [E, out, in] layout.

    Autograd's own ``bmm`` backward makes the gradient of ``W^T`` ([E, in, out]) and the parameter then takes a
    transposed copy of it: a strided copy of every expert weight on every step (about 1.3 s of a 2.9 s ViT-T train
    step at batch 16 on a 2-core CPU; an extra copy kernel per expert linear layer on a GPU). A ``recycler``, where
    given, provides the memory the weight gradient is written into (the CPU fast path's ``GradRecycler``)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                recycler: Optional[Any]) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        ctx.recycler = recycler
        return batched_linear_ops(x, weight, bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad_x = torch.bmm(grad, weight) if ctx.needs_input_grad[0] else None
        grad_w = None
        if ctx.needs_input_grad[1]:
            out = ctx.recycler.buffer(weight) if ctx.recycler is not None else None
            grad_w = torch.bmm(grad.transpose(1, 2), x, out=out)
        grad_b = grad.sum(1) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b, None


@torch.jit.unused
def batched_linear_with_grad(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                             recycler: Optional[Any] = None) -> torch.Tensor:
    """The experts' linear layer where autograd records it (eager): the plain ops' values, the weight gradient in
    W's layout, and written into ``recycler.buffer(weight)`` where a recycler is given (same dtype, no autocast)."""
    dtype = autocast_dtype(x)
    if dtype is not None:
        # cast as autocast would for bmm/baddbmm; the casts are ordinary ops, so the weight gradient reaches the
        # float32 parameter as autocast's would
        with torch.autocast(device_type=x.device.type, enabled=False):
            return _WeightGradInLayout.apply(
                x.to(dtype), weight.to(dtype), bias.to(dtype) if bias is not None else None, None)
    if weight.dtype != x.dtype:
        # experts kept in a lower precision (cast_experts): compute in theirs, answer in the caller's
        return _WeightGradInLayout.apply(x.to(weight.dtype), weight, bias, None).to(x.dtype)
    return _WeightGradInLayout.apply(x, weight, bias, recycler)
