""" Step 1 of recycling: read the donors (family, depth, width, MLP sizes) and check they can fill the model.

:func:`check_geometry` refuses what cannot work (another family, depth, a narrower donor, a strategy that copies
a donor of another size) before anything is computed, naming both sides, and returns a :class:`RecyclingPlan`.
"""
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple

import torch
import torch.nn as nn

from ..checkpoint_io.read import strip_wrappers
from ..errors import DonorMismatch, InvalidArgumentType, InvalidCheckpoint
from ..family import Family, family_of_model, family_of_state_dict
from .accounting import account_trunk, check_expert_blocks, components_of, refuse_components
from .recipe import RecyclingRecipe
from .selection import map_blocks
from .statistics import weights_hash

__all__ = ['DenseDonor', 'RecyclingPlan', 'check_geometry']


def _compact(widths: List[int]) -> Any:
    """One width, or the widths of the stages in order (each listed once)."""
    distinct = sorted(set(widths), key=widths.index)
    return distinct[0] if len(distinct) == 1 else tuple(distinct)


class DenseDonor:
    """A dense state dict with its family and geometry.

    Attributes:
        sd: The state dict (wrappers removed).
        family: Its :class:`~timm_moejet.family.Family`.
        prefixes: Key prefix of every block, in forward order.
        role: 'trunk' or 'expert', for messages.
        name: How the donor was named (Hub id, path), for messages and the record.
    """

    def __init__(self, state_dict: Mapping[str, Any], role: str, name: Optional[str] = None) -> None:
        if not isinstance(state_dict, Mapping):
            raise InvalidArgumentType(f'{role} donor must be a state dict (a mapping of names to tensors), '
                                      f'got {type(state_dict).__name__}.')
        self.sd = strip_wrappers(state_dict)
        self.role = role
        self.name = name or ''
        self.family = family_of_state_dict(self.sd, f'{role} donor', self.name)
        self.prefixes = self.family.block_prefixes(list(self.sd))
        self._hash: Optional[str] = None

    @property
    def depth(self) -> int:
        return len(self.prefixes)

    def width(self, block: int = 0) -> int:
        """Channels of block ``block`` (the size of the norm feeding its MLP)."""
        key = f'{self.prefixes[block]}{self.family.mlp_input_norm}.weight'
        norm = self.sd[key]
        if norm.ndim != 1:
            raise DonorMismatch(f'{self.role} donor {self.name}: tensor {key} has shape {tuple(norm.shape)}, expected '
                                f'(width,): a norm weight is a vector.')
        return int(norm.shape[0])

    def hidden(self, block: int = 0) -> int:
        """Hidden units of block ``block``'s MLP."""
        return int(self.sd[f'{self.prefixes[block]}{self.family.mlp_keys[0]}'].shape[0])

    @property
    def hash(self) -> str:
        if self._hash is None:
            self._hash = weights_hash(self.sd)
        return self._hash

    def check_values(self) -> None:
        """Refuse a tensor recycling may read (everything but the heads the family never takes) that is not floating
        point (copying it into the model's float weights would cast it silently) or holds NaN or Inf.

        Raises:
            InvalidCheckpoint: Naming the first offending tensor.
        """
        for key, value in self.sd.items():
            if not isinstance(value, torch.Tensor) or key.startswith(self.family.new_head):
                continue
            if not value.is_floating_point():
                raise InvalidCheckpoint(f'{self.label()}: tensor {key} is {str(value.dtype).replace("torch.", "")}; '
                                        f'recycling takes floating-point weights (a quantized or damaged checkpoint?). '
                                        f'Use the float checkpoint, or dequantize it first.')
            if not bool(torch.isfinite(value).all()):
                raise InvalidCheckpoint(f'{self.label()}: tensor {key} holds NaN or Inf values; recycling it would '
                                        f'give a model that computes NaN.')

    def widths(self) -> List[int]:
        """Channels of every block."""
        return [self.width(i) for i in range(self.depth)]

    def label(self) -> str:
        return f'{self.role} donor {self.name}'.rstrip() + \
            f' ({self.family.name}, width {_compact(self.widths())}, depth {self.depth})'

    def mlp(self, block: int) -> Tuple[torch.Tensor, ...]:
        """fc1 weight, fc1 bias, fc2 weight, fc2 bias of block ``block``."""
        p, keys = self.prefixes[block], self.family.mlp_keys
        missing = [p + n for n in keys if p + n not in self.sd]
        if missing:
            raise InvalidCheckpoint(f'{self.label()} lacks {missing}; its MLPs need fc1/fc2 weights and biases.')
        tensors = tuple(self.sd[p + n].detach() for n in keys)
        width, hidden = self.width(block), int(tensors[0].shape[0]) if tensors[0].ndim else 0
        for name, value, expected in zip(keys, tensors, ((hidden, width), (hidden,), (width, hidden), (width,))):
            shape = tuple(value.shape)
            if shape == expected:
                continue
            # a 1x1 convolution (timm's conv_mlp=True) computes the same, but the statistics and the expert copies
            # read Linear weights: refused by name rather than reshaped on the way
            conv = shape == expected + (1, 1)
            why = ('a 1x1-convolution MLP (conv_mlp=True), which experts are not cut from: use a donor whose MLPs are '
                   'Linear layers (conv_mlp=False), or save its fc1/fc2 weights as 2-D (weight[:, :, 0, 0])') if conv \
                else 'the donor is damaged or of another layout'
            raise DonorMismatch(f'{self.label()}: tensor {p}{name} has shape {shape}, expected {expected} (hidden '
                                f'{hidden}, width {width} from {p}{self.family.mlp_input_norm}.weight); {why}.')
        return tensors


