""" ``prune``: a smaller MoE model that keeps, in every MoE layer, the experts its routing uses most. """
import argparse

from ..options import (
    BATCH_SIZE,
    DEVICE,
    LIMIT,
    MODEL_SOURCE,
    SEED,
    Command,
    Group,
    check_output_free,
    folder_output,
    model_kwargs_from,
    option,
    resolve_device,
)

COMMAND = Command(
    'prune', 'drop the experts a MoE model\'s routing uses least',
    'Measure the contribution of every expert over --images (or read statistics written by inspect '
    '--save-routing), keep in every MoE layer the experts of highest contribution (the same fraction or count in '
    'the core and the universal group, rounded up, at least one per group; CORE,UNIV for per-group values) and '
    'write the smaller model as a timm Hub folder. Its config.json holds the per-layer expert counts '
    '(moe_experts_per_layer) and, in pretrained_cfg.pruning, what was kept and from which statistics.', '''\
example:
  weights-tools prune ./moejet_tiny --images ./imgs --limit 256 --keep-fraction 0.5 --output ./moejet_tiny_half
  weights-tools inspect ./moejet_tiny --images ./imgs --save-routing routing.json
  weights-tools prune ./moejet_tiny --routing routing.json --keep-count 32,64 --output ./moejet_tiny_small
  python -c "import timm, timm_moejet; timm.create_model('local-dir:./moejet_tiny_half', pretrained=True)"''', (
        MODEL_SOURCE,
        Group((option('--images', metavar='FOLDER', default=None, help='image folder to measure the routing on'),
               option('--routing', metavar='FILE.json', default=None,
                      help='routing statistics of this model (weights-tools inspect --save-routing)')),
              exclusive=True),
        Group((option('--keep-fraction', metavar='F[,F]', default=None,
                      help='fraction in (0, 1] of the experts each group keeps (rounded up), or CORE,UNIV'),
               option('--keep-count', metavar='N[,N]', default=None,
                      help='experts each group keeps (at most what it has), or CORE,UNIV')), exclusive=True),
        LIMIT(default=256, help='images used from --images (class-balanced, seeded)'), BATCH_SIZE,
        SEED(help='seed of the image subset (recorded with the pruning)'), DEVICE,
        folder_output('the Hub folder to write'),
    ))


def _numbers(text: str, kind: type, option_name: str) -> list:
    from timm_moejet.errors import InvalidArgument

    try:
        return [kind(part) for part in text.split(',')]
    except ValueError:
        raise InvalidArgument(f'{option_name} takes one {kind.__name__} or two (CORE,UNIV), got {text!r}.') from None


def keep_from(args: argparse.Namespace):
    """The ``keep`` of ``prune_experts`` from --keep-fraction / --keep-count, checked."""
    from timm_moejet.errors import InvalidArgument
    from timm_moejet.pruning import parse_keep

    if args.keep_fraction is None and args.keep_count is None:
        raise InvalidArgument('say how many experts to keep: --keep-fraction F (e.g. 0.5) or --keep-count N.')
    text, kind, name = ((args.keep_fraction, float, '--keep-fraction') if args.keep_fraction is not None
                        else (args.keep_count, int, '--keep-count'))
    values = _numbers(text, kind, name)
    if len(values) > 2:
        raise InvalidArgument(f'{name} takes one value or two (CORE,UNIV), got {text!r}.')
    keep = values[0] if len(values) == 1 else tuple(values)
    try:
        parse_keep(keep)
    except InvalidArgument as e:
        raise InvalidArgument(f'{name} {text}: {e}') from None
    return keep


def run(args: argparse.Namespace) -> int:
    from timm_moejet.build import load_model
    from timm_moejet.checkpoint_io.hub import save_hub_folder
    from timm_moejet.cost import count_params
    from timm_moejet.diagnostics import moe_layers
    from timm_moejet.errors import InvalidArgument
    from timm_moejet.pruning import load_routing, measure_routing, prune_experts

    keep = keep_from(args)
    if args.images is None and args.routing is None:
        raise InvalidArgument('prune needs the routing: --images FOLDER to measure it, or --routing FILE.json.')
    check_output_free(args.output, args.overwrite, 'output folder',
                      {'model': args.model, 'checkpoint': args.checkpoint, 'image folder': args.images,
                       'routing statistics': args.routing}, folder=True)
    routing = load_routing(args.routing) if args.routing is not None else None
    device = resolve_device(args.device)
    model, extra = load_model(args.model, args.checkpoint, args.pretrained, model_kwargs_from(args), ema=args.ema)
    if not moe_layers(model):
        raise InvalidArgument(f'{args.model} ({type(model).__name__}) has no SpheroMoE layer: only a MoE model has '
                              f'experts to prune.')
    model = model.to(device).eval()
    if routing is None:
        from timm_moejet.image_folder import image_loader

        images, summary = image_loader(args.images, model, args.limit, args.batch_size, args.seed)
        routing = measure_routing(model, images, name=args.model, seed=args.seed,
                                  images_described=f'{summary["images"]} images of {args.images}')
    pruned = prune_experts(model, routing, keep, name=args.model)
    out = save_hub_folder(pruned, args.output, args.overwrite, extra_config=extra)
    before, after = count_params(model)['total'], count_params(pruned)['total']
    kept = ', '.join(f'{len(layer["kept_core"])}+{len(layer["kept_univ"])}'
                     for layer in pruned.pretrained_cfg['pruning']['layers'])
    print(f'pruned {args.model}: experts per MoE layer (core+universal) {kept}; {before / 1e6:.3f}M -> '
          f'{after / 1e6:.3f}M parameters; written to {out}/ (model.safetensors + config.json)')
    return 0
