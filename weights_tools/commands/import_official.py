""" ``import-official``: an official MoE Jetpack checkpoint + its config -> our timm Hub folder. """
import argparse
import json
from pathlib import Path
from typing import Any, Dict, Optional

from ..options import Command, check_output_free, folder_output, option

COMMAND = Command(
    'import-official', 'convert an official MoE Jetpack checkpoint to a timm Hub folder',
    'Convert an official MoE Jetpack checkpoint (VisionTransformerMoe with DualPathSoftMoELayerWrapper; .pth/.pt '
    'read with weights_only=True, or .safetensors; mmpretrain "state_dict"/"model." wrappers and "state_dict.<key>" '
    'flattened tensors are unwrapped) into model.safetensors + config.json with our key names.', '''\
example (the official config is the VisionTransformerMoe kwargs of its mmpretrain config, as JSON):
  echo '{"img_size": 224, "patch_size": 16, "embed_dim": 192, "depth": 12, "num_heads": 3,
         "num_classes": 1000, "global_pool": "avg", "moe_layers": [6, 7, 8, 9, 10, 11],
         "core_experts": 98, "univ_experts": 196, "univ_factor": 0.25, "slot_layernorm": true}' > official.json
  weights-tools import-official epoch_300.pth --config official.json --output ./moejet_official''', (
        option('checkpoint', metavar='CHECKPOINT', help='the official checkpoint file'),
        option('--config', metavar='JSON', default=None,
               help='the official constructor kwargs: a JSON file or a JSON string (default: the "config" metadata '
                    'entry of a safetensors checkpoint)'),
        folder_output('the folder to write'),
    ))


def _parse_config(arg: Optional[str]) -> Optional[Dict[str, Any]]:
    """--config as a JSON file or a JSON string."""
    from timm_moejet.errors import InvalidArgument

    if arg is None:
        return None
    if Path(arg).is_file():
        text, source = Path(arg).read_text(), arg
    elif arg.lstrip().startswith('{'):
        text, source = arg, '--config'
    else:
        raise InvalidArgument(f'--config {arg!r} is neither an existing JSON file nor a JSON object.')
    try:
        config = json.loads(text)
    except json.JSONDecodeError as e:
        raise InvalidArgument(f'{source} is not valid JSON ({e}).') from e
    if not isinstance(config, dict):
        raise InvalidArgument(f'{source} must hold a JSON object of official kwargs, got {type(config).__name__}.')
    return config


def run(args: argparse.Namespace) -> int:
    from timm_moejet.checkpoint_io.hub import save_hub_folder
    from timm_moejet.checkpoint_io.official import load_official
    from timm_moejet.cost import count_params

    check_output_free(args.output, args.overwrite, 'output folder',
                      {'checkpoint': args.checkpoint, 'config': args.config}, folder=True)
    config = _parse_config(args.config)
    model = load_official(args.checkpoint, config).eval()
    out = save_hub_folder(model, args.output, args.overwrite)
    n = count_params(model)['total']
    print(f'imported {args.checkpoint} ({model.pretrained_cfg["architecture"]}, {n / 1e6:.2f}M parameters, '
          f'MoE blocks {list(model.moe_blocks)}) to {out}/')
    return 0