class RecyclingPlan:
    """The checked geometry of one recycling: target model, donors, MoE layers and where their experts come from.

    Attributes:
        model: The target MoE model.
        family: The model's family.
        prefixes: Key prefix of every model block.
        layers: MoE layers by block index.
        trunk: Trunk donor.
        experts: Expert donor (may be the trunk donor).
        expert_blocks: Donor block of each MoE block.
        dropped: Trunk donor tensors the model does not take, with the reason (recorded).
        experts_from_trunk: The expert MLPs are the trunk donor's own (the same donor object, or tensors sharing its
            memory: the pretrained filter hands the checkpoint over twice, once as it was read).
    """

    def __init__(self, model: nn.Module, family: Family, prefixes: List[str], layers: Dict[int, nn.Module],
                 trunk: DenseDonor, experts: DenseDonor, expert_blocks: Dict[int, int], select_trunk: bool,
                 dropped: Optional[Dict[str, str]] = None, experts_from_trunk: bool = False) -> None:
        self.model = model
        self.family = family
        self.prefixes = prefixes
        self.layers = layers
        self.trunk = trunk
        self.experts = experts
        self.expert_blocks = expert_blocks
        self.select_trunk = select_trunk
        self.dropped = dict(dropped or {})  # trunk donor tensors not used -> why
        self.experts_from_trunk = experts_from_trunk or experts is trunk
        # the first convolution, whose input channels timm adapts to in_chans (ViT: patch_embed.proj.weight)
        first = (getattr(model, 'pretrained_cfg', None) or {}).get('first_conv') or 'patch_embed.proj'
        self.first_conv = f'{first}.weight'

    def moe_prefix(self, block: int) -> str:
        return f'{self.prefixes[block]}{self.family.mlp}.'


def _same_mlps(trunk: DenseDonor, experts: DenseDonor, blocks: Iterable[int]) -> bool:
    """Whether the expert donor's MLPs of ``blocks`` are the trunk donor's own tensors (not equal copies: the same
    memory), so recycling cuts the experts out of the trunk donor."""
    if experts is trunk:
        return True
    for j in blocks:
        for name in trunk.family.mlp_keys:
            a, b = trunk.sd.get(experts.prefixes[j] + name), experts.sd.get(experts.prefixes[j] + name)
            if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor) or a.shape != b.shape or \
                    a.stride() != b.stride() or a.data_ptr() != b.data_ptr():
                return False
    return True


