""" Weight Selection (Xu et al., ICLR 2024): a smaller model initialised from a larger one of the same family.

Every tensor of the smaller model is the larger one's tensor with evenly spaced elements kept along each dimension
that shrinks: a step of ``n // k`` where ``k`` divides ``n`` (so a residual channel ``c`` is donor channel
``2c`` in every tensor when the width halves), ``round(linspace(0, n - 1, k))`` otherwise. Fewer blocks per stage
take evenly spaced (or the first) donor blocks of that stage. This is the "Dense (21k)" baseline of MoE Jetpack's
tables, and the trunk of C-JetMoE-F (``recycle_trunk_fit='select'``).
"""
from typing import Any, Dict, List, Mapping, Optional

import torch
import torch.nn as nn

from ..errors import DonorMismatch
from ..family import Family, family_of_state_dict
from .accounting import components_of, refuse_components, select_hint
from .geometry import DenseDonor
from .selection import map_blocks, uniform_indices

__all__ = ['evenly_spaced', 'select_tensor', 'select_state_dict']


def evenly_spaced(n: int, k: int) -> torch.Tensor:
    """``k`` evenly spaced indices of ``n``: ``arange(k) * (n // k)`` when ``k`` divides ``n``, else
    ``round(linspace(0, n - 1, k))``."""
    if n % k == 0:
        return torch.arange(k) * (n // k)
    return uniform_indices(n, k)


def select_tensor(src: torch.Tensor, shape: torch.Size, name: str = 'tensor') -> torch.Tensor:
    """``src`` cut to ``shape`` by evenly spaced elements along every dimension that shrinks.

    A linear weight [out, in] and a 1x1 convolution weight [out, in, 1, 1] stand for each other (ConvNeXt's
    ``conv_mlp`` variants).

    Raises:
        DonorMismatch: If a dimension would grow, or the tensors are of other kinds.
    """
    shape = tuple(shape)
    if src.ndim == len(shape) - 2 and shape[-2:] == (1, 1):
        src = src[..., None, None]
    elif src.ndim == len(shape) + 2 and tuple(src.shape[-2:]) == (1, 1):
        src = src[..., 0, 0]
    if src.ndim != len(shape) or any(n < k for n, k in zip(src.shape, shape)):
        raise DonorMismatch(f'{name}: the donor tensor {tuple(src.shape)} cannot be cut to {shape} (every dimension '
                            f'must be as large or larger).')
    for dim, (n, k) in enumerate(zip(src.shape, shape)):
        if n != k:
            src = src.index_select(dim, evenly_spaced(n, k))
    return src


def _refuse_layout(family: Family, donor: DenseDonor, model: nn.Module, target: Mapping[str, Any]) -> None:
    """Another layout of the tokens in front of the patches (a ViT's class token, registers) cannot be resampled
    into the model's: refused, naming what differs."""
    layout = family.layout_problem(donor.sd, model)
    if layout:
        lacks = [k for k in family.token_parts if k in target and k not in donor.sd]
        extra = [k for k in donor.sd if k in family.token_parts and k not in target]
        refuse_components(donor.label(), type(model).__name__, [layout] + components_of(extra),
                          select_hint(type(model).__name__) + (f' (the model has {", ".join(lacks)}, the donor does '
                                                               f'not)' if lacks else ''))


def block_key_map(family: Family, model_keys: List[str], donor_keys: List[str], how: str = 'even') -> Dict[str, str]:
    """Model block prefix -> donor block prefix, stage by stage (the blocks of a stage mapped as ``map_blocks``).

    Raises:
        DonorMismatch: If the donor has another number of stages or fewer blocks in a stage.
    """
    model_stages, donor_stages = family.block_stages(model_keys), family.block_stages(donor_keys)
    if len(model_stages) != len(donor_stages) or any(len(d) < len(m) for m, d in zip(model_stages, donor_stages)):
        raise DonorMismatch(f'the donor has {[len(s) for s in donor_stages]} blocks per stage, the model '
                            f'{[len(s) for s in model_stages]}: a donor needs as many stages and at least as many '
                            f'blocks in each.')
    mapping = {}
    for model_blocks, donor_blocks in zip(model_stages, donor_stages):
        for prefix, j in zip(model_blocks, map_blocks(len(model_blocks), len(donor_blocks), how)):
            mapping[prefix] = donor_blocks[j]
    return mapping


def select_state_dict(
        model: nn.Module,
        donor_state_dict: Mapping[str, Any],
        block_map: str = 'even',
        donor_name: str = 'donor',
        dropped: Optional[Dict[str, str]] = None,
) -> Dict[str, torch.Tensor]:
    """A complete state dict for a dense timm ``model`` selected from a larger donor of its family.

    Args:
        model: The smaller dense model (its own values fill what a donor cannot give: a head for another number
            of classes, a pooling norm the donor lacks).
        donor_state_dict: The larger donor's weights.
        block_map: 'even' (evenly spaced blocks of each stage) or 'first' when the model has fewer blocks.
        donor_name: How to name the donor in messages.
        dropped: Filled with the donor tensors the model does not take, each with the reason (blocks not selected,
            a head for another number of classes).

    Returns:
        Every model key, in the model's dtype; loads with ``strict=True``.

    Raises:
        DonorMismatch: If the donor is of another family, has fewer stages or blocks, is narrower anywhere
            (naming both sides), or has components the model cannot hold (LayerScale, q/k norms, ...).
    """
    target = model.state_dict()
    family = family_of_state_dict(target, 'model', type(model).__name__)
    donor = DenseDonor(donor_state_dict, 'donor', donor_name)
    donor.check_values()
    if donor.family is not family:
        raise DonorMismatch(f'{donor.label()} is of family {donor.family.name}, the model {type(model).__name__} of '
                            f'family {family.name}.')
    _refuse_layout(family, donor, model, target)
    prepared = family.prepare(dict(donor.sd), model)  # the family's own conversions (position-embedding resampling)
    mapping = block_key_map(family, list(target), list(prepared), block_map)
    plan = {}  # model key -> donor key
    for key, value in target.items():
        prefix = next((p for p in mapping if key.startswith(p)), None)
        plan[key] = mapping[prefix] + key[len(prefix):] if prefix else key
    read = set(plan.values())
    chosen = set(mapping.values())
    why: Dict[str, str] = {}
    unheld = []
    for key in prepared:
        block = next((p for p in family.block_prefixes([key])), None)
        if key in read and not (key.startswith(family.new_head) and key in target
                                and prepared[key].shape[:1] != target[key].shape[:1]):
            continue
        if block is not None and block not in chosen:
            why[key] = f'block {block.rstrip(".")} is not selected (block_map={block_map!r})'
        elif key.startswith(family.new_head):
            why[key] = 'classifier head: the model has another number of classes (its own head is kept)'
        elif key.startswith(tuple(family.donor_head_parts)):
            why[key] = next(r for p, r in family.donor_head_parts.items() if key.startswith(p))
        else:
            unheld.append(key)
    refuse_components(donor.label(), type(model).__name__, components_of(unheld), select_hint(type(model).__name__))
    out: Dict[str, torch.Tensor] = {}
    for key, value in target.items():
        src_key = plan[key]
        src = prepared.get(src_key)
        fresh = key.startswith(family.new_head)
        if src is None or (fresh and src.shape[0] != value.shape[0]):
            if not fresh:
                raise DonorMismatch(f'{donor.label()} lacks {src_key} for the model\'s {key}.')
            out[key] = value.detach().clone()  # a new head (another number of classes): the model's own init
            continue
        out[key] = select_tensor(src.detach(), value.shape, key).to(value.dtype).contiguous()
    if dropped is not None:
        dropped.update(sorted(why.items()))
    return out
