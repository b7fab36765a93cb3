"""Checkpoint recycling: dense timm weights become MoE Jetpack weights (also on load, as timm's filter).

``RecyclingRecipe`` says how (strategy, statistics, seed), ``STRATEGIES`` is the table of strategies,
``recycle_state_dict``/``recycle_into`` run the pipeline, ``checkpoint_filter_fn`` is timm's pretrained filter.
"""
from .families import FAMILIES, Family, family_of_state_dict, is_moe_state_dict
from .geometry import DenseDonor, RecyclingPlan, check_geometry
from .graph import GRAPH_METHODS, partition_graph
from .pretrained_filter import RecyclingArgs, checkpoint_filter_fn
from .recipe import DEFAULT_SEED, RECYCLE_KWARGS, TRUNK_FITS, RecyclingRecipe
from .recycle import build_recycled_model, build_selected_model, recycle_into, recycle_state_dict, recycling_record
from .selection import BLOCK_MAPS
from .statistics import METRICS, ActivationStats, collect_statistics, weight_proxy_statistics, weights_hash
from .strategies import STRATEGIES, SelectionContext, Strategy, get_strategy, register_strategy
from .weight_selection import evenly_spaced, select_state_dict, select_tensor

__all__ = [
    'RecyclingRecipe', 'STRATEGIES', 'Strategy', 'SelectionContext', 'register_strategy', 'get_strategy',
    'ActivationStats', 'collect_statistics', 'weight_proxy_statistics', 'weights_hash', 'recycle_state_dict',
    'recycle_into', 'recycling_record', 'checkpoint_filter_fn', 'RecyclingArgs', 'DEFAULT_SEED', 'RECYCLE_KWARGS',
    'METRICS', 'GRAPH_METHODS', 'partition_graph', 'FAMILIES', 'Family', 'family_of_state_dict', 'is_moe_state_dict',
    'DenseDonor', 'RecyclingPlan', 'check_geometry', 'build_recycled_model', 'TRUNK_FITS', 'BLOCK_MAPS',
    'evenly_spaced', 'select_state_dict', 'select_tensor', 'build_selected_model',
]
