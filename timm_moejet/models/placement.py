""" What the MoE models of every family share: where their SpheroMoE layers go, and what they answer about them.

A family's constructor pops its MoE kwargs with :func:`pop_moe_kwargs`: the placement (``moe_blocks``,
``moe_drop_path_rate``) and the layer settings (every field of ``SpheroMoESettings``, by the same name), each
checked once by its settings class. :meth:`MoEPlacement.layer_factories` then gives, for every MoE
block, the ``functools.partial`` of ``SpheroMoE`` that timm's block calls as its ``mlp_layer`` (ViT), or that the
family calls in place of a block's MLP (ConvNeXt, MLP-Mixer; per-block overrides where expert counts differ).

:class:`MoEModelMixin` gives a family's model class the MoE parts of timm's model API from its ``family`` and
``moe_blocks``: ``moe_layers()``, ``group_matcher`` (the MoE layers and the norms feeding them train at the full
lr, with the head, under timm's ``--layer-decay``) and ``no_weight_decay``.
"""
import dataclasses
import re
from functools import partial
from typing import Any, Callable, Dict, Mapping, Optional, Set, Tuple

import torch
import torch.nn as nn
from timm.layers import calculate_drop_path_rates

from ..errors import InvalidArgument, InvalidArgumentType
from ..layers import SpheroMoE, SpheroMoESettings
from ..layers.sphero_moe import DEPRECATED_NAMES
from ..moe_keys import MOE_KEYS
from ..settings import Check, check_fields, from_kwargs, int_sequence, integer, optional, real, setting

__all__ = ['MoEPlacement', 'pop_moe_kwargs', 'MoEModelMixin', 'replace_mlps']

# parameters without weight decay in every MoE model: routing temperatures, biases of every shape (experts' are 2-D),
# norms
MOE_NO_WEIGHT_DECAY = frozenset({f'*.{MOE_KEYS.temperature}', '*.bias', '*norm*.weight'})


def _expert_count_pairs(label: str, value: Any) -> Tuple[Tuple[int, int], ...]:
    """A list of (core, universal) expert counts, one pair per MoE block, as a tuple of int pairs."""
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)) or not value:
        raise InvalidArgumentType(f'{label} must be a non-empty list of (core, universal) expert counts, one pair per '
                                  f'MoE block, got {value!r}.')
    pairs = []
    for i, pair in enumerate(value):
        if isinstance(pair, (str, bytes)) or not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise InvalidArgumentType(f'{label} entry {i} must be a (core, universal) pair of ints, got {pair!r}.')
        core, univ = (integer(0)(f'{label} entry {i} {part}', n) for part, n in zip(('core', 'universal'), pair))
        if core + univ == 0:
            raise InvalidArgument(f'{label} entry {i} keeps no expert: a MoE layer needs at least one.')
        pairs.append((core, univ))
    return tuple(pairs)


EXPERT_COUNT_PAIRS = Check('a list of (core, universal) int pairs, one per MoE block', _expert_count_pairs)


@dataclasses.dataclass(frozen=True)
class MoEPlacement:
    """Which blocks get a SpheroMoE layer, and the MoE drop path schedule."""
    moe_blocks: Optional[Tuple[int, ...]] = setting(
        None, optional(int_sequence(), 'the second half'),
        '0-based indices of the blocks whose MLP becomes a SpheroMoE layer (None: the second half).')
    moe_drop_path_rate: float = setting(
        0.1, real(0., 1., max_open=True),
        'Largest per-sample drop path on MoE outputs, ramped linearly over depth (the released "MoE drop path").')
    moe_experts_per_layer: Optional[Tuple[Tuple[int, int], ...]] = setting(
        None, optional(EXPERT_COUNT_PAIRS, 'the expert-count settings of every layer'),
        '(core, universal) experts of each MoE block in block order, over the expert-count settings (a pruned '
        'model: timm_moejet.prune_experts).')

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
        overrides = self.per_layer_counts(depth, overrides)
        factories = {}
        for i in self.blocks(depth):
            changes = overrides.get(i)
            block_settings = dataclasses.replace(settings, **changes) if changes else settings
            factories[i] = partial(SpheroMoE, drop_path=rates[i], settings=block_settings)
        return factories

    def per_layer_counts(self, depth: int, overrides: Optional[Mapping[int, Mapping[str, Any]]] = None
                         ) -> Dict[int, Dict[str, Any]]:
        """``overrides`` with ``moe_experts_per_layer`` applied over them (checked against the MoE blocks)."""
        out = {i: dict(changes) for i, changes in (overrides or {}).items()}
        if self.moe_experts_per_layer is None:
            return out
        blocks = self.blocks(depth)
        if len(self.moe_experts_per_layer) != len(blocks):
            raise InvalidArgument(f'moe_experts_per_layer has {len(self.moe_experts_per_layer)} (core, universal) '
                                  f'pairs for {len(blocks)} MoE blocks {list(blocks)}; give one pair per MoE block.')
        for i, (core, univ) in zip(blocks, self.moe_experts_per_layer):
            out.setdefault(i, {}).update(num_core_experts=core, num_univ_experts=univ)
        return out


