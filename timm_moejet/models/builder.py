""" The one build path of every MoE family: timm's ``build_model_with_cfg`` with recycling as the pretrained filter.

The ``recycle_*`` kwargs and the tag's recipe become one :class:`~timm_moejet.recycling.RecyclingRecipe`; with
``pretrained`` its inputs (the trunk donor's file, the expert donor, the statistics) are located and loaded once,
before the model is built, so that a missing donor is named before 260M parameters are built and the filter that
timm calls works on what is in memory.
"""
import contextlib
import dataclasses
from functools import partial
from typing import Any, Dict, Mapping, Optional, Tuple, Type

import torch.nn as nn
from timm.models import build_model_with_cfg, resolve_pretrained_cfg

from ..checkpoint_io.donors import locate_donor
from ..checkpoint_io.hub import hub_errors_named
from ..checkpoint_io.names import HF_HUB
from ..errors import InvalidArgument, InvalidArgumentType
from ..layers import experts_to_be_loaded
from ..recycling import RECYCLE_KWARGS, RecyclingRecipe, checkpoint_filter_fn, resolve_inputs
from ..recycling.recipe import NAMES_OTHER_SOURCES
from ..recycling.recycle import record_on
from ..settings import unknown_kwargs_message

__all__ = ['PAPER_CFG', 'build_moe_model', 'recipe_from_kwargs']

# what every MoE family's pretrained cfg says of its origin
PAPER_CFG = {
    'license': 'apache-2.0',
    'paper_ids': 'arXiv:2406.04801',
    'paper_name': 'MoE Jetpack: From Dense Checkpoints to Adaptive Mixture of Experts for Vision Tasks',
}
# where the weights come from when they are not the tag's trunk donor
_WEIGHT_OVERLAYS = ('file', 'url', 'hf_hub_id', 'state_dict')


def _refuse_config_naming_files(variant: str, source: Optional[str], kwargs: Mapping[str, Any]) -> None:
    """A local-dir:/hf-hub: model's config.json is data from the checkpoint: its model_args (which timm merges into
    the kwargs) may not name other files or repos."""
    if source not in ('local-dir', 'hf-hub'):
        return
    config_args = kwargs.get('pretrained_model_args') or {}  # timm hands the config's model_args over apart
    from_config = sorted(k for k, f in RECYCLE_KWARGS.items() if f in NAMES_OTHER_SOURCES and k in config_args)
    if from_config:
        raise InvalidArgument(
            f'{variant}: the model\'s own config (config.json model_args) sets {", ".join(from_config)}; a '
            f'checkpoint\'s config may not name other files or repos (they come only from the caller\'s kwargs). '
            f'Remove them from config.json, then pass them to create_model if you mean them.')


def recipe_from_kwargs(
        variant: str,
        kwargs: Dict[str, Any],
        recipes: Mapping[str, RecyclingRecipe],
) -> Tuple[RecyclingRecipe, Optional[Dict[str, Any]], Optional[str], Optional[str]]:
    """Pop the ``recycle_*`` kwargs (and a recorded recipe in a ``pretrained_cfg`` dict) out of ``kwargs``.

    The recipe is the pretrained tag's, with the ``recycle_*`` kwargs given replacing its fields (``recycle_experts=
    None``: the trunk donor). When the weights are the caller's (a file, a state dict, a model folder or repo) rather
    than the tag's trunk donor, they give the experts too unless ``recycle_experts`` says otherwise.

    Args:
        variant: The entrypoint's model name.
        kwargs: The entrypoint kwargs; modified in place.
        recipes: ``'architecture.tag'`` -> recipe of that pretrained tag.

    Returns:
        The recipe, a recorded recipe to put back on the model (or None), the trunk donor's name and its Hub repo
        when it is the tag's (to locate before building).

    Raises:
        InvalidArgumentType: On an unknown ``recycle_*`` kwarg.
        InvalidArgument: On an invalid recycling argument, or a model config that names other files.
    """
    unknown = [k for k in kwargs if k.startswith('recycle_') and k not in RECYCLE_KWARGS]
    if unknown:
        raise InvalidArgumentType(unknown_kwargs_message(variant, unknown, RECYCLE_KWARGS))
    overrides = {RECYCLE_KWARGS[k]: kwargs.pop(k) for k in list(kwargs) if k in RECYCLE_KWARGS}
    record = None
    cfg = kwargs.get('pretrained_cfg')
    if isinstance(cfg, Mapping) and 'recycling' in cfg:
        # an exported model's config: keep the recorded recipe (timm's PretrainedCfg has no such field)
        record = cfg['recycling']
        kwargs['pretrained_cfg'] = cfg = {k: v for k, v in cfg.items() if k != 'recycling'}
    overlay = kwargs.get('pretrained_cfg_overlay') or {}
    resolved = resolve_pretrained_cfg(variant, pretrained_cfg=cfg, pretrained_cfg_overlay=overlay)
    _refuse_config_naming_files(variant, resolved.source, kwargs)
    base = recipes.get(f'{resolved.architecture or variant}.{resolved.tag}') or RecyclingRecipe()
    callers_weights = any(overlay.get(k) is not None for k in _WEIGHT_OVERLAYS) or \
        resolved.source in ('hf-hub', 'local-dir')
    if callers_weights:
        # the weights are the caller's, not the tag's trunk: they are also the expert donor (a folder's config may
        # claim a tag; its donors stay unused)
        base = dataclasses.replace(base, experts=None)
    recipe = dataclasses.replace(base, **overrides) if overrides else base
    return recipe, record, resolved.hf_hub_id, None if callers_weights else resolved.hf_hub_id


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
    recipe, record, trunk_id, trunk_repo = recipe_from_kwargs(variant, kwargs, recipes)
    inputs = None
    if pretrained:
        cache_dir = kwargs.get('cache_dir')
        if trunk_repo:  # a missing donor fails here, before 260M parameters are built
            locate_donor(f'{HF_HUB}{trunk_repo}', cache_dir=cache_dir, role='trunk donor')
        inputs = resolve_inputs(recipe, cache_dir)
    # with pretrained weights the experts are about to be overwritten: skip drawing 260M random values
    with hub_errors_named(f'trunk donor {trunk_id or "(pretrained weights)"!r}'), \
            experts_to_be_loaded() if pretrained else contextlib.nullcontext():
        model = build_model_with_cfg(
            model_cls,
            variant,
            pretrained,
            pretrained_filter_fn=partial(checkpoint_filter_fn, recipe=recipe, inputs=inputs),
            feature_cfg=feature_cfg,
            **kwargs,
        )
    # the record describes the weights the model holds: the filter's own when this load recycled dense weights; the
    # config's when its MoE weights were loaded as they are; none without pretrained weights
    recycled_now = 'recycling' in (getattr(model, 'pretrained_cfg', None) or {})
    if record is not None and pretrained and not recycled_now:
        record_on(model, record)
    return model
