""" The one build path of every MoE family: timm's ``build_model_with_cfg`` with recycling as the pretrained filter.

A model builds; it reads nothing itself. What loading asks of recycling (the recipe of the tag and the ``recycle_*``
kwargs, the donors and statistics it names, read once before the model is built, and the filter timm calls) is
``timm_moejet.recycling.on_load``'s. Sizes are checked against the device's memory before anything is read or
allocated (``budget.py``).
"""
import contextlib
from typing import Any, Dict, Type

import torch.nn as nn
from timm.models import build_model_with_cfg

from ..layers import experts_to_be_loaded
from ..recycling.on_load import locate_weights, read_inputs, recipe_from_kwargs
from ..settings import integer, real
from .budget import check_fits_device, target_device

__all__ = ['PAPER_CFG', 'paper_cfg', 'build_moe_model']

# what every MoE family's pretrained cfg says of its origin
PAPER_CFG = {
    'license': 'apache-2.0',
    'paper_ids': 'arXiv:2406.04801',
    'paper_name': 'MoE Jetpack: From Dense Checkpoints to Adaptive Mixture of Experts for Vision Tasks',
}


def paper_cfg(url: str = '', **kwargs: Any) -> Dict[str, Any]:
    """A pretrained cfg of a MoE family: timm's common fields at 224 px and 1000 classes, the paper's, and the
    family's own (``kwargs``)."""
    return {'url': url, 'num_classes': 1000, 'input_size': (3, 224, 224), 'interpolation': 'bicubic', **PAPER_CFG,
            **kwargs}


# timm's kwargs that torch checks late (a dropout rate when the layer is built) or never (a drop path rate above 1, no
# input channels): every family takes them, so they are checked here once
_RATE_SUFFIXES = ('drop_rate', 'drop_path_rate')


def _check_timm_kwargs(variant: str, kwargs: Dict[str, Any]) -> None:
    for name, value in kwargs.items():
        if name.endswith(_RATE_SUFFIXES) and not name.startswith('moe_') and value is not None:  # moe_*: settings
            real(0., 1.)(f'{variant}: {name}', value)
    if 'in_chans' in kwargs:
        integer(1)(f'{variant}: in_chans', kwargs['in_chans'])


def build_moe_model(
        model_cls: Type[nn.Module],
        variant: str,
        pretrained: bool,
        feature_cfg: Dict[str, Any],
        **kwargs: Any,
) -> nn.Module:
    """Build a registered MoE model, recycling dense donors into it on load when ``pretrained``.

    Args:
        model_cls: The family's model class (its ``family`` holds the pretrained tags' recipes).
        variant: The registered name.
        pretrained: Load (and recycle) the pretrained tag's weights.
        feature_cfg: timm's feature extraction config of the family.
        **kwargs: ``create_model`` kwargs; the ``recycle_*`` ones configure the pretrained filter.
    """
    _check_timm_kwargs(variant, kwargs)
    on_load = recipe_from_kwargs(variant, kwargs, model_cls.family.recipes)
    if pretrained:  # a missing or damaged donor is named before anything is built, on the meta device too
        locate_weights(on_load)
    # absurd sizes refused before a byte is allocated or a donor read
    check_fits_device(variant, lambda: build_model_with_cfg(model_cls, variant, False, feature_cfg=dict(feature_cfg),
                                                            **dict(on_load.kwargs, device='meta')),
                      target_device(on_load.kwargs.get('device')))
    on_load = read_inputs(on_load) if pretrained else on_load
    # with pretrained weights the experts are about to be overwritten: skip drawing 260M random values
    with on_load.loading(), experts_to_be_loaded() if pretrained else contextlib.nullcontext():
        model = build_model_with_cfg(model_cls, variant, pretrained, pretrained_filter_fn=on_load.filter,
                                     feature_cfg=feature_cfg, **on_load.kwargs)
    model.pretrained_cfg = model.default_cfg = on_load.recorded(model, pretrained)
    return model
