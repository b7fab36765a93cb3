""" MoE Jetpack Vision Transformers: timm's ViT with SpheroMoE layers in place of chosen MLPs.

`MoE Jetpack: From Dense Checkpoints to Adaptive Mixture of Experts for Vision Tasks`
    - https://arxiv.org/abs/2406.04801

``MoEVisionTransformer`` subclasses timm's ``VisionTransformer``; only the MLPs of ``moe_blocks`` change, so
everything timm's ViT offers (features, intermediates, grad checkpointing, dynamic size, torchscript, fx)
keeps working.
"""
from functools import partial
from typing import Any, Callable, Dict, List, Optional, Set

import torch
import torch.nn as nn
from timm.layers import LayerNorm
from timm.models import generate_default_cfgs, register_model
from timm.models.vision_transformer import Block, VisionTransformer

from ..errors import InvalidArgument
from ..layers import SpheroMoE
from ..recycling import RecyclingRecipe
from ..settings import integer, real
from .builder import PAPER_CFG, build_moe_model
from .placement import pop_moe_kwargs

__all__ = ['MoEVisionTransformer']


def _block(*, depth: int, mlp_layer: Callable[..., nn.Module], moe_layers: Dict[int, Callable[..., SpheroMoE]],
           **kwargs) -> Block:
    """timm's ``Block``; its ``mlp_layer`` is a SpheroMoE ``partial`` when ``depth`` (the block index) is a MoE
    block."""
    return Block(depth=depth, mlp_layer=moe_layers.get(depth, mlp_layer), **kwargs)


_MAX_HIDDEN = 1 << 24  # MLP hidden units: beyond any ViT, and where a typo such as mlp_ratio=1e300 is caught


def _check_sizes(embed_dim: int, kwargs: Dict[str, Any]) -> None:
    """``img_size``, ``patch_size`` and ``mlp_ratio`` as whole, usable sizes, before torch is asked to allocate."""
    def pair(name: str, value: Any) -> List[int]:
        values = list(value) if isinstance(value, (tuple, list)) else [value, value]
        if len(values) != 2:
            raise InvalidArgument(f'{name} must be an int or (height, width), got {value!r}.')
        return [integer(1)(name, v) for v in values]

    patch = pair('patch_size', kwargs.get('patch_size', 16))
    if kwargs.get('img_size') is not None:
        size = pair('img_size', kwargs['img_size'])
        if any(s < p for s, p in zip(size, patch)) and not kwargs.get('dynamic_img_pad'):
            raise InvalidArgument(f'img_size {kwargs["img_size"]} is smaller than the patch size '
                                  f'{patch[0]}x{patch[1]}: the image would hold no patch.')
    if kwargs.get('mlp_ratio') is not None:
        ratio = real(0., min_open=True)('mlp_ratio', kwargs['mlp_ratio'])
        if embed_dim * ratio > _MAX_HIDDEN:
            raise InvalidArgument(f'mlp_ratio {ratio:g} gives {embed_dim} x {ratio:g} MLP hidden units, more than '
                                  f'{_MAX_HIDDEN}.')


