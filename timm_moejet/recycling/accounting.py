""" Every donor tensor accounted for: used, or dropped for a stated reason; never dropped silently.

:func:`account_trunk` reads the trunk donor's keys against the model's: a tensor the model holds is used, a head the
model replaces is dropped (the record lists it, with the reason), and anything else is a component the model cannot
hold (LayerScale gammas, q/k norms, registers, another class-token layout, ...): the donor is refused before any
work, naming the components and how to get a model that holds them. What no key name shows (a ViT's class-token
layout) the family tells (``Family.layout_problem``).
"""
import re
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from ..errors import DonorMismatch

__all__ = ['components_of', 'account_trunk', 'check_expert_blocks', 'refuse_components', 'select_hint']

# donor keys of components a target model may lack: (pattern, component, the create_model setting that holds it)
_COMPONENTS: Tuple[Tuple[re.Pattern, str, str], ...] = tuple((re.compile(p), c, s) for p, c, s in (
    (r'(^|\.)(ls[12]\.gamma|gamma(_[12])?)$', 'LayerScale gammas', 'init_values'),
    (r'\.attn\.[qk]_norm\.', 'q/k norms', 'qk_norm=True'),
    (r'\.attn\.norm\.', 'attention output norms', 'scale_attn_norm=True'),
    (r'\.mlp\.norm\.', 'MLP norms', 'scale_mlp_norm=True'),
    (r'^reg_token$', 'register tokens', 'reg_tokens'),
    (r'^cls_token$', 'a class token', 'class_token=True'),
    (r'^norm_pre\.', 'a pre-norm', 'pre_norm=True'),
    (r'^pos_embed$', 'a position embedding', "pos_embed='learn'"),
    (r'\.(qkv|proj|fc[12])\.bias$', 'biases', 'qkv_bias=True / proj_bias=True'),
))

def select_hint(model_name: str) -> str:
    """How to get a smaller model that holds the components (Weight Selection)."""
    return f'create {model_name} with those settings (create_model kwargs; weights_tools select --model-kwargs)'


def components_of(keys: Sequence[str]) -> List[str]:
    """What the keys are, in words: ``'LayerScale gammas (init_values; blocks.0.ls1.gamma ...)'``, one per kind."""
    kinds: Dict[str, List[str]] = {}
    settings: Dict[str, str] = {}
    for key in keys:
        match = next(((c, s) for p, c, s in _COMPONENTS if p.search(key)), None)
        component, setting = match if match else ('tensors', '')
        kinds.setdefault(component, []).append(key)
        settings[component] = setting
    out = []
    for component, found in kinds.items():
        where = found[0] + (f' +{len(found) - 1}' if len(found) > 1 else '')
        out.append(f'{component} ({settings[component] + "; " if settings[component] else ""}{where})')
    return out


def refuse_components(donor: str, model: str, components: Sequence[str], hint: str) -> None:
    """Raise the one ``DonorMismatch`` that names what the model cannot hold and how to get one that can."""
    if components:
        raise DonorMismatch(f'{donor} has {"; ".join(components)}, which {model} cannot hold (recycling would drop '
                            f'them). To keep them, {hint}.')


def account_trunk(
        trunk: Mapping[str, torch.Tensor],
        model_keys: Sequence[str],
        new_head: Tuple[str, ...],
        moe_prefixes: Tuple[str, ...],
        expert_mlp_keys: Sequence[str],
        optional: Optional[Mapping[str, str]] = None,
) -> Tuple[Dict[str, str], List[str]]:
    """Every trunk donor tensor: used, dropped for a reason, or not holdable by the model.

    Args:
        trunk: The trunk donor's tensors.
        model_keys: The model's state dict keys.
        new_head: Model keys that start fresh (the new head): the donor's are dropped, with the reason.
        moe_prefixes: The MLP prefixes of the model's MoE blocks (``blocks.2.mlp.``).
        expert_mlp_keys: Trunk keys the experts are cut from (empty when another donor gives the experts).
        optional: Prefix -> reason, of donor head parts the model may lack and replaces anyway (a ViT's final norm
            where the model pools with a new ``fc_norm``, an attention-pool head).

    Returns:
        ``{dropped key: reason}`` and the keys the model cannot hold.
    """
    model = set(model_keys)
    experts = set(expert_mlp_keys)
    dropped: Dict[str, str] = {}
    unheld: List[str] = []
    for key in trunk:
        if key.startswith(new_head):
            dropped[key] = 'classifier head: the MoE model\'s head starts fresh (MoE Jetpack recipe)'
        elif key.startswith(moe_prefixes) and re.search(r'\.fc[12]\.(weight|bias)$', key):
            if key not in experts:
                dropped[key] = 'dense MLP of a MoE block: its experts come from the expert donor'
        elif key in model:
            continue
        elif any(key.startswith(p) for p in optional or {}):
            dropped[key] = next(why for p, why in (optional or {}).items() if key.startswith(p))
        else:
            unheld.append(key)
    return dropped, unheld


def check_expert_blocks(
        experts: Mapping[str, torch.Tensor],
        blocks: Mapping[str, str],
        model_keys: Sequence[str],
        mlp: str = 'mlp',
) -> List[str]:
    """Keys of the expert donor's blocks that shape what its MLPs compute (LayerScale on the MLP branch, a norm
    inside the MLP) and that the model's MoE block lacks.

    Args:
        experts: The expert donor's tensors.
        blocks: Model MoE block prefix -> expert donor block prefix.
        model_keys: The model's state dict keys.
        mlp: The block's MLP attribute (the family's).
    """
    model = set(model_keys)
    unheld = []
    for model_prefix, donor_prefix in blocks.items():
        for key in experts:
            if not key.startswith(donor_prefix):
                continue
            rest = key[len(donor_prefix):]
            if (rest.startswith(f'{mlp}.') and not re.fullmatch(rf'{re.escape(mlp)}\.fc[12]\.(weight|bias)', rest)) or \
                    (re.fullmatch(r'(ls2\.gamma|gamma)', rest) and model_prefix + rest not in model):
                unheld.append(key)
    return unheld
