""" SpheroMoE: soft-routing Mixture of Experts on the hypersphere with an adaptive dual path.

MoE Jetpack (Zhu et al., NeurIPS 2024). A drop-in for timm's ``Mlp``: it takes the same constructor call (timm's
``Block`` builds it through ``functools.partial(SpheroMoE, **settings)``), maps [B, N, D] to [B, N, D] (or
channels-last [B, H, W, D] to the same) and needs no auxiliary loss. Tokens are routed to slots by cosine
similarity between L2-normalised tokens and (LayerNorm then L2-normalised) slot queries; dispatch is a softmax
over tokens, combine an entmax-1.5 (or softmax) over all slots: the layer's router
(:class:`~timm_moejet.layers.router.SpheroRouter`). Slots belong to "core" experts (large hidden) or "universal"
experts (small hidden).

Every setting is a field of :class:`SpheroMoESettings` (default, check, doc); defaults reproduce the released
MoE Jetpack code, except where that code is buggy (see docs/deviations.md).
"""
import contextlib
import dataclasses
import warnings
from typing import Any, Callable, Dict, Iterator, List, NamedTuple, Optional, Tuple, Type

import torch
import torch.nn as nn
from timm.layers import DropPath
from torch.jit import Final

from ..errors import InvalidArgument, InvalidArgumentType
from ..moe_keys import rename_legacy_layer_keys
from ..settings import boolean, check_fields, choice, integer, optional, real, setting
from .experts import BatchedExperts
from .router import COMBINE_MODES, SpheroRouter

__all__ = ['SpheroMoE', 'SpheroMoESettings', 'COMBINE_MODES', 'RoutingRecord', 'record_routing', 'layer_settings']


