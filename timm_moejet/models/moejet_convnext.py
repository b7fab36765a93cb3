""" C-JetMoE: timm's ConvNeXt with SpheroMoE layers in place of chosen block MLPs (MoE Jetpack, NeurIPS 2024).

`MoE Jetpack: From Dense Checkpoints to Adaptive Mixture of Experts for Vision Tasks`
    - https://arxiv.org/abs/2406.04801

The paper reports C-JetMoE-F (ConvNeXt, "MoE layers 10:18", core experts [98, 24], universal [196, 48], about 1.1
GMACs) without its code or exact architecture. Its best reading (docs/models.md): ConvNeXt-T's depths (3, 3, 9, 3)
at femto widths (48, 96, 192, 384), the SpheroMoE layer in place of the MLP of blocks 10-18 counted over all 18 (the
last six of stage 3 at 14x14 = 196 tokens, the three of stage 4 at 7x7 = 49 tokens), a token being one position of
the stage's channels-last feature map, the layer before the block's layer scale; experts per stage: tokens // 2
core and twice as many universal (the paper's [98, 24] and [196, 48]). Each choice is a ``create_model`` kwarg.

``MoEConvNeXt`` subclasses timm's ``ConvNeXt`` and swaps only those MLPs, so features, intermediates, grad
checkpointing and the classifier reset of timm's ConvNeXt keep working. The family in one module: the model, what
recycling knows of a ConvNeXt (:class:`ConvNeXtFamily`), the pretrained tag and the entrypoints.
"""
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from timm.models import generate_default_cfgs, register_model
from timm.models.convnext import ConvNeXt, checkpoint_filter_fn

from ..errors import InvalidArgument, InvalidArgumentType
from ..family import Family, register_family
from ..recycling import RecyclingRecipe
from ..settings import integer
from .budget import check_block_count
from .builder import build_moe_model, paper_cfg
from .placement import MoEModelMixin, pop_moe_kwargs, replace_mlps

__all__ = ['MoEConvNeXt', 'ConvNeXtFamily', 'CONVNEXT']


