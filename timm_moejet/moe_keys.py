""" The key names of a SpheroMoE layer's own tensors, the one place they are named outside ``layers/``.

Recycling, the official import, the MoE models' ``no_weight_decay`` and cost accounting read them from
:data:`MOE_KEYS`; a change of the layer's parameter names (a router module, say) is a change of this table.
"""
import dataclasses
import re
from typing import Mapping, Tuple

__all__ = ['MOE_KEYS', 'MoEKeys', 'is_expert_key', 'is_moe_key', 'is_moe_state_dict']


@dataclasses.dataclass(frozen=True)
class MoEKeys:
    """The names of a SpheroMoE layer's tensors below its own prefix (``blocks.6.mlp.``), as ``layers/`` makes them.

    Attributes:
        groups: The expert groups (core, universal), each a ``BatchedExperts``.
        expert_tensors: The tensors of a group, batched over its experts.
        slot_queries: The router's slot queries.
        slot_norm: The router's slot norm (a module: ``.weight``, ``.bias``).
        temperature: The router's log-temperatures.
    """
    groups: Tuple[str, ...] = ('core', 'univ')
    expert_tensors: Tuple[str, ...] = ('fc1.weight', 'fc1.bias', 'fc2.weight', 'fc2.bias')
    slot_queries: str = 'slot_queries'
    slot_norm: str = 'slot_norm'
    temperature: str = 'log_temperature'


MOE_KEYS = MoEKeys()
# the batched expert weights of a SpheroMoE layer under any block MLP: blocks.N.<mlp>.{core,univ}.fc{1,2}.{weight,bias}
_EXPERT_KEY = re.compile(rf'\.(?:{"|".join(MOE_KEYS.groups)})\.'
                         rf'(?:{"|".join(re.escape(t) for t in MOE_KEYS.expert_tensors)})$')


def is_expert_key(key: str) -> bool:
    """True for a key of the batched expert weights of a SpheroMoE layer."""
    return _EXPERT_KEY.search(key) is not None


def is_moe_key(key: str) -> bool:
    """True for a key only a SpheroMoE layer has (expert weights or slot queries): a MoE checkpoint holds one."""
    return key.endswith(f'.{MOE_KEYS.slot_queries}') or is_expert_key(key)


def is_moe_state_dict(state_dict: Mapping[str, object]) -> bool:
    """True for our MoE layout (slot queries or batched expert weights under some block's MLP)."""
    return any(is_moe_key(k) for k in state_dict)
