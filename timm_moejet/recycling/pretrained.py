""" Recycling as timm's pretrained-weight filter, and the recipes behind the pretrained tags.

``timm.create_model('moejet_vit_tiny', pretrained=True)`` makes timm download the trunk donor named by the tag's
``hf_hub_id`` (cache, offline mode, safetensors first) and hand its state dict to
:func:`checkpoint_filter_fn`, which fetches the expert donor through the same Hub machinery and returns a complete
MoE state dict. MoE checkpoints (our exports, ``hf-hub:``/``local-dir:`` repos) and official MoE Jetpack
checkpoints pass through, after timm's ViT filter has resampled the position embedding if needed.
"""
import contextlib
import dataclasses
import logging
import os
from typing import Any, Callable, Dict, Iterator, Mapping, Optional, Union

import torch
import torch.nn as nn

from ..checkpoint_io import load_state_dict_file
from ..official import convert_official_state_dict, is_official_state_dict, unwrap_state_dict
from .graph import GRAPH_METHODS
from .recycle import (
    DEFAULT_SEED,
    _check_seed,
    is_dense_vit_state_dict,
    is_moe_state_dict,
    recycle_state_dict,
    recycling_record,
)
from .selection import check_strategy
from .statistics import METRICS, ActivationStats

__all__ = ['RecyclingRecipe', 'RecyclingArgs', 'checkpoint_filter_fn', 'load_donor', 'resolve_recipe',
           'RECYCLE_KWARGS']

_logger = logging.getLogger(__name__)

# create_model kwargs consumed by the entrypoint (prefix 'recycle_' + field of RecyclingRecipe)
RECYCLE_KWARGS = ('recycle_strategy', 'recycle_stats', 'recycle_seed', 'recycle_experts', 'recycle_metric',
                  'recycle_graph_method', 'recycle_graph_parts')


@dataclasses.dataclass(frozen=True)
class RecyclingRecipe:
    """How a pretrained tag turns dense donors into MoE weights (the trunk donor is the tag's ``hf_hub_id``).

    Attributes:
        experts: Expert donor: a Hub id (``org/repo[@rev]``, optional ``hf-hub:`` prefix), ``local-dir:<dir>``,
            a local checkpoint file, or None for the trunk donor itself (single-donor recycling; the
            ``recycle_experts='trunk'`` kwarg selects it).
        strategy: One of ``STRATEGIES``.
        stats: Path of an activation statistics file of the expert donor (None: data-free proxy).
        seed: Selection seed (3407 as released).
        metric: Importance statistic ('l2' as released, 'l1', 'freq').
        graph_method: 'metis' or 'spectral' (graph strategy).
        graph_parts: Parts of the co-activation graph (graph strategy).
        cache_dir: Hub cache folder (None: huggingface_hub's default / ``HF_HUB_CACHE``).
    """
    experts: Optional[str] = None
    strategy: str = 'importance'
    stats: Optional[str] = None
    seed: int = DEFAULT_SEED
    metric: str = 'l2'
    graph_method: str = 'metis'
    graph_parts: int = 32
    cache_dir: Optional[str] = None

    def __post_init__(self) -> None:
        check_strategy(self.strategy)
        _check_seed(self.seed)
        if self.metric not in METRICS:
            raise ValueError(f'Unknown importance metric {self.metric!r}; valid metrics are {", ".join(METRICS)}.')
        if self.graph_method not in GRAPH_METHODS:
            raise ValueError(f'Unknown graph method {self.graph_method!r}; valid methods are '
                             f'{", ".join(GRAPH_METHODS)}.')
        if isinstance(self.graph_parts, bool) or not isinstance(self.graph_parts, int) or self.graph_parts < 2:
            raise ValueError(f'recycle_graph_parts must be an int >= 2, got {self.graph_parts!r}.')
        if self.experts is not None and (not isinstance(self.experts, str) or not self.experts):
            raise ValueError(f'recycle_experts must be a Hub id, local-dir:<folder>, a checkpoint file or None, '
                             f'got {self.experts!r}.')
        if self.stats is not None:
            if not isinstance(self.stats, (str, os.PathLike)):
                raise ValueError(f'recycle_stats must be the path of a statistics file, got {self.stats!r}.')
            if not os.path.isfile(self.stats):
                raise FileNotFoundError(f'recycle_stats: activation statistics file not found: {self.stats}')

    def describe(self) -> str:
        """One line for the pretrained cfg's description."""
        experts = self.experts or 'the trunk donor'
        return f'MoE Jetpack checkpoint recycling: experts from {experts}, strategy {self.strategy}, seed {self.seed}'


