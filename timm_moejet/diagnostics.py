""" Router diagnostics of SpheroMoE models: how tokens are routed and which experts carry the output.

Measured on a batch (or several) of images, per MoE layer:

* **dispatch entropy**: entropy of each slot's dispatch distribution over the N tokens, divided by ``log N`` and
  averaged over slots and images (1: a slot averages all tokens uniformly; 0: a slot copies one token).
* **combine sparsity**: fraction of combine weights that are exactly zero (entmax-1.5 gives exact zeros;
  softmax gives none), and **combine support**, the mean number of slots with a non-zero weight per token;
  ``core_active``/``univ_active``: the mean number of core/universal experts whose output reaches a token
  (non-zero combine weight on at least one of their slots).
* **output mass** of expert ``e``: the summed norm of what the expert adds to the output tokens,
  ``m_e = sum_images sum_tokens sum_{slots s of e} combine[n, s] * ||y_s||_2``, where ``y_s`` is the expert's
  output for slot ``s``. ``share_e = m_e / sum_e' m_e'`` (shares sum to 1 over all experts of the layer).
* **core / universal share**: the summed shares of the core and of the universal experts.
* **expert contribution** (the quantity of MoE Jetpack's Table 8, which the paper leaves undefined): an expert's
  share relative to the uniform share over all ``E`` experts of the layer, ``contribution_e = E * share_e``
  (1: the expert carries exactly its even share; 17: seventeen times its share). The per-layer figures
  ``core_contribution`` and ``univ_contribution`` are the maxima over the core and over the universal experts,
  so a value below 1 means even the strongest expert of that group carries less than an even share.

Each MoE layer records its own routing during the model's normal forward (``record_routing``: dispatch, combine and
the norm of every slot's expert output), in eval mode; nothing is recomputed.
``plot_diagnostics`` draws a per-layer heatmap of expert contribution and a bar chart of core vs universal share.
"""
import contextlib
import math
import os
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Union

import torch
import torch.nn as nn

from .cost import num_params
from .errors import InvalidArgument
from .family import FAMILIES
from .layers import RoutingRecord, SpheroMoE, record_routing
from .modes import eval_mode

__all__ = ['LayerDiagnostics', 'router_diagnostics', 'format_diagnostics', 'plot_diagnostics', 'moe_layers',
           'active_parameters']


@dataclass
class LayerDiagnostics:
    """Router diagnostics of one SpheroMoE layer (see the module docstring for the definitions)."""
    block: int
    num_core: int
    num_univ: int
    num_tokens: int
    dispatch_entropy: float
    combine_sparsity: float
    combine_support: float
    core_active: float
    univ_active: float
    expert_share: torch.Tensor = field(repr=False)  # [E] core experts first, sums to 1

    @property
    def num_experts(self) -> int:
        return self.num_core + self.num_univ

    @property
    def contribution(self) -> torch.Tensor:
        """Per-expert share relative to the uniform share 1 / E: [E], core experts first."""
        return self.expert_share * self.num_experts

    @property
    def core_share(self) -> float:
        return float(self.expert_share[:self.num_core].sum())

    @property
    def univ_share(self) -> float:
        return float(self.expert_share[self.num_core:].sum())

    @property
    def core_contribution(self) -> float:
        """Contribution of the most important core expert (nan without core experts)."""
        return float(self.contribution[:self.num_core].max()) if self.num_core else math.nan

    @property
    def univ_contribution(self) -> float:
        """Contribution of the most important universal expert (nan without universal experts)."""
        return float(self.contribution[self.num_core:].max()) if self.num_univ else math.nan

    def as_dict(self) -> Dict[str, float]:
        """Scalar figures, for logging (e.g. ``wandb.log({f'moe/{k}': v ...})``)."""
        return dict(
            block=self.block, dispatch_entropy=self.dispatch_entropy, combine_sparsity=self.combine_sparsity,
            combine_support=self.combine_support, core_active=self.core_active, univ_active=self.univ_active,
            core_share=self.core_share, univ_share=self.univ_share,
            core_contribution=self.core_contribution, univ_contribution=self.univ_contribution,
        )


def moe_layers(model: nn.Module) -> Dict[int, SpheroMoE]:
    """SpheroMoE layers by block index: the model's own (``moe_layers()``), else the blocks of a registered family
    whose MLP is one (a timm model built with ``mlp_layer=SpheroMoE``)."""
    if callable(getattr(model, 'moe_layers', None)):
        return dict(model.moe_layers())
    for family in FAMILIES.values():
        try:
            blocks = family.block_modules(model)
        except (AttributeError, TypeError):  # not a model of this family
            continue
        found = {i: getattr(b, family.mlp) for i, b in enumerate(blocks)
                 if isinstance(getattr(b, family.mlp, None), SpheroMoE)}
        if found:
            return found
    return {}


