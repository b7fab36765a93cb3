""" M-JetMoE, the MLP-Mixer family: timm's MLP-Mixer with SpheroMoE layers in place of chosen channel MLPs.

`MoE Jetpack: From Dense Checkpoints to Adaptive Mixture of Experts for Vision Tasks`
    - https://arxiv.org/abs/2406.04801
`MLP-Mixer: An all-MLP Architecture for Vision`
    - https://arxiv.org/abs/2105.01601

Not in the paper: a third family that shows what a family module is. A Mixer block has two MLPs: the token-mixing
MLP over the patches (``mlp_tokens``) and the channel MLP (``mlp_channels``, fed by ``norm2``), the counterpart of a
ViT block's MLP. The SpheroMoE layer replaces the channel MLP of the blocks in ``moe_blocks`` (the second half by
default); the token MLPs stay dense and come from the trunk donor. A token is one patch (there is no class token):
196 at 224 px with 16 px patches, so the paper's rule gives 98 core and 196 universal experts. The released recipe
is the ViT-B/L one: the trunk from Mixer-B/16 in21k, each expert a sub-block of Mixer-L/16 in21k's channel MLP of the
evenly spaced block.

``MoEMlpMixer`` subclasses timm's ``MlpMixer`` and swaps only those MLPs, so features, intermediates, grad
checkpointing, torchscript and fx keep working. The family in one module: the model, what recycling knows of a
Mixer (:class:`MixerFamily`), the pretrained tags and the entrypoints.
"""
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from timm.layers import to_2tuple
from timm.models import generate_default_cfgs, register_model
from timm.models.mlp_mixer import MixerBlock, MlpMixer, checkpoint_filter_fn

from ..errors import InvalidArgument
from ..family import Family, register_family
from ..recycling import RecyclingRecipe
from ..settings import integer, optional
from .budget import check_block_count
from .builder import build_moe_model, paper_cfg
from .placement import MoEModelMixin, pop_moe_kwargs, replace_mlps

__all__ = ['MoEMlpMixer', 'MixerFamily', 'MIXER']


