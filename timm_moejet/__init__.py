"""timm-moejet: MoE Jetpack (NeurIPS 2024) as a timm model-zoo extension.

Importing the package registers its models with timm (``timm.list_models('moejet*')``).
"""
from .interrupt import while_importing  # standard library only: first, so Ctrl-C in the imports below is caught

with while_importing():  # seconds of torch and timm: a command interrupted here ends in one line (interrupt.py)
    from .build import build_recycled_model, build_selected_model, create_moejet_from, load_model
    from .checkpoint_io.official import load_official
    from .errors import MoEJetError
    from .layers import SpheroMoE, cast_experts, entmax15
    from .models import MoEConvNeXt, MoEMlpMixer, MoEVisionTransformer
    from .pruning import RoutingStatistics, load_routing, measure_routing, prune_experts
    from .recycling import RecyclingRecipe, recycle_into, recycle_state_dict, resolve_inputs

__version__ = '0.1.0'

__all__ = [
    'MoEConvNeXt', 'MoEJetError', 'MoEMlpMixer', 'MoEVisionTransformer', 'RecyclingRecipe', 'RoutingStatistics',
    'SpheroMoE', 'build_recycled_model', 'build_selected_model', 'cast_experts', 'create_moejet_from', 'entmax15',
    'load_model', 'load_official', 'load_routing', 'measure_routing', 'prune_experts', 'recycle_into',
    'recycle_state_dict', 'resolve_inputs',
]
