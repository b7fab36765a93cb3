""" Import of official MoE Jetpack checkpoints (``VisionTransformerMoe`` with ``DualPathSoftMoELayerWrapper``).

The official state dict uses its own key names; this module maps them and the official constructor kwargs onto
``MoEVisionTransformer``, checking every shape before any weight is written.
"""
import json
import logging
import os
import re
from typing import Any, Dict, Mapping, Optional, Union

import timm
import torch
from safetensors import SafetensorError, safe_open

from ..errors import InvalidArgument, InvalidArgumentType, InvalidCheckpoint
from ..layers import experts_to_be_loaded
from ..moe_keys import MOE_KEYS
from ..settings import boolean, int_sequence, integer, real
from .read import check_state_dict_fits, check_weights_file, read_state_dict, strip_wrappers

__all__ = ['load_official', 'official_config_to_kwargs', 'convert_official_state_dict', 'is_official_state_dict']

_logger = logging.getLogger(__name__)

# official kwarg -> ours (same meaning)
_DIRECT = {
    'img_size': 'img_size',
    'patch_size': 'patch_size',
    'in_chans': 'in_chans',
    'embed_dim': 'embed_dim',
    'depth': 'depth',
    'num_heads': 'num_heads',
    'num_classes': 'num_classes',
    'global_pool': 'global_pool',
    'mlp_ratio': 'mlp_ratio',
    'qkv_bias': 'qkv_bias',
    'class_token': 'class_token',
    'drop_rate': 'drop_rate',
    'pos_drop_rate': 'pos_drop_rate',
    'attn_drop_rate': 'attn_drop_rate',
    'proj_drop_rate': 'proj_drop_rate',
    'drop_path_rate': 'drop_path_rate',
    'slots_per_expert': 'slots_per_expert',
    'core_experts': 'num_core_experts',
    'univ_experts': 'num_univ_experts',
    'slot_layernorm': 'moe_slot_norm',
    'moe_droprate': 'moe_expert_drop',
    'moe_drop_path_rate': 'moe_drop_path_rate',
}
# accepted and handled below, or accepted because they change nothing in the released forward
_HANDLED = {'moe_layers', 'univ_factor', 'compress_ratio', 'add_noise', 'noise_mult', 'if_dualpath'}
_NO_EFFECT = {
    'num_experts',  # ignored by the dual path
    'moe_logits_drop',  # a no-op in the released code
    'use_rot_pos_emb',  # computed but never used in the released code
    'with_cp', 'init_cfg', 'type', 'model_name', 'pretrained', 'weight_init', 'fix_init',
}
# options of the official code this project does not implement: refused when switched on
_UNSUPPORTED = {
    'key_proj', 'query_proj', 'multi_head', 'glu', 'input_as_phi', 'only_phi', 'layer_scale', 'init_values',
    'moe_groups_dict', 'phi_groups_dict', 'freeze_moe', 'no_embed_class', 'reg_tokens', 'dynamic_img_size',
}
# checks of the official values the conversion computes with (the rest are checked by our model's settings)
_CHECKS = {
    'embed_dim': integer(1), 'depth': integer(1), 'num_heads': integer(1), 'mlp_ratio': real(0., min_open=True),
    'compress_ratio': real(0., min_open=True), 'univ_factor': real(0., min_open=True), 'core_experts': integer(0),
    'univ_experts': integer(0), 'moe_layers': int_sequence(0), 'noise_mult': real(0.), 'add_noise': boolean(),
    'if_dualpath': boolean(),
}
# official VisionTransformerMoe defaults (a timm ViT-B/16 copy) where a config leaves a key out
_DEFAULTS = dict(
    img_size=224, patch_size=16, in_chans=3, embed_dim=768, depth=12, num_heads=12, num_classes=1000,
    global_pool='token', mlp_ratio=4.0, qkv_bias=True, class_token=True,
)