class _Accumulator:
    """Running sums for one layer over any number of batches."""

    def __init__(self, layer: SpheroMoE) -> None:
        self.layer = layer
        self.entropy_sum = 0.
        self.entropy_count = 0
        self.zero_count = 0
        self.weight_count = 0
        self.support_sum = 0.
        self.core_active_sum = 0.
        self.univ_active_sum = 0.
        self.token_count = 0
        self.num_tokens = 0
        self.slot_mass = torch.zeros(layer.num_slots, dtype=torch.float64)

    @torch.no_grad()
    def update(self, record: RoutingRecord) -> None:
        layer = self.layer
        dispatch, combine = record.dispatch.float(), record.combine.float()  # [B, N, S] each
        b, n, s = combine.shape
        self.num_tokens = n
        # dispatch: a distribution over tokens for every slot
        ent = -(dispatch * torch.log(dispatch.clamp_min(1e-30))).sum(dim=1)  # [B, S]
        self.entropy_sum += float((ent / math.log(n)).sum()) if n > 1 else 0.
        self.entropy_count += b * s
        nonzero = combine > 0
        self.zero_count += int(combine.numel() - nonzero.sum())
        self.weight_count += combine.numel()
        self.support_sum += float(nonzero.sum())
        expert_used = nonzero.reshape(b, n, -1, layer.slots_per_expert).any(dim=-1)  # [B, N, E]
        self.core_active_sum += float(expert_used[..., :layer.num_core].sum())
        self.univ_active_sum += float(expert_used[..., layer.num_core:].sum())
        self.token_count += b * n
        out_norm = record.slot_output_norm.float()  # [B, S], the layer's own expert outputs (eval: no dropout)
        # sum over tokens of ||combine[n, s] * y_s|| = (sum_n combine[n, s]) * ||y_s||
        self.slot_mass += (combine.sum(dim=1) * out_norm).sum(dim=0).double().cpu()

    def result(self, block: int) -> LayerDiagnostics:
        layer = self.layer
        expert_mass = self.slot_mass.reshape(-1, layer.slots_per_expert).sum(dim=1)
        total = float(expert_mass.sum())
        share = expert_mass / total if total > 0 else torch.full_like(expert_mass, 1. / expert_mass.numel())
        return LayerDiagnostics(
            block=block,
            num_core=layer.num_core,
            num_univ=layer.num_univ,
            num_tokens=self.num_tokens,
            dispatch_entropy=self.entropy_sum / max(self.entropy_count, 1),
            combine_sparsity=self.zero_count / max(self.weight_count, 1),
            combine_support=self.support_sum / max(self.token_count, 1),
            core_active=self.core_active_sum / max(self.token_count, 1),
            univ_active=self.univ_active_sum / max(self.token_count, 1),
            expert_share=share.float(),
        )


@torch.no_grad()
def router_diagnostics(
        model: nn.Module,
        images: Union[torch.Tensor, Iterable],
        device: Optional[Union[str, torch.device]] = None,
) -> List[LayerDiagnostics]:
    """Router diagnostics of every SpheroMoE layer of ``model`` over some images.

    Args:
        model: A model with SpheroMoE layers (e.g. ``MoEVisionTransformer``). Run in eval mode (no routing noise,
            no dropout) and restored to its mode afterwards.
        images: A batch [B, C, H, W], or an iterable of batches or of ``(images, targets)`` pairs (a DataLoader).
        device: Where to run (default: the model's device).

    Returns:
        One ``LayerDiagnostics`` per MoE layer, in block order.

    Raises:
        ValueError: If the model has no SpheroMoE layer or no image was given.
    """
    layers = moe_layers(model)
    if not layers:
        raise InvalidArgument(f'{type(model).__name__} has no SpheroMoE layer: router diagnostics need a MoE model.')
    if device is None:
        device = next(model.parameters()).device
    accs = {i: _Accumulator(layer) for i, layer in layers.items()}
    records = contextlib.ExitStack()
    for i, layer in layers.items():
        records.enter_context(record_routing(layer, accs[i].update))
    batches = [images] if isinstance(images, torch.Tensor) else images
    seen = 0
    with records, eval_mode(model):
        for batch in batches:
            if isinstance(batch, (tuple, list)):
                batch = batch[0]
            model(batch.to(device))
            seen += batch.shape[0]
    if seen == 0:
        raise InvalidArgument('router_diagnostics got no images (empty batch or loader).')
    return [accs[i].result(i) for i in sorted(accs)]