class MoEVisionTransformer(VisionTransformer):
    """Vision Transformer with SpheroMoE layers (MoE Jetpack).

    Takes every ``VisionTransformer`` argument, plus the MoE placement (``moe_blocks``, ``moe_drop_path_rate``,
    see ``MoEPlacement``) and the layer settings under their ``create_model`` names (``num_core_experts``,
    ``num_univ_experts``, ``moe_combine``, ..., see ``SpheroMoESettings``; docs/models.md lists them all).
    """
    recycling_family = 'vit'

    def __init__(self, depth: int = 12, embed_dim: int = 768, num_heads: int = 12, norm_eps: Optional[float] = None,
                 **kwargs) -> None:
        """
        Args:
            depth: Number of blocks.
            embed_dim: Transformer width.
            num_heads: Attention heads (must divide ``embed_dim``).
            norm_eps: Epsilon of every LayerNorm (None: timm's ViT default, 1e-6). A JSON-serialisable way to carry
                a donor's norms (CLIP's are torch's 1e-5) into the model's config.json.
            **kwargs: MoE placement and layer settings, and ``VisionTransformer`` arguments.
        """
        for name, value in (('embed_dim', embed_dim), ('depth', depth), ('num_heads', num_heads)):
            integer(1)(name, value)
        if norm_eps is not None:
            if kwargs.get('norm_layer') is not None:
                raise InvalidArgument('give norm_eps or norm_layer, not both.')
            kwargs['norm_layer'] = partial(LayerNorm, eps=real(0., min_open=True)('norm_eps', norm_eps))
        integer(0)('num_classes', kwargs.get('num_classes', 0))
        _check_sizes(embed_dim, kwargs)
        if embed_dim % num_heads:
            raise InvalidArgument(
                f'embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads}); '
                f'allowed num_heads: {[h for h in range(1, embed_dim + 1) if embed_dim % h == 0][:12]}...')
        if 'block_fn' in kwargs:
            raise InvalidArgument('MoEVisionTransformer builds its blocks itself; block_fn cannot be set.')
        placement, settings = pop_moe_kwargs(kwargs)
        moe_layers = placement.layer_factories(depth, settings)
        super().__init__(depth=depth, embed_dim=embed_dim, num_heads=num_heads,
                         block_fn=partial(_block, moe_layers=moe_layers), **kwargs)
        self.moe_blocks = tuple(moe_layers)

    def moe_layers(self) -> Dict[int, SpheroMoE]:
        """The SpheroMoE layers by block index."""
        return {i: self.blocks[i].mlp for i in self.moe_blocks}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        """Parameter groups for layer-wise lr decay (timm's ``--layer-decay``).

        As in the released recipe, the MoE layers (experts, slot queries, temperatures, slot norm) and the norm2
        feeding them are new or re-cut weights, so they train at the full lr together with the head; the dense
        trunk (stem, attention, dense MLPs) decays by depth. The block regex skips those parameters, so they fall
        through to the unmatched group, which timm places last (lr scale 1.0).
        """
        matcher = super().group_matcher(coarse=coarse)
        if self.moe_blocks:
            moe_ids = '|'.join(str(i) for i in self.moe_blocks)
            block_re = rf'^blocks\.(?!(?:{moe_ids})\.(?:mlp|norm2)\.)(\d+)'
            matcher['blocks'] = [(block_re, None)] + [s for s in matcher['blocks'] if s[0] != r'^blocks\.(\d+)']
        return matcher

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        """timm's ViT set plus routing temperatures, biases of every shape (experts' are 2-D) and norms."""
        return super().no_weight_decay() | {'*.log_temperature', '*.bias', '*norm*.weight', '*pos_embed*'}


def _cfg(url: str = '', **kwargs) -> Dict[str, Any]:
    return {
        'url': url,
        'num_classes': 1000,
        'input_size': (3, 224, 224),
        'pool_size': None,
        'crop_pct': .9,
        'interpolation': 'bicubic',
        'fixed_input_size': True,
        # the trunk comes from augreg checkpoints, trained with mean = std = 0.5 (the released code used ImageNet's)
        'mean': (0.5, 0.5, 0.5),
        'std': (0.5, 0.5, 0.5),
        'first_conv': 'patch_embed.proj',
        'classifier': 'head',
        **PAPER_CFG,
        **kwargs,
    }


_TINY_NAMES = ('moejet_vit_tiny_patch16_224', 'moejet_vit_tiny')
_SMALL_NAMES = ('moejet_vit_small_patch16_224', 'moejet_vit_small')
_BASE_NAMES = ('moejet_vit_base_patch16_224', 'moejet_vit_base')
_VIT_TINY_IN21K = 'timm/vit_tiny_patch16_224.augreg_in21k'
_VIT_SMALL_IN21K = 'timm/vit_small_patch16_224.augreg_in21k'
_VIT_BASE_IN21K = 'timm/vit_base_patch16_224.augreg_in21k'
_VIT_LARGE_IN21K = 'timm/vit_large_patch16_224.augreg_in21k'