def official_config_to_kwargs(config: Mapping[str, Any]) -> Dict[str, Any]:
    """Map official ``VisionTransformerMoe`` kwargs to ``MoEVisionTransformer`` kwargs.

    Args:
        config: The official constructor kwargs.

    Returns:
        Keyword arguments for ``timm.create_model('moejet_vit_*', **kwargs)``.

    Raises:
        InvalidArgument: On unknown keys, unsupported options or a config without ``moe_layers``/``core_experts``.
    """
    if not isinstance(config, Mapping):
        raise InvalidArgumentType(f'config must be a dict of official VisionTransformerMoe kwargs, got '
                                  f'{type(config).__name__}.')
    known = set(_DIRECT) | _HANDLED | _NO_EFFECT | _UNSUPPORTED
    unknown = sorted(set(config) - known)
    if unknown:
        raise InvalidArgument(f'config has keys the official VisionTransformerMoe does not take: {unknown}; '
                              f'known keys: {sorted(known)}.')
    switched_on = sorted(k for k in _UNSUPPORTED if config.get(k))
    if switched_on:
        raise InvalidArgument(f'config enables official options this project does not implement: {switched_on}.')
    if config.get('if_dualpath', True) is False:
        raise InvalidArgument('config has if_dualpath=False: only the dual-path SpheroMoE layer '
                              '(DualPathSoftMoELayerWrapper) can be imported.')
    for key in ('moe_layers', 'core_experts'):
        if key not in config:
            raise InvalidArgument(f'config must give {key!r} (the official default builds a model without experts).')
    config = {k: (_CHECKS[k](k, v) if k in _CHECKS else v) for k, v in config.items()}

    cfg = dict(_DEFAULTS, **config)
    kwargs = {ours: cfg[theirs] for theirs, ours in _DIRECT.items() if theirs in cfg}
    kwargs['moe_blocks'] = tuple(int(i) for i in cfg['moe_layers'])
    core_hidden = int(cfg['embed_dim'] * cfg['mlp_ratio'] * cfg.get('compress_ratio', 1.0))
    kwargs['core_hidden'] = core_hidden
    kwargs['univ_hidden'] = int(round(core_hidden * cfg.get('univ_factor', 0.25)))
    if kwargs['univ_hidden'] < 1:
        raise InvalidArgument(f'univ_factor {cfg.get("univ_factor", 0.25):g} gives universal experts of '
                              f'{core_hidden} x {cfg.get("univ_factor", 0.25):g} < 1 hidden unit; the official '
                              f'univ_factor must give at least one.')
    kwargs.setdefault('num_univ_experts', int(round(cfg['core_experts'] / cfg.get('univ_factor', 0.25))))
    if cfg.get('add_noise', True):
        if 'noise_mult' in cfg:
            kwargs['moe_noise_std'] = float(cfg['noise_mult'])
    else:
        kwargs['moe_noise_std'] = 0.
    kwargs['moe_slot_norm_eps'] = 1e-5  # the official slot LayerNorm is a plain nn.LayerNorm(dim)
    return kwargs


# official expert groups -> ours
_GROUPS = dict(zip(('core', 'univ'), MOE_KEYS.groups))
_MOE_KEY = re.compile(r'^(blocks\.\d+\.mlp)\.(phi|scales\.[01]|slot_norm\.(?:weight|bias)|'
                      r'(core|univ)_experts\.vit_(fc[12])\.(weight|bias))$')


def is_official_state_dict(state_dict: Mapping[str, Any]) -> bool:
    """True if the dict holds official SpheroMoE keys (``blocks.N.mlp.phi``)."""
    return any(k.endswith('.mlp.phi') for k in state_dict)


def convert_official_state_dict(state_dict: Mapping[str, Any]) -> Dict[str, torch.Tensor]:
    """Rename official keys to ours; non-MoE keys pass unchanged.

    Raises:
        InvalidCheckpoint: If a temperature is not positive (it cannot be represented by a positive temperature).
    """
    state_dict = strip_wrappers(state_dict)
    out: Dict[str, torch.Tensor] = {}
    scales: Dict[str, Dict[int, torch.Tensor]] = {}
    for key, value in state_dict.items():
        m = _MOE_KEY.match(key)
        if m is None:
            out[key] = value
            continue
        prefix, name = m.group(1), m.group(2)
        if name == 'phi':
            out[f'{prefix}.{MOE_KEYS.slot_queries}'] = value.reshape(-1, value.shape[-1])
        elif name.startswith('scales'):
            scales.setdefault(prefix, {})[int(name[-1])] = value
        elif name.startswith('slot_norm'):
            out[f'{prefix}.{MOE_KEYS.slot_norm}.{name.split(".")[-1]}'] = value
        else:
            out[f'{prefix}.{_GROUPS[m.group(3)]}.{m.group(4)}.{m.group(5)}'] = value
    for prefix, pair in scales.items():
        if set(pair) != {0, 1}:
            raise InvalidCheckpoint(f'{prefix}.scales needs both entries 0 (dispatch) and 1 (combine), got '
                                    f'{sorted(pair)}.')
        temps = torch.stack([pair[0].reshape(()), pair[1].reshape(())]).float()
        if not bool((temps > 0).all()):
            raise InvalidCheckpoint(f'{prefix}.scales holds a non-positive temperature {temps.tolist()}; '
                                    f'this project keeps temperatures positive and cannot represent it.')
        out[f'{prefix}.{MOE_KEYS.temperature}'] = torch.log(temps).to(pair[0].dtype)
    return out


# the ViT geometry (img_size, patch_size, embed_dim, depth, num_heads) of the paper's sizes -> their registered name
_SIZES = {
    (224, 16, 192, 12, 3): 'moejet_vit_tiny_patch16_224',
    (224, 16, 384, 12, 6): 'moejet_vit_small_patch16_224',
    (224, 16, 768, 12, 12): 'moejet_vit_base_patch16_224',
}


