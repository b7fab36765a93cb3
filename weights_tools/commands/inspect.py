""" ``inspect``: parameters (total vs active), counted GMACs and per-layer router diagnostics of a MoE model. """
import argparse
import json
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

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
    '--plot draws a heatmap of expert contribution and a bar chart of core vs universal share; --route-image and '
    '--route-plot draw, for one image, each token\'s core share and top-slot weight over the image.', '''\
example:
  weights-tools inspect ./moejet_tiny --images ./imgs --limit 64 --plot routers.png
  weights-tools inspect ./moejet_tiny --route-image cat.jpg --route-plot cat_routing.png
  weights-tools inspect moejet_vit_tiny --random-images 4     # untrained model, random inputs''', (
        MODEL_SOURCE,
        Group((option('--images', metavar='FOLDER', default=None, help='image folder for the router diagnostics'),
               option('--random-images', type=COUNT_ARG, default=None, metavar='N',
                      help='use N Gaussian-noise images instead of a folder (diagnostics of little meaning)')),
              exclusive=True),
        LIMIT(default=64, help='images used from --images (class-balanced, seeded)'), BATCH_SIZE,
        SEED(help='seed of the image subset / random images / the weights a model is not given'), DEVICE,
        option('--plot', metavar='FILE.png', default=None, help='write the diagnostics figure here'),
        option('--json', metavar='FILE.json', default=None, help='also write all figures as JSON here'),
        option('--route-image', metavar='IMAGE', default=None,
               help='one image whose routing per token is printed (and drawn with --route-plot)'),
        option('--route-plot', metavar='FILE.png', default=None,
               help='draw the core share and top-slot weight of every token of --route-image, per MoE layer'),
        option('--save-routing', metavar='FILE.json', default=None,
               help='write the routing statistics (contribution of every expert) here, for weights-tools prune'),
        OVERWRITE(help='replace existing --plot/--json/--route-plot/--save-routing files'),
    ))


def _check_outputs(args: argparse.Namespace) -> None:
    from timm_moejet.errors import InvalidArgument

    if args.plot is not None and Path(args.plot).suffix.lower() != '.png':
        raise InvalidArgument(f'--plot must name a .png file, got {args.plot}.')
    _check_route(args)
    outputs = ((args.plot, '--plot file'), (args.json, '--json file'), (args.route_plot, '--route-plot file'),
               (args.save_routing, '--save-routing file'))
    for out, what in outputs:
        if out is not None:
            inputs = {'model': args.model, 'checkpoint': args.checkpoint, 'image folder': args.images,
                      'route image': args.route_image}
            check_output_free(out, args.overwrite, what, inputs, folder=False)


def _check_route(args: argparse.Namespace) -> None:
    """--route-plot: a .png (its folder is made, as for every output) of a readable --route-image; matplotlib."""
    from timm_moejet.errors import InvalidArgument
    from timm_moejet.extras import require
    from timm_moejet.image_folder import read_image

    if args.route_plot is not None:
        if args.route_image is None:
            raise InvalidArgument('--route-plot draws the routing of one image: name it with --route-image IMAGE.')
        if Path(args.route_plot).suffix.lower() != '.png':
            raise InvalidArgument(f'--route-plot must name a .png file, got {args.route_plot}.')
        require('matplotlib.figure', 'plot', '--route-plot')
    if args.route_image is not None:
        read_image(args.route_image, decode=False)


def _images(args: argparse.Namespace, model: nn.Module, input_size: tuple, route: Optional[tuple]) -> tuple:
    """The batches the diagnostics run on, and what they are, in words."""
    if route is not None and args.images is None and args.random_images is None:
        return [route[0].unsqueeze(0)], f'the image {args.route_image}'
    if args.images is not None:
        from timm_moejet.image_folder import image_loader

        images, summary = image_loader(args.images, model, args.limit, args.batch_size, args.seed)
        return images, f'{summary["images"]} images of {args.images} ({summary["classes"]} classes)'
    n = args.random_images if args.random_images is not None else 8
    return (_random_batches(n, input_size, args.batch_size, args.seed),
            f'{n} random Gaussian images (pass --images FOLDER for meaningful routing figures)')


def _random_batches(n: int, input_size: tuple, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """``n`` seeded Gaussian images, drawn one batch at a time: memory is bounded by the batch size, not by ``n``."""
    g = torch.Generator().manual_seed(seed)
    for start in range(0, n, batch_size):
        yield torch.randn(min(batch_size, n - start), *input_size, generator=g)


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


def _route_report(args: argparse.Namespace, model: nn.Module, route: tuple) -> None:
    """Print the routing of --route-image per MoE layer, and draw it to --route-plot."""
    from timm_moejet.routing_map import format_routing_maps, plot_routing_maps, routing_maps

    maps = routing_maps(model, route[0])
    print(f'routing of each token of {args.route_image} (positions on the image; prefix: the first prefix token):')
    print(format_routing_maps(maps))
    if args.route_plot is not None:
        plot_routing_maps(maps, route[1], args.route_plot,
                          title=f'{args.model}: routing of {Path(args.route_image).name}')
        print(f'routing plot written to {args.route_plot}')


def run(args: argparse.Namespace) -> int:
    from timm_moejet.build import load_model
    from timm_moejet.checkpoint_io import write_json
    from timm_moejet.cost import count_macs, count_params
    from timm_moejet.diagnostics import active_parameters, moe_layers, plot_diagnostics, router_diagnostics
    from timm_moejet.errors import InvalidArgument
    from timm_moejet.routing_map import read_route_image

    _check_outputs(args)
    device = resolve_device(args.device)
    torch.manual_seed(args.seed)  # an untrained model (or new head) is the same on every run
    model, extra = load_model(args.model, args.checkpoint, args.pretrained, model_kwargs_from(args), ema=args.ema)
    if not moe_layers(model):
        raise InvalidArgument(f'{args.model} ({type(model).__name__}) has no SpheroMoE layer to inspect.')
    model = model.to(device).eval()
    input_size = tuple(model.pretrained_cfg.get('input_size', (3, 224, 224)))
    route = read_route_image(args.route_image, model) if args.route_image is not None else None
    images, source = _images(args, model, input_size, route)
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
    if route is not None:
        _route_report(args, model, route)
    return 0
