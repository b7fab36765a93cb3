""" The key names of a SpheroMoE layer's own tensors, the one place they are named outside ``layers/``.

Recycling, the official import, the MoE models' ``no_weight_decay`` and cost accounting read them from
:data:`MOE_KEYS`; a change of the layer's parameter names is a change of this table, with the old names mapped on
load (:data:`LEGACY_ROUTER_KEYS`: checkpoints from before the router was a module of its own).
"""
import dataclasses
import re
from typing import Dict, Mapping, MutableMapping, Tuple, TypeVar

__all__ = ['LEGACY_ROUTER_KEYS', 'MOE_KEYS', 'MoEKeys', 'current_key_names', 'is_expert_key', 'is_moe_key',
           'is_moe_state_dict', 'rename_legacy_layer_keys']


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
    slot_queries: str = 'router.slot_queries'
    slot_norm: str = 'router.slot_norm'
    temperature: str = 'router.log_temperature'


MOE_KEYS = MoEKeys()
# the router's tensors as checkpoints named them before the router was a module of its own, below the layer's prefix
LEGACY_ROUTER_KEYS = {'slot_queries': MOE_KEYS.slot_queries, 'slot_norm.weight': f'{MOE_KEYS.slot_norm}.weight',
                      'slot_norm.bias': f'{MOE_KEYS.slot_norm}.bias', 'log_temperature': MOE_KEYS.temperature}
# the batched expert weights of a SpheroMoE layer under any block MLP: blocks.N.<mlp>.{core,univ}.fc{1,2}.{weight,bias}
_EXPERT_KEY = re.compile(rf'\.(?:{"|".join(MOE_KEYS.groups)})\.'
                         rf'(?:{"|".join(re.escape(t) for t in MOE_KEYS.expert_tensors)})$')


def is_expert_key(key: str) -> bool:
    """True for a key of the batched expert weights of a SpheroMoE layer."""
    return _EXPERT_KEY.search(key) is not None


def is_moe_key(key: str) -> bool:
    """True for a key only a SpheroMoE layer has (expert weights or slot queries, under either name): a MoE
    checkpoint holds one."""
    return key.endswith('.slot_queries') or is_expert_key(key)


def is_moe_state_dict(state_dict: Mapping[str, object]) -> bool:
    """True for our MoE layout (slot queries or batched expert weights under some block's MLP)."""
    return any(is_moe_key(k) for k in state_dict)


def rename_legacy_layer_keys(state_dict: MutableMapping[str, object], prefix: str) -> None:
    """Rename, in place, the router tensors of the SpheroMoE layer at ``prefix`` (``blocks.6.mlp.``) from their
    names before the router was a module (``slot_queries``) to today's (``router.slot_queries``)."""
    for old, new in LEGACY_ROUTER_KEYS.items():
        if prefix + old in state_dict and prefix + new not in state_dict:
            state_dict[prefix + new] = state_dict.pop(prefix + old)


_V = TypeVar('_V')


def current_key_names(state_dict: Mapping[str, _V]) -> Dict[str, _V]:
    """``state_dict`` with the router tensors of every SpheroMoE layer under today's names (a new dict; the order
    of the keys kept). A layer is found by its legacy slot queries or its expert weights."""
    legacy = [k for k in state_dict if (k.endswith('.slot_queries') or k == 'slot_queries')
              and not k.endswith(MOE_KEYS.slot_queries)]
    prefixes = {k[:-len('slot_queries')] for k in legacy}
    prefixes.update(k[:_EXPERT_KEY.search(k).start() + 1] for k in state_dict if is_expert_key(k))
    names = {}
    for prefix in prefixes:
        for old, new in LEGACY_ROUTER_KEYS.items():
            if prefix + old in state_dict and prefix + new not in state_dict:
                names[prefix + old] = prefix + new
    return {names.get(k, k): v for k, v in state_dict.items()} if names else dict(state_dict)
