""" SpheroMoE: soft-routing Mixture of Experts on the hypersphere with an adaptive dual path.

MoE Jetpack (Zhu et al., NeurIPS 2024). A drop-in replacement for timm's ``Mlp``: [B, N, D] in, [B, N, D] out,
no auxiliary loss. Tokens are routed to slots by cosine similarity between L2-normalised tokens and
(LayerNorm then L2-normalised) slot queries; dispatch is a softmax over tokens, combine an entmax-1.5 (or
softmax) over all slots. Slots belong to "core" experts (large hidden) or "universal" experts (small hidden).

Defaults reproduce the released MoE Jetpack code, except where that code is buggy (see README, "Deviations").
"""
import math
from typing import List, Optional, Tuple, Type

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath
from torch.jit import Final

from .entmax import entmax15_halved
from .experts import BatchedExperts, fx_tracing

__all__ = ['SpheroMoE', 'COMBINE_MODES']

COMBINE_MODES = ('entmax15', 'softmax')

# the entmax threshold has data-dependent control flow: a leaf for plain torch.fx too (timm's tracer already
# treats it as one through register_notrace_function)
torch.fx.wrap('entmax15_halved')


def l2_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x / (||x|| + eps), the released code's form (not F.normalize's max(||x||, eps))."""
    return x / (torch.linalg.vector_norm(x, dim=-1, keepdim=True) + eps)


@torch.jit.unused
def _autocast_on(x: torch.Tensor) -> bool:
    device_type = x.device.type
    return torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)


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


@torch.jit.unused
def _attention_eager(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    if not fx_tracing(q) and _autocast_on(q):
        with torch.autocast(device_type=q.device.type, enabled=False):
            return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), scale=1.)
    return F.scaled_dot_product_attention(q, k, v, scale=1.)


def routing_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q @ k.T) @ v by ``scaled_dot_product_attention`` (scale folded into q or k), float32 under autocast."""
    if torch.jit.is_scripting():
        return F.scaled_dot_product_attention(q, k, v, scale=1.)
    return _attention_eager(q, k, v)


def _check_positive_int(name: str, value: int, allow_zero: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f'{name} must be an int, got {type(value).__name__} ({value!r}).')
    low = 0 if allow_zero else 1
    if value < low:
        raise ValueError(f'{name} must be >= {low}, got {value}.')


