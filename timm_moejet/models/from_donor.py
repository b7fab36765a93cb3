""" The architecture of any dense timm VisionTransformer donor, read as ``moejet_vit`` kwargs.

:func:`vit_architecture` refuses what the recycling cannot carry (not a ``VisionTransformer``, a gated or normed MLP,
a block, attention or patch embedding of another kind), reads the constructor arguments (patch and image size, class
and register tokens, layer scale, norms, pooling, activation, dynamic size) and checks that they rebuild exactly that
architecture. ``timm_moejet.create_moejet_from`` adds the paper's MoE settings scaled to the donor.
"""
from functools import partial
from typing import Any, Dict, Optional

import torch
import torch.nn as nn
from timm.layers import LayerNorm, LayerScale, Mlp, PatchEmbed, get_act_layer
from timm.models.vision_transformer import Attention, Block, VisionTransformer

from ..errors import DonorMismatch

__all__ = ['vit_architecture', 'check_vit_donor']

# activations timm's ViT takes by name (act_layer='...'), tried in order; None is timm's default (nn.GELU)
_ACT_NAMES = (None, 'gelu_tanh', 'quick_gelu', 'silu', 'relu')
_DEFAULT_NORM_EPS = 1e-6  # timm's ViT LayerNorm


def check_vit_donor(model: nn.Module, name: str) -> None:
    """Refuse a donor the recycling cannot carry, naming it and what is unsupported."""
    if not isinstance(model, VisionTransformer):
        raise DonorMismatch(f'donor {name} is a {type(model).__module__}.{type(model).__name__}, not a timm '
                            f'VisionTransformer; MoE Jetpack ViTs recycle VisionTransformer checkpoints.')
    problems = []
    if type(model.patch_embed) is not PatchEmbed or not isinstance(model.patch_embed.norm, nn.Identity):
        problems.append(f'patch embedding {type(model.patch_embed).__name__} (a plain PatchEmbed is needed)')
    for i, block in enumerate(model.blocks):
        if type(block) is not Block:
            problems.append(f'blocks.{i} is a {type(block).__name__} (timm\'s Block is needed)')
        elif type(block.mlp) is not Mlp:
            problems.append(f'blocks.{i}.mlp is a {type(block.mlp).__name__} (a gated MLP such as SwiGLU cannot be '
                            f'cut into fc1 -> act -> fc2 experts; timm\'s Mlp is needed)')
        elif not isinstance(block.mlp.norm, nn.Identity):
            problems.append(f'blocks.{i}.mlp has a norm inside (scale_mlp_norm), which experts do not have')
        elif type(block.attn) is not Attention:
            problems.append(f'blocks.{i}.attn is a {type(block.attn).__name__} (timm\'s Attention is needed)')
        if problems:
            break
    if problems:
        raise DonorMismatch(f'donor {name} cannot be recycled into a MoE Jetpack ViT: {"; ".join(problems)}.')


def _act_name(act: nn.Module, name: str) -> Optional[str]:
    """The ``act_layer`` name that gives the same function as ``act`` (probed on a grid of values)."""
    probe = torch.linspace(-6, 6, 97)
    expected = act.to_empty(device='cpu')(probe) if any(True for _ in act.parameters()) else act(probe)
    for candidate in _ACT_NAMES:
        layer = get_act_layer(candidate) if candidate is not None else nn.GELU
        if torch.allclose(layer()(probe), expected, rtol=0, atol=1e-7):
            return candidate
    raise DonorMismatch(f'donor {name}: activation {type(act).__name__} is none of the ones timm\'s ViT takes by '
                        f'name ({", ".join(n or "gelu" for n in _ACT_NAMES)}).')


def vit_architecture(model: nn.Module, name: str = 'donor') -> Dict[str, Any]:
    """The ``VisionTransformer``/``moejet_vit`` kwargs that rebuild ``model``'s architecture (JSON-serialisable).

    Args:
        model: A dense timm ``VisionTransformer`` (any device, meta included).
        name: How to name it in messages.

    Raises:
        DonorMismatch: If the architecture is not one the MoE ViT can carry, or the kwargs read from it do not rebuild
            it exactly (naming the differences).
    """
    check_vit_donor(model, name)
    block, embed = model.blocks[0], model.patch_embed
    norms = {type(m).__name__: m.eps for m in model.modules() if isinstance(m, nn.LayerNorm)}
    eps = set(norms.values())
    if not all(issubclass(type(m), nn.LayerNorm) for m in (block.norm1, block.norm2)) or len(eps) > 1:
        raise DonorMismatch(f'donor {name}: norms {norms} are not one LayerNorm with one epsilon.')
    args: Dict[str, Any] = dict(
        img_size=list(embed.img_size) if embed.img_size is not None else None,
        patch_size=list(embed.patch_size),
        in_chans=embed.proj.in_channels,
        num_classes=model.num_classes,
        global_pool=model.global_pool,
        embed_dim=model.embed_dim,
        depth=len(model.blocks),
        num_heads=block.attn.num_heads,
        mlp_ratio=block.mlp.fc1.out_features / model.embed_dim,
        qkv_bias=block.attn.qkv.bias is not None,
        qk_norm=not isinstance(block.attn.q_norm, nn.Identity),
        scale_attn_norm=not isinstance(block.attn.norm, nn.Identity),
        proj_bias=block.attn.proj.bias is not None,
        init_values=float(block.ls1.init_values) if isinstance(block.ls1, LayerScale) else None,
        class_token=model.cls_token is not None,
        pos_embed='learn' if model.pos_embed is not None else 'none',
        no_embed_class=model.no_embed_class,
        reg_tokens=model.num_reg_tokens,
        pre_norm=not isinstance(model.norm_pre, nn.Identity),
        final_norm=not (isinstance(model.norm, nn.Identity) and isinstance(model.fc_norm, nn.Identity)),
        fc_norm=not isinstance(model.fc_norm, nn.Identity),
        pool_include_prefix=model.pool_include_prefix,
        dynamic_img_size=model.dynamic_img_size,
        dynamic_img_pad=embed.dynamic_img_pad,
        act_layer=_act_name(block.mlp.act, name),
        norm_eps=eps.pop() if eps else _DEFAULT_NORM_EPS,
    )
    args = {k: v for k, v in args.items() if v is not None or k in ('img_size',)}
    _check_rebuilds(model, args, name)
    return args


def _check_rebuilds(model: nn.Module, args: Dict[str, Any], name: str) -> None:
    """Rebuild the dense ViT from ``args`` on the meta device: same tensors, same shapes, or a ``DonorMismatch``."""
    kwargs = {k: v for k, v in args.items() if k != 'norm_eps'}
    kwargs['norm_layer'] = partial(LayerNorm, eps=args['norm_eps'])
    rebuilt = VisionTransformer(**kwargs, device='meta').state_dict()
    original = model.state_dict()
    differ = sorted(set(original) ^ set(rebuilt)) + sorted(
        k for k in set(original) & set(rebuilt) if original[k].shape != rebuilt[k].shape)
    if differ:
        raise DonorMismatch(f'donor {name}: its architecture could not be read back exactly (tensors that differ: '
                            f'{differ[:6]}); it uses options MoE Jetpack ViTs do not carry.')
