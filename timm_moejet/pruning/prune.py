""" Pruning experts by their measured routing: a smaller MoE model that keeps the experts that carry the output.

:func:`prune_experts` takes a MoE model and its :class:`~timm_moejet.pruning.RoutingStatistics`, keeps in every MoE
layer the experts of highest contribution (``selection.py``: a fraction or count per group, rounded up, at least one
per group), and returns a new model of the same architecture whose ``moe_experts_per_layer`` kwarg holds the
per-layer expert counts, with the kept experts, their slots and slot queries (``slicing.py``). Its
``pretrained_cfg['pruning']`` records what was pruned, from which statistics, and their seed; an exported folder
rebuilds it with ``timm.create_model('local-dir:DIR', pretrained=True)``.

The router needs no change: its combine normalises over the slots it has (entmax-1.5 or softmax over the remaining
slots), so each token's combine weights again sum to 1 over the kept slots; the dispatch is a softmax over tokens for
each kept slot, as before.
"""
from typing import Any, Dict, Optional

import timm
import torch
import torch.nn as nn
from timm.models import get_model_args

from ..errors import InvalidArgument
from ..layers import experts_to_be_loaded
from .routing_stats import RoutingStatistics
from .selection import Keep, describe_keep, kept_experts, kept_share
from .slicing import layer_prefixes, slice_state_dict

__all__ = ['prune_experts', 'pruning_record']

# create_model kwargs of loading, not of the architecture (recycling options): never passed to the rebuilt model
_LOAD_TIME_KWARGS = ('recycle_', 'pretrained_cfg')


def _rebuild_kwargs(model: nn.Module, counts: list, kwargs: Dict[str, Any]) -> Dict[str, Any]:
    args = {k: v for k, v in get_model_args(model).items() if not k.startswith(_LOAD_TIME_KWARGS)}
    args.update(kwargs)
    args['moe_experts_per_layer'] = [list(c) for c in counts]
    return args


def pruning_record(routing: RoutingStatistics, keep: Keep, kept: Dict[int, tuple]) -> Dict[str, Any]:
    """The JSON record of a pruning: the rule, the statistics it used, and per layer what was kept."""
    by_block = {layer.block: layer for layer in routing.layers}
    return dict(
        keep=describe_keep(keep),
        rounding='per group: ceil(fraction x experts), or min(count, experts); at least one expert per group',
        statistics=dict(model=routing.model, router_hash=routing.router_hash, digest=routing.digest,
                        images=routing.images, num_images=routing.num_images, seed=routing.seed),
        layers=[dict(block=b, experts_before=[by_block[b].num_core, by_block[b].num_univ],
                     kept_core=list(core), kept_univ=list(univ),
                     kept_share=round(kept_share(by_block[b], core, univ), 6))
                for b, (core, univ) in sorted(kept.items())],
    )


def prune_experts(model: nn.Module, routing: RoutingStatistics, keep: Keep = 0.5, name: Optional[str] = None,
                  **kwargs: Any) -> nn.Module:
    """A copy of ``model`` that keeps, in every MoE layer, the experts of highest measured contribution.

    Args:
        model: A MoE model built by ``timm.create_model`` (its architecture and kwargs rebuild it).
        routing: Statistics measured on this very model (:func:`~timm_moejet.pruning.measure_routing` or
            :func:`~timm_moejet.pruning.load_routing`).
        keep: A fraction in (0, 1] (float) or a count >= 1 (int) of experts per group, or a (core, universal) pair
            of them; see ``timm_moejet/pruning/selection.py`` for the rounding.
        name: How to name the model in messages.
        **kwargs: Further ``create_model`` kwargs of the pruned model (e.g. ``drop_path_rate`` to train it).

    Returns:
        The pruned model, on the model's device and dtype, in eval mode, ``pretrained_cfg['pruning']`` recording
        the pruning.

    Raises:
        InvalidArgument: If ``keep`` is not allowed (a fraction of 0 or above 1, a count of 0), or ``model`` has no
            MoE layer or was not built by ``timm.create_model``.
        InvalidCheckpoint: If ``routing`` was measured on another model.
    """
    name = name or type(model).__name__
    routing.check_model(model, name)
    kept = kept_experts(routing, keep)
    architecture = (getattr(model, 'pretrained_cfg', None) or {}).get('architecture')
    if not architecture or not timm.is_model(architecture):
        raise InvalidArgument(f'{name} has no registered architecture in its pretrained_cfg; prune a model built by '
                              f'timm.create_model.')
    layers = {layer.block: layer for layer in routing.layers}
    prefixes = layer_prefixes(model)
    sliced = slice_state_dict(model.state_dict(), {
        prefixes[b]: (layers[b].num_core, layers[b].slots_per_expert, core, univ) for b, (core, univ) in kept.items()})
    counts = [(len(core), len(univ)) for _, (core, univ) in sorted(kept.items())]
    param = next(model.parameters())
    with experts_to_be_loaded(), torch.device('cpu'):  # every expert is filled from the sliced state dict
        pruned = timm.create_model(architecture, pretrained=False, **_rebuild_kwargs(model, counts, kwargs))
    pruned.load_state_dict(sliced, strict=True)
    cfg = {k: v for k, v in (model.pretrained_cfg or {}).items() if k != 'pruning'}
    pruned.pretrained_cfg = pruned.default_cfg = dict(cfg, pruning=pruning_record(routing, keep, kept))
    return pruned.to(device=param.device, dtype=param.dtype).eval()