def pop_moe_kwargs(kwargs: Dict[str, Any], **defaults: Any) -> Tuple[MoEPlacement, SpheroMoESettings]:
    """Pop the placement and layer-settings kwargs out of a model's constructor kwargs and check them.

    Args:
        kwargs: The constructor kwargs (modified in place); what remains goes to the timm base class.
        **defaults: Family defaults for layer settings, by name.
    """
    old = sorted(k for k in kwargs if k in DEPRECATED_NAMES)
    if old:  # the layer still takes them (deprecated); a model never did, and both names at once would be one twice
        raise InvalidArgumentType('; '.join(f'{k} is the SpheroMoE layer\'s deprecated name of {DEPRECATED_NAMES[k]}, '
                                            f'give {DEPRECATED_NAMES[k]} only' for k in old)
                                  + ' (create_model takes the current names).')
    placement = from_kwargs(MoEPlacement, kwargs)
    for name, value in defaults.items():
        kwargs.setdefault(name, value)
    return placement, from_kwargs(SpheroMoESettings, kwargs)


class MoEModelMixin:
    """The MoE parts of a family's model class (listed first among its bases, before the timm model it extends).

    Attributes:
        family: The :class:`~timm_moejet.family.Family` (a class attribute, set by the family module).
        moe_blocks: The blocks that hold a SpheroMoE layer, counted over all blocks in forward order (a tuple of
            ints, set by the constructor).
        no_weight_decay_extra: Patterns without weight decay besides the MoE ones and the timm model's own.
    """
    # (no class annotations here: TorchScript would read them as the scripted attributes' types)
    no_weight_decay_extra = ()

    def moe_layers(self) -> Dict[int, SpheroMoE]:
        """The SpheroMoE layers by block index."""
        return self.family.moe_layers(self)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        """Parameter groups for layer-wise lr decay (timm's ``--layer-decay``).

        As in the released recipe, the MoE layers (experts, slot queries, temperatures, slot norm) and the norm
        feeding them are new or re-cut weights, so they train at the full lr together with the head; the dense
        trunk decays by depth. Every per-block pattern skips those parameters, so they fall through to the unmatched
        group, which timm places last (lr scale 1.0). A coarse grouping given as one pattern is left as timm has it.
        """
        matcher = super().group_matcher(coarse=coarse)
        moe = self.family.moe_prefixes(self, (self.family.mlp, self.family.mlp_input_norm))
        if not moe or isinstance(matcher.get('blocks'), str):
            return matcher
        skip = '(?!(?:' + '|'.join(re.escape(p) for p in moe) + '))'
        matcher['blocks'] = [(f'^{skip}{pattern[1:] if pattern.startswith("^") else pattern}', order)
                             for pattern, order in matcher['blocks']]
        return matcher

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        """The timm model's own set, the MoE parameters' and the family's extra patterns."""
        own = super().no_weight_decay() if hasattr(super(), 'no_weight_decay') else set()
        return set(own) | MOE_NO_WEIGHT_DECAY | set(self.no_weight_decay_extra)


def replace_mlps(model: nn.Module, layers: Mapping[int, Callable[..., SpheroMoE]], widths: Mapping[int, int]) -> None:
    """Put a SpheroMoE layer in place of the MLP of each block in ``layers`` (block index -> layer factory), built
    for the block's width with the factory kwargs and activation its own MLP got, through timm's ``Mlp`` call."""
    family = model.family
    blocks = family.block_modules(model)
    for i, layer in layers.items():
        dense = getattr(blocks[i], family.mlp)
        p = next(dense.parameters())
        setattr(blocks[i], family.mlp, layer(widths[i], dense.fc1.out_features, act_layer=type(dense.act),
                                             device=p.device, dtype=p.dtype))
