""" Dense ViT state dicts -> a complete MoE Jetpack state dict (checkpoint recycling).

The trunk donor (same width and depth as the model) gives every dense tensor: patch/pos embed, class token,
attention, norms and the dense MLPs. The expert donor (same depth, same or wider) gives the experts of each MoE
block ``i``, carved out of its block-``i`` MLP (Weight Selection style): expert ``e`` keeps hidden units ``h_e``
and channels ``c_e``, so ``fc1.W = W1[h_e][:, c_e]``, ``fc1.b = b1[h_e]``, ``fc2.W = W2[c_e][:, h_e]``,
``fc2.b = b2[c_e]``. Universal experts shrink a core-sized selection to their size by evenly spaced units, as
in the released code. Head, ``fc_norm``, slot queries, slot norms and temperatures keep the model's values.
"""
import logging
import os
import re
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import torch
import torch.nn as nn

from ..official import unwrap_state_dict
from .graph import GRAPH_METHODS, partition_graph
from .selection import (
    STRATEGIES,
    check_strategy,
    select_from_parts,
    select_importance,
    select_random,
    select_uniform,
    select_upcycle,
    subselect_uniform,
)
from .statistics import METRICS, ActivationStats, weight_proxy_statistics, weights_hash

__all__ = ['recycle_state_dict', 'recycle_into', 'is_dense_vit_state_dict', 'is_moe_state_dict', 'DEFAULT_SEED']

_logger = logging.getLogger(__name__)

DEFAULT_SEED = 3407  # the released gen_ViT_MoE_weight.py seed
_BLOCK = re.compile(r'^blocks\.(\d+)\.')
_MOE_EXPERT = re.compile(r'^blocks\.\d+\.mlp\.(core|univ)\.fc[12]\.(weight|bias)$')
# keys never taken from a donor: the new head and pooling norm
_FRESH_PREFIXES = ('head.', 'fc_norm.', 'head_drop.')
_CHUNK = 32  # experts gathered per step, bounds the temporary memory


def is_moe_state_dict(state_dict: Mapping[str, Any]) -> bool:
    """True for our MoE layout (``blocks.N.mlp.slot_queries`` or batched expert weights)."""
    return any(k.endswith('.mlp.slot_queries') or _MOE_EXPERT.match(k) for k in state_dict)


def is_dense_vit_state_dict(state_dict: Mapping[str, Any]) -> bool:
    """True for a dense timm ViT layout (``blocks.N.mlp.fc1.weight`` with ``blocks.N.norm2.weight``)."""
    return 'blocks.0.mlp.fc1.weight' in state_dict and 'blocks.0.norm2.weight' in state_dict \
        and not is_moe_state_dict(state_dict)


