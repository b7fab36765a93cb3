""" Dense state dicts -> a complete MoE Jetpack state dict (checkpoint recycling), in four steps.

1. :func:`check_geometry`: read the donors (family, depth, width, MLP sizes) and refuse what cannot work, before
   anything is computed.
2. :func:`copy_trunk`: every dense tensor of the model (embeddings, attention, norms, the dense MLPs) from the trunk
   donor; keys that are never recycled (the new head, slot queries, temperatures) keep the model's own values.
3. :func:`carve_experts`: the experts of each MoE block ``i`` are cut out of the expert donor's block-``i`` MLP
   (Weight Selection style): expert ``e`` keeps hidden units ``h_e`` and channels ``c_e``, so
   ``fc1.W = W1[h_e][:, c_e]``, ``fc1.b = b1[h_e]``, ``fc2.W = W2[c_e][:, h_e]``, ``fc2.b = b2[c_e]``. Universal
   experts shrink a core-sized selection to their size by evenly spaced units, as in the released code. Which units
   is the recipe's strategy (``strategies.py``).
4. :func:`recycling_record`: the JSON record of what was done, kept in ``model.pretrained_cfg['recycling']``.

:func:`recycle` is the one entry point, shared by the pretrained filter (``create_model(..., pretrained=True)``,
``create_moejet_from``) and the command line (``build_recycled_model``): the trunk donor and what the recipe names,
resolved once (:class:`~timm_moejet.recycling.RecyclingInputs`), into the state dict, the donor indices of every
expert and the record, on what is in memory (no file or Hub access). :func:`recycle_state_dict` and
:func:`recycle_into` are the same for a caller holding the donors' state dicts. Building models from named donors is
``timm_moejet.build``'s.
"""
import logging
import os
from typing import Any, Dict, Mapping, NamedTuple, Optional, Tuple

import torch
import torch.nn as nn
from timm.models import adapt_input_conv as adapt_channels

from ..errors import DonorMismatch, InvalidArgument, InvalidArgumentType, InvalidCheckpoint
from ..moe_keys import is_expert_key
from .geometry import RecyclingPlan, check_geometry
from .inputs import RecyclingInputs, load_statistics
from .recipe import RecyclingRecipe
from .selection import subselect_uniform
from .statistics import ActivationStats, weight_proxy_statistics
from .strategies import SelectionContext
from .weight_selection import select_tensor

__all__ = ['RecyclingResult', 'recycle', 'recycle_state_dict', 'recycle_into', 'recycling_record',
           'resolve_statistics', 'copy_trunk', 'carve_experts', 'record_on']

_logger = logging.getLogger(__name__)


def resolve_statistics(plan: RecyclingPlan, recipe: RecyclingRecipe,
                       stats: Optional[ActivationStats]) -> Optional[ActivationStats]:
    """The statistics the strategy reads: ``stats``, else the recipe's file, else the data-free proxy.

    Raises:
        DonorMismatch: If the statistics were made for another donor or another donor size.
    """
    strategy = recipe.strategy_obj
    experts = plan.experts
    if not strategy.needs_stats:
        if stats is not None:  # (a recipe naming a file is refused already, see check_strategy_reads)
            raise InvalidArgument(f'strategy {recipe.strategy!r} reads no activation statistics, but statistics were '
                                  f'given ({stats.describe()}); pass none, or choose a strategy that reads them.')
        return None
    blocks = sorted(set(plan.expert_blocks.values()))
    if stats is None and recipe.stats is not None:
        raise InvalidArgument(f'the recipe names the statistics file {recipe.stats}: pass it loaded (stats=, see '
                              f'timm_moejet.recycling.resolve_inputs), or use recycle_into, which loads it.')
    if stats is None:
        _logger.warning(
            'No activation statistics given: %r recycling uses the data-free weight proxy of %s (Gaussian model '
            'of the MLP input norm through fc1; see timm_moejet.recycling.weight_proxy_statistics).',
            recipe.strategy, experts.name or 'the expert donor')
        return weight_proxy_statistics(experts.sd, blocks, coactivation=strategy.needs_coactivation,
                                       hub_id=experts.name, weights_hash_value=experts.hash)
    if not isinstance(stats, ActivationStats):
        raise InvalidArgumentType(f'stats must be an ActivationStats or None, got {type(stats).__name__}.')
    if not stats.weights_hash:
        raise DonorMismatch(
            f'These activation statistics ({stats.describe()}) carry no donor weights hash, so they cannot be checked '
            f'against the expert donor {experts.name or "given"}; collect them again with weights_tools calibrate.')
    if stats.weights_hash != experts.hash:
        raise DonorMismatch(
            f'These activation statistics were made for donor {stats.describe()}, not for the expert donor '
            f'{experts.name or "given"} (weights sha256 {experts.hash[:12]}); collect statistics on the expert '
            f'donor or pass the matching file.')
    stats.validate({j: (experts.hidden(j), experts.width(j)) for j in blocks},
                   need_coact=strategy.needs_coactivation, metric=recipe.metric)
    return stats


