""" Routing on the image: where each token of one image sends its combine weight, per MoE layer, over the image.

A SpheroMoE layer mixes, for token ``n``, the outputs of its slots with the combine weights ``combine[n, s]`` (a
distribution over the ``S`` slots; core experts' slots first). For every token this module measures:

* **core share**: ``sum over core slots of combine[n, s]``, the part of the token's output that the core experts
  give (1: only core experts, 0: only universal ones; the universal share is one minus it);
* **top-slot weight**: ``max_s combine[n, s]``, how much of the output the single strongest slot gives (1: one
  slot, ``1/S``: all slots evenly);
* **combine entropy**: ``-sum_s combine[n, s] log combine[n, s] / log S`` (0: one slot, 1: all slots evenly);
* **support**: the number of slots with a non-zero weight (entmax-1.5 gives exact zeros, softmax none).

Tokens are laid out on the image: a ViT's (or Mixer's) patch tokens on the patch grid, its prefix tokens (class
token, registers) apart; a ConvNeXt's tokens are the positions of the stage's feature map. The combine weights are
the ones the layer computed in the model's own eval forward (:func:`~timm_moejet.layers.record_routing`).
``plot_routing_maps`` draws the core share and the top-slot weight of every layer over the image, each feature-map
cell stretched over the pixels it covers.
"""
import contextlib
import dataclasses
import math
import os
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn

from .diagnostics import moe_layers
from .errors import InvalidArgument
from .layers import RoutingRecord, SpheroMoE, record_routing
from .modes import eval_mode

__all__ = ['TokenRouting', 'RoutingMap', 'routing_maps', 'read_route_image', 'format_routing_maps',
           'plot_routing_maps']


