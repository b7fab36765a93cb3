""" The batched-linear math of the experts (plain, and with its weight gradient in place), the dtype they compute in,
and the tracing queries that the experts and their CPU fast path share. """
import contextlib
from typing import Any, Optional, Tuple

import torch

__all__ = ['batched_linear_ops', 'batched_linear_in_weight_dtype', 'batched_linear_with_grad', 'fx_tracing',
           'autocast_dtype', 'expert_dtypes', 'autocast_off']


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
    in a lower precision by ``cast_experts``), answered in the input's. TorchScript's path (no autocast there)."""
    if weight.dtype == x.dtype:
        return batched_linear_ops(x, weight, bias)
    return batched_linear_ops(x.to(weight.dtype), weight, bias).to(x.dtype)


@torch.jit.unused
def fx_tracing(x: torch.Tensor) -> bool:
    """True while a torch.fx symbolic tracer (torch.fx, timm's, torchvision's feature extraction) runs this code
    on ``x``: the values it traces are ``torch.fx.Proxy`` objects. (``make_fx`` and ``torch.compile`` trace real
    or fake tensors and run the eager code.)"""
    return isinstance(x, torch.fx.Proxy)


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
def expert_dtypes(x: torch.Tensor, weight: torch.Tensor) -> Tuple[torch.dtype, torch.dtype, bool]:
    """The dtype the experts compute in, the dtype they answer in, and whether autocast is on.

    Under autocast both are autocast's dtype (``bmm``/``baddbmm`` are on its lower-precision list on the CPU and on
    CUDA alike); otherwise they compute in the weights' dtype (float32, or what ``cast_experts`` chose) and answer
    in the input's."""
    dtype = autocast_dtype(x)
    if dtype is not None:
        return dtype, dtype, True
    return weight.dtype, x.dtype, False


@torch.jit.unused
def autocast_off(x: torch.Tensor, autocast_on: bool):
    """A context that turns autocast off for ``x``'s device where it is on (the experts cast their operands once
    themselves), else nothing."""
    if autocast_on:
        return torch.autocast(device_type=x.device.type, enabled=False)
    return contextlib.nullcontext()


class _WeightGradInLayout(torch.autograd.Function):
    """x @ W^T + b per expert, with the weight gradient computed straight in W's [E, out, in] layout.

    Autograd's own ``bmm`` backward makes the gradient of ``W^T`` ([E, in, out]) and the parameter then takes a
    transposed copy of it: a strided copy of every expert weight on every step (about 1.3 s of a 2.9 s ViT-T train
    step at batch 16 on a 2-core CPU; an extra copy kernel per expert linear layer on a GPU). Under
    ``torch.compile`` the same holds: the graph's weight gradient comes out transposed and the parameter copies it.
    A ``recycler``, where given, provides the memory the weight gradient is written into (the CPU fast path's
    ``GradRecycler``)."""

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
            if ctx.recycler is None:
                grad_w = torch.bmm(grad.transpose(1, 2), x)
            else:
                grad_w = ctx.recycler.weight_grad(grad, x, weight)
        grad_b = grad.sum(1) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b, None


@torch.jit.unused
def batched_linear_with_grad(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                             recycler: Optional[Any] = None) -> torch.Tensor:
    """The experts' linear layer (eager or compiled, autograd recording), in the dtypes of :func:`expert_dtypes`.

    Each operand is cast at most once, and not at all where it already is in the compute dtype (under autocast
    with ``cast_experts`` weights, or inputs already cast by :class:`BatchedExperts`); the casts are ordinary ops,
    so the weight gradient reaches a float32 parameter as autocast's would. The weight gradient comes in W's
    layout, written into ``recycler.buffer(weight)`` where a recycler is given and no cast stands between."""
    dtype, answer, autocast_on = expert_dtypes(x, weight)
    if weight.dtype != dtype:
        weight, recycler = weight.to(dtype), None
    if bias is not None:
        bias = bias.to(dtype)
    with autocast_off(x, autocast_on):
        if torch.is_grad_enabled():
            out = _WeightGradInLayout.apply(x.to(dtype), weight, bias, recycler)
        else:
            out = batched_linear_ops(x.to(dtype), weight, bias)
    return out.to(answer)
