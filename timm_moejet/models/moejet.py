""" MoE Jetpack Vision Transformers: timm's ViT with SpheroMoE layers in place of chosen MLPs.

`MoE Jetpack: From Dense Checkpoints to Adaptive Mixture of Experts for Vision Tasks`
    - https://arxiv.org/abs/2406.04801

``MoEVisionTransformer`` subclasses timm's ``VisionTransformer``; only the MLPs of ``moe_blocks`` change, so
everything timm's ViT offers (features, intermediates, grad checkpointing, dynamic size, torchscript, fx)
keeps working.
"""
from functools import partial
from typing import Any, Dict, Optional, Sequence, Set, Type

import torch
import torch.nn as nn
from timm.layers import calculate_drop_path_rates
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import Block, VisionTransformer

from ..layers import COMBINE_MODES, SpheroMoE
from ..recycling.pretrained import RecyclingArgs, RecyclingRecipe

__all__ = ['MoEVisionTransformer']


def _sphero_mlp(
        in_features: int,
        hidden_features: Optional[int] = None,
        act_layer: Type[nn.Module] = nn.GELU,
        norm_layer: Optional[Type[nn.Module]] = None,
        bias: bool = True,
        drop: float = 0.,
        device=None,
        dtype=None,
        *,
        moe_args: Dict[str, Any],
) -> SpheroMoE:
    """Adapts timm's ``mlp_layer`` call signature to ``SpheroMoE``."""
    args = dict(moe_args)
    if args.get('core_hidden') is None:
        args['core_hidden'] = hidden_features
    return SpheroMoE(in_features, act_layer=act_layer, device=device, dtype=dtype, **args)


def _moe_block(
        *,
        depth: int,
        mlp_layer: Type[nn.Module],
        moe_blocks: Sequence[int],
        moe_args: Dict[str, Any],
        moe_drop_path: Sequence[float],
        **kwargs,
) -> Block:
    """timm ``Block`` whose MLP is a SpheroMoE layer when ``depth`` (the block index) is in ``moe_blocks``."""
    if depth in moe_blocks:
        mlp_layer = partial(_sphero_mlp, moe_args=dict(moe_args, drop_path=moe_drop_path[depth]))
    return Block(depth=depth, mlp_layer=mlp_layer, **kwargs)