# A pretrained tag is a checkpoint-recycling recipe: its hf_hub_id is the trunk donor (timm downloads it), the
# recipe names the expert donor and strategy; the filter turns both into MoE weights on load.
# (names, tag, trunk donor, recipe); the first tag of a name is its default
_RECYCLING_TAGS = (
    # the released recipe: experts carved from the next wider in21k ViT, the rest from the same width
    (_TINY_NAMES, 'recycled_in21k', _VIT_TINY_IN21K, RecyclingRecipe(experts=_VIT_SMALL_IN21K)),
    (_SMALL_NAMES, 'recycled_in21k', _VIT_SMALL_IN21K, RecyclingRecipe(experts=_VIT_BASE_IN21K)),
    # the next size: experts from ViT-L (24 blocks: MoE block i takes evenly spaced ViT-L block, width 1024 cut to 768)
    (_BASE_NAMES, 'recycled_in21k', _VIT_BASE_IN21K, RecyclingRecipe(experts=_VIT_LARGE_IN21K)),
    # sparse upcycling of the same-width checkpoint (core experts are copies of its MLPs)
    (_TINY_NAMES, 'upcycled_in21k', _VIT_TINY_IN21K, RecyclingRecipe(strategy='upcycle')),
    (_SMALL_NAMES, 'upcycled_in21k', _VIT_SMALL_IN21K, RecyclingRecipe(strategy='upcycle')),
    (_BASE_NAMES, 'upcycled_in21k', _VIT_BASE_IN21K, RecyclingRecipe(strategy='upcycle')),
)
_RECIPES: Dict[str, RecyclingRecipe] = {
    f'{name}.{tag}': recipe for names, tag, _, recipe in _RECYCLING_TAGS for name in names}

default_cfgs = generate_default_cfgs({
    **{f'{name}.{tag}': _cfg(hf_hub_id=trunk, description=recipe.describe())
       for names, tag, trunk, recipe in _RECYCLING_TAGS for name in names},
    # any dense timm ViT (create_moejet_from): architecture and weights come from the donor
    'moejet_vit.untrained': _cfg(),
    'moejet_vit_tiny_patch16_224.untrained': _cfg(),
    'moejet_vit_tiny.untrained': _cfg(),
    'moejet_vit_small_patch16_224.untrained': _cfg(),
    'moejet_vit_small.untrained': _cfg(),
    'moejet_vit_base_patch16_224.untrained': _cfg(),
    'moejet_vit_base.untrained': _cfg(),
    'softmoe_vit_tiny_patch16_224.untrained': _cfg(),
    'moejet_vit_test.untrained': _cfg(input_size=(3, 64, 64)),
    'softmoe_vit_test.untrained': _cfg(input_size=(3, 64, 64)),
})


def _create_moejet(variant: str, pretrained: bool = False, **kwargs) -> MoEVisionTransformer:
    out_indices = kwargs.pop('out_indices', 3)
    return build_moe_model(MoEVisionTransformer, variant, pretrained, _RECIPES,
                           dict(out_indices=out_indices, feature_cls='getter'), **kwargs)


# MoE Jetpack defaults (released code): MoE in the second half, 98 core + 196 universal experts, 1 slot each.
_MOEJET_TINY = dict(patch_size=16, embed_dim=192, depth=12, num_heads=3, global_pool='avg')
_MOEJET_SMALL = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6, global_pool='avg')
_MOEJET_BASE = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, global_pool='avg')
# Soft MoE baseline from the same layer code: one path of 197 experts, softmax combine, one learnable scale.
_SOFTMOE = dict(
    num_core_experts=197, num_univ_experts=0, moe_combine='softmax', moe_shared_temperature=True,
    moe_temperature_init=1.0, moe_slot_norm=False, moe_expert_drop=0., moe_drop_path_rate=0.,
)
# Reduced-size variants for tests (timm's own suite runs on them).
_TEST = dict(
    patch_size=16, embed_dim=64, depth=4, num_heads=2, global_pool='avg', moe_blocks=(2, 3),
    num_core_experts=4, num_univ_experts=8,
)


