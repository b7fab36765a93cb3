"""timm-moejet: MoE Jetpack (NeurIPS 2024) as a timm model-zoo extension.

Importing the package registers its models with timm (``timm.list_models('moejet*')``).
"""
from .layers import SpheroMoE, entmax15
from .models import *
from .official import load_official

__version__ = '0.1.0'