def resolve_recipe(base: Optional[RecyclingRecipe] = None, **overrides: Any) -> RecyclingRecipe:
    """``base`` (default: single-donor importance recycling) with ``recycle_*``-style overrides applied.

    Args:
        base: The tag's recipe.
        **overrides: Field values (``strategy``, ``stats``, ``seed``, ...); None values are ignored.

    Raises:
        TypeError: On an unknown field, naming the valid ``recycle_*`` kwargs.
        ValueError: On an invalid value (unknown strategy, ...), before any model is built.
    """
    fields = {f.name for f in dataclasses.fields(RecyclingRecipe)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise TypeError(f'unknown recycling argument(s) {["recycle_" + u for u in unknown]}; valid ones are '
                        f'{", ".join(RECYCLE_KWARGS)}.')
    overrides = {k: (os.fspath(v) if k == 'stats' and isinstance(v, os.PathLike) else v)
                 for k, v in overrides.items() if v is not None}
    if overrides.get('experts') == 'trunk':
        overrides['experts'] = None
    return dataclasses.replace(base or RecyclingRecipe(), **overrides)


def _hub_unreachable(repo: str, role: str, err: Exception) -> FileNotFoundError:
    return FileNotFoundError(
        f'{role} donor {repo!r} is not in the local Hugging Face cache and the Hub was not reachable '
        f'({type(err).__name__}; offline mode or no network). Download it once online, or point '
        f'HF_HUB_CACHE at a cache that holds it.')


def load_donor(spec: str, cache_dir: Optional[Union[str, os.PathLike]] = None, role: str = 'expert'
               ) -> Dict[str, torch.Tensor]:
    """Load a dense donor state dict through timm's Hub loading (cache, offline mode, safetensors first).

    Args:
        spec: ``org/repo[@rev]`` or ``hf-hub:org/repo``, ``local-dir:<folder>``, or a checkpoint file path.
        cache_dir: Hub cache folder override.
        role: Donor role for messages.

    Raises:
        FileNotFoundError: If the donor is neither cached nor downloadable (naming the repo), or a path is missing.
    """
    from timm.models._hub import load_state_dict_from_hf, load_state_dict_from_path

    if spec.startswith('local-dir:'):
        path = spec[len('local-dir:'):]
        if not os.path.isdir(path):
            raise FileNotFoundError(f'{role} donor folder not found: {path}')
        return load_state_dict_from_path(path)
    if os.path.isfile(spec):
        return load_state_dict_file(spec)
    repo = spec[len('hf-hub:'):] if spec.startswith('hf-hub:') else spec
    if repo.count('/') != 1 or repo.startswith(('/', '.')):
        raise FileNotFoundError(f'{role} donor {spec!r} is neither an existing file nor a Hub id (org/repo).')
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled, RepositoryNotFoundError
    try:
        return load_state_dict_from_hf(repo, cache_dir=cache_dir)
    except (LocalEntryNotFoundError, OfflineModeIsEnabled, ConnectionError, TimeoutError) as e:
        raise _hub_unreachable(repo, role, e) from e
    except RepositoryNotFoundError as e:
        raise FileNotFoundError(f'{role} donor repository {repo!r} does not exist on the Hub ({e}).') from e


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


def _record(model: nn.Module, record: Dict[str, Any]) -> None:
    cfg = dict(getattr(model, 'pretrained_cfg', None) or {})
    cfg['recycling'] = record
    model.pretrained_cfg = model.default_cfg = cfg


def checkpoint_filter_fn(
        state_dict: Mapping[str, Any],
        model: nn.Module,
        recipe: Optional[RecyclingRecipe] = None,
) -> Dict[str, torch.Tensor]:
    """timm ``pretrained_filter_fn`` of the MoE Jetpack models.

    * Official MoE Jetpack checkpoints are renamed to our layout.
    * MoE checkpoints (ours) pass through.
    * Dense timm ViT checkpoints are recycled with ``recipe`` (the trunk donor is ``state_dict``), and the recipe
      is recorded in ``model.pretrained_cfg['recycling']``.
    In every case timm's ViT ``checkpoint_filter_fn`` runs first, so ``img_size`` (pos-embed resampling) and
    patch size changes work; ``in_chans`` and ``num_classes`` are then adapted by timm's loader.

    Raises:
        ValueError: If the checkpoint is neither a dense ViT nor a MoE checkpoint, or recycling input is bad.
        FileNotFoundError: If the expert donor cannot be loaded.
    """
    from timm.models.vision_transformer import checkpoint_filter_fn as vit_filter_fn

    try:
        raw = unwrap_state_dict(state_dict)
        if is_official_state_dict(raw):
            _logger.info('Converting an official MoE Jetpack checkpoint')
            return vit_filter_fn(convert_official_state_dict(raw), model)
        if is_moe_state_dict(raw):
            return vit_filter_fn(raw, model)
        trunk = vit_filter_fn(raw, model)
        if not is_dense_vit_state_dict(trunk):
            raise ValueError(f'The pretrained checkpoint is neither a dense timm ViT nor a MoE Jetpack checkpoint '
                             f'(first keys: {list(raw)[:6]}); cannot load it into {type(model).__name__}.')
        recipe = recipe or RecyclingRecipe()
        cfg = getattr(model, 'pretrained_cfg', None) or {}
        trunk_id = _source_name(cfg)
        if recipe.experts is None:
            # the raw dict keeps the donor's own pos embed, so a statistics file's weights hash still matches
            experts, expert_id = (raw if is_dense_vit_state_dict(raw) else trunk), trunk_id
        else:
            experts, expert_id = load_donor(recipe.experts, recipe.cache_dir), recipe.experts
        stats = ActivationStats.load(recipe.stats) if recipe.stats else None
        _logger.info('Recycling %s (trunk) and %s (experts) into %s with strategy %r, seed %d',
                     trunk_id, expert_id, type(model).__name__, recipe.strategy, recipe.seed)
        out = recycle_state_dict(
            model, trunk, experts, strategy=recipe.strategy, stats=stats, seed=recipe.seed, metric=recipe.metric,
            graph_method=recipe.graph_method, graph_parts=recipe.graph_parts, trunk_id=trunk_id, expert_id=expert_id,
            adapt_input_conv=False, inplace=True)
        extra = {}
        if recipe.strategy in ('importance', 'graph'):
            extra['metric'] = recipe.metric
        if recipe.strategy == 'graph':
            extra.update(graph_method=recipe.graph_method, graph_parts=recipe.graph_parts)
        _record(model, recycling_record(recipe.strategy, recipe.seed, stats, trunk_id, expert_id, **extra))
        return out
    except TypeError as e:
        # timm retries a filter that raised TypeError with one argument, which would hide this message
        raise ValueError(f'checkpoint recycling failed: {e}') from e


class RecyclingArgs:
    """What a model entrypoint needs for recycling on load; consumes the ``recycle_*`` kwargs.

    Usage in ``_create_moejet``::

        recycling = RecyclingArgs.pop_from(variant, kwargs, recipes)
        with recycling.naming_missing_donors():
            model = build_model_with_cfg(..., pretrained_filter_fn=recycling.filter_fn, **kwargs)
        return recycling.finish(model)
    """

    def __init__(self, recipe: RecyclingRecipe, trunk_id: Optional[str], record: Optional[Dict[str, Any]]) -> None:
        self.recipe = recipe
        self.trunk_id = trunk_id
        self.record = record

    @classmethod
    def pop_from(cls, variant: str, kwargs: Dict[str, Any], recipes: Mapping[str, RecyclingRecipe]
                 ) -> 'RecyclingArgs':
        """Pop ``recycle_*`` kwargs (and a recorded recipe in a ``pretrained_cfg`` dict) out of ``kwargs``.

        Args:
            variant: The entrypoint's model name.
            kwargs: The entrypoint kwargs; modified in place.
            recipes: ``'architecture.tag'`` -> recipe of that pretrained tag.

        Raises:
            TypeError: On an unknown ``recycle_*`` kwarg.
            ValueError: On an invalid recycling argument.
            FileNotFoundError: If ``recycle_stats`` does not exist.
        """
        from timm.models import resolve_pretrained_cfg

        overrides = {}
        for key in [k for k in kwargs if k.startswith('recycle_')]:
            if key not in RECYCLE_KWARGS:
                raise TypeError(f'{variant}: unknown argument {key!r}; the recycling arguments are '
                                f'{", ".join(RECYCLE_KWARGS)}.')
            overrides[key[len('recycle_'):]] = kwargs.pop(key)
        record = None
        cfg = kwargs.get('pretrained_cfg')
        if isinstance(cfg, Mapping) and 'recycling' in cfg:
            # an exported model's config: keep the recorded recipe (timm's PretrainedCfg has no such field)
            record = cfg['recycling']
            kwargs['pretrained_cfg'] = cfg = {k: v for k, v in cfg.items() if k != 'recycling'}
        overlay = kwargs.get('pretrained_cfg_overlay') or {}
        resolved = resolve_pretrained_cfg(variant, pretrained_cfg=cfg, pretrained_cfg_overlay=overlay)
        base = recipes.get(f'{resolved.architecture or variant}.{resolved.tag}')
        if any(overlay.get(k) is not None for k in ('file', 'url', 'hf_hub_id', 'state_dict')):
            # the user replaced the tag's trunk checkpoint: it is also the expert donor unless recycle_experts says
            base = dataclasses.replace(base, experts=None) if base is not None else None
        cache_dir = kwargs.get('cache_dir')
        recipe = resolve_recipe(base, cache_dir=os.fspath(cache_dir) if cache_dir is not None else None,
                                **overrides)
        return cls(recipe, resolved.hf_hub_id, record)

    @property
    def filter_fn(self) -> Callable[..., Dict[str, torch.Tensor]]:
        """The ``pretrained_filter_fn`` bound to this recipe."""
        recipe = self.recipe

        def _filter(state_dict: Mapping[str, Any], model: nn.Module) -> Dict[str, torch.Tensor]:
            return checkpoint_filter_fn(state_dict, model, recipe=recipe)
        return _filter

    @contextlib.contextmanager
    def naming_missing_donors(self) -> Iterator[None]:
        """Turn huggingface_hub's cache miss for the trunk donor into an error naming the repo."""
        from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled
        try:
            yield
        except (LocalEntryNotFoundError, OfflineModeIsEnabled) as e:
            raise _hub_unreachable(self.trunk_id or 'pretrained weights', 'trunk', e) from e

    def finish(self, model: nn.Module) -> nn.Module:
        """Re-attach a recorded recipe that came with an exported model's config."""
        if self.record is not None:
            _record(model, self.record)
        return model