class MoEVisionTransformer(VisionTransformer):
    """Vision Transformer with SpheroMoE layers (MoE Jetpack).

    All ``VisionTransformer`` arguments are accepted; the MoE arguments below are added.
    """

    def __init__(
            self,
            embed_dim: int = 768,
            depth: int = 12,
            num_heads: int = 12,
            mlp_ratio: float = 4.,
            moe_blocks: Optional[Sequence[int]] = None,
            num_core_experts: int = 98,
            num_univ_experts: int = 196,
            core_hidden: Optional[int] = None,
            univ_hidden: Optional[int] = None,
            slots_per_expert: int = 1,
            moe_combine: str = 'entmax15',
            moe_temperature_init: float = 0.5,
            moe_shared_temperature: bool = False,
            moe_noise_std: Optional[float] = None,
            moe_slot_norm: bool = True,
            moe_slot_norm_eps: float = 1e-5,
            moe_expert_drop: float = 0.4,
            moe_drop_path_rate: float = 0.1,
            **kwargs,
    ) -> None:
        """
        Args:
            embed_dim: Transformer width.
            depth: Number of blocks.
            num_heads: Attention heads (must divide ``embed_dim``).
            mlp_ratio: Dense MLP ratio; also the default core-expert hidden ratio.
            moe_blocks: 0-based indices of blocks whose MLP becomes SpheroMoE (default: the second half).
            num_core_experts: Core experts per MoE layer.
            num_univ_experts: Universal experts per MoE layer (0: single path).
            core_hidden: Core expert hidden units (default ``mlp_ratio * embed_dim``).
            univ_hidden: Universal expert hidden units (default ``core_hidden // 4``).
            slots_per_expert: Slots per expert.
            moe_combine: 'entmax15' or 'softmax'.
            moe_temperature_init: Initial routing temperature.
            moe_shared_temperature: One temperature for dispatch and combine.
            moe_noise_std: Training-time logit noise std (None: 1 / num_slots; 0: off).
            moe_slot_norm: LayerNorm on slot queries.
            moe_slot_norm_eps: Epsilon of the slot-query LayerNorm.
            moe_expert_drop: Dropout inside experts.
            moe_drop_path_rate: Maximum per-sample drop path on MoE outputs, ramped linearly over depth.
            **kwargs: ``VisionTransformer`` arguments.
        """
        for name, value in (('embed_dim', embed_dim), ('depth', depth), ('num_heads', num_heads)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f'{name} must be a positive int, got {value!r}.')
        if embed_dim % num_heads:
            raise ValueError(
                f'embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads}); '
                f'allowed num_heads: {[h for h in range(1, embed_dim + 1) if embed_dim % h == 0][:12]}...')
        if moe_blocks is None:
            moe_blocks = tuple(range(depth // 2, depth))
        moe_blocks = tuple(moe_blocks)
        bad = [i for i in moe_blocks if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < depth]
        if bad:
            raise ValueError(f'moe_blocks {bad} are outside the model depth; allowed block indices are 0..{depth - 1}.')
        if len(set(moe_blocks)) != len(moe_blocks):
            raise ValueError(f'moe_blocks has repeated indices: {list(moe_blocks)}.')
        if moe_combine not in COMBINE_MODES:
            raise ValueError(f'moe_combine must be one of {COMBINE_MODES}, got {moe_combine!r}.')
        if num_core_experts + num_univ_experts < 1 and moe_blocks:
            raise ValueError('No experts: num_core_experts and num_univ_experts are both 0; set at least one > 0.')
        for name, value in (('core_hidden', core_hidden), ('univ_hidden', univ_hidden)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f'{name} must be a positive int or None, got {value!r}.')
        if int(mlp_ratio * embed_dim) < 1:
            raise ValueError(f'mlp_ratio * embed_dim must give at least 1 hidden unit, got mlp_ratio={mlp_ratio}.')

        moe_args = dict(
            num_core=num_core_experts,
            num_univ=num_univ_experts,
            core_hidden=core_hidden,
            univ_hidden=univ_hidden,
            slots_per_expert=slots_per_expert,
            combine=moe_combine,
            temperature_init=moe_temperature_init,
            shared_temperature=moe_shared_temperature,
            noise_std=moe_noise_std,
            slot_norm=moe_slot_norm,
            slot_norm_eps=moe_slot_norm_eps,
            expert_drop=moe_expert_drop,
        )
        block_fn = partial(
            _moe_block,
            moe_blocks=moe_blocks,
            moe_args=moe_args,
            moe_drop_path=calculate_drop_path_rates(moe_drop_path_rate, depth),
        )
        super().__init__(
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            block_fn=block_fn,
            **kwargs,
        )
        self.moe_blocks = moe_blocks

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
        'license': 'apache-2.0',
        'paper_ids': 'arXiv:2406.04801',
        'paper_name': 'MoE Jetpack: From Dense Checkpoints to Adaptive Mixture of Experts for Vision Tasks',
        **kwargs,
    }


# A pretrained tag is a checkpoint-recycling recipe: its hf_hub_id is the trunk donor (timm downloads it), the
# recipe names the expert donor and strategy; the filter turns both into MoE weights on load.
_RECIPES: Dict[str, RecyclingRecipe] = {}


def _recycled_cfgs(names: Sequence[str], tag: str, trunk: str, recipe: RecyclingRecipe) -> Dict[str, Any]:
    for name in names:
        _RECIPES[f'{name}.{tag}'] = recipe
    return {f'{name}.{tag}': _cfg(hf_hub_id=trunk, description=recipe.describe()) for name in names}


_TINY_NAMES = ('moejet_vit_tiny_patch16_224', 'moejet_vit_tiny')
_SMALL_NAMES = ('moejet_vit_small_patch16_224', 'moejet_vit_small')
_VIT_TINY_IN21K = 'timm/vit_tiny_patch16_224.augreg_in21k'
_VIT_SMALL_IN21K = 'timm/vit_small_patch16_224.augreg_in21k'
_VIT_BASE_IN21K = 'timm/vit_base_patch16_224.augreg_in21k'

default_cfgs = generate_default_cfgs({
    # the released recipe (default tag): experts carved from the next wider in21k ViT, the rest from the same width
    **_recycled_cfgs(_TINY_NAMES, 'recycled_in21k', _VIT_TINY_IN21K, RecyclingRecipe(experts=_VIT_SMALL_IN21K)),
    **_recycled_cfgs(_SMALL_NAMES, 'recycled_in21k', _VIT_SMALL_IN21K, RecyclingRecipe(experts=_VIT_BASE_IN21K)),
    # sparse upcycling of the same-width checkpoint (core experts are copies of its MLPs)
    **_recycled_cfgs(_TINY_NAMES, 'upcycled_in21k', _VIT_TINY_IN21K, RecyclingRecipe(strategy='upcycle')),
    **_recycled_cfgs(_SMALL_NAMES, 'upcycled_in21k', _VIT_SMALL_IN21K, RecyclingRecipe(strategy='upcycle')),
    'moejet_vit_tiny_patch16_224.untrained': _cfg(),
    'moejet_vit_tiny.untrained': _cfg(),
    'moejet_vit_small_patch16_224.untrained': _cfg(),
    'moejet_vit_small.untrained': _cfg(),
    'softmoe_vit_tiny_patch16_224.untrained': _cfg(),
    'moejet_vit_test.untrained': _cfg(input_size=(3, 64, 64)),
    'softmoe_vit_test.untrained': _cfg(input_size=(3, 64, 64)),
})


def _create_moejet(variant: str, pretrained: bool = False, **kwargs) -> MoEVisionTransformer:
    out_indices = kwargs.pop('out_indices', 3)
    # recycle_strategy / recycle_stats / recycle_seed / ... configure the dense->MoE pretrained filter
    recycling = RecyclingArgs.pop_from(variant, kwargs, _RECIPES)
    with recycling.naming_missing_donors():
        model = build_model_with_cfg(
            MoEVisionTransformer,
            variant,
            pretrained,
            pretrained_filter_fn=recycling.filter_fn,
            feature_cfg=dict(out_indices=out_indices, feature_cls='getter'),
            **kwargs,
        )
    return recycling.finish(model)


# MoE Jetpack defaults (released code): MoE in the second half, 98 core + 196 universal experts, 1 slot each.
_MOEJET_TINY = dict(patch_size=16, embed_dim=192, depth=12, num_heads=3, global_pool='avg')
_MOEJET_SMALL = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6, global_pool='avg')
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