@register_model
def moejet_vit_tiny_patch16_224(pretrained: bool = False, **kwargs) -> MoEVisionTransformer:
    """V-JetMoE-T: ViT-Ti/16 with SpheroMoE (98 core + 196 universal experts) in blocks 6..11."""
    return _create_moejet('moejet_vit_tiny_patch16_224', pretrained=pretrained, **dict(_MOEJET_TINY, **kwargs))


@register_model
def moejet_vit_tiny(pretrained: bool = False, **kwargs) -> MoEVisionTransformer:
    """Alias of ``moejet_vit_tiny_patch16_224``."""
    return _create_moejet('moejet_vit_tiny', pretrained=pretrained, **dict(_MOEJET_TINY, **kwargs))


@register_model
def moejet_vit_small_patch16_224(pretrained: bool = False, **kwargs) -> MoEVisionTransformer:
    """V-JetMoE-S: ViT-S/16 with SpheroMoE (98 core + 196 universal experts) in blocks 6..11."""
    return _create_moejet('moejet_vit_small_patch16_224', pretrained=pretrained, **dict(_MOEJET_SMALL, **kwargs))


@register_model
def moejet_vit_small(pretrained: bool = False, **kwargs) -> MoEVisionTransformer:
    """Alias of ``moejet_vit_small_patch16_224``."""
    return _create_moejet('moejet_vit_small', pretrained=pretrained, **dict(_MOEJET_SMALL, **kwargs))


@register_model
def moejet_vit_base_patch16_224(pretrained: bool = False, **kwargs) -> MoEVisionTransformer:
    """V-JetMoE-B: ViT-B/16 with SpheroMoE (98 core + 196 universal experts) in blocks 6..11, experts from ViT-L."""
    return _create_moejet('moejet_vit_base_patch16_224', pretrained=pretrained, **dict(_MOEJET_BASE, **kwargs))


@register_model
def moejet_vit_base(pretrained: bool = False, **kwargs) -> MoEVisionTransformer:
    """Alias of ``moejet_vit_base_patch16_224``."""
    return _create_moejet('moejet_vit_base', pretrained=pretrained, **dict(_MOEJET_BASE, **kwargs))


@register_model
def moejet_vit(pretrained: bool = False, **kwargs) -> MoEVisionTransformer:
    """Any MoE Jetpack ViT, all of its architecture given as kwargs (``timm_moejet.create_moejet_from`` reads them
    from a dense donor; an exported model's config.json carries them). Defaults: timm's ViT-B/16."""
    return _create_moejet('moejet_vit', pretrained=pretrained, **kwargs)


@register_model
def softmoe_vit_tiny_patch16_224(pretrained: bool = False, **kwargs) -> MoEVisionTransformer:
    """Soft MoE-T baseline: ViT-Ti/16 with 197 single-path experts (softmax combine) in blocks 6..11."""
    return _create_moejet(
        'softmoe_vit_tiny_patch16_224', pretrained=pretrained, **dict(_MOEJET_TINY, **_SOFTMOE, **kwargs))


@register_model
def moejet_vit_test(pretrained: bool = False, **kwargs) -> MoEVisionTransformer:
    """Reduced-size MoE Jetpack ViT for tests (D 64, depth 4, 4 core + 8 universal experts in blocks 2, 3)."""
    return _create_moejet('moejet_vit_test', pretrained=pretrained, **dict(_TEST, **kwargs))


@register_model
def softmoe_vit_test(pretrained: bool = False, **kwargs) -> MoEVisionTransformer:
    """Reduced-size Soft MoE ViT for tests."""
    return _create_moejet(
        'softmoe_vit_test', pretrained=pretrained, **dict(_TEST, **dict(_SOFTMOE, num_core_experts=12), **kwargs))
