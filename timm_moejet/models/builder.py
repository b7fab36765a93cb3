""" The one build path of every MoE family: timm's ``build_model_with_cfg`` with recycling as the pretrained filter. """
import contextlib
from typing import Any, Dict, Type

import torch.nn as nn
from timm.models import build_model_with_cfg

from ..layers import experts_to_be_loaded
from ..recycling import RecyclingArgs, RecyclingRecipe

__all__ = ['PAPER_CFG', 'build_moe_model']

# what every MoE family's pretrained cfg says of its origin
PAPER_CFG = {
    'license': 'apache-2.0',
    'paper_ids': 'arXiv:2406.04801',
    'paper_name': 'MoE Jetpack: From Dense Checkpoints to Adaptive Mixture of Experts for Vision Tasks',
}


def build_moe_model(
        model_cls: Type[nn.Module],
        variant: str,
        pretrained: bool,
        recipes: Dict[str, RecyclingRecipe],
        feature_cfg: Dict[str, Any],
        **kwargs: Any,
) -> nn.Module:
    """Build a registered MoE model, recycling dense donors into it on load when ``pretrained``.

    Args:
        model_cls: The model class (``MoEVisionTransformer``, ``MoEConvNeXt``).
        variant: The registered name.
        pretrained: Load (and recycle) the pretrained tag's weights.
        recipes: The family's pretrained tags -> their recycling recipes.
        feature_cfg: timm's feature extraction config of the family.
        **kwargs: ``create_model`` kwargs; the ``recycle_*`` ones configure the pretrained filter.
    """
    recycling = RecyclingArgs.pop_from(variant, kwargs, recipes)
    if pretrained:
        recycling.locate_donors()  # a missing donor fails here, before 260M parameters are built
    # with pretrained weights the experts are about to be overwritten: skip drawing 260M random values
    with recycling.naming_missing_donors(), experts_to_be_loaded() if pretrained else contextlib.nullcontext():
        model = build_model_with_cfg(
            model_cls,
            variant,
            pretrained,
            pretrained_filter_fn=recycling.filter_fn,
            feature_cfg=feature_cfg,
            **kwargs,
        )
    return recycling.finish(model)
