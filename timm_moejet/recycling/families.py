""" Model families the recycling understands: where a family keeps its blocks, MLPs and heads.

A family is one object in :data:`FAMILIES`. It reads a state dict (a dense donor, or a MoE model's) as a flat list of
blocks, each with a key prefix, a dense MLP (``mlp.fc1``/``mlp.fc2``) and the norm whose output feeds that MLP;
it names the keys a recycled model never takes from a donor (the new head), and it runs the family's own timm
checkpoint filter on donors (position-embedding resampling, foreign layouts). Adding a family is one entry.
"""
import re
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ..checkpoint_io.names import is_moe_key
from ..errors import DonorMismatch

__all__ = ['Family', 'FAMILIES', 'family_of_state_dict', 'family_of_model', 'is_moe_state_dict', 'MLP_KEYS']

MLP_KEYS = ('mlp.fc1.weight', 'mlp.fc1.bias', 'mlp.fc2.weight', 'mlp.fc2.bias')


def is_moe_state_dict(state_dict: Mapping[str, object]) -> bool:
    """True for our MoE layout (slot queries or batched expert weights under some block's ``mlp``)."""
    return any(is_moe_key(k) for k in state_dict)


class Family:
    """How one model family lays out its blocks.

    Attributes:
        name: Short name, used in records.
        title: What a dense checkpoint of the family is called in messages.
        block_pattern: Regex whose groups (ints) order the blocks; its match is the block's key prefix.
        mlp_input_norm: The block's norm whose output is the MLP input (channel statistics are taken there).
        fresh_prefixes: Model keys that never come from a donor (the new classifier, the new pooling norm).
        timm_filter: Dotted path of the family's timm checkpoint filter, run on donors against the target model.
    """

    def __init__(self, name: str, title: str, block_pattern: str, mlp_input_norm: str,
                 fresh_prefixes: Tuple[str, ...], timm_filter: str,
                 blocks_of: Callable[[nn.Module], Sequence[nn.Module]]) -> None:
        self.name = name
        self.title = title
        self.block_re = re.compile(block_pattern)
        self.mlp_input_norm = mlp_input_norm
        self.fresh_prefixes = fresh_prefixes
        self._timm_filter = timm_filter
        self._blocks_of = blocks_of

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
        """A dense checkpoint of this family: its first block has a dense MLP and the norm feeding it."""
        prefixes = self.block_prefixes(list(state_dict))
        return bool(prefixes) and f'{prefixes[0]}mlp.fc1.weight' in state_dict \
            and f'{prefixes[0]}{self.mlp_input_norm}.weight' in state_dict and not is_moe_state_dict(state_dict)

    def block_modules(self, model: nn.Module) -> Sequence[nn.Module]:
        """The block modules of a model of this family, in forward order."""
        return self._blocks_of(model)

    def prepare(self, state_dict: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
        """The family's timm checkpoint filter applied to a donor for ``model`` (resampling, foreign layouts)."""
        import importlib

        module, fn = self._timm_filter.rsplit('.', 1)
        return getattr(importlib.import_module(module), fn)(state_dict, model)

    def __repr__(self) -> str:
        return f'Family({self.name!r})'


FAMILIES: Dict[str, Family] = {
    'vit': Family(
        'vit', 'timm ViT', r'^blocks\.(\d+)\.', 'norm2', ('head.', 'fc_norm.', 'head_drop.'),
        'timm.models.vision_transformer.checkpoint_filter_fn', lambda model: list(model.blocks)),
    # blocks counted over all stages in forward order (C-JetMoE-F's "MoE layers 10:18" are flat indices 9..17);
    # the head's norm is part of the trunk, only its classifier is new
    'convnext': Family(
        'convnext', 'timm ConvNeXt', r'^stages\.(\d+)\.blocks\.(\d+)\.', 'norm', ('head.fc.',),
        'timm.models.convnext.checkpoint_filter_fn', lambda model: [b for s in model.stages for b in s.blocks]),
}


def family_of_state_dict(state_dict: Mapping[str, object], role: str = 'checkpoint', name: str = '') -> Family:
    """The family of a dense checkpoint; a ``DonorMismatch`` naming what it looks like otherwise."""
    for family in FAMILIES.values():
        if family.is_dense(state_dict):
            return family
    kind = 'a MoE checkpoint' if is_moe_state_dict(state_dict) else \
        f'not a dense checkpoint of a supported family ({", ".join(f.title for f in FAMILIES.values())})'
    raise DonorMismatch(f'{role} {name} is {kind} (first keys: {list(state_dict)[:6]}); recycling needs dense '
                        f'weights with blocks of fc1/fc2 MLPs.'.replace('  ', ' '))


def family_of_model(model: nn.Module) -> Optional[Family]:
    """The family a MoE model declares (``recycling_family`` attribute), or None."""
    name = getattr(model, 'recycling_family', None)
    return FAMILIES.get(name) if name else None
