""" A MoE Jetpack model for any dense timm VisionTransformer checkpoint, its architecture read from the donor.

``create_moejet_from('vit_small_patch14_reg4_dinov2.lvd142m')`` builds the donor's architecture on the meta device
(no weights fetched), refuses what the recycling cannot carry (not a ``VisionTransformer``, a gated or normed MLP, a
block, attention or patch embedding of another kind), reads its constructor arguments (patch and image size, class
and register tokens, layer scale, norms, pooling, activation, dynamic size), checks that they rebuild exactly that
architecture, and creates ``moejet_vit`` with them and the paper's MoE settings scaled to the donor: MoE in the second
half, core experts = patch tokens / 2, universal experts = patch tokens, core hidden = the donor's MLP hidden,
universal hidden a quarter of it. The weights are then recycled on load, as for every pretrained tag.
"""
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn as nn
from timm.layers import to_2tuple

from ..errors import DonorMismatch, InvalidArgument

__all__ = ['create_moejet_from', 'vit_architecture', 'moejet_vit_kwargs']

# activations timm's ViT takes by name (act_layer='...'), tried in order; None is timm's default (nn.GELU)
_ACT_NAMES = (None, 'gelu_tanh', 'quick_gelu', 'silu', 'relu')
_DEFAULT_NORM_EPS = 1e-6  # timm's ViT LayerNorm


def _donor_model(spec: str) -> nn.Module:
    """The donor's architecture on the meta device (a timm name with or without tag, hf-hub: or local-dir:)."""
    import os

    import timm

    from ..hub import WEIGHT_SUFFIXES, check_model_name, create_model, hub_errors_named

    if not isinstance(spec, str) or os.path.isfile(spec) or spec.endswith(WEIGHT_SUFFIXES):
        raise InvalidArgument(f'the architecture of donor {spec!r} is not known from its name: name it as a timm '
                              f'model with its tag, hf-hub:ORG/REPO or local-dir:FOLDER, or give the MoE '
                              f'architecture (--model).')
    if os.path.isdir(spec):
        spec = f'local-dir:{spec}'
    if spec.startswith('local-dir:'):
        from ..hub import read_folder_config
        read_folder_config(spec[len('local-dir:'):])  # a folder's config.json is checked before timm reads it
    if not spec.startswith(('hf-hub:', 'local-dir:')):
        check_model_name(spec)
        from timm.models import resolve_pretrained_cfg, split_model_name_tag
        arch, tag = split_model_name_tag(spec)
        try:
            resolve_pretrained_cfg(arch, pretrained_cfg=tag or None)
        except RuntimeError as e:  # timm: 'Invalid pretrained tag (...) for ...'
            raise InvalidArgument(f'{spec}: {e}') from e
    with hub_errors_named(f'config of donor {spec!r}'):
        return create_model(spec, pretrained=False, device='meta') if spec.startswith(('hf-hub:', 'local-dir:')) \
            else timm.create_model(spec, pretrained=False, device='meta')


def _check_supported(model: nn.Module, name: str) -> None:
    """Refuse a donor the recycling cannot carry, naming it and what is unsupported."""
    from timm.layers import Mlp, PatchEmbed
    from timm.models.vision_transformer import Attention, Block, VisionTransformer

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
    from timm.layers import get_act_layer

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
    from timm.layers import LayerScale

    _check_supported(model, name)
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
    from functools import partial

    from timm.layers import LayerNorm
    from timm.models.vision_transformer import VisionTransformer

    kwargs = {k: v for k, v in args.items() if k != 'norm_eps'}
    kwargs['norm_layer'] = partial(LayerNorm, eps=args['norm_eps'])
    rebuilt = VisionTransformer(**kwargs, device='meta').state_dict()
    original = model.state_dict()
    differ = sorted(set(original) ^ set(rebuilt)) + sorted(
        k for k in set(original) & set(rebuilt) if original[k].shape != rebuilt[k].shape)
    if differ:
        raise DonorMismatch(f'donor {name}: its architecture could not be read back exactly (tensors that differ: '
                            f'{differ[:6]}); it uses options MoE Jetpack ViTs do not carry.')


