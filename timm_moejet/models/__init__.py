from .moejet import MoEVisionTransformer
from .moejet_convnext import MoEConvNeXt

__all__ = ['MoEVisionTransformer', 'MoEConvNeXt']
