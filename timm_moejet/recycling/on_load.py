""" Recycling on load: what ``timm.create_model(..., pretrained=True)`` of a MoE model asks of recycling.

The model entrypoint (``models/builder.py``) builds; this module reads, in three steps (:func:`prepare_on_load` runs
them all): :func:`recipe_from_kwargs` turns the ``recycle_*`` kwargs and the pretrained tag's recipe into one
:class:`~timm_moejet.recycling.RecyclingRecipe` (reading nothing), :func:`locate_weights` names a missing or damaged
trunk donor before 260M parameters are built, and :func:`read_inputs` loads what the recipe names (the expert donor,
the statistics) once; the :class:`~timm_moejet.recycling.pretrained_filter.PretrainedFilter` it hands timm then works
on what is in memory. :meth:`RecyclingOnLoad.recorded` gives the model's ``pretrained_cfg`` with the record of the
weights it holds.
"""
import contextlib
import dataclasses
from typing import Any, Dict, Iterator, Mapping, Optional

import torch.nn as nn
from timm.models import resolve_pretrained_cfg

from ..checkpoint_io.donors import locate_donor
from ..checkpoint_io.hub import MOE_CFG_RECORDS, hub_errors_named
from ..checkpoint_io.names import HF_HUB
from ..checkpoint_io.read import is_damaged_file_error
from ..errors import InvalidArgument, InvalidArgumentType, InvalidCheckpoint
from ..settings import unknown_kwargs_message
from .inputs import resolve_inputs
from .pretrained_filter import PretrainedFilter
from .recipe import NAMES_OTHER_SOURCES, RECYCLE_KWARGS, RecyclingRecipe, check_strategy_reads

__all__ = ['RecyclingOnLoad', 'prepare_on_load', 'recipe_from_kwargs', 'locate_weights', 'read_inputs']

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


@dataclasses.dataclass(frozen=True)
class RecyclingOnLoad:
    """How one ``create_model`` call of a MoE model loads its weights.

    Attributes:
        kwargs: The model kwargs for timm's ``build_model_with_cfg``: without ``recycle_*``, and with a recorded
            recipe taken out of a ``pretrained_cfg`` dict (timm's ``PretrainedCfg`` has no such field).
        recipe: How a dense checkpoint is recycled.
        filter: timm's ``pretrained_filter_fn``.
        record: The recipe recorded with the checkpoint (an exported model's), or None.
        trunk_id: The trunk donor's Hub repo, when the weights are the tag's.
        weights: What timm will read, as a donor is named (``hf-hub:ORG/REPO``, a folder, a file), to be located and
            checked before building; None when the weights are in memory or behind a URL.
        tags_trunk: Whether those weights are the pretrained tag's trunk donor (else the caller's).
        other_records: The checkpoint's records besides its recipe (``pruning``), put back with its weights.
    """
    kwargs: Dict[str, Any]
    recipe: RecyclingRecipe
    filter: PretrainedFilter
    record: Optional[Dict[str, Any]] = None
    trunk_id: Optional[str] = None
    weights: Optional[str] = None
    tags_trunk: bool = False
    other_records: Dict[str, Any] = dataclasses.field(default_factory=dict)

    @contextlib.contextmanager
    def loading(self) -> Iterator[None]:
        """timm's download and read of the weights, its errors naming them (a damaged file that the checks before
        building let through, such as a zip checkpoint with a damaged member, included)."""
        what = self.weights or self.trunk_id or '(pretrained weights)'
        with hub_errors_named(f'trunk donor {what!r}'):
            try:
                yield
            except Exception as e:
                if not is_damaged_file_error(e):
                    raise
                raise InvalidCheckpoint(f'{what} cannot be read ({type(e).__name__}: {str(e).strip()[:200]}); it may '
                                        f'be truncated or damaged: delete it and download or copy it again.') from e

    def recorded(self, model: nn.Module, pretrained: bool) -> Dict[str, Any]:
        """The model's ``pretrained_cfg`` with the record of the weights it holds: the filter's when this load
        recycled dense weights; the checkpoint's when its MoE weights were loaded as they are; none without
        pretrained weights."""
        cfg = dict(getattr(model, 'pretrained_cfg', None) or {})
        if pretrained:
            cfg.update(self.other_records)
        if self.filter.record is not None:
            return dict(cfg, recycling=self.filter.record)
        if self.record is not None and pretrained:
            return dict(cfg, recycling=self.record)
        return cfg


