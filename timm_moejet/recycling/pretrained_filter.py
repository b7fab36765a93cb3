""" Recycling as timm's pretrained-weight filter.

``timm.create_model('moejet_vit_tiny', pretrained=True)`` makes timm download the trunk donor named by the tag's
``hf_hub_id`` (cache, offline mode, safetensors first) and hand its state dict to a :class:`PretrainedFilter`,
which returns a complete MoE state dict, recycled by :func:`~timm_moejet.recycling.recycle`. The filter reads nothing
from files or the Hub: what the recipe names (the expert donor, the statistics) was resolved before the model was
built (:func:`~timm_moejet.recycling.prepare_on_load`). MoE
checkpoints (our exports, ``hf-hub:``/``local-dir:`` repos) and official MoE Jetpack checkpoints pass through, after
the family's timm filter has resampled the position embedding if needed.
"""
import logging
from typing import Any, Dict, Mapping, Optional

import torch
import torch.nn as nn

from ..checkpoint_io.official import convert_official_state_dict, is_official_state_dict
from ..checkpoint_io.read import strip_wrappers
from ..errors import InvalidArgument, InvalidCheckpoint
from ..family import Family, family_of_model
from ..moe_keys import is_expert_key, is_moe_state_dict
from .accounting import components_of, refuse_components
from .inputs import RecyclingInputs
from .recipe import RecyclingRecipe
from .recycle import recycle

__all__ = ['PretrainedFilter', 'checkpoint_filter_fn']

_logger = logging.getLogger(__name__)


def _source_name(cfg: Mapping[str, Any]) -> str:
    """Where timm loaded the checkpoint from, in timm's order (``_resolve_pretrained_source``)."""
    source = cfg.get('source')
    if source == 'hf-hub' and cfg.get('hf_hub_id'):
        return cfg['hf_hub_id']
    if source == 'local-dir' and cfg.get('file'):
        return f'local-dir:{cfg["file"]}'
    if cfg.get('state_dict') is not None:
        return 'in-memory state dict'
    for key in ('file', 'hf_hub_id', 'url'):
        if cfg.get(key):
            return str(cfg[key])
    return 'pretrained checkpoint'


def _with_every_expert(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """A MoE checkpoint must fill every expert tensor: timm's load is not strict when the head changes, and the
    experts of a model built for pretrained weights are left uninitialised."""
    missing = [k for k in model.state_dict() if is_expert_key(k) and k not in state_dict]
    if missing:
        raise InvalidCheckpoint(f'the MoE checkpoint lacks expert weights of the model: {missing[:6]}'
                                f'{" ..." if len(missing) > 6 else ""} ({len(missing)} tensors).')
    return state_dict


def _refuse_layout(family: Family, raw: Mapping[str, torch.Tensor], model: nn.Module, name: str) -> None:
    """A dense donor of another layout (a ViT's class-token layout) is refused before the family's timm filter
    resamples it as if it had the model's, naming what else the model cannot hold."""
    layout = family.layout_problem(raw, model)
    if layout:
        keys = set(model.state_dict())
        named = [c for c in components_of([k for k in raw if k not in keys]) if not c.startswith('tensors')]
        refuse_components(f'trunk donor {name}', type(model).__name__, named + [layout], family.recycle_hint)


class PretrainedFilter:
    """timm's ``pretrained_filter_fn`` of the MoE Jetpack models (no file or Hub access).

    * Official MoE Jetpack checkpoints are renamed to our layout.
    * MoE checkpoints (ours) pass through.
    * Dense checkpoints of the model's family are recycled with ``recipe`` (the trunk donor is the checkpoint, the
      expert donor and statistics are ``inputs``); :attr:`record` is then what was done, for the model's
      ``pretrained_cfg['recycling']`` (the filter leaves the model's config alone).

    In every case the family's timm filter runs first, so ``img_size`` (pos-embed resampling) and patch size changes
    work; ``in_chans`` and ``num_classes`` are then adapted by timm's loader.

    Args:
        recipe: How to recycle a dense checkpoint (default ``RecyclingRecipe()``).
        inputs: What the recipe names, resolved (:func:`~timm_moejet.recycling.resolve_inputs`); None when it names
            nothing.
    """

    def __init__(self, recipe: Optional[RecyclingRecipe] = None, inputs: Optional[RecyclingInputs] = None) -> None:
        self.recipe = recipe or RecyclingRecipe()
        self.inputs = inputs or RecyclingInputs()
        self.record: Optional[Dict[str, Any]] = None

    def __call__(self, state_dict: Mapping[str, Any], model: nn.Module) -> Dict[str, torch.Tensor]:
        """The state dict to load into ``model``.

        Raises:
            InvalidCheckpoint: If the checkpoint is neither a dense checkpoint of the family nor a MoE checkpoint.
            DonorMismatch: If recycling input is bad.
            InvalidArgument: If the recipe names an expert donor that ``inputs`` does not hold.
        """
        try:
            return self._filter(strip_wrappers(state_dict), model, family_of_model(model))
        except TypeError as e:
            # timm retries a filter that raised TypeError with one argument, which would hide this message
            raise InvalidArgument(f'checkpoint recycling failed: {e}') from e

    def _filter(self, raw: Dict[str, Any], model: nn.Module, family: Family) -> Dict[str, torch.Tensor]:
        if is_official_state_dict(raw):
            _logger.info('Converting an official MoE Jetpack checkpoint')
            return _with_every_expert(family.prepare(convert_official_state_dict(raw), model), model)
        if is_moe_state_dict(raw):
            return _with_every_expert(family.prepare(raw, model), model)
        trunk_id = _source_name(getattr(model, 'pretrained_cfg', None) or {})
        if family.is_dense(raw):
            _refuse_layout(family, raw, model, trunk_id)
        trunk = family.prepare(raw, model)
        if not family.is_dense(trunk):
            raise InvalidCheckpoint(
                f'The pretrained checkpoint is neither a dense {family.title} nor a MoE Jetpack checkpoint (first '
                f'keys: {list(raw)[:6]}); cannot load it into {type(model).__name__}.')
        inputs = self.inputs
        if self.recipe.experts is None:
            # the raw dict keeps the donor's own pos embed, so a statistics file's weights hash still matches
            inputs = RecyclingInputs(raw if family.is_dense(raw) else trunk, trunk_id, inputs.stats)
        elif inputs.experts is None:
            raise InvalidArgument(f'the recipe names the expert donor {self.recipe.experts!r}, which was not '
                                  f'resolved: pass inputs=resolve_inputs(recipe).')
        _logger.info('Recycling %s (trunk) and %s (experts) into %s with strategy %r, seed %d', trunk_id,
                     inputs.expert_id, type(model).__name__, self.recipe.strategy, self.recipe.seed)
        result = recycle(model, trunk, self.recipe, inputs, trunk_id=trunk_id, adapt_input_conv=False, inplace=True)
        self.record = result.record
        return result.state_dict


def checkpoint_filter_fn(
        state_dict: Mapping[str, Any],
        model: nn.Module,
        recipe: Optional[RecyclingRecipe] = None,
        inputs: Optional[RecyclingInputs] = None,
) -> Dict[str, torch.Tensor]:
    """:class:`PretrainedFilter` as a function of timm's filter signature: the state dict to load into ``model``
    (the record of a recycling is the filter object's :attr:`~PretrainedFilter.record`)."""
    return PretrainedFilter(recipe, inputs)(state_dict, model)
