""" Smaller MoE models for deployment: measure which experts carry the output, keep those, drop the rest.

* ``routing_stats``: routing statistics as a file (:class:`RoutingStatistics`, :func:`measure_routing`,
  :func:`load_routing`), tied to the model by a hash of its router weights;
* ``selection``: which experts a layer keeps (a fraction or count per group, rounded up, at least one per group);
* ``slicing``: the kept experts, their slots and slot queries cut out of a state dict;
* ``prune``: :func:`prune_experts`, the pruned model rebuilt with per-layer expert counts
  (``moe_experts_per_layer``).
"""
from .prune import prune_experts, pruning_record
from .routing_stats import (
    LayerRouting,
    RoutingStatistics,
    load_routing,
    measure_routing,
    router_hash,
    routing_from_diagnostics,
)
from .selection import kept_count, kept_experts, parse_keep

__all__ = ['prune_experts', 'pruning_record', 'RoutingStatistics', 'LayerRouting', 'measure_routing', 'load_routing',
           'router_hash', 'routing_from_diagnostics', 'kept_count', 'kept_experts', 'parse_keep']
