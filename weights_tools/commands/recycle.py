""" ``recycle``: dense donor(s) + strategy (+ statistics, seed) -> a MoE checkpoint folder in timm's Hub layout. """
import argparse
import textwrap

from ._args import SEED_ARG, add_model_kwargs, add_output_args, check_output_free, model_kwargs_from

EXAMPLE = textwrap.dedent('''\
    example:
      weights-tools recycle --model moejet_vit_tiny --num-classes 10 \\
          --trunk vit_tiny_patch16_224.augreg_in21k --experts vit_small_patch16_224.augreg_in21k \\
          --strategy importance --stats vit_small_digits_stats.safetensors --seed 3407 --output ./moejet_tiny
      python -c "import timm, timm_moejet; timm.create_model('local-dir:./moejet_tiny', pretrained=True)"''')


def add_parser(subparsers, parent: argparse.ArgumentParser, formatter) -> argparse.ArgumentParser:
    from timm_moejet.recycling import BLOCK_MAPS, GRAPH_METHODS, METRICS, STRATEGIES, TRUNK_FITS, RecyclingRecipe

    p = subparsers.add_parser(
        'recycle', parents=[parent], formatter_class=formatter, epilog=EXAMPLE,
        help='turn dense donors into a MoE checkpoint folder',
        description='Build a MoE model and fill it from dense timm donors: the trunk donor (same width) gives '
                    'attention, embeddings and norms, the expert donor (same depth, same or wider) is cut into '
                    'experts by the chosen strategy. Writes model.safetensors + config.json (model args and the '
                    'recycling recipe), loadable with timm.create_model("local-dir:FOLDER", pretrained=True).')
    p.add_argument('--model', default=None,
                   help='the MoE architecture, a registered timm name (default: the trunk donor\'s own ViT '
                        'architecture with MoE layers, see create_moejet_from)')
    p.add_argument('--trunk', required=True,
                   help='trunk donor: a timm name with its tag (from the Hub cache), ORG/REPO or hf-hub:ORG/REPO, '
                        'a Hub folder or a weights file (.safetensors, or .pth read with weights_only=True)')
    p.add_argument('--experts', default=None, help='expert donor, same forms (default: the trunk donor)')
    p.add_argument('--strategy', default=RecyclingRecipe.strategy,
                   help='how experts are cut from the donor MLPs: ' + ', '.join(
                       f'{name} ({s.doc})' for name, s in STRATEGIES.items()))
    p.add_argument('--stats', default=None, metavar='FILE.safetensors',
                   help='activation statistics of the expert donor from calibrate (default for strategies that '
                        'need statistics: a data-free proxy from the donor\'s weights)')
    p.add_argument('--metric', default=RecyclingRecipe.metric, help=f'importance statistic: {", ".join(METRICS)}')
    p.add_argument('--graph-method', default=RecyclingRecipe.graph_method,
                   help=f'graph strategy partitioner: {", ".join(GRAPH_METHODS)}')
    p.add_argument('--trunk-fit', default=RecyclingRecipe.trunk_fit, choices=TRUNK_FITS,
                   help='copy: the trunk donor has the model\'s shapes (the ViT recipes); select: Weight Selection '
                        'from a wider trunk donor (the C-JetMoE-F recipe, e.g. ConvNeXt-T for moejet_convnext_femto)')
    p.add_argument('--block-map', default=RecyclingRecipe.block_map, choices=BLOCK_MAPS,
                   help='which blocks of a deeper expert donor give the experts: evenly spaced or the first ones')
    p.add_argument('--seed', type=SEED_ARG, default=RecyclingRecipe.seed,
                   help='seed of the sampling and of the initial values of what is not recycled (head, slot '
                        'queries): the same command gives a bit-identical checkpoint')
    add_model_kwargs(p, 'of the MoE model')
    add_output_args(p, 'the folder to write', folder=True)
    return p


def run(args: argparse.Namespace) -> int:
    from timm_moejet.hub import save_hub_folder
    from timm_moejet.recycling import RecyclingRecipe, build_recycled_model

    recipe = RecyclingRecipe(experts=args.experts, strategy=args.strategy, stats=args.stats, seed=args.seed,
                             metric=args.metric, graph_method=args.graph_method, trunk_fit=args.trunk_fit,
                             block_map=args.block_map)
    check_output_free(args.output, args.overwrite, 'output folder',
                      {'trunk donor': args.trunk, 'expert donor': args.experts, 'statistics file': args.stats})
    model = build_recycled_model(args.model, args.trunk, recipe, init_seed=args.seed, **model_kwargs_from(args))
    model.pretrained_cfg = dict(model.pretrained_cfg, tag='recycled')
    out = save_hub_folder(model.eval(), args.output, args.overwrite)
    n = sum(p.numel() for p in model.parameters())
    print(f'recycled {model.pretrained_cfg["architecture"]} ({n / 1e6:.2f}M parameters, MoE blocks '
          f'{list(model.moe_layers())}) from trunk {args.trunk} and experts {args.experts or args.trunk} with strategy '
          f'{args.strategy!r}, seed {args.seed}{", statistics " + args.stats if args.stats else ""} to {out}/')
    return 0