def copy_trunk(plan: RecyclingPlan, adapt_input_conv: bool = True) -> Dict[str, torch.Tensor]:
    """Step 2: every model key except the experts; dense ones from the trunk donor, the rest as the model has them.

    Raises:
        DonorMismatch: Naming the keys the trunk donor lacks or has in another shape.
    """
    model, trunk = plan.model, plan.trunk
    moe_prefixes = tuple(plan.moe_prefix(i) for i in plan.layers)
    out: Dict[str, torch.Tensor] = {}
    problems = []
    for key, value in model.state_dict().items():
        if key.startswith(moe_prefixes):
            if not is_expert_key(key):  # router state: slot queries, slot norm, temperatures
                out[key] = value.detach().clone()
            continue
        src = trunk.sd.get(key)
        if key.startswith(plan.family.new_head) or (src is None and key.startswith(plan.family.model_head_parts)):
            # a new head (or a head part the dense donor lacks): the model's own initial values
            out[key] = value.detach().clone()
            continue
        if src is None:
            problems.append(f'missing {key}')
            continue
        first_conv = key == plan.first_conv
        if first_conv and src.ndim == 4 and src.shape[1] != value.shape[1] and adapt_input_conv:
            src = adapt_channels(value.shape[1], src)
        # timm's loader adapts the input channels of the first convolution after the filter
        channels_left_to_timm = first_conv and not adapt_input_conv and src.ndim == 4 and src.shape[1] != value.shape[1]
        wanted = (value.shape[0], src.shape[1], *value.shape[2:]) if channels_left_to_timm else value.shape
        if tuple(src.shape) != tuple(wanted):
            if not plan.select_trunk:
                problems.append(f'{key}: donor {tuple(src.shape)} vs model {tuple(value.shape)}')
                continue
            src = select_tensor(src, wanted, key)  # Weight Selection from a wider trunk donor
        out[key] = src.detach().to(value.dtype)
    if problems:
        raise DonorMismatch(f'{trunk.label()} does not fit the model: ' + '; '.join(problems[:12])
                            + (' ...' if len(problems) > 12 else '')
                            + '. (pos_embed and patch size are resampled by the pretrained filter, not here.)')
    return out


