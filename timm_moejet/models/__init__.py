from .moejet_convnext import MoEConvNeXt
from .moejet_vit import MoEVisionTransformer

__all__ = ['MoEVisionTransformer', 'MoEConvNeXt']
