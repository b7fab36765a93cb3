"""Checkpoint recycling: dense timm ViT weights become MoE Jetpack weights (also on load, as timm's filter).

See ``recycle_state_dict`` for the recipe and ``STRATEGIES`` for the selection strategies.
"""
from .graph import GRAPH_METHODS, partition_graph
from .pretrained import (
    RECYCLE_KWARGS,
    RecyclingArgs,
    RecyclingRecipe,
    checkpoint_filter_fn,
    load_donor,
    resolve_recipe,
)
from .recycle import (
    DEFAULT_SEED,
    is_dense_vit_state_dict,
    is_moe_state_dict,
    recycle_into,
    recycle_state_dict,
    recycling_record,
)
from .selection import STRATEGIES, check_strategy
from .statistics import METRICS, ActivationStats, collect_statistics, weight_proxy_statistics, weights_hash

__all__ = [
    'STRATEGIES', 'ActivationStats', 'collect_statistics', 'recycle_state_dict', 'recycle_into',
    'DEFAULT_SEED', 'METRICS', 'GRAPH_METHODS', 'check_strategy', 'is_dense_vit_state_dict', 'is_moe_state_dict',
    'partition_graph', 'recycling_record', 'weight_proxy_statistics', 'weights_hash', 'RecyclingRecipe',
    'RecyclingArgs', 'checkpoint_filter_fn', 'load_donor', 'resolve_recipe', 'RECYCLE_KWARGS',
]
