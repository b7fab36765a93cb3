"""The model families, one module each; importing a family module registers its family and its models."""
# ruff: noqa: I001  (the order the families are registered in, and named in messages)
from .moejet_vit import MoEVisionTransformer
from .moejet_convnext import MoEConvNeXt
from .moejet_mixer import MoEMlpMixer

__all__ = ['MoEVisionTransformer', 'MoEConvNeXt', 'MoEMlpMixer']