class _Donor:
    """A dense ViT state dict with its geometry."""

    def __init__(self, state_dict: Mapping[str, Any], role: str, name: Optional[str] = None) -> None:
        if not isinstance(state_dict, Mapping):
            raise TypeError(f'{role} donor must be a state dict (a mapping of names to tensors), '
                            f'got {type(state_dict).__name__}.')
        sd = unwrap_state_dict(state_dict)
        if not is_dense_vit_state_dict(sd):
            kind = 'a MoE checkpoint' if is_moe_state_dict(sd) else 'not a dense timm ViT checkpoint'
            raise ValueError(f'{role} donor {name or ""} is {kind} (no blocks.0.mlp.fc1.weight / blocks.0.norm2.weight;'
                             f' first keys: {list(sd)[:6]}); recycling needs dense timm ViT weights.')
        self.sd = sd
        self.role = role
        self.name = name or ''
        self.depth = 1 + max(int(m.group(1)) for m in map(_BLOCK.match, sd) if m)
        self.width = int(sd['blocks.0.norm2.weight'].shape[0])
        self.hidden = int(sd['blocks.0.mlp.fc1.weight'].shape[0])
        self._hash: Optional[str] = None

    @property
    def hash(self) -> str:
        if self._hash is None:
            self._hash = weights_hash(self.sd)
        return self._hash

    def label(self) -> str:
        return f'{self.role} donor {self.name}'.rstrip() + f' (width {self.width}, depth {self.depth})'

    def mlp(self, block: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        p = f'blocks.{block}.mlp.'
        try:
            return tuple(self.sd[p + n] for n in ('fc1.weight', 'fc1.bias', 'fc2.weight', 'fc2.bias'))
        except KeyError as e:
            raise ValueError(f'{self.label()} lacks {e.args[0]!r}; MLPs need fc1/fc2 weights and biases.') from None


def _moe_geometry(model: nn.Module) -> Dict[int, nn.Module]:
    layers = getattr(model, 'moe_layers', None)
    if not callable(layers):
        raise TypeError(f'model must be a MoEVisionTransformer (with moe_layers()), got {type(model).__name__}.')
    return layers()


def _check_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 63:
        raise ValueError(f'seed must be a non-negative int, got {seed!r}.')
    return seed


def _resolve_stats(
        stats: Union[None, ActivationStats, str, os.PathLike],
        strategy: str,
        experts: _Donor,
        blocks: List[int],
        metric: str,
) -> Optional[ActivationStats]:
    if strategy not in ('importance', 'graph'):
        if stats is not None:
            _logger.info('recycling strategy %r does not use activation statistics; ignoring them', strategy)
        return None
    need_coact = strategy == 'graph'
    if stats is None:
        _logger.warning(
            'No activation statistics given: %r recycling uses the data-free weight proxy of %s (Gaussian model '
            'of the LayerNorm output through fc1; see timm_moejet.recycling.weight_proxy_statistics).',
            strategy, experts.name or 'the expert donor')
        return weight_proxy_statistics(experts.sd, blocks, coactivation=need_coact, hub_id=experts.name,
                                       weights_hash_value=experts.hash)
    if isinstance(stats, (str, os.PathLike)):
        stats = ActivationStats.load(stats)
    if not isinstance(stats, ActivationStats):
        raise TypeError(f'stats must be an ActivationStats, a path to a statistics file or None, '
                        f'got {type(stats).__name__}.')
    if stats.weights_hash and stats.weights_hash != experts.hash:
        raise ValueError(
            f'These activation statistics were made for donor {stats.describe()}, not for the expert donor '
            f'{experts.name or "given"} (weights sha256 {experts.hash[:12]}); collect statistics on the expert '
            f'donor or pass the matching file.')
    stats.validate(blocks, experts.hidden, experts.width, need_coact=need_coact, metric=metric)
    return stats


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
    try:
        wn, on = w.numpy(), out.numpy()
    except TypeError:  # a dtype numpy lacks (bfloat16): torch's indexing, chunked to bound the index memory
        for s in range(0, e, _CHUNK):
            t = slice(s, s + _CHUNK)
            out[t] = w[rows[t, :, None], cols[t, None, :]]
        return out
    # numpy's row-then-column fancy indexing is ~4x faster here than torch's gather/advanced indexing
    rn, cn = rows.numpy(), cols.numpy()
    for i in range(e):
        on[i] = wn[rn[i]][:, cn[i]]
    return out


class _Selector:
    """Draws hidden-unit and channel indices for one MoE block with the chosen strategy."""

    def __init__(self, strategy: str, generator: torch.Generator, stats: Optional[ActivationStats], block: int,
                 metric: str, graph_method: str, graph_parts: int, seed: int) -> None:
        self.strategy = strategy
        self.g = generator
        self.stats = stats
        self.block = block
        self.metric = metric
        self.graph_method = graph_method
        self.graph_parts = graph_parts
        self.seed = seed
        self._parts = None

    def hidden(self, num: int, population: int, k: int) -> torch.Tensor:
        s = self.strategy
        if s == 'upcycle':
            return select_upcycle(num, population, k)
        if s == 'uniform':
            return select_uniform(num, population, k)
        if s == 'random':
            return select_random(num, population, k, self.g)
        importance = self.stats.get(self.block, 'hidden', self.metric)
        if s == 'importance':
            return select_importance(num, importance, k, self.g)
        if self._parts is None:
            coact = self.stats.get(self.block, 'hidden', 'coact')
            self._parts = partition_graph(coact, self.graph_parts, method=self.graph_method, seed=self.seed)
        parts, weights = self._parts
        return select_from_parts(num, parts, weights, k, self.g, node_scores=importance)

    def channels(self, num: int, population: int, k: int) -> torch.Tensor:
        if population == k:  # same width: keep every channel in place
            return torch.arange(k).expand(num, k)
        s = self.strategy
        if s == 'upcycle':
            return select_upcycle(num, population, k)  # raises: upcycle cannot narrow
        if s == 'uniform':
            return select_uniform(num, population, k)
        if s == 'random':
            return select_random(num, population, k, self.g)
        # importance and graph: channels by importance (the norm2 output statistic), per expert
        return select_importance(num, self.stats.get(self.block, 'channel', self.metric), k, self.g)


def recycle_state_dict(
        model: nn.Module,
        trunk_state_dict: Mapping[str, torch.Tensor],
        expert_state_dict: Optional[Mapping[str, torch.Tensor]] = None,
        *,
        strategy: str = 'importance',
        stats: Union[None, ActivationStats, str, os.PathLike] = None,
        seed: int = DEFAULT_SEED,
        metric: str = 'l2',
        graph_method: str = 'metis',
        graph_parts: int = 32,
        trunk_id: Optional[str] = None,
        expert_id: Optional[str] = None,
        adapt_input_conv: bool = True,
        return_indices: bool = False,
        inplace: bool = False,
) -> Dict[str, torch.Tensor]:
    """Build a complete state dict for a MoE ViT from dense timm ViT state dicts.

    Args:
        model: The target ``MoEVisionTransformer`` (read only; its values fill the keys that are not recycled).
        trunk_state_dict: Dense ViT of the model's width and depth: all dense tensors come from it.
        expert_state_dict: Dense ViT of the same depth and the same or larger width whose MLPs become the
            experts (None: the trunk donor).
        strategy: One of ``STRATEGIES``: 'upcycle' (copy), 'uniform', 'random', 'importance' (default) or
            'graph'.
        stats: ``ActivationStats`` of the expert donor, or a path to a statistics file. None with 'importance'
            or 'graph' uses the data-free weight proxy (logged).
        seed: Seed of the selection; the same seed gives bit-identical weights.
        metric: Importance statistic: 'l2' (released default), 'l1' or 'freq'.
        graph_method: 'metis' (pymetis, default) or 'spectral' (scikit-learn) for the 'graph' strategy.
        graph_parts: Parts of the co-activation graph partition (32 as released).
        trunk_id: Name of the trunk donor (for messages and the recorded recipe).
        expert_id: Name of the expert donor.
        adapt_input_conv: Convert the trunk's patch embedding to the model's ``in_chans`` (timm's
            ``adapt_input_conv``); the pretrained filter leaves it to timm's loader.
        return_indices: Also return ``{block: {'core'|'univ': (hidden [E, k], channels [E, D])}}``.
        inplace: Write the experts straight into the model's expert parameters (after all checks) and return
            those; saves allocating and copying the experts again (about 1 GB for moejet_vit_tiny). The
            pretrained filter uses it, since timm loads the result into that model anyway.

    Returns:
        The state dict (every model key, model dtype), or ``(state_dict, indices)`` with ``return_indices``.
        Dense tensors may share memory with the trunk donor's.

    Raises:
        ValueError: On bad input (unknown strategy, donor of another depth or narrower than the model, a
            checkpoint that is not a dense ViT, statistics of another donor, wrong shapes or NaN), before
            anything is computed or written.
        TypeError: If ``model`` is not a MoE ViT or a donor is not a mapping.
    """
    check_strategy(strategy)
    _check_seed(seed)
    if metric not in METRICS:
        raise ValueError(f'Unknown importance metric {metric!r}; valid metrics are {", ".join(METRICS)}.')
    if graph_method not in GRAPH_METHODS:
        raise ValueError(f'Unknown graph method {graph_method!r}; valid methods are {", ".join(GRAPH_METHODS)}.')
    if isinstance(graph_parts, bool) or not isinstance(graph_parts, int) or graph_parts < 2:
        raise ValueError(f'graph_parts must be an int >= 2, got {graph_parts!r}.')
    moe = _moe_geometry(model)
    trunk = _Donor(trunk_state_dict, 'trunk', trunk_id)
    experts = trunk if expert_state_dict is None else _Donor(expert_state_dict, 'expert', expert_id)
    depth, width = len(model.blocks), int(model.embed_dim)
    if trunk.width != width or trunk.depth != depth:
        raise ValueError(f'{trunk.label()} must have the model width {width} and depth {depth}; use a trunk donor '
                         f'of the model size.')
    if experts.depth != depth:
        raise ValueError(f'{experts.label()} must have the model depth {depth}; expert block i comes from donor '
                         f'block i.')
    if experts.width < width:
        raise ValueError(f'{experts.label()} is narrower than the model (width {width}); the expert donor must be '
                         f'as wide or wider.')
    for i, layer in moe.items():
        for group in (layer.core, layer.univ):
            if group is not None and group.hidden_features > experts.hidden:
                raise ValueError(f'block {i}: experts need {group.hidden_features} hidden units but {experts.label()}'
                                 f' has {experts.hidden}; use a wider expert donor.')
        if strategy == 'upcycle' and (experts.width != width or (
                layer.core is not None and layer.core.hidden_features != experts.hidden)):
            raise ValueError(f"strategy 'upcycle' copies the donor MLP into each expert, so it needs an expert "
                             f'donor with the model width {width} and core hidden '
                             f'{layer.core.hidden_features if layer.core is not None else "-"}; {experts.label()} '
                             f'has hidden {experts.hidden}. Use the trunk as expert donor or another strategy.')
        experts.mlp(i)
    blocks = sorted(moe)
    stats_obj = _resolve_stats(stats, strategy, experts, blocks, metric)

    # every key the model has: dense ones from the trunk, non-recyclable ones from the model
    target = model.state_dict()
    moe_prefixes = tuple(f'blocks.{i}.mlp.' for i in blocks)
    out: Dict[str, torch.Tensor] = {}
    problems = []
    for key, value in target.items():
        if key.startswith(moe_prefixes):
            if not _MOE_EXPERT.match(key):  # router state: slot queries, slot norm, temperatures
                out[key] = value.detach().clone()
            continue
        if key.startswith(_FRESH_PREFIXES):
            out[key] = value.detach().clone()
            continue
        src = trunk.sd.get(key)
        if src is None and key.startswith('attn_pool.'):  # a pooling head the dense donor lacks: new, like the head
            out[key] = value.detach().clone()
            continue
        if src is None:
            problems.append(f'missing {key}')
            continue
        if key == 'patch_embed.proj.weight' and src.ndim == 4 and src.shape[1] != value.shape[1] \
                and src.shape[0] == value.shape[0] and adapt_input_conv:
            from timm.layers import adapt_input_conv as _adapt
            src = _adapt(value.shape[1], src)
        if tuple(src.shape) != tuple(value.shape) and not (key == 'patch_embed.proj.weight' and not adapt_input_conv
                                                           and src.shape[2:] == value.shape[2:]):
            problems.append(f'{key}: donor {tuple(src.shape)} vs model {tuple(value.shape)}')
            continue
        out[key] = src.detach().to(value.dtype)
    if problems:
        raise ValueError(f'{trunk.label()} does not fit the model: ' + '; '.join(problems[:12])
                         + (' ...' if len(problems) > 12 else '')
                         + '. (pos_embed and patch size are resampled by the pretrained filter, not here.)')

    g = torch.Generator().manual_seed(seed)
    indices: Dict[int, Dict[str, Tuple[torch.Tensor, torch.Tensor]]] = {}
    for i in blocks:
        layer = moe[i]
        w1, b1, w2, b2 = (t.detach() for t in experts.mlp(i))
        sel = _Selector(strategy, g, stats_obj, i, metric, graph_method, graph_parts, seed)
        indices[i] = {}
        for name, group in (('core', layer.core), ('univ', layer.univ)):
            if group is None:
                continue
            n, k = group.num_experts, group.hidden_features
            core_k = layer.core.hidden_features if layer.core is not None else k
            base_k = min(experts.hidden, max(core_k, k))
            if strategy == 'upcycle':
                base_k = experts.hidden
            hidden = sel.hidden(n, experts.hidden, base_k)
            if base_k != k:
                hidden = subselect_uniform(hidden, k)
            chans = sel.channels(n, experts.width, width)
            dtype = target[f'blocks.{i}.mlp.{name}.fc1.weight'].dtype
            p = f'blocks.{i}.mlp.{name}.'
            dest = target if inplace else {}
            out[p + 'fc1.weight'] = _gather_experts(w1, hidden, chans, dtype, dest.get(p + 'fc1.weight'))
            out[p + 'fc1.bias'] = b1[hidden].to(dtype)
            out[p + 'fc2.weight'] = _gather_experts(w2, chans, hidden, dtype, dest.get(p + 'fc2.weight'))
            out[p + 'fc2.bias'] = b2[chans].to(dtype)
            indices[i][name] = (hidden, chans.clone())
    missing = [k for k in target if k not in out]
    if missing:  # a layer variant this module does not know how to fill
        raise ValueError(f'recycling left model keys unfilled: {missing[:8]}.')
    return (out, indices) if return_indices else out


def recycling_record(
        strategy: str,
        seed: int,
        stats: Union[None, ActivationStats, str, os.PathLike],
        trunk_id: Optional[str],
        expert_id: Optional[str],
        **extra: Any,
) -> Dict[str, Any]:
    """The JSON-serialisable recipe recorded in ``model.pretrained_cfg['recycling']``."""
    if isinstance(stats, (str, os.PathLike)):
        stats = ActivationStats.load(stats)
    record = dict(strategy=strategy, seed=seed, trunk=trunk_id or '', experts=expert_id or trunk_id or '')
    if strategy in ('importance', 'graph'):
        record['stats'] = stats.identity() if isinstance(stats, ActivationStats) else 'weights-proxy'
    record.update({k: v for k, v in extra.items() if v is not None})
    return record


def recycle_into(
        model: nn.Module,
        trunk_state_dict: Mapping[str, torch.Tensor],
        expert_state_dict: Optional[Mapping[str, torch.Tensor]] = None,
        **kwargs: Any,
) -> nn.Module:
    """Recycle dense donors into ``model`` (strict load) and record the recipe in its ``pretrained_cfg``.

    Args:
        model: The target ``MoEVisionTransformer``.
        trunk_state_dict: See :func:`recycle_state_dict`.
        expert_state_dict: See :func:`recycle_state_dict`.
        **kwargs: Keyword arguments of :func:`recycle_state_dict`.

    Returns:
        The same model, holding the recycled weights.
    """
    kwargs.pop('return_indices', None)
    if isinstance(kwargs.get('stats'), (str, os.PathLike)):
        kwargs['stats'] = ActivationStats.load(kwargs['stats'])
    state_dict = recycle_state_dict(model, trunk_state_dict, expert_state_dict, **kwargs)
    model.load_state_dict(state_dict, strict=True)
    record = recycling_record(
        kwargs.get('strategy', 'importance'), kwargs.get('seed', DEFAULT_SEED), kwargs.get('stats'),
        kwargs.get('trunk_id'), kwargs.get('expert_id'),
        metric=kwargs.get('metric') if kwargs.get('strategy', 'importance') in ('importance', 'graph') else None,
        graph_method=kwargs.get('graph_method') if kwargs.get('strategy') == 'graph' else None,
    )
    cfg = dict(getattr(model, 'pretrained_cfg', None) or {})
    cfg['recycling'] = record
    model.pretrained_cfg = model.default_cfg = cfg
    return model


__all__ += ['recycling_record', 'STRATEGIES']