def _architecture_for(kwargs: Mapping[str, Any]) -> str:
    """The registered name of the imported model: a paper size (V-JetMoE-T/S/B) when the ViT geometry is one, else
    ``moejet_vit``, whose kwargs (written to config.json as model_args) give all of its architecture."""
    size = kwargs.get('img_size')
    size = size if isinstance(size, int) else tuple(size) if size is not None else None
    geometry = (224 if size in (224, (224, 224)) else size, *(kwargs.get(k) for k in
                                                              ('patch_size', 'embed_dim', 'depth', 'num_heads')))
    return _SIZES.get(geometry, 'moejet_vit')


def _config_from_metadata(path: Union[str, os.PathLike]) -> Dict[str, Any]:
    """The official kwargs stored as JSON under the ``config`` metadata entry of a safetensors checkpoint."""
    try:
        with safe_open(os.fspath(path), 'pt') as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise InvalidCheckpoint(f'{path} is not a readable safetensors file ({e}).') from e
    if 'config' not in meta:
        raise InvalidArgument(f'{path} has no "config" metadata; pass the official VisionTransformerMoe kwargs.')
    try:
        config = json.loads(meta['config'])
    except json.JSONDecodeError as e:
        raise InvalidCheckpoint(f'{path}: the "config" metadata is not valid JSON ({e}).') from e
    if not isinstance(config, dict):
        raise InvalidCheckpoint(f'{path}: the "config" metadata is not a JSON object of kwargs.')
    return config


def load_official(
        checkpoint: Union[str, os.PathLike, Mapping[str, Any]],
        config: Optional[Mapping[str, Any]] = None,
) -> torch.nn.Module:
    """Build our model from an official MoE Jetpack checkpoint and its constructor config.

    Args:
        checkpoint: An official state dict (official key names; mmpretrain ``state_dict``/``model.`` wrappers and
            flattened ``state_dict.<key>`` tensors are unwrapped), or a path to one (``.pth``/``.pt`` read with
            ``weights_only=True``, or ``.safetensors``).
        config: The official ``VisionTransformerMoe`` constructor kwargs (None: the ``config`` metadata entry of a
            safetensors checkpoint).

    Returns:
        A ``MoEVisionTransformer`` (in train mode, as ``timm.create_model`` returns) holding those weights.

    Raises:
        NotFound: If there is no file at ``checkpoint``.
        InvalidArgument: If the config is missing or not supported.
        InvalidCheckpoint: If the checkpoint is not an official one or does not fit the config (naming keys and
            shapes).
    """
    source = 'the given state dict'
    if isinstance(checkpoint, (str, os.PathLike)):
        source = os.fspath(checkpoint)
        check_weights_file(source)  # a missing or damaged file is named before the config is asked for
        if config is None:
            if not source.endswith('.safetensors'):
                raise InvalidArgument(f'{source}: the official VisionTransformerMoe kwargs are needed for a .pth/.pt '
                                      f'checkpoint (a JSON object of them).')
            config = _config_from_metadata(source)
        checkpoint = read_state_dict(checkpoint)
    if not isinstance(checkpoint, Mapping):
        raise InvalidArgumentType(f'checkpoint must be a state dict or a file path, got {type(checkpoint).__name__}.')
    checkpoint = strip_wrappers(checkpoint)
    if not is_official_state_dict(checkpoint):
        raise InvalidCheckpoint(f'{source} holds no official SpheroMoE keys (blocks.N.mlp.phi); it is not an official '
                                f'MoE Jetpack checkpoint (our own checkpoints load with timm.create_model).')
    if config is None:
        raise InvalidArgument('load_official needs the official VisionTransformerMoe kwargs (config).')
    kwargs = official_config_to_kwargs(config)
    state_dict = convert_official_state_dict(checkpoint)
    # the config's architecture against the tensors' shapes on the meta device first: a 3 KB file declaring a
    # 24-block, 8192-wide model is refused without allocating it
    check_state_dict_fits(state_dict, timm.create_model(_architecture_for(kwargs), pretrained=False, device='meta',
                                                        **kwargs), source)
    with experts_to_be_loaded():  # the checkpoint fills every expert (checked below, then loaded strictly)
        model = timm.create_model(_architecture_for(kwargs), pretrained=False, **kwargs)
    check_state_dict_fits(state_dict, model, source)
    model.load_state_dict(state_dict, strict=True)
    # imported_from is not a timm cfg field: an export writes it at the top level of config.json
    model.pretrained_cfg = dict(model.pretrained_cfg, tag='official', notes='imported from an official checkpoint',
                                imported_from=dict(checkpoint=os.path.basename(source), official_config=dict(config)))
    _logger.info('Loaded official checkpoint %s into %s', source, type(model).__name__)
    return model