def active_parameters(model: nn.Module, diagnostics: List[LayerDiagnostics]) -> Dict[str, float]:
    """Total parameters and the parameters that take part in computing one image and one token.

    Soft routing sends a mix of tokens through every expert, so all parameters are used per image. Per token, only
    the experts whose output reaches the token (non-zero combine weight) count; ``per_token`` is the mean over
    the measured tokens: every non-expert parameter plus ``core_active``/``univ_active`` experts of each layer.

    Returns:
        ``total``, ``per_image`` and ``per_token`` (a mean, hence a float).
    """
    total = num_params(model)
    layers = moe_layers(model)
    per_token = float(total)
    for d in diagnostics:
        layer = layers[d.block]
        for group, active in ((layer.core, d.core_active), (layer.univ, d.univ_active)):
            if group is not None:
                per_token -= num_params(group) * (1. - active / group.num_experts)
    return dict(total=total, per_image=total, per_token=per_token)


def format_diagnostics(diagnostics: List[LayerDiagnostics]) -> str:
    """A plain-text table, one row per MoE layer."""
    header = ('block', 'experts', 'disp.entropy', 'comb.sparsity', 'comb.support', 'core share', 'univ share',
              'core contrib', 'univ contrib')
    rows = [header]
    for d in diagnostics:
        rows.append((
            str(d.block), f'{d.num_core}+{d.num_univ}', f'{d.dispatch_entropy:.3f}', f'{d.combine_sparsity:.3f}',
            f'{d.combine_support:.1f}', f'{d.core_share:.3f}', f'{d.univ_share:.3f}',
            f'{d.core_contribution:.2f}', f'{d.univ_contribution:.2f}',
        ))
    widths = [max(len(r[c]) for r in rows) for c in range(len(header))]
    return '\n'.join('  '.join(v.rjust(w) for v, w in zip(r, widths)) for r in rows)


def plot_diagnostics(
        diagnostics: List[LayerDiagnostics],
        path: Optional[Union[str, os.PathLike]] = None,
        title: Optional[str] = None,
) -> bytes:
    """Draw a heatmap of expert contribution per layer and a bar chart of core vs universal share.

    Renders with matplotlib's Agg canvas on a standalone ``Figure`` (headless; pyplot and the global backend are
    left alone, so training code that uses its own backend is not disturbed).

    Args:
        diagnostics: Output of ``router_diagnostics``.
        path: Where to write the PNG (atomically); None only returns the bytes.
        title: Figure title.

    Returns:
        The PNG bytes.
    """
    from .plotting import new_figure, save_png

    if not diagnostics:
        raise InvalidArgument('plot_diagnostics needs at least one layer of diagnostics.')
    num_experts = max(d.num_experts for d in diagnostics)
    grid = torch.full((len(diagnostics), num_experts), float('nan'))
    for row, d in enumerate(diagnostics):
        grid[row, :d.num_experts] = d.contribution
    blocks = [str(d.block) for d in diagnostics]

    fig = new_figure('plot_diagnostics', (11, 1.2 + 0.45 * len(diagnostics) + 2.5))
    ax_map, ax_bar = fig.subplots(2, 1, height_ratios=[max(len(diagnostics), 2), 3])
    im = ax_map.imshow(grid.numpy(), aspect='auto', interpolation='nearest', cmap='viridis')
    core = diagnostics[0].num_core
    if all(d.num_core == core for d in diagnostics) and 0 < core < num_experts:
        ax_map.axvline(core - 0.5, color='white', linewidth=1.5)
    ax_map.set_yticks(range(len(blocks)), labels=blocks)
    ax_map.set_ylabel('MoE block')
    ax_map.set_xlabel('expert (core first, then universal)')
    ax_map.set_title('expert contribution (share of output mass x number of experts; 1 = even share)')
    fig.colorbar(im, ax=ax_map, label='contribution')

    core_share = [d.core_share for d in diagnostics]
    univ_share = [d.univ_share for d in diagnostics]
    ax_bar.bar(blocks, core_share, width=0.5, label='core experts', color='tab:blue')
    ax_bar.bar(blocks, univ_share, width=0.5, bottom=core_share, label='universal experts', color='tab:orange')
    ax_bar.set_ylim(0, 1)
    ax_bar.set_xlabel('MoE block')
    ax_bar.set_ylabel('share of output mass')
    ax_bar.legend(loc='upper left', bbox_to_anchor=(1.01, 1.0))
    if title:
        fig.suptitle(title)

    return save_png(fig, path, dpi=100)
