""" ``import-official``: an official MoE Jetpack checkpoint + its config -> our timm Hub folder. """
import argparse
import json
import textwrap
from pathlib import Path
from typing import Any, Dict, Optional

from ..common import CommandError, check_output_free, save_hub_folder

EXAMPLE = textwrap.dedent('''\
    example (the official config is the VisionTransformerMoe kwargs of its mmpretrain config, as JSON):
      echo '{"img_size": 224, "patch_size": 16, "embed_dim": 192, "depth": 12, "num_heads": 3,
             "num_classes": 1000, "global_pool": "avg", "moe_layers": [6, 7, 8, 9, 10, 11],
             "core_experts": 98, "univ_experts": 196, "univ_factor": 0.25, "slot_layernorm": true}' > official.json
      python -m weights_tools import-official epoch_300.pth --config official.json --output ./moejet_official''')


def add_parser(subparsers, parent: argparse.ArgumentParser, formatter) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        'import-official', parents=[parent], formatter_class=formatter, epilog=EXAMPLE,
        help='convert an official MoE Jetpack checkpoint to a timm Hub folder',
        description='Convert an official MoE Jetpack checkpoint (VisionTransformerMoe with '
                    'DualPathSoftMoELayerWrapper; .pth/.pt read with weights_only=True, or .safetensors; '
                    'mmpretrain "state_dict"/"model." wrappers and "state_dict.<key>" flattened tensors are '
                    'unwrapped) into model.safetensors + config.json with our key names.')
    p.add_argument('checkpoint', metavar='CHECKPOINT', help='the official checkpoint file')
    p.add_argument('--config', metavar='JSON', default=None,
                   help='the official constructor kwargs: a JSON file or a JSON string (default: the "config" '
                        'metadata entry of a safetensors checkpoint)')
    p.add_argument('--output', '-o', required=True, metavar='FOLDER', help='the folder to write')
    p.add_argument('--overwrite', action='store_true', help='replace an existing output folder')
    return p


def _read_config(arg: Optional[str], checkpoint: Path) -> Dict[str, Any]:
    if arg is None:
        if checkpoint.suffix == '.safetensors':
            from safetensors import SafetensorError, safe_open
            try:
                with safe_open(str(checkpoint), 'pt') as f:
                    meta = f.metadata() or {}
            except (SafetensorError, OSError) as e:
                raise CommandError(f'{checkpoint} is not a readable safetensors file ({e}).') from e
            if 'config' in meta:
                text, source = meta['config'], f'{checkpoint} metadata "config"'
            else:
                raise CommandError(f'{checkpoint} has no "config" metadata; pass the official kwargs with --config.')
        else:
            raise CommandError('--config is required for a .pth/.pt checkpoint (the official VisionTransformerMoe '
                               'kwargs as a JSON file or string).')
    elif Path(arg).is_file():
        text, source = Path(arg).read_text(), arg
    elif arg.lstrip().startswith('{'):
        text, source = arg, '--config'
    else:
        raise CommandError(f'--config {arg!r} is neither an existing JSON file nor a JSON object.')
    try:
        config = json.loads(text)
    except json.JSONDecodeError as e:
        raise CommandError(f'{source} is not valid JSON ({e}).') from e
    if not isinstance(config, dict):
        raise CommandError(f'{source} must hold a JSON object of official kwargs, got {type(config).__name__}.')
    return config


def _flattened(state_dict: Dict[str, Any]) -> Dict[str, Any]:
    """``state_dict.<key>`` tensors (a flattened wrapper, as in reference files) -> ``<key>``."""
    prefix = 'state_dict.'
    if any(k.startswith(prefix) for k in state_dict):
        return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    return state_dict


def run(args: argparse.Namespace) -> int:
    from timm_moejet.checkpoint_io import load_state_dict_file
    from timm_moejet.official import is_official_state_dict, load_official, unwrap_state_dict

    check_output_free(args.output, args.overwrite, 'output folder')
    path = Path(args.checkpoint)
    config = _read_config(args.config, path)
    state_dict = _flattened(load_state_dict_file(path))
    if not is_official_state_dict(unwrap_state_dict(state_dict)):
        raise CommandError(f'{path} holds no official SpheroMoE keys (blocks.N.mlp.phi); it is not an official '
                           f'MoE Jetpack checkpoint (for our own checkpoints use export --checkpoint).')
    model = load_official(state_dict, config).eval()
    extra = {'imported_from': {'checkpoint': path.name, 'official_config': config}}
    out = save_hub_folder(model, args.output, args.overwrite, extra_config=extra)
    n = sum(p.numel() for p in model.parameters())
    print(f'imported {path} ({model.pretrained_cfg["architecture"]}, {n / 1e6:.2f}M parameters, '
          f'MoE blocks {list(model.moe_blocks)}) to {out}/')
    return 0
