""" ``inspect``: parameters (total vs active), counted GMACs and per-layer router diagnostics of a MoE model. """
import argparse
import json
from pathlib import Path
from typing import Any, Dict, List

import torch
import torch.nn as nn

from ..options import (
    BATCH_SIZE,
    COUNT_ARG,
    DEVICE,
    LIMIT,
    MODEL_SOURCE,
    OVERWRITE,
    SEED,
    Command,
    Group,
    check_output_free,
    model_kwargs_from,
    option,
    resolve_device,
)

COMMAND = Command(
    'inspect', 'parameters, GMACs and router diagnostics of a MoE model',
    'Print total vs active parameters, GMACs per image counted op by op (routing matmuls included), and per MoE '
    'layer: dispatch entropy, combine sparsity/support, core vs universal share of the output mass and the expert '
    'contribution of MoE Jetpack\'s Table 8 (definitions in timm_moejet/diagnostics.py and docs/command_line.md). '
    '--plot draws a heatmap of expert contribution and a bar chart of core vs universal share.', '''\
example:
  weights-tools inspect ./moejet_tiny --images ./imgs --limit 64 --plot routers.png
  weights-tools inspect moejet_vit_tiny --random-images 4     # untrained model, random inputs''', (
        MODEL_SOURCE,
        Group((option('--images', metavar='FOLDER', default=None, help='image folder for the router diagnostics'),
               option('--random-images', type=COUNT_ARG, default=None, metavar='N',
                      help='use N Gaussian-noise images instead of a folder (diagnostics of little meaning)')),
              exclusive=True),
        LIMIT(default=64, help='images used from --images (class-balanced, seeded)'), BATCH_SIZE,
        SEED(help='seed of the image subset / random images'), DEVICE,
        option('--plot', metavar='FILE.png', default=None, help='write the diagnostics figure here'),
        option('--json', metavar='FILE.json', default=None, help='also write all figures as JSON here'),
        option('--save-routing', metavar='FILE.json', default=None,
               help='write the routing statistics (contribution of every expert) here, for weights-tools prune'),
        OVERWRITE(help='replace existing --plot/--json/--save-routing files'),
    ))


def _check_outputs(args: argparse.Namespace) -> None:
    from timm_moejet.errors import InvalidArgument

    if args.plot is not None and Path(args.plot).suffix.lower() != '.png':
        raise InvalidArgument(f'--plot must name a .png file, got {args.plot}.')
    outputs = ((args.plot, '--plot file'), (args.json, '--json file'), (args.save_routing, '--save-routing file'))
    for out, what in outputs:
        if out is not None:
            check_output_free(out, args.overwrite, what, {'model': args.model, 'checkpoint': args.checkpoint,
                                                          'image folder': args.images})


def _images(args: argparse.Namespace, model: nn.Module, input_size: tuple) -> tuple:
    """The batches the diagnostics run on, and what they are, in words."""
    if args.images is not None:
        from timm_moejet.image_folder import image_loader

        images, summary = image_loader(args.images, model, args.limit, args.batch_size, args.seed)
        return images, f'{summary["images"]} images of {args.images} ({summary["classes"]} classes)'
    n = args.random_images if args.random_images is not None else 8
    g = torch.Generator().manual_seed(args.seed)
    return (list(torch.randn(n, *input_size, generator=g).split(args.batch_size)),
            f'{n} random Gaussian images (pass --images FOLDER for meaningful routing figures)')


def _report(model: nn.Module, figures: Dict[str, Any], diags: List[Any], record: Any) -> None:
    from timm_moejet.diagnostics import format_diagnostics

    params, active, macs = figures['params'], figures['active_params'], figures['macs']
    print(f'model: {figures["model"]} ({type(model).__name__}, input {figures["input_size"]}, MoE blocks '
          f'{[d.block for d in diags]})')
    print(f'parameters: total {params["total"] / 1e6:.3f}M = dense {params["dense"] / 1e6:.3f}M + experts '
          f'{params["experts"] / 1e6:.3f}M + router {params["router"] / 1e6:.4f}M')
    print(f'active parameters: per image {active["per_image"] / 1e6:.3f}M (soft routing: every expert sees its '
          f'slots), per token {active["per_token"] / 1e6:.3f}M (experts with non-zero combine weight, mean)')
    print(f'GMACs per image: {macs["gmacs"]:.4f} (counted by torch FlopCounterMode, routing and attention '
          f'matmuls included)')
    print(f'router diagnostics on {figures["images"]}:')
    print(format_diagnostics(diags))
    if record:
        print(f'recycling record: {json.dumps(record, sort_keys=True, default=str)}')


def run(args: argparse.Namespace) -> int:
    from timm_moejet.build import load_model
    from timm_moejet.checkpoint_io import write_json
    from timm_moejet.cost import count_macs, count_params
    from timm_moejet.diagnostics import active_parameters, moe_layers, plot_diagnostics, router_diagnostics
    from timm_moejet.errors import InvalidArgument

    _check_outputs(args)
    device = resolve_device(args.device)
    model, extra = load_model(args.model, args.checkpoint, args.pretrained, model_kwargs_from(args), ema=args.ema)
    if not moe_layers(model):
        raise InvalidArgument(f'{args.model} ({type(model).__name__}) has no SpheroMoE layer to inspect.')
    model = model.to(device).eval()
    input_size = tuple(model.pretrained_cfg.get('input_size', (3, 224, 224)))
    images, source = _images(args, model, input_size)
    diags = router_diagnostics(model, images, device=device)
    figures = dict(model=args.model, input_size=input_size, params=count_params(model),
                   active_params=active_parameters(model, diags), macs=count_macs(model, input_size, device=device),
                   images=source)
    _report(model, figures, diags, (model.pretrained_cfg or {}).get('recycling') or extra.get('recycling'))
    if args.plot is not None:
        plot_diagnostics(diags, args.plot, title=f'{args.model}: router diagnostics')
        print(f'plot written to {args.plot}')
    if args.json is not None:
        write_json(dict(figures, layers=[dict(d.as_dict(), expert_share=d.expert_share) for d in diags]), args.json)
        print(f'figures written to {args.json}')
    if args.save_routing is not None:
        from timm_moejet.pruning import routing_from_diagnostics

        routing_from_diagnostics(model, diags, args.model, source, seed=args.seed).save(args.save_routing)
        print(f'routing statistics written to {args.save_routing}')
    return 0
