"""Checkpoint recycling: dense timm weights become MoE Jetpack weights (also on load, as timm's filter).

``RecyclingRecipe`` says how (strategy, statistics, seed), ``STRATEGIES`` is the table of strategies,
``resolve_inputs`` loads what a recipe names once, ``recycle`` is the one entry point on what is in memory
(``recycle_state_dict`` and ``recycle_into`` the same for a caller holding state dicts), ``PretrainedFilter`` is
timm's pretrained filter and ``prepare_on_load`` what a MoE model's ``create_model`` asks of recycling. What a model
family looks like is ``timm_moejet.family``'s; building models from named donors is ``timm_moejet.build``'s.
"""
from .geometry import DenseDonor, RecyclingPlan, check_geometry
from .graph import GRAPH_METHODS, partition_graph
from .inputs import RecyclingInputs, load_statistics, resolve_inputs
from .on_load import RecyclingOnLoad, prepare_on_load
from .pretrained_filter import PretrainedFilter, checkpoint_filter_fn
from .recipe import DEFAULT_SEED, RECYCLE_KWARGS, TRUNK_FITS, RecyclingRecipe
from .recycle import RecyclingResult, recycle, recycle_into, recycle_state_dict, recycling_record
from .selection import BLOCK_MAPS
from .statistics import METRICS, ActivationStats, collect_statistics, weight_proxy_statistics, weights_hash
from .strategies import STRATEGIES, SelectionContext, Strategy, get_strategy, register_strategy
from .weight_selection import evenly_spaced, select_state_dict, select_tensor

__all__ = [
    'RecyclingRecipe', 'STRATEGIES', 'Strategy', 'SelectionContext', 'register_strategy', 'get_strategy',
    'ActivationStats', 'collect_statistics', 'weight_proxy_statistics', 'weights_hash', 'recycle', 'recycle_state_dict',
    'RecyclingResult', 'recycle_into', 'recycling_record', 'PretrainedFilter', 'checkpoint_filter_fn',
    'RecyclingOnLoad', 'prepare_on_load', 'RecyclingInputs', 'resolve_inputs', 'load_statistics', 'DEFAULT_SEED',
    'RECYCLE_KWARGS', 'METRICS', 'GRAPH_METHODS', 'partition_graph', 'DenseDonor', 'RecyclingPlan', 'check_geometry',
    'TRUNK_FITS', 'BLOCK_MAPS', 'evenly_spaced', 'select_state_dict', 'select_tensor',
]