def check_geometry(
        model: nn.Module,
        trunk_state_dict: Mapping[str, torch.Tensor],
        expert_state_dict: Optional[Mapping[str, torch.Tensor]],
        recipe: RecyclingRecipe,
        trunk_id: Optional[str] = None,
        expert_id: Optional[str] = None,
) -> RecyclingPlan:
    """Step 1: read the donors and check they can fill ``model`` with ``recipe``.

    Raises:
        InvalidArgumentType: If ``model`` is not a MoE model of a known family, or a donor is not a mapping.
        DonorMismatch: If a donor is of another family, depth, or narrower than the model (naming both).
    """
    family = family_of_model(model)
    if family is None or not callable(getattr(model, 'moe_layers', None)):
        raise InvalidArgumentType(f'model must be a MoE Jetpack model (of a family, with moe_layers()), got '
                                  f'{type(model).__name__}.')
    layers = model.moe_layers()
    model_sd = model.state_dict()
    prefixes = family.block_prefixes(list(model_sd))
    widths = [int(model_sd[f'{p}{family.mlp_input_norm}.weight'].shape[0]) for p in prefixes]
    trunk = DenseDonor(trunk_state_dict, 'trunk', trunk_id)
    experts = trunk if expert_state_dict is None else DenseDonor(expert_state_dict, 'expert', expert_id)
    depth = len(prefixes)
    model_label = f'the model {type(model).__name__} (width {_compact(widths)}, depth {depth})'
    for donor in (trunk, experts):
        donor.check_values()
        if donor.family is not family:
            raise DonorMismatch(f'{donor.label()} is of family {donor.family.name}, {model_label} of family '
                                f'{family.name}.')
    select_trunk = recipe.trunk_fit == 'select'
    if trunk.depth != depth:
        raise DonorMismatch(f'{trunk.label()} must have the depth of {model_label}; the trunk gives every block.')
    if select_trunk and any(t < w for t, w in zip(trunk.widths(), widths)):
        raise DonorMismatch(f'{trunk.label()} is narrower than {model_label}; Weight Selection needs a donor as '
                            f'wide or wider.')
    if not select_trunk and trunk.widths() != widths:
        raise DonorMismatch(f'{trunk.label()} must have the width of {model_label}; use a trunk donor of the model '
                            f'size, or recycle_trunk_fit="select" (weights-tools: --trunk-fit select) to take the '
                            f'trunk from a wider one by Weight Selection.')
    if experts.depth < depth:
        raise DonorMismatch(f'{experts.label()} is shallower than {model_label}; an expert donor needs a block for '
                            f'each model block.')
    donor_block = map_blocks(depth, experts.depth, recipe.block_map)
    expert_blocks = {i: donor_block[i] for i in layers}
    strategy = recipe.strategy_obj
    for i, layer in layers.items():
        j = expert_blocks[i]
        width = layer.dim
        if experts.width(j) < width:
            raise DonorMismatch(f'{experts.label()} is narrower than {model_label} at block {i} (width {width}); the '
                                f'expert donor must be as wide or wider.')
        for group in (layer.core, layer.univ):
            if group is not None and group.hidden_features > experts.hidden(j):
                raise DonorMismatch(f'block {i}: experts need {group.hidden_features} hidden units but block {j} of '
                                    f'{experts.label()} has {experts.hidden(j)}; use a wider expert donor.')
        if strategy.copies_donor and (experts.width(j) != width or (
                layer.core is not None and layer.core.hidden_features != experts.hidden(j))):
            raise DonorMismatch(
                f'strategy {recipe.strategy!r} copies the donor MLP into each expert, so it needs an expert donor '
                f'with the model width {width} and core hidden '
                f'{layer.core.hidden_features if layer.core is not None else "-"}; {experts.label()} has hidden '
                f'{experts.hidden(j)}. Use the trunk as expert donor or another strategy.')
        experts.mlp(j)
    same = _same_mlps(trunk, experts, expert_blocks.values())
    dropped = _account(model, family, prefixes, layers, trunk, experts if not same else trunk, expert_blocks)
    return RecyclingPlan(model, family, prefixes, layers, trunk, experts, expert_blocks, select_trunk, dropped, same)


def _account(model: nn.Module, family: Family, prefixes: List[str], layers: Dict[int, nn.Module],
             trunk: 'DenseDonor', experts: 'DenseDonor', expert_blocks: Dict[int, int]) -> Dict[str, str]:
    """Every donor tensor used or dropped for a reason (returned); a component the model cannot hold refused."""
    model_keys = list(model.state_dict())
    moe_prefixes = tuple(f'{prefixes[i]}{family.mlp}.' for i in layers)
    expert_mlp = [f'{trunk.prefixes[j]}{n}' for j in expert_blocks.values() for n in family.mlp_keys] \
        if experts is trunk else []
    dropped, unheld = account_trunk(trunk.sd, model_keys, family.new_head, moe_prefixes, expert_mlp,
                                    family.donor_head_parts)
    components = components_of(unheld)
    layout = family.layout_problem(trunk.sd, model)
    if layout:
        components.append(layout)
    model_name = type(model).__name__
    refuse_components(trunk.label(), model_name, components, family.recycle_hint)
    if experts is not trunk:
        blocks = {prefixes[i]: experts.prefixes[j] for i, j in expert_blocks.items()}
        unheld = check_expert_blocks(experts.sd, blocks, model_keys, family.mlp)
        refuse_components(experts.label(), model_name, components_of(unheld), family.recycle_hint)
    return dropped