@dataclasses.dataclass(frozen=True)
class SpheroMoESettings:
    """The settings of a SpheroMoE layer, one name each from ``create_model`` to the layer.

    A field's name is the ``create_model`` kwarg that sets it for every MoE layer of a model and the layer's keyword
    argument. Expert counts and sizes name experts already; every other setting starts with ``moe_``, so that it
    cannot be mistaken for a kwarg of the timm model around it. Constructing the object checks every value once;
    the layer takes it as it is (``SpheroMoE(dim, settings=...)``).
    """
    num_core_experts: int = setting(98, integer(0), 'Core experts per MoE layer (large hidden).')
    num_univ_experts: int = setting(196, integer(0),
                                    'Universal experts per MoE layer (small hidden); 0: a single path.')
    core_hidden: Optional[int] = setting(
        None, optional(integer(1)), "Hidden units of a core expert (None: the block's MLP hidden, e.g. 4 x width).")
    univ_hidden: Optional[int] = setting(
        None, optional(integer(1)), 'Hidden units of a universal expert (None: a quarter of core_hidden).')
    slots_per_expert: int = setting(1, integer(1), 'Slots per expert; slots = (core + universal) x this.')
    moe_combine: str = setting('entmax15', choice(lambda: COMBINE_MODES),
                               'Combine over slots: entmax15 (sparse, released) or softmax (paper text, Soft MoE).')
    moe_temperature_init: float = setting(0.5, real(0., min_open=True),
                                          'Initial routing temperature (logits are divided by it); learned, kept > 0.')
    moe_shared_temperature: bool = setting(False, boolean(),
                                           'One temperature for dispatch and combine instead of two.')
    moe_noise_std: Optional[float] = setting(None, optional(real(0.)),
                                             'Std of the Gaussian logit noise in training (None: 1 / slots; 0: off).')
    moe_slot_norm: bool = setting(True, boolean(), 'LayerNorm on the slot queries before the L2 normalisation.')
    moe_slot_norm_eps: float = setting(1e-5, real(0., min_open=True), 'Epsilon of the slot-query LayerNorm.')
    moe_expert_drop: float = setting(0.4, real(0., 1., max_open=True),
                                     'Dropout inside every expert (after the activation and after fc2).')
    moe_l2_eps: float = setting(1e-6, real(0., min_open=True), 'Epsilon of the L2 normalisation: x / (||x|| + eps).')

    def __post_init__(self) -> None:
        check_fields(self)
        if self.num_core_experts + self.num_univ_experts == 0:
            raise InvalidArgument('SpheroMoE needs at least one expert: num_core_experts and num_univ_experts are '
                                  'both 0.')

    def hidden_sizes(self, hidden_features: int) -> Tuple[int, int]:
        """Core and universal hidden sizes given the block's MLP hidden size."""
        core = self.core_hidden if self.core_hidden is not None else hidden_features
        return core, (self.univ_hidden if self.univ_hidden is not None else max(1, core // 4))


# the layer's keyword names before settings took one name each: accepted for now, with a DeprecationWarning
DEPRECATED_NAMES = {
    'num_core': 'num_core_experts', 'num_univ': 'num_univ_experts', 'combine': 'moe_combine',
    'temperature_init': 'moe_temperature_init', 'shared_temperature': 'moe_shared_temperature',
    'noise_std': 'moe_noise_std', 'slot_norm': 'moe_slot_norm', 'slot_norm_eps': 'moe_slot_norm_eps',
    'expert_drop': 'moe_expert_drop', 'l2_eps': 'moe_l2_eps',
}


def layer_settings(settings: Optional[SpheroMoESettings], kwargs: Dict[str, Any]) -> SpheroMoESettings:
    """The layer's settings: ``settings`` (default: the defaults) with ``kwargs`` (setting names) applied."""
    names = [f.name for f in dataclasses.fields(SpheroMoESettings)]
    twice = sorted(k for k in kwargs if k in DEPRECATED_NAMES and DEPRECATED_NAMES[k] in kwargs)
    if twice:
        raise InvalidArgumentType('; '.join(f'SpheroMoE got both {k} and {DEPRECATED_NAMES[k]}, one setting twice: '
                                            f'give {DEPRECATED_NAMES[k]} only' for k in twice) + '.')
    values = {}
    for name, value in kwargs.items():
        if name in DEPRECATED_NAMES:
            warnings.warn(f'SpheroMoE({name}=...) is deprecated; the setting is named {DEPRECATED_NAMES[name]} '
                          f'everywhere now (create_model, the layer, the docs).', DeprecationWarning, stacklevel=3)
            name = DEPRECATED_NAMES[name]
        if name not in names:
            raise InvalidArgumentType(f'SpheroMoE got unknown argument {name!r}; its settings are {", ".join(names)}.')
        values[name] = value
    if settings is None:
        return SpheroMoESettings(**values)
    if not isinstance(settings, SpheroMoESettings):
        raise InvalidArgumentType(f'SpheroMoE settings must be a SpheroMoESettings, got {type(settings).__name__}.')
    return dataclasses.replace(settings, **values) if values else settings


class RoutingRecord(NamedTuple):
    """What one forward of a SpheroMoE layer routed (detached; see :func:`record_routing`)."""
    dispatch: torch.Tensor  # [B, N, S]: a distribution over tokens for each slot
    combine: torch.Tensor  # [B, N, S]: a distribution over slots for each token
    slot_output_norm: torch.Tensor  # [B, S]: the 2-norm of each slot's expert output


class SpheroMoE(nn.Module):
    """SpheroMoE layer (soft routing on the hypersphere, adaptive dual path).

    With ``num_univ_experts=0, moe_combine='softmax', moe_shared_temperature=True, moe_slot_norm=False,
    moe_temperature_init=1.0`` the same code is a Soft MoE layer (Puigcerver et al. 2024) with L2-normalised routing
    and one learnable scale.
    """
    num_core_slots: Final[int]
    group_slots: Final[List[int]]
    slots_per_expert: Final[int]
    recording: bool

    def __init__(
            self,
            in_features: int,
            hidden_features: Optional[int] = None,
            act_layer: Type[nn.Module] = nn.GELU,
            norm_layer: Optional[Type[nn.Module]] = None,
            bias: bool = True,
            drop: float = 0.,
            drop_path: float = 0.,
            device=None,
            dtype=None,
            settings: Optional[SpheroMoESettings] = None,
            **kwargs: Any,
    ) -> None:
        """
        Args:
            in_features: Token channels (input and output), as for timm's ``Mlp``.
            hidden_features: The dense MLP's hidden size; the default core-expert hidden size (default 4 x width).
            act_layer: Expert activation.
            norm_layer: timm's ``Mlp`` norm after the activation (``scale_mlp_norm``): not supported, must be None.
            bias: Biases in the experts.
            drop: Dropout on the layer output (timm's projection dropout); the experts' own dropout is the
                ``moe_expert_drop`` setting.
            drop_path: Per-sample drop path on the layer output (the released "MoE drop path").
            settings: The layer's checked settings (a model passes its own; default: the defaults).
            **kwargs: Settings by name (``num_core_experts``, ``moe_combine``, ...), applied over ``settings``.
        """
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        cfg = layer_settings(settings, kwargs)
        in_features = integer(1)('in_features', in_features)
        if norm_layer is not None:
            raise InvalidArgument(
                f'SpheroMoE has no norm inside its experts, so norm_layer={getattr(norm_layer, "__name__", norm_layer)}'
                f' (timm\'s scale_mlp_norm) cannot be honoured; build the model without scale_mlp_norm.')
        drop = real(0., 1., max_open=True)('drop', drop)
        drop_path = real(0., 1., max_open=True)('drop_path', drop_path)
        hidden = integer(1)('hidden_features', hidden_features) if hidden_features is not None else 4 * in_features
        core_hidden, univ_hidden = cfg.hidden_sizes(hidden)

        # the settings as given, and the values the forward reads as plain attributes (TorchScript reads no dataclass)
        self.settings = cfg
        self.dim = in_features
        self.num_core = cfg.num_core_experts
        self.num_univ = cfg.num_univ_experts
        self.slots_per_expert = cfg.slots_per_expert
        self.num_slots = (self.num_core + self.num_univ) * cfg.slots_per_expert
        self.num_core_slots = self.num_core * cfg.slots_per_expert
        self.group_slots = [n * cfg.slots_per_expert for n in (self.num_core, self.num_univ) if n]
        self.router = SpheroRouter(
            in_features, self.num_slots, combine=cfg.moe_combine, temperature_init=cfg.moe_temperature_init,
            shared_temperature=cfg.moe_shared_temperature, noise_std=cfg.moe_noise_std, slot_norm=cfg.moe_slot_norm,
            slot_norm_eps=cfg.moe_slot_norm_eps, l2_eps=cfg.moe_l2_eps, **dd)
        experts = dict(dim=in_features, slots_per_expert=cfg.slots_per_expert, act_layer=act_layer,
                       drop=cfg.moe_expert_drop, bias=bias, **dd)
        self.core = BatchedExperts(self.num_core, hidden_features=core_hidden, **experts) if self.num_core else None
        self.univ = BatchedExperts(self.num_univ, hidden_features=univ_hidden, **experts) if self.num_univ else None
        self.out_drop = nn.Dropout(drop) if drop > 0. else nn.Identity()
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        # routing records (record_routing): off, a constant False that compiled and scripted graphs fold away
        self.recording = False
        self.routing_sink: Optional[Callable[[RoutingRecord], None]] = None
        self.init_weights()

    def init_weights(self) -> None:
        """The router's parameters (orthogonal slot queries, temperatures at their init, slot norm).

        The experts initialise themselves at construction (``BatchedLinear.reset_parameters``, trunc-normal), once:
        timm's init pass calls this method for the layer and skips the experts. The router draws after the experts,
        the order in which seeded and recycled models have always been made.
        """
        self.router.reset_parameters()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # checkpoints from before the router was a module name its tensors without ``router.``
        rename_legacy_layer_keys(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def expert_outputs(self, slots: torch.Tensor) -> List[torch.Tensor]:
        """Run the slots through their experts.

        Args:
            slots: Slot inputs [B, S, D], core slots first.

        Returns:
            One [B, S_group, D] output per expert group present (core first, then universal); strided views of the
            expert-major results, which ``bmm`` consumes without a copy.
        """
        groups = slots.split(self.group_slots, dim=1)
        outs: List[torch.Tensor] = []
        if self.core is not None:
            outs.append(self.core(groups[0]))
        if self.univ is not None:
            outs.append(self.univ(groups[len(outs)]))
        return outs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x: Tokens [B, N, D], or a channels-last feature map [B, H, W, D] (its positions are the tokens).

        Returns:
            The same shape as ``x``.
        """
        tokens = x.flatten(1, -2)  # [B, H, W, D] -> [B, H * W, D]; [B, N, D] unchanged
        dispatch, combine = self.router(tokens)
        slots = torch.bmm(dispatch.transpose(1, 2), tokens)
        outs = self.expert_outputs(slots)
        if self.recording:
            self._record(dispatch, combine, outs)
        # combine group by group: a split of the weights instead of a concatenation of the expert outputs
        weights = combine.split(self.group_slots, dim=2)
        out = torch.bmm(weights[0], outs[0])
        for i in range(1, len(outs)):
            out = torch.baddbmm(out, weights[i], outs[i])
        # per-sample drop path on the expert outputs commutes with the (linear) combine
        return self.drop_path(self.out_drop(out)).reshape_as(x)

    @torch.jit.unused
    def _record(self, dispatch: torch.Tensor, combine: torch.Tensor, outs: List[torch.Tensor]) -> None:
        if self.routing_sink is not None:
            norm = torch.cat([torch.linalg.vector_norm(o.detach(), dim=-1) for o in outs], dim=1)
            self.routing_sink(RoutingRecord(dispatch.detach(), combine.detach(), norm))

    def extra_repr(self) -> str:
        return f'dim={self.dim}, num_core={self.num_core}, num_univ={self.num_univ}, ' \
               f'slots_per_expert={self.slots_per_expert}'


@contextlib.contextmanager
def record_routing(layer: SpheroMoE, sink: Callable[[RoutingRecord], None]) -> Iterator[None]:
    """Within: every forward of ``layer`` hands its :class:`RoutingRecord` to ``sink``, from the forward itself (no
    second pass). Off by default; a layer compiled while off keeps its graph."""
    previous = layer.recording, layer.routing_sink
    layer.recording, layer.routing_sink = True, sink
    try:
        yield
    finally:
        layer.recording, layer.routing_sink = previous
