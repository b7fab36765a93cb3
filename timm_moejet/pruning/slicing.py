""" The state dict of a pruned model: every MoE layer's kept experts, their slots and their slot queries.

Slots are laid out expert by expert, core experts first (``SpheroMoE``): slot ``j`` of core expert ``e`` is
``e * s + j``, of universal expert ``e`` it is ``num_core * s + e * s + j`` (``s`` slots per expert). The
tensors are named through :data:`~timm_moejet.moe_keys.MOE_KEYS`; the slot norm and the temperatures are kept as they
are.
"""
from typing import Dict, List, Mapping, Sequence, Tuple

import torch
import torch.nn as nn

from ..diagnostics import moe_layers
from ..moe_keys import MOE_KEYS

__all__ = ['kept_slots', 'slice_state_dict', 'layer_prefixes']


def layer_prefixes(model: nn.Module) -> Dict[int, str]:
    """Block -> the key prefix of its MoE layer (``blocks.2.mlp.``)."""
    names = {id(m): n for n, m in model.named_modules()}
    return {block: f'{names[id(layer)]}.' for block, layer in moe_layers(model).items()}


def kept_slots(num_core: int, slots_per_expert: int, core: Sequence[int], univ: Sequence[int]) -> List[int]:
    """The slot indices of the kept experts, core first, in the layer's order."""
    experts = list(core) + [num_core + e for e in univ]
    return [e * slots_per_expert + j for e in experts for j in range(slots_per_expert)]


def slice_state_dict(
        state_dict: Mapping[str, torch.Tensor],
        layers: Mapping[str, Tuple[int, int, Sequence[int], Sequence[int]]],
) -> Dict[str, torch.Tensor]:
    """``state_dict`` with only the kept experts of each MoE layer.

    Args:
        state_dict: The unpruned model's.
        layers: Layer key prefix -> (core experts, slots per expert, kept core indices, kept universal indices).

    Returns:
        A new state dict: the experts' batched tensors and the slot queries indexed by what is kept; every other
        tensor as it was (shared, not copied).
    """
    out = dict(state_dict)
    for prefix, (num_core, slots_per_expert, core, univ) in layers.items():
        for group, kept in zip(MOE_KEYS.groups, (core, univ)):
            for tensor in MOE_KEYS.expert_tensors:
                key = f'{prefix}{group}.{tensor}'
                if key in out:
                    out[key] = out[key][torch.as_tensor(list(kept), dtype=torch.long)].clone()
        key = f'{prefix}{MOE_KEYS.slot_queries}'
        slots = kept_slots(num_core, slots_per_expert, core, univ)
        out[key] = out[key][torch.as_tensor(slots, dtype=torch.long)].clone()
    return out
