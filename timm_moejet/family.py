""" A model family: what recycling, Weight Selection, training and diagnostics know of one kind of timm model.

Everything that differs between the ViTs, the ConvNeXts and the MLP-Mixers lives in one family module each
(``models/moejet_vit.py``, ...), as timm keeps a family in one file: the MoE model class, a :class:`Family`
subclass, the pretrained tags and the ``@register_model`` entrypoints. The rest of the package asks the family and
never tests its name. A family describes:

* its **key layout**: a regex whose match is a block's key prefix (``blocks.3.``, ``stages.2.blocks.4.``), the
  block's MLP (timm's ``Mlp``: ``fc1 -> act -> fc2``) that a SpheroMoE layer replaces and the norm that feeds it;
  from these, which blocks a state dict has, in forward order, and whether it is a dense checkpoint of the family;
* its **heads**: the model keys that never come from a donor (a new classifier), the donor head parts a model may
  lack (dropped with the reason) and the model head parts a donor may lack (they start fresh);
* what the family's **timm checkpoint filter** does to a donor (position-embedding resampling), and what else makes
  a donor unfit that no key name shows (a ViT's class-token layout);
* its **blocks as modules** (which hold MoE layers: ``model.moe_blocks``), the expert-count rule for a number of
  tokens, and the FSDP2 units.

A family module registers its instance with :func:`register_family` when it is imported (``timm_moejet.models``
imports every family module), and names it as ``family`` on its MoE model class.
"""
import re
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .errors import DonorMismatch, InvalidArgument
from .moe_keys import is_moe_state_dict

__all__ = ['Family', 'FAMILIES', 'register_family', 'family_of_model', 'family_of_state_dict']

FAMILIES: Dict[str, 'Family'] = {}