class MixerFamily(Family):
    """timm's ``MlpMixer`` of ``MixerBlock``s: blocks ``blocks.N``, the channel MLP ``mlp_channels`` fed by
    ``norm2``; the final norm is part of the trunk, only the classifier is new."""
    name = 'mixer'
    title = 'timm MLP-Mixer'
    block_pattern = r'^blocks\.(\d+)\.'
    mlp = 'mlp_channels'
    mlp_input_norm = 'norm2'
    new_head = ('head.',)

    def block_modules(self, model: nn.Module) -> List[nn.Module]:
        return list(model.blocks)

    def timm_filter(self, state_dict: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
        return checkpoint_filter_fn(state_dict, model)


MIXER = register_family(MixerFamily())


def _tokens(img_size: Union[int, Sequence[int]], patch_size: Union[int, Sequence[int]]) -> int:
    """Patches of an image: the tokens every block mixes."""
    size = [integer(1)('img_size', v) for v in to_2tuple(img_size)]
    patch = [integer(1)('patch_size', v) for v in to_2tuple(patch_size)]
    if any(s < p for s, p in zip(size, patch)):
        raise InvalidArgument(f'img_size {img_size} is smaller than the patch size {patch_size}: the image would '
                              f'hold no patch.')
    return (size[0] // patch[0]) * (size[1] // patch[1])


class MoEMlpMixer(MoEModelMixin, MlpMixer):
    """MLP-Mixer with SpheroMoE layers in place of the channel MLPs of ``moe_blocks`` (M-JetMoE).

    Takes every ``MlpMixer`` argument (its blocks stay timm's ``MixerBlock``), plus the MoE placement
    (``moe_blocks``, ``moe_drop_path_rate``) and the SpheroMoE settings under their ``create_model`` names.
    """
    family = MIXER

    def __init__(
            self,
            num_blocks: int = 8,
            embed_dim: int = 512,
            img_size: Union[int, Tuple[int, int]] = 224,
            patch_size: int = 16,
            num_core_experts: Optional[int] = None,
            num_univ_experts: Optional[int] = None,
            **kwargs: Any,
    ) -> None:
        """
        Args:
            num_blocks: Number of blocks.
            embed_dim: Channels.
            img_size: Input size; its patches are the tokens the expert counts scale with.
            patch_size: Patch size.
            num_core_experts: Core experts per MoE layer (None: the family's rule, half the tokens).
            num_univ_experts: Universal experts per MoE layer (None: the family's rule, twice the core experts).
            **kwargs: MoE placement and layer settings, and ``MlpMixer`` arguments.
        """
        integer(1)('embed_dim', embed_dim)
        check_block_count('num_blocks', num_blocks)
        integer(0)('num_classes', kwargs.get('num_classes', 0))
        if kwargs.get('block_layer', MixerBlock) is not MixerBlock:
            raise InvalidArgument('MoEMlpMixer builds timm\'s MixerBlock; block_layer (ResMLP, gMLP blocks) cannot '
                                  'be set.')
        core = optional(integer(0))('num_core_experts', num_core_experts)
        core, univ = self.family.expert_counts(_tokens(img_size, patch_size), core)
        kwargs.update(num_core_experts=core, num_univ_experts=univ if num_univ_experts is None else num_univ_experts)
        placement, settings = pop_moe_kwargs(kwargs)
        super().__init__(num_blocks=num_blocks, embed_dim=embed_dim, img_size=img_size, patch_size=patch_size,
                         **kwargs)
        layers = placement.layer_factories(num_blocks, settings)
        replace_mlps(self, layers, {i: embed_dim for i in layers})
        self.moe_blocks = tuple(layers)


_CFG = dict(pool_size=None, crop_pct=0.875, fixed_input_size=True, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
            first_conv='stem.proj', classifier='head')


def _cfg(url: str = '', **kwargs) -> Dict[str, Any]:
    return paper_cfg(url, **dict(_CFG, **kwargs))


_MIXER_B16_IN21K = 'timm/mixer_b16_224.goog_in21k'
_MIXER_L16_IN21K = 'timm/mixer_l16_224.goog_in21k'
# as for V-JetMoE-B: experts from the next size's channel MLPs (24 blocks: evenly spaced, width 1024 cut to 768)
_RECYCLING_TAGS = (
    ('recycled_in21k', _MIXER_B16_IN21K, RecyclingRecipe(experts=_MIXER_L16_IN21K)),
    ('upcycled_in21k', _MIXER_B16_IN21K, RecyclingRecipe(strategy='upcycle')),
)
MIXER.recipes = {f'moejet_mixer_b16_224.{tag}': recipe for tag, _, recipe in _RECYCLING_TAGS}

default_cfgs = generate_default_cfgs({
    **{f'moejet_mixer_b16_224.{tag}': _cfg(hf_hub_id=trunk, description=recipe.describe())
       for tag, trunk, recipe in _RECYCLING_TAGS},
    'moejet_mixer_b16_224.untrained': _cfg(),
    'moejet_mixer_test.untrained': _cfg(input_size=(3, 64, 64)),
})


def _create_moejet_mixer(variant: str, pretrained: bool = False, **kwargs) -> MoEMlpMixer:
    out_indices = kwargs.pop('out_indices', 3)
    return build_moe_model(MoEMlpMixer, variant, pretrained, dict(out_indices=out_indices, feature_cls='getter'),
                           **kwargs)


@register_model
def moejet_mixer_b16_224(pretrained: bool = False, **kwargs) -> MoEMlpMixer:
    """M-JetMoE-B/16: Mixer-B/16 with SpheroMoE (98 core + 196 universal experts) in blocks 6..11."""
    model_args = dict(patch_size=16, num_blocks=12, embed_dim=768)
    return _create_moejet_mixer('moejet_mixer_b16_224', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def moejet_mixer_test(pretrained: bool = False, **kwargs) -> MoEMlpMixer:
    """Reduced M-JetMoE for tests: width 64, 4 blocks, 64 px (16 tokens: 8 core + 16 universal experts in blocks 2,
    3)."""
    model_args = dict(patch_size=16, num_blocks=4, embed_dim=64, img_size=64)
    return _create_moejet_mixer('moejet_mixer_test', pretrained=pretrained, **dict(model_args, **kwargs))
