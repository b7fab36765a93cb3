""" Recycling as timm's pretrained-weight filter, and the glue between a model entrypoint and its tag's recipe.

``timm.create_model('moejet_vit_tiny', pretrained=True)`` makes timm download the trunk donor named by the tag's
``hf_hub_id`` (cache, offline mode, safetensors first) and hand its state dict to :func:`checkpoint_filter_fn`,
which loads the expert donor through :func:`timm_moejet.donors.load_donor` and returns a complete MoE state dict.
MoE checkpoints (our exports, ``hf-hub:``/``local-dir:`` repos) and official MoE Jetpack checkpoints pass through,
after the family's timm filter has resampled the position embedding if needed.
"""
import contextlib
import logging
from typing import Any, Callable, Dict, Iterator, Mapping, Optional

import torch
import torch.nn as nn

from ..checkpoint_io import unwrap_state_dict
from ..errors import InvalidArgument, InvalidArgumentType, InvalidCheckpoint
from ..official import convert_official_state_dict, is_official_state_dict
from ..settings import unknown_kwargs_message
from .families import family_of_model, is_moe_state_dict
from .recipe import NAMES_OTHER_SOURCES, RECYCLE_KWARGS, RecyclingRecipe
from .recycle import record_on, run_recycling
from .statistics import ActivationStats

__all__ = ['checkpoint_filter_fn', 'RecyclingArgs']

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
    missing = [k for k in model.state_dict() if ('.mlp.core.fc' in k or '.mlp.univ.fc' in k) and k not in state_dict]
    if missing:
        raise InvalidCheckpoint(f'the MoE checkpoint lacks expert weights of the model: {missing[:6]}'
                                f'{" ..." if len(missing) > 6 else ""} ({len(missing)} tensors).')
    return state_dict


def checkpoint_filter_fn(
        state_dict: Mapping[str, Any],
        model: nn.Module,
        recipe: Optional[RecyclingRecipe] = None,
        cache_dir: Optional[str] = None,
) -> Dict[str, torch.Tensor]:
    """timm ``pretrained_filter_fn`` of the MoE Jetpack models.

    * Official MoE Jetpack checkpoints are renamed to our layout.
    * MoE checkpoints (ours) pass through.
    * Dense checkpoints of the model's family are recycled with ``recipe`` (the trunk donor is ``state_dict``), and
      the recipe is recorded in ``model.pretrained_cfg['recycling']``.
    In every case the family's timm filter runs first, so ``img_size`` (pos-embed resampling) and patch size changes
    work; ``in_chans`` and ``num_classes`` are then adapted by timm's loader.

    Raises:
        InvalidCheckpoint: If the checkpoint is neither a dense checkpoint of the family nor a MoE checkpoint.
        DonorMismatch, NotFound: If recycling input is bad or the expert donor cannot be loaded.
    """
    from ..donors import load_donor

    family = family_of_model(model)
    try:
        raw = unwrap_state_dict(state_dict)
        if is_official_state_dict(raw):
            _logger.info('Converting an official MoE Jetpack checkpoint')
            return _with_every_expert(family.prepare(convert_official_state_dict(raw), model), model)
        if is_moe_state_dict(raw):
            return _with_every_expert(family.prepare(raw, model), model)
        if family.name == 'vit' and family.is_dense(raw):
            _refuse_vit_layout(raw, model, _source_name(getattr(model, 'pretrained_cfg', None) or {}))
        trunk = family.prepare(raw, model)
        if not family.is_dense(trunk):
            raise InvalidCheckpoint(
                f'The pretrained checkpoint is neither a dense {family.title} nor a MoE Jetpack checkpoint (first '
                f'keys: {list(raw)[:6]}); cannot load it into {type(model).__name__}.')
        recipe = recipe or RecyclingRecipe()
        trunk_id = _source_name(getattr(model, 'pretrained_cfg', None) or {})
        if recipe.experts is None:
            # the raw dict keeps the donor's own pos embed, so a statistics file's weights hash still matches
            experts, expert_id = (raw if family.is_dense(raw) else trunk), trunk_id
        else:
            experts, expert_id = load_donor(recipe.experts, cache_dir=cache_dir, role='expert donor').state_dict, \
                recipe.experts
        stats = ActivationStats.load(recipe.stats) if recipe.stats and recipe.strategy_obj.needs_stats else None
        _logger.info('Recycling %s (trunk) and %s (experts) into %s with strategy %r, seed %d',
                     trunk_id, expert_id, type(model).__name__, recipe.strategy, recipe.seed)
        out, _, record = run_recycling(model, trunk, experts, recipe, stats=stats, trunk_id=trunk_id,
                                       expert_id=expert_id, adapt_input_conv=False, inplace=True)
        record_on(model, record)
        return out
    except TypeError as e:
        # timm retries a filter that raised TypeError with one argument, which would hide this message
        raise InvalidArgument(f'checkpoint recycling failed: {e}') from e


def _refuse_vit_layout(raw: Mapping[str, torch.Tensor], model: nn.Module, name: str) -> None:
    """A dense ViT donor of another class-token layout is refused before timm's filter resamples its position
    embedding as if it had the model's layout (naming what else the model cannot hold)."""
    from .accounting import RECYCLE_HINT, components_of, refuse_components, vit_layout_problem

    layout = vit_layout_problem(raw, model)
    if layout:
        keys = set(model.state_dict())
        named = [c for c in components_of([k for k in raw if k not in keys]) if not c.startswith('tensors')]
        refuse_components(f'trunk donor {name}', type(model).__name__, named + [layout], RECYCLE_HINT)


