""" V-JetMoE, the ViT family: timm's Vision Transformer with SpheroMoE layers in place of chosen MLPs.

`MoE Jetpack: From Dense Checkpoints to Adaptive Mixture of Experts for Vision Tasks`
    - https://arxiv.org/abs/2406.04801

The family in one module, as timm keeps one: the model (``MoEVisionTransformer`` subclasses timm's
``VisionTransformer``; only the MLPs of ``moe_blocks`` change, so everything timm's ViT offers keeps working:
features, intermediates, grad checkpointing, dynamic size, torchscript, fx), what recycling knows of a ViT
(:class:`ViTFamily`: key layout, heads, class-token layout, the expert-count rule), the architecture of any dense timm
ViT donor read as ``moejet_vit`` kwargs (:func:`vit_architecture`, for ``create_moejet_from``), the pretrained tags
(recycling recipes) and the ``@register_model`` entrypoints.
"""
import math
from functools import partial
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import torch
import torch.nn as nn
from timm.layers import LayerNorm, LayerScale, Mlp, PatchEmbed, get_act_layer
from timm.models import generate_default_cfgs, register_model
from timm.models.vision_transformer import Attention, Block, VisionTransformer, checkpoint_filter_fn

from ..errors import DonorMismatch, InvalidArgument
from ..family import Family, register_family
from ..layers import SpheroMoE
from ..recycling import RecyclingRecipe
from ..settings import integer, real
from .budget import check_block_count
from .builder import build_moe_model, paper_cfg
from .placement import MoEModelMixin, pop_moe_kwargs

__all__ = ['MoEVisionTransformer', 'ViTFamily', 'VIT', 'vit_architecture', 'check_vit_donor']


def _is_square(n: int) -> bool:
    return n >= 0 and math.isqrt(n) ** 2 == n


class ViTFamily(Family):
    """timm's ``VisionTransformer``: blocks ``blocks.N``, the MLP fed by ``norm2``, a class token and registers in
    front of the patch tokens."""
    name = 'vit'
    title = 'timm ViT'
    block_pattern = r'^blocks\.(\d+)\.'
    mlp_input_norm = 'norm2'
    new_head = ('head.', 'fc_norm.', 'head_drop.')
    donor_head_parts = {
        'norm.': 'final norm: the model pools by average and normalises with its fc_norm (MoE Jetpack recipe)',
        'attn_pool.': 'attention-pool head the model does not use: its head starts fresh',
    }
    model_head_parts = ('attn_pool.',)
    token_parts = ('reg_token', 'cls_token')
    recycle_hint = ('use the donor\'s architecture: timm_moejet.create_moejet_from(DONOR), or weights_tools recycle '
                    'without --model')

    def block_modules(self, model: nn.Module) -> List[nn.Module]:
        return list(model.blocks)

    def timm_filter(self, state_dict: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
        return checkpoint_filter_fn(state_dict, model)  # position embedding resampled to the model's grid

    def expert_counts(self, tokens: int, core: Optional[int] = None) -> Tuple[int, int]:
        """As released: half the patch tokens core experts, as many universal experts as patch tokens."""
        return (max(1, tokens // 2) if core is None else core), max(1, tokens)

    def layout_problem(self, state_dict: Mapping[str, torch.Tensor], model: nn.Module) -> Optional[str]:
        """The class-token layout of a ViT donor when it is not the model's, in words (None when it fits).

        The donor's position embedding holds its grid and, unless ``no_embed_class``, its prefix tokens (class and
        registers); its length tells which (another image size is resampled later, another layout cannot be).
        """
        pos, model_pos = state_dict.get('pos_embed'), getattr(model, 'pos_embed', None)
        if not isinstance(pos, torch.Tensor) or pos.ndim != 3 or model_pos is None:
            return None
        tokens = pos.shape[1]
        grid = getattr(getattr(model, 'patch_embed', None), 'num_patches', None)
        model_prefix = 0 if getattr(model, 'no_embed_class', False) else int(getattr(model, 'num_prefix_tokens', 1))
        donor_prefix = sum(int(state_dict[k].shape[1]) for k in self.token_parts
                           if isinstance(state_dict.get(k), torch.Tensor) and state_dict[k].ndim == 3)
        if tokens - model_prefix == grid or _is_square(tokens - model_prefix):
            return None
        if model_prefix and _is_square(tokens):
            return (f'its class token outside the position embedding ({tokens} positions for a grid of '
                    f'{math.isqrt(tokens)}x{math.isqrt(tokens)}; no_embed_class=True)')
        if not model_prefix and donor_prefix and _is_square(tokens - donor_prefix):
            return (f'its {donor_prefix} prefix token(s) inside the position embedding ({tokens} positions; '
                    f'no_embed_class=False)')
        return f'a position embedding of {tokens} positions, which fits no grid with the model\'s {model_prefix} ' \
               f'prefix token(s)'


VIT = register_family(ViTFamily())


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


class MoEVisionTransformer(MoEModelMixin, VisionTransformer):
    """Vision Transformer with SpheroMoE layers (MoE Jetpack).

    Takes every ``VisionTransformer`` argument, plus the MoE placement (``moe_blocks``, ``moe_drop_path_rate``,
    see ``MoEPlacement``) and the layer settings under their ``create_model`` names (``num_core_experts``,
    ``num_univ_experts``, ``moe_combine``, ..., see ``SpheroMoESettings``; docs/models.md lists them all).
    """
    family = VIT
    no_weight_decay_extra = ('*pos_embed*',)

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
        for name, value in (('embed_dim', embed_dim), ('num_heads', num_heads)):
            integer(1)(name, value)
        check_block_count('depth', depth)
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


# the trunk comes from augreg checkpoints, trained with mean = std = 0.5 (the released code used ImageNet's)
_CFG = dict(pool_size=None, crop_pct=.9, fixed_input_size=True, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
            first_conv='patch_embed.proj', classifier='head')


def _cfg(url: str = '', **kwargs) -> Dict[str, Any]:
    return paper_cfg(url, **dict(_CFG, **kwargs))


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
VIT.recipes = {f'{name}.{tag}': recipe for names, tag, _, recipe in _RECYCLING_TAGS for name in names}

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
    return build_moe_model(MoEVisionTransformer, variant, pretrained, dict(out_indices=out_indices,
                                                                           feature_cls='getter'), **kwargs)


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
        'softmoe_vit_tiny_patch16_224', pretrained=pretrained, **{**_MOEJET_TINY, **_SOFTMOE, **kwargs})


@register_model
def moejet_vit_test(pretrained: bool = False, **kwargs) -> MoEVisionTransformer:
    """Reduced-size MoE Jetpack ViT for tests (D 64, depth 4, 4 core + 8 universal experts in blocks 2, 3)."""
    return _create_moejet('moejet_vit_test', pretrained=pretrained, **dict(_TEST, **kwargs))


@register_model
def softmoe_vit_test(pretrained: bool = False, **kwargs) -> MoEVisionTransformer:
    """Reduced-size Soft MoE ViT for tests."""
    return _create_moejet(
        'softmoe_vit_test', pretrained=pretrained, **{**_TEST, **_SOFTMOE, 'num_core_experts': 12, **kwargs})
