"""timm-moejet: MoE Jetpack (NeurIPS 2024) as a timm model-zoo extension.

Importing the package registers its models with timm (``timm.list_models('moejet*')``).
"""
from .errors import MoEJetError
from .layers import SpheroMoE, cast_experts, entmax15
from .models import *
from .official import load_official
from .recycling import RecyclingRecipe

__version__ = '0.1.0'
