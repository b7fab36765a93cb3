""" ``recycle``: dense donor(s) + strategy (+ statistics, seed) -> a MoE checkpoint folder in timm's Hub layout. """
import argparse
import os
import textwrap

import torch

from ..common import CommandError, check_output_free, json_safe, load_donor_state_dict, save_hub_folder
from ._args import model_kwargs_from

EXAMPLE = textwrap.dedent('''\
    example:
      python -m weights_tools recycle --model moejet_vit_tiny --num-classes 10 \\
          --trunk vit_tiny_patch16_224.augreg_in21k --experts vit_small_patch16_224.augreg_in21k \\
          --strategy importance --stats vit_small_digits_stats.safetensors --seed 3407 --output ./moejet_tiny
      python -c "import timm, timm_moejet; timm.create_model('local-dir:./moejet_tiny', pretrained=True)"''')


def _strategies():
    from timm_moejet.recycling import STRATEGIES
    return STRATEGIES


def add_parser(subparsers, parent: argparse.ArgumentParser, formatter) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        'recycle', parents=[parent], formatter_class=formatter, epilog=EXAMPLE,
        help='turn dense donors into a MoE checkpoint folder',
        description='Build a MoE model and fill it from dense timm ViT donors: the trunk donor (same width) gives '
                    'attention, embeddings and norms, the expert donor (same depth, same or wider) is cut into '
                    'experts by the chosen strategy. Writes model.safetensors + config.json (model args and the '
                    'recycling recipe), loadable with timm.create_model("local-dir:FOLDER", pretrained=True).')
    p.add_argument('--model', default='moejet_vit_tiny', help='the MoE architecture (a registered timm name)')
    p.add_argument('--trunk', required=True,
                   help='trunk donor: a timm name (from the Hub cache), hf-hub:ORG/REPO, a Hub folder or a weights '
                        'file (.safetensors, or .pth read with weights_only=True)')
    p.add_argument('--experts', default=None, help='expert donor, same forms (default: the trunk donor)')
    p.add_argument('--strategy', default='importance', help='how experts are cut from the donor MLPs: '
                   'upcycle, uniform, random, importance or graph')
    p.add_argument('--stats', default=None, metavar='FILE.safetensors',
                   help='activation statistics of the expert donor from calibrate (default for importance/graph: '
                        'a data-free proxy from the donor\'s weights)')
    p.add_argument('--metric', default='l2', help='importance statistic: l2 (released default), l1 or freq')
    p.add_argument('--graph-method', default='metis', help='graph strategy partitioner: metis or spectral')
    p.add_argument('--seed', type=int, default=3407,
                   help='seed of the sampling and of the initial values of what is not recycled (head, slot '
                        'queries): the same command gives a bit-identical checkpoint')
    p.add_argument('--num-classes', type=int, default=None, help='classifier size of the MoE model')
    p.add_argument('--model-kwargs', nargs='*', default=None, metavar='KEY=VALUE',
                   help='extra create_model kwargs of the MoE model, values parsed as Python literals')
    p.add_argument('--output', '-o', required=True, metavar='FOLDER', help='the folder to write')
    p.add_argument('--overwrite', action='store_true', help='replace an existing output folder')
    return p


def run(args: argparse.Namespace) -> int:
    import timm

    from timm_moejet.diagnostics import moe_layers
    from timm_moejet.recycling import ActivationStats, recycle_into

    from ..common import _check_model_name

    strategies = tuple(_strategies())
    if args.strategy not in strategies:
        raise CommandError(f'--strategy must be one of {", ".join(strategies)}, got {args.strategy!r}.')
    check_output_free(args.output, args.overwrite, 'output folder')
    _check_model_name(args.model)
    with torch.random.fork_rng(devices=[]):
        # the seed also fixes what is not recycled (head, slot queries), so the same command gives the same file
        torch.manual_seed(args.seed)
        model = timm.create_model(args.model, pretrained=False, **model_kwargs_from(args))
    if not moe_layers(model):
        raise CommandError(f'--model {args.model} has no SpheroMoE layer; recycle builds MoE models '
                           f'(e.g. moejet_vit_tiny).')
    trunk = load_donor_state_dict(args.trunk)
    experts = load_donor_state_dict(args.experts) if args.experts else None
    stats = ActivationStats.load(args.stats) if args.stats is not None else None
    recycle_into(model, trunk, experts, strategy=args.strategy, stats=stats, seed=args.seed, metric=args.metric,
                 graph_method=args.graph_method, trunk_id=args.trunk, expert_id=args.experts or args.trunk)
    record = dict((model.pretrained_cfg or {}).get('recycling') or {})
    if args.stats is not None:
        record.setdefault('stats_file', os.path.basename(args.stats))
    model.pretrained_cfg = dict(model.pretrained_cfg, recycling=json_safe(record), tag='recycled')
    out = save_hub_folder(model.eval(), args.output, args.overwrite)
    n = sum(p.numel() for p in model.parameters())
    print(f'recycled {args.model} ({n / 1e6:.2f}M parameters, MoE blocks {list(moe_layers(model))}) from trunk '
          f'{args.trunk} and experts {args.experts or args.trunk} with strategy {args.strategy!r}, seed {args.seed}'
          f'{", statistics " + args.stats if args.stats else ""} to {out}/')
    return 0