def _refuse_config_naming_files(variant: str, resolved: Any, kwargs: Mapping[str, Any]) -> None:
    """A local-dir:/hf-hub: model's config.json is data from the checkpoint: its model_args (which timm merges into
    the kwargs) may not name other files or repos."""
    if resolved.source not in ('local-dir', 'hf-hub'):
        return
    config_args = kwargs.get('pretrained_model_args') or {}  # timm hands the config's model_args over apart
    from_config = sorted(k for k, f in RECYCLE_KWARGS.items() if f in NAMES_OTHER_SOURCES and k in config_args)
    if from_config:
        raise InvalidArgument(
            f'{variant}: the model\'s own config (config.json model_args) sets {", ".join(from_config)}; a '
            f'checkpoint\'s config may not name other files or repos (they come only from the caller\'s kwargs). '
            f'Remove them from config.json, then pass them to create_model if you mean them.')


class RecyclingArgs:
    """What a model entrypoint needs for recycling on load; consumes the ``recycle_*`` kwargs.

    Usage in a family's ``_create_*``::

        recycling = RecyclingArgs.pop_from(variant, kwargs, recipes)
        with recycling.naming_missing_donors():
            model = build_model_with_cfg(..., pretrained_filter_fn=recycling.filter_fn, **kwargs)
        return recycling.finish(model)
    """

    def __init__(self, recipe: RecyclingRecipe, trunk_id: Optional[str], record: Optional[Dict[str, Any]],
                 cache_dir: Optional[str], trunk_repo: Optional[str] = None) -> None:
        self.recipe = recipe
        self.trunk_id = trunk_id
        self.record = record
        self.cache_dir = cache_dir
        self.trunk_repo = trunk_repo
        self.loaded: Optional[str] = None  # what the filter did in this load: 'recycled' or 'moe' (passed through)

    @classmethod
    def pop_from(cls, variant: str, kwargs: Dict[str, Any], recipes: Mapping[str, RecyclingRecipe]
                 ) -> 'RecyclingArgs':
        """Pop ``recycle_*`` kwargs (and a recorded recipe in a ``pretrained_cfg`` dict) out of ``kwargs``.

        Args:
            variant: The entrypoint's model name.
            kwargs: The entrypoint kwargs; modified in place.
            recipes: ``'architecture.tag'`` -> recipe of that pretrained tag.

        Raises:
            InvalidArgumentType: On an unknown ``recycle_*`` kwarg.
            InvalidArgument: On an invalid recycling argument.
            NotFound: If ``recycle_stats`` does not exist.
        """
        from timm.models import resolve_pretrained_cfg

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
        _refuse_config_naming_files(variant, resolved, kwargs)
        base = recipes.get(f'{resolved.architecture or variant}.{resolved.tag}') or RecyclingRecipe()
        replaced = any(overlay.get(k) is not None for k in ('file', 'url', 'hf_hub_id', 'state_dict'))
        if replaced or resolved.source in ('hf-hub', 'local-dir'):
            # the weights are the caller's file or a model folder/repo, not the tag's trunk: they are also the expert
            # donor unless recycle_experts says otherwise (a folder's config may claim a tag; its donors stay unused)
            base = base.replace(experts='trunk')
        recipe = base.replace(**overrides)
        cache_dir = kwargs.get('cache_dir')
        trunk_repo = None if replaced or resolved.source in ('hf-hub', 'local-dir') else resolved.hf_hub_id
        return cls(recipe, resolved.hf_hub_id, record, str(cache_dir) if cache_dir is not None else None, trunk_repo)

    def locate_donors(self) -> None:
        """Find the tag's trunk donor and the expert donor (fetching them into the Hub cache when online) before
        the model is built, so a missing donor is named at once rather than after building the model."""
        from ..donors import locate_donor

        if self.trunk_repo:
            locate_donor(f'hf-hub:{self.trunk_repo}', cache_dir=self.cache_dir, role='trunk donor')
        if self.recipe.experts:
            locate_donor(self.recipe.experts, cache_dir=self.cache_dir, role='expert donor')

    @property
    def filter_fn(self) -> Callable[..., Dict[str, torch.Tensor]]:
        """The ``pretrained_filter_fn`` bound to this recipe."""
        recipe, cache_dir = self.recipe, self.cache_dir

        def _filter(state_dict: Mapping[str, Any], model: nn.Module) -> Dict[str, torch.Tensor]:
            before = (getattr(model, 'pretrained_cfg', None) or {}).get('recycling')
            out = checkpoint_filter_fn(state_dict, model, recipe=recipe, cache_dir=cache_dir)
            recycled = (getattr(model, 'pretrained_cfg', None) or {}).get('recycling') is not before
            self.loaded = 'recycled' if recycled else 'moe'
            return out
        return _filter

    @contextlib.contextmanager
    def naming_missing_donors(self) -> Iterator[None]:
        """Name the trunk donor's repo when timm cannot find it in the cache or on the Hub."""
        from ..hub import hub_errors_named
        with hub_errors_named(f'trunk donor {self.trunk_id or "(pretrained weights)"!r}'):
            yield

    def finish(self, model: nn.Module) -> nn.Module:
        """Re-attach the recorded recipe of an exported model's config when its MoE weights were loaded as they are.

        A record describes the weights the model holds: when this load recycled dense weights, the filter's record
        of that recycling stays; without pretrained weights there is none (a config's record speaks of other
        weights).
        """
        if self.loaded == 'moe' and self.record is not None:
            record_on(model, self.record)
        elif self.loaded is None:
            cfg = dict(getattr(model, 'pretrained_cfg', None) or {})
            if cfg.pop('recycling', None) is not None:
                model.pretrained_cfg = model.default_cfg = cfg
        return model
