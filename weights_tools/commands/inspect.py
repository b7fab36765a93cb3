""" ``inspect``: parameters (total vs active), counted GMACs and per-layer router diagnostics of a MoE model. """
import argparse
import json
import math
import textwrap
from pathlib import Path

import torch

from ._args import COUNT_ARG, SEED_ARG, add_model_args, check_output_free, model_kwargs_from, resolve_device

EXAMPLE = textwrap.dedent('''\
    example:
      weights-tools inspect ./moejet_tiny --images ./imgs --limit 64 --plot routers.png
      weights-tools inspect moejet_vit_tiny --random-images 4     # untrained model, random inputs''')


def add_parser(subparsers, parent: argparse.ArgumentParser, formatter) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        'inspect', parents=[parent], formatter_class=formatter, epilog=EXAMPLE,
        help='parameters, GMACs and router diagnostics of a MoE model',
        description='Print total vs active parameters, GMACs per image counted op by op (routing matmuls '
                    'included), and per MoE layer: dispatch entropy, combine sparsity/support, core vs universal '
                    'share of the output mass and the expert contribution of MoE Jetpack\'s Table 8 (definitions '
                    'in timm_moejet/diagnostics.py and docs/command_line.md). --plot draws a heatmap of expert '
                    'contribution and a bar chart of core vs universal share.')
    add_model_args(p, what='MoE model')
    src = p.add_mutually_exclusive_group()
    src.add_argument('--images', metavar='FOLDER', default=None, help='image folder for the router diagnostics')
    src.add_argument('--random-images', type=COUNT_ARG, default=None, metavar='N',
                     help='use N Gaussian-noise images instead of a folder (diagnostics of little meaning)')
    p.add_argument('--limit', type=COUNT_ARG, default=64, help='images used from --images (class-balanced, seeded)')
    p.add_argument('--batch-size', type=COUNT_ARG, default=32, help='images per forward')
    p.add_argument('--seed', type=SEED_ARG, default=0, help='seed of the image subset / random images')
    p.add_argument('--device', default='cpu', help='torch device')
    p.add_argument('--plot', metavar='FILE.png', default=None, help='write the diagnostics figure here')
    p.add_argument('--json', metavar='FILE.json', default=None, help='also write all figures as JSON here')
    p.add_argument('--overwrite', action='store_true', help='replace existing --plot/--json files')
    return p


def _jsonable(value):
    return value.tolist() if isinstance(value, torch.Tensor) else str(value)


def _undefined_as_null(value):
    """NaN and infinities (a figure undefined for this model, e.g. the core/universal share of a single-path layer)
    as JSON null: a bare NaN is not JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _undefined_as_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_undefined_as_null(v) for v in value]
    return value


def run(args: argparse.Namespace) -> int:
    from timm_moejet.build import load_model
    from timm_moejet.checkpoint_io import atomic_write_bytes
    from timm_moejet.cost import count_macs, count_params
    from timm_moejet.diagnostics import (
        active_parameters,
        format_diagnostics,
        moe_layers,
        plot_diagnostics,
        router_diagnostics,
    )
    from timm_moejet.errors import InvalidArgument

    if args.plot is not None and Path(args.plot).suffix.lower() != '.png':
        raise InvalidArgument(f'--plot must name a .png file, got {args.plot}.')
    for out, what in ((args.plot, '--plot file'), (args.json, '--json file')):
        if out is not None:
            check_output_free(out, args.overwrite, what, {'model': args.model, 'checkpoint': args.checkpoint,
                                                          'image folder': args.images})
    device = resolve_device(args.device)
    model, extra = load_model(args.model, args.checkpoint, args.pretrained, model_kwargs_from(args), ema=args.ema)
    if not moe_layers(model):
        raise InvalidArgument(f'{args.model} ({type(model).__name__}) has no SpheroMoE layer to inspect.')
    model = model.to(device).eval()
    input_size = tuple(model.pretrained_cfg.get('input_size', (3, 224, 224)))

    if args.images is not None:
        from timm_moejet.image_folder import image_loader
        images, summary = image_loader(args.images, model, args.limit, args.batch_size, args.seed)
        source = f'{summary["images"]} images of {args.images} ({summary["classes"]} classes)'
    else:
        n = args.random_images if args.random_images is not None else 8
        g = torch.Generator().manual_seed(args.seed)
        images = list(torch.randn(n, *input_size, generator=g).split(args.batch_size))
        source = f'{n} random Gaussian images (pass --images FOLDER for meaningful routing figures)'

    params = count_params(model)
    macs = count_macs(model, input_size, device=device)
    diags = router_diagnostics(model, images, device=device)
    active = active_parameters(model, diags)

    print(f'model: {args.model} ({type(model).__name__}, input {input_size}, MoE blocks '
          f'{[d.block for d in diags]})')
    print(f'parameters: total {params["total"] / 1e6:.3f}M = dense {params["dense"] / 1e6:.3f}M + experts '
          f'{params["experts"] / 1e6:.3f}M + router {params["router"] / 1e6:.4f}M')
    print(f'active parameters: per image {active["per_image"] / 1e6:.3f}M (soft routing: every expert sees its '
          f'slots), per token {active["per_token"] / 1e6:.3f}M (experts with non-zero combine weight, mean)')
    print(f'GMACs per image: {macs["gmacs"]:.4f} (counted by torch FlopCounterMode, routing and attention '
          f'matmuls included)')
    print(f'router diagnostics on {source}:')
    print(format_diagnostics(diags))
    record = (model.pretrained_cfg or {}).get('recycling') or extra.get('recycling')
    if record:
        print(f'recycling record: {json.dumps(record, sort_keys=True, default=str)}')

    if args.plot is not None:
        plot_diagnostics(diags, args.plot, title=f'{args.model}: router diagnostics')
        print(f'plot written to {args.plot}')
    if args.json is not None:
        record = dict(model=args.model, input_size=input_size, params=params, active_params=active, macs=macs,
                      images=source, layers=[dict(d.as_dict(), expert_share=d.expert_share) for d in diags])
        record = _undefined_as_null(json.loads(json.dumps(record, default=_jsonable)))
        atomic_write_bytes(json.dumps(record, indent=2, allow_nan=False).encode(), args.json, overwrite=True)
        print(f'figures written to {args.json}')
    return 0
