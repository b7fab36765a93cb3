""" Which experts a pruned layer keeps: a fraction or a count per expert group, the highest contributions first.

``keep`` is one of:

* a fraction ``F`` in (0, 1] (a float): each group (core, universal) keeps ``ceil(F x experts in the group)``, so
  at least one expert of every group stays (75% of 7 experts keeps 6);
* a count ``N`` >= 1 (an int): each group keeps ``N`` experts, or all it has when it has fewer;
* a pair ``(core, universal)`` (a tuple, or a dict with keys ``core`` and ``univ``) of such values: per group.

A layer without universal experts (Soft MoE) prunes its core group only. Within a group, the experts with the
highest measured contribution stay (ties: the lower index), in their original order.
"""
import math
import numbers
from typing import Any, Dict, List, Sequence, Tuple, Union

from ..errors import InvalidArgument, InvalidArgumentType
from .routing_stats import LayerRouting, RoutingStatistics

__all__ = ['Keep', 'parse_keep', 'kept_count', 'kept_experts', 'describe_keep', 'kept_share']

Amount = Union[int, float]
Keep = Union[Amount, Tuple[Amount, Amount], Dict[str, Amount]]


def _amount(label: str, value: Any) -> Amount:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InvalidArgumentType(f'{label} must be a fraction in (0, 1] (a float) or a count >= 1 (an int), got '
                                  f'{value!r} ({type(value).__name__}).')
    if isinstance(value, numbers.Integral):
        if value < 1:
            raise InvalidArgument(f'{label} must keep at least one expert: a count >= 1, got {value}.')
        return int(value)
    value = float(value)
    if not 0. < value <= 1. or math.isnan(value):
        raise InvalidArgument(f'{label} must be a fraction in (0, 1] (0 would keep no expert, above 1 more than '
                              f'there are), got {value:g}.')
    return value


def parse_keep(keep: Keep) -> Tuple[Amount, Amount]:
    """``keep`` as a checked (core, universal) pair of fractions (floats) or counts (ints)."""
    if isinstance(keep, dict):
        unknown = sorted(set(keep) - {'core', 'univ'})
        if unknown or len(keep) != 2:
            raise InvalidArgument(f'keep as a dict needs exactly the keys core and univ, got {sorted(keep)}.')
        keep = (keep['core'], keep['univ'])
    if isinstance(keep, (tuple, list)):
        if len(keep) != 2:
            raise InvalidArgument(f'keep as a pair is (core, universal), got {len(keep)} values: {list(keep)}.')
        return _amount('keep (core)', keep[0]), _amount('keep (universal)', keep[1])
    amount = _amount('keep', keep)
    return amount, amount


def kept_count(amount: Amount, experts: int) -> int:
    """Experts a group of ``experts`` keeps: ``ceil(fraction x experts)``, or ``min(count, experts)``; 0 only for
    an empty group."""
    if experts == 0:
        return 0
    if isinstance(amount, float):
        # a tolerance keeps 0.75 x 8 = 6.000000001 from rounding up to 7
        return max(1, min(experts, math.ceil(amount * experts - 1e-9)))
    return min(amount, experts)


def _top(contribution: Sequence[float], count: int) -> List[int]:
    order = sorted(range(len(contribution)), key=lambda i: (-contribution[i], i))
    return sorted(order[:count])


def kept_experts(routing: RoutingStatistics, keep: Keep) -> Dict[int, Tuple[List[int], List[int]]]:
    """Block -> (kept core expert indices, kept universal expert indices), each in ascending order."""
    core_amount, univ_amount = parse_keep(keep)
    out = {}
    for layer in routing.layers:
        out[layer.block] = (_top(layer.core, kept_count(core_amount, layer.num_core)),
                            _top(layer.univ, kept_count(univ_amount, layer.num_univ)))
    return out


def describe_keep(keep: Keep) -> Dict[str, Amount]:
    """The checked ``keep`` as a JSON record: ``{'core': ..., 'univ': ...}``."""
    core, univ = parse_keep(keep)
    return {'core': core, 'univ': univ}


def kept_share(layer: LayerRouting, core: Sequence[int], univ: Sequence[int]) -> float:
    """The share of the layer's measured output mass the kept experts carried (1: nothing measured is lost)."""
    total = sum(layer.contribution)
    kept = sum(layer.core[i] for i in core) + sum(layer.univ[i] for i in univ)
    return kept / total if total > 0 else 1.