@dataclasses.dataclass
class TokenRouting:
    """Per-token routing figures of some tokens (see the module docstring), each of one shape: [H, W] for the
    positions of a feature map or patch grid, [P] for prefix tokens."""
    core_share: torch.Tensor
    top_weight: torch.Tensor
    entropy: torch.Tensor
    support: torch.Tensor

    @classmethod
    def of(cls, combine: torch.Tensor, num_core_slots: int) -> 'TokenRouting':
        """The figures of each row of ``combine`` [N, S] (slots of the core experts first)."""
        combine = combine.float()
        num_slots = combine.shape[-1]
        entropy = -(combine * torch.log(combine.clamp_min(1e-30))).sum(-1)
        return cls(
            core_share=combine[:, :num_core_slots].sum(-1),
            top_weight=combine.max(dim=-1).values,
            entropy=entropy / math.log(num_slots) if num_slots > 1 else torch.zeros_like(entropy),
            support=(combine > 0).sum(-1),
        )

    def apply(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> 'TokenRouting':
        """The same figures with ``fn`` applied to each (a reshape, a slice)."""
        return TokenRouting(**{f.name: fn(getattr(self, f.name)) for f in dataclasses.fields(self)})


@dataclasses.dataclass
class RoutingMap:
    """Routing of one image in one MoE layer.

    Attributes:
        block: Index of the block (as ``moe_layers`` counts them).
        num_core: Core experts of the layer.
        num_univ: Universal experts of the layer.
        num_slots: Slots of the layer (the length of each token's combine distribution).
        positions: The figures of the tokens laid out on the image, each [H, W] (rows top to bottom).
        prefix: The figures of the prefix tokens (class token, registers), each [P]; P is 0 without them.
        prefix_names: What each prefix token is ('class token', 'register 1', ...).
    """
    block: int
    num_core: int
    num_univ: int
    num_slots: int
    positions: TokenRouting
    prefix: TokenRouting
    prefix_names: Tuple[str, ...] = ()

    @property
    def even_core_share(self) -> float:
        """The core share of a token whose combine weight is spread evenly over all slots."""
        return self.num_core / (self.num_core + self.num_univ)

    @property
    def grid(self) -> Tuple[int, int]:
        """Rows and columns of the token grid over the image."""
        return tuple(self.positions.core_share.shape)


def _prefix_names(model: nn.Module, count: int) -> Tuple[str, ...]:
    """timm's order of the prefix tokens: the class token (when the model has one), then the registers."""
    names = ['class token'] if getattr(model, 'cls_token', None) is not None else []
    names += [f'register {i + 1}' for i in range(count - len(names))]
    return tuple(names[:count])


def _token_grid(tokens: int, image_hw: Tuple[int, int]) -> Tuple[int, int]:
    """The rows and columns of ``tokens`` patch tokens over an image of ``image_hw`` pixels (square patches)."""
    height, width = image_hw
    stride = math.sqrt(height * width / tokens)
    rows, cols = round(height / stride), round(width / stride)
    if rows * cols != tokens:
        raise InvalidArgument(f'{tokens} patch tokens do not form a grid over a {height}x{width} image.')
    return rows, cols


def _layout(model: nn.Module, layer_input: torch.Size, image_hw: Tuple[int, int]) -> Tuple[int, Tuple[int, int]]:
    """How a layer's tokens lie on the image: the number of prefix tokens and the grid of the rest."""
    if len(layer_input) == 4:  # channels-last feature map [B, H, W, D]: every position a token
        return 0, (int(layer_input[1]), int(layer_input[2]))
    tokens = int(layer_input[1])
    prefix = int(getattr(model, 'num_prefix_tokens', 0) or 0)
    return prefix, _token_grid(tokens - prefix, image_hw)


@torch.no_grad()
def routing_maps(model: nn.Module, image: torch.Tensor) -> List[RoutingMap]:
    """Where each token of one image sends its combine weight, in every MoE layer of ``model``.

    Args:
        model: A model with SpheroMoE layers; run in eval mode (no routing noise) and restored to its mode.
        image: One preprocessed image, [C, H, W] or [1, C, H, W] (see :func:`read_route_image`).

    Returns:
        One :class:`RoutingMap` per MoE layer, in block order.

    Raises:
        InvalidArgument: If the model has no SpheroMoE layer, or ``image`` is not one image.
    """
    layers: Dict[int, SpheroMoE] = moe_layers(model)
    if not layers:
        raise InvalidArgument(f'{type(model).__name__} has no SpheroMoE layer: a routing map needs a MoE model.')
    if image.ndim == 3:
        image = image.unsqueeze(0)
    if image.ndim != 4 or image.shape[0] != 1:
        raise InvalidArgument(f'routing_maps takes one image [C, H, W] or [1, C, H, W], got {tuple(image.shape)}.')
    combines: Dict[int, torch.Tensor] = {}
    inputs: Dict[int, torch.Size] = {}

    def sink(i: int) -> Callable[[RoutingRecord], None]:
        return lambda record: combines.__setitem__(i, record.combine[0].float().cpu())

    def shape_hook(i: int) -> Callable:
        return lambda module, args: inputs.__setitem__(i, args[0].shape)

    with contextlib.ExitStack() as stack, eval_mode(model):
        for i, layer in layers.items():
            stack.enter_context(record_routing(layer, sink(i)))
            stack.callback(layer.register_forward_pre_hook(shape_hook(i)).remove)
        model(image.to(next(model.parameters()).device))
    return [_layer_map(model, i, layers[i], combines[i], inputs[i], tuple(image.shape[-2:])) for i in sorted(layers)]


def _layer_map(model: nn.Module, block: int, layer: SpheroMoE, combine: torch.Tensor, layer_input: torch.Size,
               image_hw: Tuple[int, int]) -> RoutingMap:
    prefix, grid = _layout(model, layer_input, image_hw)
    figures = TokenRouting.of(combine, layer.num_core * layer.slots_per_expert)
    return RoutingMap(
        block=block, num_core=layer.num_core, num_univ=layer.num_univ, num_slots=combine.shape[-1],
        positions=figures.apply(lambda t: t[prefix:].reshape(grid)),
        prefix=figures.apply(lambda t: t[:prefix]),
        prefix_names=_prefix_names(model, prefix),
    )


def read_route_image(path: Union[str, os.PathLike], model: nn.Module) -> Tuple[torch.Tensor, torch.Tensor]:
    """Read an image file and preprocess it as the model's eval data config says (timm's ``resolve_data_config`` and
    ``create_transform``: resize, centre crop, normalise).

    Returns:
        The model input [C, H, W], and the same crop for display, [H, W, C] in [0, 1] (the normalisation undone).

    Raises:
        NotFound, InvalidCheckpoint: If the file does not exist or cannot be decoded (naming it).
    """
    from timm.data import create_transform, resolve_data_config

    from .image_folder import read_image

    config = resolve_data_config({}, model=model)
    pixels = create_transform(**config, is_training=False)(read_image(os.fspath(path)))
    mean = torch.tensor(config['mean']).view(-1, 1, 1)
    std = torch.tensor(config['std']).view(-1, 1, 1)
    return pixels, (pixels * std + mean).clamp(0, 1).permute(1, 2, 0)


def format_routing_maps(maps: List[RoutingMap]) -> str:
    """A plain-text table, one row per MoE layer: the grid, the core share (mean, min, max over the positions, and the
    even share of an even combine), the mean top-slot weight and support, and the first prefix token's core share and
    top-slot weight."""
    header = ('block', 'grid', 'core share mean', 'min', 'max', 'even', 'top-slot w.', 'support', 'prefix core',
              'prefix top')
    rows = [header]
    for m in maps:
        p = m.positions
        first = [f'{float(m.prefix.core_share[0]):.3f}', f'{float(m.prefix.top_weight[0]):.3f}'] \
            if m.prefix.core_share.numel() else ['-', '-']
        rows.append((str(m.block), f'{m.grid[0]}x{m.grid[1]}', f'{float(p.core_share.mean()):.3f}',
                     f'{float(p.core_share.min()):.3f}', f'{float(p.core_share.max()):.3f}', f'{m.even_core_share:.3f}',
                     f'{float(p.top_weight.mean()):.3f}', f'{float(p.support.float().mean()):.1f}', *first))
    widths = [max(len(r[c]) for r in rows) for c in range(len(header))]
    return '\n'.join('  '.join(v.rjust(w) for v, w in zip(r, widths)) for r in rows)


def _prefix_note(m: RoutingMap, figure: str) -> str:
    """The panel's words for the prefix tokens' value of ``figure`` (empty without prefix tokens)."""
    values = getattr(m.prefix, figure)
    return ', '.join(f'{name} {float(v):.2f}' for name, v in zip(m.prefix_names, values))


def _draw_panel(ax, background: torch.Tensor, values: torch.Tensor, title: str, **style):
    """Draw ``values`` [h, w] over the grey image, each cell stretched over the pixels it covers."""
    height, width = background.shape
    ax.imshow(background.numpy(), cmap='gray', vmin=0, vmax=1, extent=(0, width, height, 0))
    im = ax.imshow(values.numpy(), extent=(0, width, height, 0), interpolation='nearest', alpha=0.6, **style)
    ax.set_title(title, fontsize=9)
    ax.set_axis_off()
    return im


def plot_routing_maps(
        maps: List[RoutingMap],
        image: torch.Tensor,
        path: Optional[Union[str, os.PathLike]] = None,
        title: Optional[str] = None,
) -> bytes:
    """Draw the core share and the top-slot weight of every token over the image, one row per MoE layer.

    Rendered on matplotlib's Agg canvas on a standalone ``Figure`` (headless; pyplot's global state is untouched).

    Args:
        maps: Output of :func:`routing_maps`.
        image: The image as the model saw it, [H, W, C] in [0, 1] (see :func:`read_route_image`).
        path: Where to write the PNG (atomically); None only returns the bytes.
        title: Figure title.

    Returns:
        The PNG bytes.
    """
    from .plotting import new_figure, save_png

    if not maps:
        raise InvalidArgument('plot_routing_maps needs the map of at least one layer.')
    grey = image.float().mean(dim=-1)
    # core share: white at the layer's even share (what an even combine over all slots gives), one spread for all
    spread = max(max(float((m.positions.core_share - m.even_core_share).abs().max()) for m in maps), 1e-3)
    top_max = max(float(m.positions.top_weight.max()) for m in maps)
    fig = new_figure('plot_routing_maps', (7.6, 0.5 + 2.6 * (len(maps) + 1)))
    axes = fig.subplots(len(maps) + 1, 2, squeeze=False)
    axes[0, 0].imshow(image.numpy())
    axes[0, 0].set_title('the image as the model sees it', fontsize=9)
    axes[0, 0].set_axis_off()
    axes[0, 1].set_axis_off()
    axes[0, 1].text(0, 0.5, 'left: core share of each token\'s combine weight\n(red: more than the even share, blue: '
                            'less;\nthe even share: core slots / all slots)\n\nright: weight of its strongest slot\n'
                            '(how concentrated its combine is)', fontsize=8, va='center')
    for row, m in enumerate(maps, start=1):
        heading = f'block {m.block} ({m.num_core}+{m.num_univ} experts)'
        for col, figure, words, style in (
                (0, 'core_share', f'core share (even {m.even_core_share:.2f})',
                 dict(cmap='coolwarm', vmin=m.even_core_share - spread, vmax=m.even_core_share + spread)),
                (1, 'top_weight', 'top-slot weight', dict(cmap='viridis', vmin=0., vmax=top_max))):
            note = _prefix_note(m, figure)
            im = _draw_panel(axes[row, col], grey, getattr(m.positions, figure),
                             f'{heading}: {words}' + (f'\n{note}' if note else ''), **style)
            fig.colorbar(im, ax=axes[row, col], shrink=0.8)
    if title:
        fig.suptitle(title)
    return save_png(fig, path, dpi=80)