def _gather_experts(
        w: torch.Tensor,
        rows: torch.Tensor,
        cols: torch.Tensor,
        dtype: torch.dtype,
        out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``out[e] = w[rows[e]][:, cols[e]]`` for every expert (into ``out`` if given)."""
    e, r = rows.shape
    c = cols.shape[1]
    if out is None or not out.is_contiguous() or out.device.type != 'cpu':
        out = torch.empty(e, r, c, dtype=dtype)
    out = out.detach()
    w = w.detach().to('cpu', dtype)
    # two index_selects per expert, the second straight into the output (multi-threaded; about 2.5x faster than
    # numpy's fancy indexing, 4x faster than advanced indexing of all experts at once)
    for i in range(e):
        torch.index_select(w.index_select(0, rows[i]), 1, cols[i], out=out[i])
    return out


def carve_experts(
        plan: RecyclingPlan,
        recipe: RecyclingRecipe,
        stats: Optional[ActivationStats],
        out: Dict[str, torch.Tensor],
        inplace: bool = False,
) -> Dict[int, Dict[str, Tuple[torch.Tensor, torch.Tensor]]]:
    """Step 3: cut every MoE layer's experts out of the expert donor's MLPs into ``out``.

    Args:
        plan: From :func:`check_geometry`.
        recipe: Strategy and seed.
        stats: From :func:`resolve_statistics`.
        out: The state dict being built; expert tensors are added.
        inplace: Write into the model's own expert parameters (saves a copy of every expert).

    Returns:
        ``{block: {'core'|'univ': (hidden [E, k], channels [E, D])}}``: the donor indices of every expert.
    """
    strategy = recipe.strategy_obj
    experts = plan.experts
    target = plan.model.state_dict()
    g = torch.Generator().manual_seed(recipe.seed)
    indices: Dict[int, Dict[str, Tuple[torch.Tensor, torch.Tensor]]] = {}
    for i in sorted(plan.layers):
        layer, donor_block = plan.layers[i], plan.expert_blocks[i]
        w1, b1, w2, b2 = experts.mlp(donor_block)
        population = experts.hidden(donor_block)
        ctx = SelectionContext(donor_block, g, stats, recipe)
        indices[i] = {}
        core_k = layer.core.hidden_features if layer.core is not None else None
        for name, group in (('core', layer.core), ('univ', layer.univ)):
            if group is None:
                continue
            n, k = group.num_experts, group.hidden_features
            # one core-sized draw, from which universal experts keep evenly spaced units (as released)
            base_k = population if strategy.copies_donor else min(population, max(core_k or k, k))
            hidden = strategy.hidden(ctx, n, population, base_k)
            if base_k != k:
                hidden = subselect_uniform(hidden, k)
            width, donor_width = layer.dim, experts.width(donor_block)
            chans = torch.arange(width).expand(n, width) if donor_width == width else \
                strategy.channels(ctx, n, donor_width, width)
            p = f'{plan.moe_prefix(i)}{name}.'
            dtype = target[p + 'fc1.weight'].dtype
            dest = target if inplace else {}
            out[p + 'fc1.weight'] = _gather_experts(w1, hidden, chans, dtype, dest.get(p + 'fc1.weight'))
            out[p + 'fc1.bias'] = b1[hidden].to(dtype)
            out[p + 'fc2.weight'] = _gather_experts(w2, chans, hidden, dtype, dest.get(p + 'fc2.weight'))
            out[p + 'fc2.bias'] = b2[chans].to(dtype)
            indices[i][name] = (hidden, chans.clone())
    return indices


def recycling_record(
        recipe: RecyclingRecipe,
        stats: Optional[ActivationStats],
        trunk_id: Optional[str],
        expert_id: Optional[str],
        expert_blocks: Optional[Mapping[int, int]] = None,
        dropped: Optional[Mapping[str, str]] = None,
        separate_experts: bool = False,
        donor_hidden: Optional[Mapping[int, int]] = None,
) -> Dict[str, Any]:
    """Step 4: the JSON-serialisable record kept in ``model.pretrained_cfg['recycling']``.

    Statistics are recorded only when the strategy reads them: the identity of the ones given, or 'weights-proxy'
    when none were given and the data-free proxy was used. When the expert donor is deeper than the model, the
    donor block of every MoE block is recorded too. ``donor_hidden`` (MoE block -> hidden units of its donor MLP)
    caps the recorded graph parts at what the partitioner could use (a part per hidden unit at most), per block
    where the blocks differ.
    """
    record: Dict[str, Any] = dict(recipe.record_fields(), trunk=trunk_id or '',
                                  experts=expert_id or trunk_id or '')
    if 'graph_parts' in record and donor_hidden:
        used = {i: min(recipe.graph_parts, hidden) for i, hidden in sorted(donor_hidden.items())}
        once = set(used.values())
        record['graph_parts'] = once.pop() if len(once) == 1 else {str(i): parts for i, parts in used.items()}
    if expert_blocks and any(i != j for i, j in expert_blocks.items()):
        record['block_map'] = recipe.block_map
        record['expert_blocks'] = {str(i): j for i, j in sorted(expert_blocks.items())}
    # every donor tensor is used or listed here with the reason it was not
    record['dropped'] = dict(sorted((dropped or {}).items()))
    if separate_experts and expert_blocks:
        record['expert_donor_reads'] = f'the MLPs of blocks {sorted(set(expert_blocks.values()))} only'
    if recipe.strategy_obj.needs_stats:
        record['stats'] = stats.identity() if stats is not None else 'weights-proxy'
        if recipe.stats is not None:
            record['stats_file'] = os.path.basename(recipe.stats)
    return record


class RecyclingResult(NamedTuple):
    """What :func:`recycle_state_dict` returns.

    Attributes:
        state_dict: Every model key, in the model's dtype (dense tensors may share memory with the trunk donor's).
        indices: ``{block: {'core'|'univ': (hidden [E, k], channels [E, D])}}``: the donor indices of every expert.
        record: The JSON-serialisable record of what was done (see :func:`recycling_record`).
    """
    state_dict: Dict[str, torch.Tensor]
    indices: Dict[int, Dict[str, Tuple[torch.Tensor, torch.Tensor]]]
    record: Dict[str, Any]


def recycle_state_dict(
        model: nn.Module,
        trunk_state_dict: Mapping[str, torch.Tensor],
        expert_state_dict: Optional[Mapping[str, torch.Tensor]] = None,
        recipe: Optional[RecyclingRecipe] = None,
        *,
        stats: Optional[ActivationStats] = None,
        trunk_id: Optional[str] = None,
        expert_id: Optional[str] = None,
        adapt_input_conv: bool = True,
        inplace: bool = False,
) -> RecyclingResult:
    """Build a complete state dict for a MoE model from dense state dicts (the four steps; no file or Hub access).

    Args:
        model: The target MoE model (read only; its values fill the keys that are not recycled).
        trunk_state_dict: Dense donor of the model's width and depth: every dense tensor comes from it.
        expert_state_dict: Dense donor of the same depth and the same or larger width whose MLPs become the experts
            (None: the trunk donor).
        recipe: Strategy, seed and strategy options (default: ``RecyclingRecipe()``, importance with the data-free
            proxy, seed 3407). ``recipe.experts`` and ``recipe.stats`` are not read here: pass what they name.
        stats: The expert donor's activation statistics (None: the data-free proxy, for strategies that need them).
        trunk_id: Name of the trunk donor (for messages and the record).
        expert_id: Name of the expert donor.
        adapt_input_conv: Convert the trunk's patch embedding to the model's ``in_chans`` (timm's
            ``adapt_input_conv``); the pretrained filter leaves it to timm's loader.
        inplace: Write the experts straight into the model's expert parameters (after all checks) and return
            those; saves allocating and copying the experts again (about 1 GB for moejet_vit_tiny). The pretrained
            filter uses it, since timm loads the result into that model anyway.

    Returns:
        The state dict, the donor indices of every expert and the record.

    Raises:
        DonorMismatch: On donors that cannot fill the model, or statistics of another donor, before anything is
            computed or written.
        InvalidArgumentType: If ``model`` is not a MoE model or a donor is not a mapping.
        InvalidArgument: If the recipe names a statistics file and ``stats`` is not given.
    """
    recipe = recipe if recipe is not None else RecyclingRecipe()
    if not isinstance(recipe, RecyclingRecipe):
        raise InvalidArgumentType(f'recipe must be a RecyclingRecipe, got {type(recipe).__name__}.')
    plan = check_geometry(model, trunk_state_dict, expert_state_dict, recipe, trunk_id, expert_id)
    used = resolve_statistics(plan, recipe, stats)
    out = copy_trunk(plan, adapt_input_conv)
    indices = carve_experts(plan, recipe, used, out, inplace=inplace)
    missing = [k for k in model.state_dict() if k not in out]
    if missing:  # a layer variant this module does not know how to fill
        raise InvalidCheckpoint(f'recycling left model keys unfilled: {missing[:8]}.')
    donor_hidden = {i: plan.experts.hidden(j) for i, j in plan.expert_blocks.items()}
    return RecyclingResult(out, indices, recycling_record(recipe, stats, trunk_id, expert_id, plan.expert_blocks,
                                                          plan.dropped, not plan.experts_from_trunk, donor_hidden))


def recycle(
        model: nn.Module,
        trunk_state_dict: Mapping[str, torch.Tensor],
        recipe: RecyclingRecipe,
        inputs: RecyclingInputs,
        *,
        trunk_id: Optional[str] = None,
        adapt_input_conv: bool = True,
        inplace: bool = False,
) -> RecyclingResult:
    """The one recycling entry point: a trunk donor and what ``recipe`` names, resolved, into ``model``'s state dict.

    Args:
        model: The target MoE model (read only; its values fill the keys that are not recycled).
        trunk_state_dict: The trunk donor's weights.
        recipe: How to recycle.
        inputs: The expert donor (None: the trunk donor) and the statistics, as
            :func:`~timm_moejet.recycling.resolve_inputs` loads them.
        trunk_id: Name of the trunk donor, recorded.
        adapt_input_conv: See :func:`recycle_state_dict`.
        inplace: See :func:`recycle_state_dict`.
    """
    expert_id = inputs.expert_id if inputs.experts is not None else trunk_id
    return recycle_state_dict(model, trunk_state_dict, inputs.experts, recipe, stats=inputs.stats, trunk_id=trunk_id,
                              expert_id=expert_id, adapt_input_conv=adapt_input_conv, inplace=inplace)


def record_on(model: nn.Module, record: Dict[str, Any]) -> nn.Module:
    """Keep a recycling record in ``model.pretrained_cfg['recycling']`` (and ``default_cfg``), as a new config."""
    model.pretrained_cfg = model.default_cfg = dict(getattr(model, 'pretrained_cfg', None) or {}, recycling=record)
    return model


def recycle_into(
        model: nn.Module,
        trunk_state_dict: Mapping[str, torch.Tensor],
        expert_state_dict: Optional[Mapping[str, torch.Tensor]] = None,
        recipe: Optional[RecyclingRecipe] = None,
        *,
        stats: Optional[ActivationStats] = None,
        trunk_id: Optional[str] = None,
        expert_id: Optional[str] = None,
) -> nn.Module:
    """Recycle dense donors into ``model`` (strict load) and record the recipe in its ``pretrained_cfg``.

    Args:
        model: The target MoE model.
        trunk_state_dict: See :func:`recycle_state_dict`.
        expert_state_dict: See :func:`recycle_state_dict`.
        recipe: See :func:`recycle_state_dict`.
        stats: See :func:`recycle_state_dict` (None: the file ``recipe.stats`` names, loaded here, if any).
        trunk_id: Name of the trunk donor, recorded.
        expert_id: Name of the expert donor, recorded.

    Returns:
        The same model, holding the recycled weights.
    """
    recipe = recipe if recipe is not None else RecyclingRecipe()
    inputs = RecyclingInputs(expert_state_dict, expert_id, stats if stats is not None else load_statistics(recipe))
    result = recycle(model, trunk_state_dict, recipe, inputs, trunk_id=trunk_id)
    model.load_state_dict(result.state_dict, strict=True)
    return record_on(model, result.record)
