""" Where a MoE model puts its SpheroMoE layers, shared by the model families.

A family's constructor pops its MoE kwargs with :func:`pop_moe_kwargs`: the placement (``moe_blocks``,
``moe_drop_path_rate``) and the layer settings (every field of ``SpheroMoESettings``, by the same name), each
checked once by its settings class. :meth:`MoEPlacement.layer_factories` then gives, for every MoE
block, the ``functools.partial`` of ``SpheroMoE`` that timm's block calls as its ``mlp_layer`` (ViT), or that the
family calls in place of a block's MLP (ConvNeXt, whose expert counts differ per stage: per-block overrides).
"""
import dataclasses
from functools import partial
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

from timm.layers import calculate_drop_path_rates

from ..errors import InvalidArgument
from ..layers import SpheroMoE, SpheroMoESettings
from ..settings import check_fields, from_kwargs, int_sequence, optional, real, setting

__all__ = ['MoEPlacement', 'pop_moe_kwargs']


@dataclasses.dataclass(frozen=True)
class MoEPlacement:
    """Which blocks get a SpheroMoE layer, and the MoE drop path schedule."""
    moe_blocks: Optional[Tuple[int, ...]] = setting(
        None, optional(int_sequence(), 'the second half'),
        '0-based indices of the blocks whose MLP becomes a SpheroMoE layer (None: the second half).')
    moe_drop_path_rate: float = setting(
        0.1, real(0., 1., max_open=True),
        'Largest per-sample drop path on MoE outputs, ramped linearly over depth (the released "MoE drop path").')

    def __post_init__(self) -> None:
        check_fields(self)

    def blocks(self, depth: int) -> Tuple[int, ...]:
        """The MoE block indices of a model with ``depth`` blocks (checked against it)."""
        blocks = tuple(range(depth // 2, depth)) if self.moe_blocks is None else self.moe_blocks
        bad = [i for i in blocks if not 0 <= i < depth]
        if bad:
            raise InvalidArgument(f'moe_blocks {bad} are outside the model depth; allowed block indices are '
                                  f'0..{depth - 1}.')
        return blocks

    def layer_factories(
            self,
            depth: int,
            settings: SpheroMoESettings,
            overrides: Optional[Mapping[int, Mapping[str, Any]]] = None,
    ) -> Dict[int, Callable[..., SpheroMoE]]:
        """Block index -> ``partial(SpheroMoE, drop_path=..., settings=...)`` for every MoE block.

        Args:
            depth: Blocks of the model (counted over all stages).
            settings: The layer settings shared by every MoE block.
            overrides: Block index -> settings that differ in that block, by name (e.g. a stage's
                ``num_core_experts``); checked as the shared ones are.
        """
        rates = calculate_drop_path_rates(self.moe_drop_path_rate, depth)
        factories = {}
        for i in self.blocks(depth):
            changes = (overrides or {}).get(i)
            block_settings = dataclasses.replace(settings, **changes) if changes else settings
            factories[i] = partial(SpheroMoE, drop_path=rates[i], settings=block_settings)
        return factories


def pop_moe_kwargs(kwargs: Dict[str, Any], **defaults: Any) -> Tuple[MoEPlacement, SpheroMoESettings]:
    """Pop the placement and layer-settings kwargs out of a model's constructor kwargs and check them.

    Args:
        kwargs: The constructor kwargs (modified in place); what remains goes to the timm base class.
        **defaults: Family defaults for layer settings, by name.
    """
    placement = from_kwargs(MoEPlacement, kwargs)
    for name, value in defaults.items():
        kwargs.setdefault(name, value)
    return placement, from_kwargs(SpheroMoESettings, kwargs)