class ConvNeXtFamily(Family):
    """timm's ``ConvNeXt``: blocks ``stages.S.blocks.J``, counted over all stages in forward order (C-JetMoE-F's "MoE
    layers 10:18" are flat indices 9..17), the channels-last MLP fed by ``norm``. The head's norm is part of the
    trunk; only its classifier is new."""
    name = 'convnext'
    title = 'timm ConvNeXt'
    block_pattern = r'^stages\.(\d+)\.blocks\.(\d+)\.'
    mlp_input_norm = 'norm'
    new_head = ('head.fc.',)

    def block_modules(self, model: nn.Module) -> List[nn.Module]:
        return [b for stage in model.stages for b in stage.blocks]

    def timm_filter(self, state_dict: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
        return checkpoint_filter_fn(state_dict, model)

    def fsdp_units(self, model: nn.Module) -> List[str]:
        """Every block, then its stage (which holds the downsample layer)."""
        return [name for i, stage in enumerate(model.stages)
                for name in [f'stages.{i}.blocks.{j}' for j in range(len(stage.blocks))] + [f'stages.{i}']]


CONVNEXT = register_family(ConvNeXtFamily())

PerStage = Union[None, int, Sequence[int]]


def _image_size(value: Union[int, Sequence[int]]) -> Tuple[int, int]:
    """An int (square) or (height, width), as timm's ``img_size``; exports write it back as a pair."""
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return integer(1)('img_size height', value[0]), integer(1)('img_size width', value[1])
    if isinstance(value, (list, tuple)):
        raise InvalidArgument(f'img_size must be an int or (height, width), got {value!r}.')
    side = integer(1)('img_size', value)
    return side, side


def _per_stage(name: str, value: PerStage, num_stages: int) -> Tuple[Optional[int], ...]:
    """None (derived per stage), one int for every stage, or one int per stage."""
    if value is None or (isinstance(value, int) and not isinstance(value, bool)):
        return (None if value is None else integer(0)(name, value),) * num_stages
    if isinstance(value, (list, tuple)) and len(value) == num_stages:
        return tuple(integer(0)(f'{name} entry', v) for v in value)
    raise InvalidArgumentType(f'{name} must be None (derived from the tokens of the stage), an int, or '
                              f'{num_stages} ints (one per stage), got {value!r}.')


class MoEConvNeXt(MoEModelMixin, ConvNeXt):
    """ConvNeXt with SpheroMoE layers (C-JetMoE).

    Takes every ``ConvNeXt`` argument (``conv_mlp`` must stay False: the MoE layer works on the channels-last
    path), plus the MoE placement (``moe_blocks`` counted over all stages, ``moe_drop_path_rate``), the SpheroMoE
    settings under their ``create_model`` names, and the per-stage expert counts below.
    """
    family = CONVNEXT
    no_weight_decay_extra = ('*.gamma',)

    def __init__(
            self,
            depths: Tuple[int, ...] = (3, 3, 9, 3),
            dims: Tuple[int, ...] = (48, 96, 192, 384),
            patch_size: int = 4,
            img_size: Union[int, Tuple[int, int]] = 224,
            num_core_experts: PerStage = None,
            num_univ_experts: PerStage = None,
            **kwargs,
    ) -> None:
        """
        Args:
            depths: Blocks per stage.
            dims: Channels per stage.
            patch_size: Stem patch size (the stride of stage 1's feature map).
            img_size: Input size (int, or (height, width)) the expert counts are scaled for: a stage's tokens are
                the positions of its feature map at this size (the layers accept any size).
            num_core_experts: Core experts per MoE layer: None (the family's rule: tokens of the stage // 2), an int,
                or one per stage.
            num_univ_experts: Universal experts per MoE layer: None (the family's rule: twice the core experts), an
                int, or one per stage.
            **kwargs: MoE placement and layer settings, and ``ConvNeXt`` arguments.
        """
        if kwargs.get('conv_mlp'):
            raise InvalidArgument('MoEConvNeXt needs conv_mlp=False: the SpheroMoE layer replaces the channels-last '
                                  'MLP (the 1x1-conv MLP of conv_mlp=True has no token axis).')
        depths, dims = tuple(depths), tuple(dims)
        for name, values in (('depths', depths), ('dims', dims)):
            for v in values:
                integer(1)(f'{name} entry', v)
        if len(depths) != 4 or len(dims) != 4:
            raise InvalidArgument(f'depths {depths} and dims {dims} must have one entry per stage; timm\'s ConvNeXt '
                                  f'has 4 stages.')
        check_block_count(f'depths {depths}: a total of', sum(depths))
        img_size = _image_size(img_size)
        integer(0)('num_classes', kwargs.get('num_classes', 0))
        cores = _per_stage('num_core_experts', num_core_experts, len(depths))
        univs = _per_stage('num_univ_experts', num_univ_experts, len(depths))
        placement, settings = pop_moe_kwargs(kwargs)
        super().__init__(depths=depths, dims=dims, patch_size=patch_size, **kwargs)
        self.img_size = img_size

        # the expert counts of a stage scale with its tokens: per-block overrides of the shared settings
        stage_of = [s for s, d in enumerate(depths) for _ in range(d)]
        overrides = {}
        for i in placement.blocks(len(stage_of)):
            s = stage_of[i]
            stride = patch_size * 2 ** s
            tokens = max(1, (img_size[0] // stride) * (img_size[1] // stride))
            core, univ = self.family.expert_counts(tokens, cores[s])
            overrides[i] = dict(num_core_experts=core, num_univ_experts=univs[s] if univs[s] is not None else univ)
        layers = placement.layer_factories(len(stage_of), settings, overrides)
        replace_mlps(self, layers, {i: dims[stage_of[i]] for i in layers})
        self.moe_blocks = tuple(layers)


_CFG = dict(pool_size=(7, 7), crop_pct=0.875, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
            first_conv='stem.0', classifier='head.fc')


def _cfg(url: str = '', **kwargs) -> Dict[str, Any]:
    return paper_cfg(url, **dict(_CFG, **kwargs))


_CONVNEXT_TINY_IN22K = 'timm/convnext_tiny.fb_in22k'
# the paper's C-JetMoE-F: ConvNeXt-T in22k is the only donor: the trunk by Weight Selection, the experts cut from
# the MLPs of the same blocks by importance
CONVNEXT.recipes = {'moejet_convnext_femto.recycled_in22k': RecyclingRecipe(trunk_fit='select')}

default_cfgs = generate_default_cfgs({
    'moejet_convnext_femto.recycled_in22k': _cfg(
        hf_hub_id=_CONVNEXT_TINY_IN22K, description='C-JetMoE-F recycled from ConvNeXt-T in22k: trunk by Weight '
                                                    'Selection, experts by importance'),
    'moejet_convnext_femto.untrained': _cfg(),
    'moejet_convnext_test.untrained': _cfg(input_size=(3, 64, 64), pool_size=(2, 2)),
})


def _create_moejet_convnext(variant: str, pretrained: bool = False, **kwargs) -> MoEConvNeXt:
    return build_moe_model(MoEConvNeXt, variant, pretrained, dict(out_indices=(0, 1, 2, 3), flatten_sequential=True),
                           **kwargs)


@register_model
def moejet_convnext_femto(pretrained: bool = False, **kwargs) -> MoEConvNeXt:
    """C-JetMoE-F: ConvNeXt-T depths at femto widths, SpheroMoE in blocks 10-18 (98+196 and 24+48 experts)."""
    model_args = dict(depths=(3, 3, 9, 3), dims=(48, 96, 192, 384))
    return _create_moejet_convnext('moejet_convnext_femto', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def moejet_convnext_test(pretrained: bool = False, **kwargs) -> MoEConvNeXt:
    """Reduced C-JetMoE for tests: depths (1, 1, 2, 2), dims (16, 32, 64, 128), 64 px; MoE in the last 3 blocks."""
    model_args = dict(depths=(1, 1, 2, 2), dims=(16, 32, 64, 128), img_size=64)
    return _create_moejet_convnext('moejet_convnext_test', pretrained=pretrained, **dict(model_args, **kwargs))
