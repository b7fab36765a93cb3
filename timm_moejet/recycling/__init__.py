"""Checkpoint recycling: dense timm weights become MoE Jetpack weights (also on load, as timm's filter).

``RecyclingRecipe`` says how (strategy, statistics, seed), ``STRATEGIES`` is the table of strategies,
``resolve_inputs`` loads what a recipe names once, ``recycle_state_dict`` runs the pipeline on what is in memory
(``recycle_into`` also loads the result into the model), ``checkpoint_filter_fn`` is timm's pretrained filter.
Building models from named donors is ``timm_moejet.build``'s.
"""
from .families import FAMILIES, Family, family_of_state_dict, is_moe_state_dict
from .geometry import DenseDonor, RecyclingPlan, check_geometry
from .graph import GRAPH_METHODS, partition_graph
from .inputs import RecyclingInputs, load_statistics, resolve_inputs
from .pretrained_filter import checkpoint_filter_fn
from .recipe import DEFAULT_SEED, RECYCLE_KWARGS, TRUNK_FITS, RecyclingRecipe
from .recycle import RecyclingResult, recycle_into, recycle_state_dict, recycling_record
from .selection import BLOCK_MAPS
from .statistics import METRICS, ActivationStats, collect_statistics, weight_proxy_statistics, weights_hash
from .strategies import STRATEGIES, SelectionContext, Strategy, get_strategy, register_strategy
from .weight_selection import evenly_spaced, select_state_dict, select_tensor

__all__ = [
    'RecyclingRecipe', 'STRATEGIES', 'Strategy', 'SelectionContext', 'register_strategy', 'get_strategy',
    'ActivationStats', 'collect_statistics', 'weight_proxy_statistics', 'weights_hash', 'recycle_state_dict',
    'RecyclingResult', 'recycle_into', 'recycling_record', 'checkpoint_filter_fn', 'RecyclingInputs',
    'resolve_inputs', 'load_statistics', 'DEFAULT_SEED', 'RECYCLE_KWARGS', 'METRICS', 'GRAPH_METHODS',
    'partition_graph', 'FAMILIES', 'Family', 'family_of_state_dict', 'is_moe_state_dict', 'DenseDonor',
    'RecyclingPlan', 'check_geometry', 'TRUNK_FITS', 'BLOCK_MAPS', 'evenly_spaced', 'select_state_dict',
    'select_tensor',
]