class Family:
    """How one model family lays out its blocks, MLPs and heads; one subclass per family module.

    Attributes:
        name: Short name, used in records and messages.
        title: What a dense checkpoint of the family is called in messages ('timm ViT').
        block_pattern: Regex whose groups (ints) order the blocks, stage first; its match is the block's key prefix.
        mlp: The block's attribute holding the MLP a SpheroMoE layer replaces.
        mlp_input_norm: The block's attribute holding the norm whose output is that MLP's input.
        new_head: Model key prefixes that never come from a donor (the new classifier).
        donor_head_parts: Donor key prefixes a model may lack, replaced by its own head -> why (recorded).
        model_head_parts: Model key prefixes a dense donor may lack; the model's own initial values stay.
        token_parts: Model keys of tokens put in front of the patch tokens (a ViT's class token, registers).
        recycle_hint: How to get a MoE model that holds donor components this one cannot, for messages.
        recipes: The family's pretrained tags (``'name.tag'``) -> their recycling recipes (set by its module).
    """
    name: str = ''
    title: str = ''
    block_pattern: str = ''
    mlp: str = 'mlp'
    mlp_input_norm: str = ''
    new_head: Tuple[str, ...] = ()
    donor_head_parts: Mapping[str, str] = {}
    model_head_parts: Tuple[str, ...] = ()
    token_parts: Tuple[str, ...] = ()
    recipes: Mapping[str, Any] = {}
    recycle_hint: str = 'create the MoE model with those settings (create_model kwargs; weights_tools recycle ' \
                        '--model-kwargs)'

    def __init__(self) -> None:
        self.block_re = re.compile(self.block_pattern)

    # what a family module implements

    def block_modules(self, model: nn.Module) -> Sequence[nn.Module]:
        """The blocks of a model of this family (dense or MoE), in forward order."""
        raise NotImplementedError

    def timm_filter(self, state_dict: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
        """The family's timm checkpoint filter, run on a donor for ``model`` (position-embedding resampling, foreign
        layouts). Default: none."""
        return state_dict

    def layout_problem(self, state_dict: Mapping[str, torch.Tensor], model: nn.Module) -> Optional[str]:
        """What makes a dense donor unfit for ``model`` that no key name shows, in words; None when it fits."""
        return None

    def expert_counts(self, tokens: int, core: Optional[int] = None) -> Tuple[int, int]:
        """Core and universal experts of a MoE layer over ``tokens`` tokens (``core`` given: the universal experts
        that go with it): the paper's half the tokens core experts and twice as many universal ones (196 tokens:
        98 + 196; 49 tokens: 24 + 48)."""
        core = max(1, tokens // 2) if core is None else core
        return core, 2 * core

    def fsdp_units(self, model: nn.Module) -> List[str]:
        """Module names that become FSDP2 units besides the experts and routers, innermost first: every block."""
        return self.block_names(model)

    # what follows from the above

    @property
    def mlp_keys(self) -> Tuple[str, ...]:
        """The dense MLP's keys below a block prefix: fc1 weight and bias, fc2 weight and bias."""
        return tuple(f'{self.mlp}.{n}' for n in ('fc1.weight', 'fc1.bias', 'fc2.weight', 'fc2.bias'))

    def block_prefixes(self, keys: Sequence[str]) -> List[str]:
        """Key prefixes of the blocks, in forward order (e.g. ``['blocks.0.', 'blocks.1.', ...]``)."""
        found: Dict[Tuple[int, ...], str] = {}
        for key in keys:
            m = self.block_re.match(key)
            if m:
                found[tuple(int(g) for g in m.groups())] = m.group(0)
        return [found[k] for k in sorted(found)]

    def block_stages(self, keys: Sequence[str]) -> List[List[str]]:
        """Block prefixes grouped by stage (all groups of the block pattern but the last), in forward order."""
        stages: Dict[Tuple[int, ...], List[str]] = {}
        for key in self.block_prefixes(keys):
            stage = tuple(int(g) for g in self.block_re.match(key).groups()[:-1])
            stages.setdefault(stage, []).append(key)
        return [stages[s] for s in sorted(stages)]

    def is_dense(self, state_dict: Mapping[str, object]) -> bool:
        """A dense checkpoint of this family: its first block has the dense MLP and the norm feeding it."""
        prefixes = self.block_prefixes(list(state_dict))
        return bool(prefixes) and f'{prefixes[0]}{self.mlp_keys[0]}' in state_dict \
            and f'{prefixes[0]}{self.mlp_input_norm}.weight' in state_dict and not is_moe_state_dict(state_dict)

    def block_names(self, model: nn.Module) -> List[str]:
        """Module names of the blocks, in forward order (``blocks.3``, ``stages.2.blocks.4``)."""
        names = {id(m): n for n, m in model.named_modules()}
        return [names[id(b)] for b in self.block_modules(model)]

    def moe_layers(self, model: nn.Module) -> Dict[int, nn.Module]:
        """The SpheroMoE layers of a MoE model by block index (counted over all blocks in forward order)."""
        blocks = self.block_modules(model)
        return {i: getattr(blocks[i], self.mlp) for i in model.moe_blocks}

    def moe_prefixes(self, model: nn.Module, parts: Sequence[str] = ()) -> List[str]:
        """Key prefixes of the MoE layers (``blocks.6.mlp.``), and with ``parts`` of those attributes of the MoE
        blocks too (``('mlp', 'norm2')``: the layer and the norm feeding it)."""
        names = self.block_names(model)
        return [f'{names[i]}.{part}.' for i in model.moe_blocks for part in (parts or (self.mlp,))]

    def prepare(self, state_dict: Mapping[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
        """A donor as the family's timm filter leaves it for ``model``."""
        return self.timm_filter(dict(state_dict), model)

    def __repr__(self) -> str:
        return f'{type(self).__name__}({self.name!r})'


def register_family(family: Family) -> Family:
    """Add ``family`` to :data:`FAMILIES` (a family module calls it once, when it is imported)."""
    if not isinstance(family, Family) or not family.name or not family.block_pattern:
        raise InvalidArgument(f'register_family needs a named Family with a block pattern, got {family!r}.')
    FAMILIES[family.name] = family
    return family


def family_of_model(model: nn.Module) -> Optional[Family]:
    """The family a MoE model's class names (its ``family`` attribute), or None for other models."""
    family = getattr(type(model), 'family', None)
    return family if isinstance(family, Family) else None


def family_of_state_dict(state_dict: Mapping[str, Any], role: str = 'checkpoint', name: str = '') -> Family:
    """The family of a dense checkpoint; a ``DonorMismatch`` naming what it looks like otherwise."""
    for family in FAMILIES.values():
        if family.is_dense(state_dict):
            return family
    kind = 'a MoE checkpoint' if is_moe_state_dict(state_dict) else \
        f'not a dense checkpoint of a supported family ({", ".join(f.title for f in FAMILIES.values())})'
    raise DonorMismatch(f'{role} {name} is {kind} (first keys: {list(state_dict)[:6]}); recycling needs dense '
                        f'weights with blocks of fc1/fc2 MLPs.'.replace('  ', ' '))
