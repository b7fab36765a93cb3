""" SpheroRouter: the routing of a SpheroMoE layer as a module of its own (tokens in, dispatch and combine out).

Tokens are routed to slots by cosine similarity between L2-normalised tokens and (LayerNorm then L2-normalised)
slot queries, scaled by learned temperatures; dispatch is a softmax over tokens for each slot, combine an
entmax-1.5 (or softmax) over slots for each token. The router holds its parameters (slot queries, slot norm,
log-temperatures) and its training noise; the combine kind and the temperature sharing are its settings. From the
scores on, the routing is one operator (:mod:`timm_moejet.layers.routing_op`).
"""
import math
from typing import Optional, Tuple

import torch
import torch.nn as nn
from torch.jit import Final

from ..errors import InvalidArgument
from .expert_ops import autocast_dtype, fx_tracing
from .routing_op import routing_weights

__all__ = ['COMBINE_MODES', 'SpheroRouter', 'l2_normalize', 'routing_logits']

COMBINE_MODES = ('entmax15', 'softmax')

# one operator: a leaf for plain torch.fx too (timm's tracer treats it as one through register_notrace_function)
torch.fx.wrap('routing_weights')


def l2_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x / (||x|| + eps), the released code's form (not F.normalize's max(||x||, eps))."""
    return x / (torch.linalg.vector_norm(x, dim=-1, keepdim=True) + eps)


@torch.jit.unused
def _autocast_on(x: torch.Tensor) -> bool:
    return autocast_dtype(x) is not None


@torch.jit.unused
def _routing_logits_eager(x: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    if not fx_tracing(x) and _autocast_on(x):
        # routing stays float32 under autocast: a bf16 cosine keeps ~3 digits, too coarse for the entmax threshold
        with torch.autocast(device_type=x.device.type, enabled=False):
            return torch.matmul(x.float(), queries.float().t())
    return torch.matmul(x, queries.t())


def routing_logits(x: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """x @ queries.T, in float32 under autocast."""
    if torch.jit.is_scripting():
        return torch.matmul(x, queries.t())
    return _routing_logits_eager(x, queries)


class SpheroRouter(nn.Module):
    """Soft routing on the hypersphere: tokens [B, N, D] to dispatch and combine weights [B, N, S].

    Parameters: ``slot_queries`` [S, D] (orthogonal init, as released), ``slot_norm`` (a LayerNorm, or Identity
    without it) and ``log_temperature`` (one entry shared by dispatch and combine, or two: dispatch, combine),
    log-parametrised so that a temperature stays positive.
    """
    sparse: Final[bool]
    noise_std: Final[float]
    eps: Final[float]

    def __init__(
            self,
            dim: int,
            num_slots: int,
            *,
            combine: str,
            temperature_init: float,
            shared_temperature: bool,
            noise_std: Optional[float],
            slot_norm: bool,
            slot_norm_eps: float,
            l2_eps: float,
            device=None,
            dtype=None,
    ) -> None:
        """
        Args:
            dim: Token channels.
            num_slots: Slots to route to.
            combine: ``'entmax15'`` (sparse, released) or ``'softmax'`` over slots.
            temperature_init: Initial temperature (the scores are divided by it).
            shared_temperature: One temperature for dispatch and combine instead of two.
            noise_std: Std of the Gaussian score noise in training (None: 1 / num_slots; 0: off).
            slot_norm: LayerNorm on the slot queries before their L2 normalisation.
            slot_norm_eps: Epsilon of that LayerNorm.
            l2_eps: Epsilon of the L2 normalisation: x / (||x|| + eps).

        The parameters are created empty: :meth:`reset_parameters` draws them (the layer calls it after its experts
        are built, the order in which recycled and seeded weights were made).
        """
        super().__init__()
        if combine not in COMBINE_MODES:
            raise InvalidArgument(f'SpheroRouter combine must be one of {", ".join(COMBINE_MODES)}, got {combine!r}.')
        dd = {'device': device, 'dtype': dtype}
        self.num_slots = num_slots
        self.combine = combine
        self.sparse = combine == 'entmax15'
        self.noise_std = float(1. / num_slots if noise_std is None else noise_std)
        self.eps = l2_eps
        self.temperature_init = temperature_init
        self.slot_queries = nn.Parameter(torch.empty(num_slots, dim, **dd))
        self.slot_norm = nn.LayerNorm(dim, eps=slot_norm_eps, **dd) if slot_norm else nn.Identity()
        # log-parametrised so the temperature stays positive (the released scalars could reach 0 or flip sign)
        self.log_temperature = nn.Parameter(torch.empty(1 if shared_temperature else 2, **dd))

    def reset_parameters(self) -> None:
        """Orthogonal slot queries (as released), temperatures at ``temperature_init``, the slot norm's defaults."""
        if not self.slot_queries.is_meta:
            nn.init.orthogonal_(self.slot_queries)
        nn.init.constant_(self.log_temperature, math.log(self.temperature_init))
        if isinstance(self.slot_norm, nn.LayerNorm):
            self.slot_norm.reset_parameters()

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            x: Tokens [B, N, D].

        Returns:
            dispatch [B, N, S], a distribution over tokens for each slot, and combine [B, N, S], a distribution
            over slots for each token.
        """
        queries = l2_normalize(self.slot_norm(self.slot_queries), self.eps)
        # cosine scores as (x . q) / (||x|| + eps): the token normalisation folds into the temperature scales
        # below, which saves a pass over x and one over the [B, N, S] scores
        raw = routing_logits(x, queries)
        inv_norm = 1. / (torch.linalg.vector_norm(x, dim=-1, keepdim=True).to(raw.dtype) + self.eps)
        inv_temp = torch.exp(-self.log_temperature).to(raw.dtype)
        dispatch_scale = inv_norm * inv_temp[0]
        # entmax-1.5 works on halved scores: fold the 1/2 into the scale
        combine_scale = inv_norm * (inv_temp[-1] * 0.5 if self.sparse else inv_temp[-1])
        noise_std = self.noise_std if self.training else 0.
        return routing_weights(raw, dispatch_scale, combine_scale, noise_std, self.sparse)

    def extra_repr(self) -> str:
        return f'num_slots={self.num_slots}, combine={self.combine!r}, noise_std={self.noise_std:.4g}'