def recipe_from_kwargs(variant: str, kwargs: Mapping[str, Any], recipes: Mapping[str, RecyclingRecipe]
                       ) -> RecyclingOnLoad:
    """The recipe of a ``create_model`` call: the pretrained tag's, with the ``recycle_*`` kwargs given replacing its
    fields (``recycle_experts=None``: the trunk donor). When the weights are the caller's (a file, a state dict, a
    model folder or repo) rather than the tag's trunk donor, they give the experts too unless ``recycle_experts`` says
    otherwise. Nothing is read.

    Args:
        variant: The entrypoint's model name.
        kwargs: The entrypoint kwargs (not modified).
        recipes: ``'architecture.tag'`` -> recipe of that pretrained tag.

    Raises:
        InvalidArgumentType: On an unknown ``recycle_*`` kwarg.
        InvalidArgument: On an invalid recycling argument, or a model config that names other files.
    """
    unknown = [k for k in kwargs if k.startswith('recycle_') and k not in RECYCLE_KWARGS]
    if unknown:
        raise InvalidArgumentType(unknown_kwargs_message(variant, unknown, RECYCLE_KWARGS))
    overrides = {RECYCLE_KWARGS[k]: v for k, v in kwargs.items() if k in RECYCLE_KWARGS}
    kwargs = {k: v for k, v in kwargs.items() if k not in RECYCLE_KWARGS}
    records: Dict[str, Any] = {}
    cfg = kwargs.get('pretrained_cfg')
    if isinstance(cfg, Mapping) and any(k in cfg for k in MOE_CFG_RECORDS):
        # an exported model's config: keep the recorded recipe and pruning (timm's PretrainedCfg has no such fields)
        records = {k: cfg[k] for k in MOE_CFG_RECORDS if k in cfg}
        kwargs['pretrained_cfg'] = cfg = {k: v for k, v in cfg.items() if k not in MOE_CFG_RECORDS}
    record = records.pop('recycling', None)
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
    check_strategy_reads(recipe.strategy, overrides)  # also a kwarg given at its default value
    return RecyclingOnLoad(kwargs, recipe, PretrainedFilter(recipe), record, resolved.hf_hub_id,
                           _weights_read(resolved, overlay), not callers_weights, records)


def _weights_read(cfg: Any, overlay: Mapping[str, Any]) -> Optional[str]:
    """The weights timm's ``load_pretrained`` will read for this cfg, named as a donor (in timm's order of sources:
    ``_resolve_pretrained_source``); None for a state dict in memory or a URL."""
    if cfg.source == 'hf-hub' and cfg.hf_hub_id:
        return HF_HUB + cfg.hf_hub_id
    if cfg.source == 'local-dir' and cfg.file:
        return str(cfg.file)
    if overlay.get('state_dict') is not None or getattr(cfg, 'state_dict', None) is not None:
        return None
    if cfg.file:
        return str(cfg.file)
    return HF_HUB + cfg.hf_hub_id if cfg.hf_hub_id else None


def locate_weights(on_load: RecyclingOnLoad) -> None:
    """Make sure the weights timm will read are there and readable (fetched into the cache when online), naming a
    missing or damaged file before 260M parameters are built."""
    if on_load.weights:
        locate_donor(on_load.weights, cache_dir=on_load.kwargs.get('cache_dir'),
                     role='trunk donor' if on_load.tags_trunk else 'pretrained weights')


def read_inputs(on_load: RecyclingOnLoad) -> RecyclingOnLoad:
    """The recipe's inputs read once, before the model is built: the filter timm calls gets the expert donor and
    statistics in memory."""
    inputs = resolve_inputs(on_load.recipe, on_load.kwargs.get('cache_dir'))
    return dataclasses.replace(on_load, filter=PretrainedFilter(on_load.recipe, inputs))


def prepare_on_load(variant: str, kwargs: Mapping[str, Any], recipes: Mapping[str, RecyclingRecipe],
                    pretrained: bool) -> RecyclingOnLoad:
    """:func:`recipe_from_kwargs`, and with ``pretrained`` :func:`locate_weights` and :func:`read_inputs`."""
    on_load = recipe_from_kwargs(variant, kwargs, recipes)
    if not pretrained:
        return on_load
    locate_weights(on_load)
    return read_inputs(on_load)