class SpheroMoE(nn.Module):
    """SpheroMoE layer (soft routing on the hypersphere, adaptive dual path).

    With ``num_univ=0, combine='softmax', shared_temperature=True, slot_norm=False, temperature_init=1.0`` the
    same code is a Soft MoE layer (Puigcerver et al. 2024) with L2-normalised routing and one learnable scale.
    """
    sparse_combine: Final[bool]
    sdpa_combine: bool
    num_core_slots: Final[int]
    slots_per_expert: Final[int]
    noise_std: Final[float]
    eps: Final[float]

    def __init__(
            self,
            dim: int,
            num_core: int = 98,
            num_univ: int = 196,
            core_hidden: Optional[int] = None,
            univ_hidden: Optional[int] = None,
            slots_per_expert: int = 1,
            combine: str = 'entmax15',
            temperature_init: float = 0.5,
            shared_temperature: bool = False,
            noise_std: Optional[float] = None,
            slot_norm: bool = True,
            slot_norm_eps: float = 1e-5,
            expert_drop: float = 0.4,
            drop_path: float = 0.,
            act_layer: Type[nn.Module] = nn.GELU,
            eps: float = 1e-6,
            device=None,
            dtype=None,
    ) -> None:
        """
        Args:
            dim: Token channels (input and output).
            num_core: Number of core experts (large hidden).
            num_univ: Number of universal experts (small hidden); 0 gives a single-path layer.
            core_hidden: Hidden units of a core expert (default 4 * dim).
            univ_hidden: Hidden units of a universal expert (default core_hidden // 4).
            slots_per_expert: Slots per expert; total slots = (num_core + num_univ) * slots_per_expert.
            combine: 'entmax15' (sparse, released default) or 'softmax' (paper text, Soft MoE).
            temperature_init: Initial routing temperature(s); logits are divided by it. Learned, kept positive.
            shared_temperature: One temperature for dispatch and combine instead of two.
            noise_std: Std of the Gaussian logit noise in training (None: 1 / num_slots; 0: off). Never in eval.
            slot_norm: LayerNorm on the slot queries before L2 normalisation.
            slot_norm_eps: Epsilon of that LayerNorm.
            expert_drop: Dropout inside every expert (after the activation and after fc2).
            drop_path: Per-sample drop path on the layer output (the released "MoE drop path").
            act_layer: Expert activation.
            eps: Epsilon of the L2 normalisation.
        """
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        _check_positive_int('dim', dim)
        _check_positive_int('num_core', num_core, allow_zero=True)
        _check_positive_int('num_univ', num_univ, allow_zero=True)
        _check_positive_int('slots_per_expert', slots_per_expert)
        if num_core + num_univ == 0:
            raise ValueError('SpheroMoE needs at least one expert: num_core and num_univ are both 0.')
        core_hidden = 4 * dim if core_hidden is None else core_hidden
        univ_hidden = max(1, core_hidden // 4) if univ_hidden is None else univ_hidden
        _check_positive_int('core_hidden', core_hidden)
        _check_positive_int('univ_hidden', univ_hidden)
        if combine not in COMBINE_MODES:
            raise ValueError(f'combine must be one of {COMBINE_MODES}, got {combine!r}.')
        if not temperature_init > 0:
            raise ValueError(f'temperature_init must be > 0, got {temperature_init}.')
        if noise_std is not None and noise_std < 0:
            raise ValueError(f'noise_std must be >= 0 or None, got {noise_std}.')
        for name, p in (('expert_drop', expert_drop), ('drop_path', drop_path)):
            if not 0. <= p < 1.:
                raise ValueError(f'{name} must be in [0, 1), got {p}.')

        self.dim = dim
        self.num_core = num_core
        self.num_univ = num_univ
        self.slots_per_expert = slots_per_expert
        self.num_slots = (num_core + num_univ) * slots_per_expert
        self.num_core_slots = num_core * slots_per_expert
        self.combine = combine
        self.sparse_combine = combine == 'entmax15'
        self.noise_std = float(1. / self.num_slots if noise_std is None else noise_std)
        self.eps = eps

        self.slot_queries = nn.Parameter(torch.empty(self.num_slots, dim, **dd))
        self.slot_norm = nn.LayerNorm(dim, eps=slot_norm_eps, **dd) if slot_norm else nn.Identity()
        self.temperature_init = temperature_init
        # log-parametrised so the temperature stays positive (the released scalars could reach 0 or flip sign)
        self.log_temperature = nn.Parameter(torch.empty(1 if shared_temperature else 2, **dd))

        expert_args = dict(dim=dim, slots_per_expert=slots_per_expert, act_layer=act_layer, drop=expert_drop, **dd)
        self.core = BatchedExperts(num_core, hidden_features=core_hidden, **expert_args) if num_core else None
        self.univ = BatchedExperts(num_univ, hidden_features=univ_hidden, **expert_args) if num_univ else None
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        # softmax combine through two scaled_dot_product_attention calls (eval, or no noise). Off by default: it
        # computes the routing logits twice, and on the 2-thread CPU it measured slower than the explicit path
        # (layer vs Mlp, batch 32: 1.93x against 1.73x); worth trying where fused attention kernels are fast
        self.sdpa_combine = False
        self.init_weights()

    def init_weights(self) -> None:
        """Orthogonal slot queries (as released), temperatures at ``temperature_init``, experts trunc-normal."""
        if not self.slot_queries.is_meta:
            nn.init.orthogonal_(self.slot_queries)
        nn.init.constant_(self.log_temperature, math.log(self.temperature_init))
        if isinstance(self.slot_norm, nn.LayerNorm):
            self.slot_norm.reset_parameters()
        for experts in (self.core, self.univ):
            if experts is not None:
                experts.fc1.init_weights()
                experts.fc2.init_weights()

    def route(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Dispatch and combine weights.

        Args:
            x: Tokens [B, N, D] (the block's norm2 output).

        Returns:
            dispatch [B, N, S], a distribution over tokens for each slot, and combine [B, N, S], a distribution
            over slots for each token.
        """
        queries = l2_normalize(self.slot_norm(self.slot_queries), self.eps)
        # cosine logits as (x . q) / (||x|| + eps): the token normalisation folds into the temperature scaling
        # below, which saves a pass over x and one over the [B, N, S] logits
        raw = routing_logits(x, queries)
        inv_norm = 1. / (torch.linalg.vector_norm(x, dim=-1, keepdim=True).to(raw.dtype) + self.eps)
        inv_temp = torch.exp(-self.log_temperature).to(raw.dtype)
        dispatch_scale = inv_norm * inv_temp[0]
        # entmax-1.5 works on halved scores: fold the 1/2 into the scale
        combine_scale = inv_norm * (inv_temp[-1] * 0.5 if self.sparse_combine else inv_temp[-1])
        if self.training and self.noise_std > 0.:
            noise = torch.randn_like(raw).mul_(self.noise_std)
            dispatch_logits = torch.addcmul(noise, raw, dispatch_scale)
            combine_logits = torch.addcmul(noise * 0.5 if self.sparse_combine else noise, raw, combine_scale)
        else:
            dispatch_logits = raw * dispatch_scale
            combine_logits = raw * combine_scale
        dispatch = torch.softmax(dispatch_logits, dim=1)
        if self.sparse_combine:
            combine = entmax15_halved(combine_logits, dim=-1)
        else:
            combine = torch.softmax(combine_logits, dim=-1)
        return dispatch, combine

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x: Tokens [B, N, D].

        Returns:
            Tokens [B, N, D].
        """
        if self.sdpa_combine and not self.sparse_combine and not (self.training and self.noise_std > 0.):
            return self.drop_path(self._forward_attention(x))
        dispatch, combine = self.route(x)
        slots = torch.bmm(dispatch.transpose(1, 2), x)
        c = self.num_core_slots
        out: Optional[torch.Tensor] = None
        if self.core is not None and self.univ is not None:
            # split, not slice: the backward of a split is one concatenation, a slice's is a zero-filled copy each
            core_slots, univ_slots = slots.split([c, self.num_slots - c], dim=1)
            core_combine, univ_combine = combine.split([c, self.num_slots - c], dim=2)
            out = torch.bmm(core_combine, self.core(core_slots))
            out = torch.baddbmm(out, univ_combine, self.univ(univ_slots))
        elif self.core is not None:
            out = torch.bmm(combine, self.core(slots))
        elif self.univ is not None:
            out = torch.bmm(combine, self.univ(slots))
        assert out is not None
        # per-sample drop path on the expert outputs commutes with the (linear) combine
        return self.drop_path(out)

    def _forward_attention(self, x: torch.Tensor) -> torch.Tensor:
        """Softmax dispatch and combine as two ``scaled_dot_product_attention`` calls (no noise).

        dispatch: slots = softmax_tokens(q_s . k_n / T_d) x_n; combine: y_n = softmax_slots(k_n . q_s / T_c) Y_s,
        with k the L2-normalised tokens and q the normalised slot queries. The fused kernel never materialises
        the [B, N, S] logits, at the price of computing them twice.
        """
        b, n, d = x.shape
        queries = l2_normalize(self.slot_norm(self.slot_queries), self.eps)
        inv_temp = torch.exp(-self.log_temperature).to(queries.dtype)
        keys = x * (1. / (torch.linalg.vector_norm(x, dim=-1, keepdim=True) + self.eps))
        slots = routing_attention((queries * inv_temp[0]).expand(b, -1, -1), keys, x)
        c = self.num_core_slots
        parts: List[torch.Tensor] = []
        if self.core is not None and self.univ is not None:
            core_slots, univ_slots = slots.split([c, self.num_slots - c], dim=1)
            parts.append(self.core.forward_expert_major(self.core.to_expert_major(core_slots)))
            parts.append(self.univ.forward_expert_major(self.univ.to_expert_major(univ_slots)))
        elif self.core is not None:
            parts.append(self.core.forward_expert_major(self.core.to_expert_major(slots)))
        elif self.univ is not None:
            parts.append(self.univ.forward_expert_major(self.univ.to_expert_major(slots)))
        h = torch.cat(parts, dim=0) if len(parts) > 1 else parts[0]
        # expert-major [E, B * s, D] -> [B, S, D] (a strided view when s == 1)
        s = self.slots_per_expert
        expert_out = h.reshape(h.shape[0], b, s, d).transpose(0, 1).reshape(b, self.num_slots, d)
        return routing_attention(keys, (queries * inv_temp[-1]).expand(b, -1, -1), expert_out)

    def extra_repr(self) -> str:
        return f'dim={self.dim}, num_core={self.num_core}, num_univ={self.num_univ}, ' \
               f'slots_per_expert={self.slots_per_expert}, combine={self.combine!r}, noise_std={self.noise_std:.4g}'
