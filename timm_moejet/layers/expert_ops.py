""" The plain batched-linear math and the tracing queries that the experts and their CPU fast path share. """
from typing import Optional

import torch

try:
    from torch.fx._symbolic_trace import is_fx_symbolic_tracing
except ImportError:  # torch < 2.9: one flag for every fx tracer (make_fx too), which only costs the fast paths there
    from torch.fx._symbolic_trace import is_fx_tracing as is_fx_symbolic_tracing

__all__ = ['batched_linear_ops', 'batched_linear_in_weight_dtype', 'fx_tracing', 'autocast_dtype']


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