def moejet_vit_kwargs(trunk: str, img_size: Any = None) -> Tuple[Dict[str, Any], nn.Module]:
    """The ``moejet_vit`` kwargs for a trunk donor: its architecture plus the paper's MoE settings scaled to it.

    Args:
        trunk: The trunk donor, named as ``create_moejet_from`` takes it.
        img_size: The MoE model's input size (int or (height, width)) when it differs from the donor's: the expert
            counts scale with the tokens at this size (a DINOv2 donor is configured for 518 px: 1369 tokens).

    Returns:
        The kwargs and the donor built on the meta device.
    """
    donor = _donor_model(trunk)
    args = vit_architecture(donor, trunk)
    grid = donor.patch_embed.grid_size
    if img_size is not None:
        size = to_2tuple(img_size)
        grid = tuple(s // p for s, p in zip(size, donor.patch_embed.patch_size))
    tokens = grid[0] * grid[1]  # 196 for a 224 px ViT/16: the paper's 98 core + 196 universal
    args.update(num_core_experts=max(1, tokens // 2), num_univ_experts=max(1, tokens))
    return args, donor


def _trunk_overlay(trunk: str, donor: nn.Module, cache_dir: Optional[str]) -> Dict[str, Any]:
    """``pretrained_cfg_overlay`` that makes timm load the trunk donor's weights, with its data config."""
    import dataclasses
    from pathlib import Path

    from timm.models import PretrainedCfg

    from ..donors import folder_weights, locate_donor

    source = dict(donor.pretrained_cfg or {})
    fields = {f.name for f in dataclasses.fields(PretrainedCfg)}
    weights_keys = ('source', 'file', 'url', 'hf_hub_id', 'hf_hub_filename', 'state_dict', 'custom_load')
    overlay = {k: v for k, v in source.items() if k in fields and k not in weights_keys + ('architecture', 'tag')}
    locate_donor(trunk, cache_dir=cache_dir, role='trunk donor')  # fetched now, or named if missing
    if trunk.startswith('local-dir:'):
        return dict(overlay, file=str(folder_weights(Path(trunk[len('local-dir:'):]))))
    overlay['hf_hub_id'] = source.get('hf_hub_id') or trunk[len('hf-hub:'):]
    if source.get('hf_hub_filename'):
        overlay['hf_hub_filename'] = source['hf_hub_filename']
    return overlay


def create_moejet_from(
        trunk: str,
        experts: Optional[str] = None,
        pretrained: bool = True,
        *,
        cache_dir: Optional[str] = None,
        **kwargs: Any,
) -> nn.Module:
    """A MoE Jetpack ViT built from a dense timm ``VisionTransformer`` donor and recycled from it.

    Args:
        trunk: The trunk donor: a timm name with its tag (``vit_small_patch14_reg4_dinov2.lvd142m``),
            ``hf-hub:ORG/REPO`` or ``local-dir:FOLDER``. Its architecture becomes the MoE model's.
        experts: A wider and/or deeper donor of the same family whose MLPs become the experts (any form
            ``timm_moejet.donors.load_donor`` takes); None: the trunk donor.
        pretrained: Recycle the donors into the model (else: the architecture only, randomly initialised).
        cache_dir: Hugging Face cache folder.
        **kwargs: ``moejet_vit`` kwargs overriding the derived ones: any MoE setting (``num_core_experts``,
            ``moe_blocks``, ...), ``num_classes``, ``recycle_*`` options, ...

    Raises:
        DonorMismatch: If a donor is not a ViT with timm's ``Mlp`` blocks (decided before any weight is fetched).
        NotFound: If a donor is neither cached nor downloadable.
    """
    import os

    import timm

    if isinstance(trunk, (str, os.PathLike)) and not str(trunk).startswith(('hf-hub:', 'local-dir:')) \
            and os.path.isdir(trunk):
        trunk = f'local-dir:{os.fspath(trunk)}'  # a plain folder, as the command line takes it
    args, donor = moejet_vit_kwargs(trunk, kwargs.get('img_size'))
    if experts is not None:
        if not isinstance(experts, str) or not experts:
            raise InvalidArgument(f'experts must name a donor, got {experts!r}.')
        if not experts.endswith(('.safetensors', '.pth', '.pt', '.bin', '.tar')):
            _check_supported(_donor_model(experts), experts)
    args.update(kwargs)
    if pretrained:
        args.setdefault('recycle_experts', experts if experts is not None else 'trunk')
        args['pretrained_cfg_overlay'] = _trunk_overlay(trunk, donor, cache_dir)
    if cache_dir is not None:
        args['cache_dir'] = cache_dir
    return timm.create_model('moejet_vit', pretrained=pretrained, **args)
