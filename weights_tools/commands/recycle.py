""" ``recycle``: dense donor(s) + strategy (+ statistics, seed) -> a MoE checkpoint folder in timm's Hub layout.

The recipe's flags are generated from the fields of ``RecyclingRecipe`` (name, default, allowed values, doc), as the
docs tables are: ``--graph-parts`` is ``graph_parts``, which ``create_model`` takes as ``recycle_graph_parts``.
"""
import argparse
import dataclasses
from typing import Any, Callable, Dict

from timm_moejet.build import build_recycled_model
from timm_moejet.checkpoint_io.hub import save_hub_folder
from timm_moejet.cost import count_params
from timm_moejet.errors import InvalidArgument
from timm_moejet.recycling import RECYCLE_KWARGS, STRATEGIES, RecyclingRecipe
from timm_moejet.recycling.recipe import check_strategy_reads
from timm_moejet.settings import Check

from ..options import MODEL_SETTINGS, Command, Group, check_output_free, folder_output, model_kwargs_from, option

# what the command line adds to a field's doc
_MORE = {
    'strategy': '; '.join(f'{name}: {s.doc}' for name, s in STRATEGIES.items()) + '.',
    'seed': 'The command also seeds the initial values of what is not recycled (head, slot queries) with it.',
}


def _flag_name(name: str) -> str:
    return '--' + name.replace('_', '-')


def _flag(field: dataclasses.Field) -> str:
    return _flag_name(field.name)


def _arg_type(field: dataclasses.Field) -> Callable[[str], Any]:
    """Text to the field's type, checked by the field's own check (argparse reports 'argument --x: ...')."""
    check: Check = field.metadata['check']

    number = isinstance(field.default, int)

    def convert(text: str) -> Any:
        if text == 'None' and field.default is None:  # as the help allows: the field's default
            return None
        try:
            return check(_flag(field), int(text) if number else text)
        except (ValueError, InvalidArgument):  # numbers as written, names quoted (as the library words them)
            raise argparse.ArgumentTypeError(f'must be {check.allowed}, got {text if number else repr(text)}') from None
    return convert


def recipe_options() -> Group:
    """One option per ``RecyclingRecipe`` field; an option not given keeps the field's default."""
    options = []
    for field in dataclasses.fields(RecyclingRecipe):
        doc = field.metadata['doc'] + (f' {_MORE[field.name]}' if field.name in _MORE else '')
        options.append(option(_flag(field), dest=field.name, default=None, type=_arg_type(field),
                              metavar=field.name.upper(),
                              help=f'{doc} Allowed: {field.metadata["check"].allowed}. Default: {field.default}.'))
    return Group(tuple(options), 'recipe (the fields of RecyclingRecipe; create_model takes them as recycle_*)')


def recipe_from_args(args: argparse.Namespace, model_kwargs: Dict[str, Any]) -> RecyclingRecipe:
    """The recipe of the flags given, and of ``recycle_*`` entries of ``--model-kwargs`` (popped from it).

    Raises:
        InvalidArgument: If a field is given both as a flag and in ``--model-kwargs``.
    """
    fields = {f.name: getattr(args, f.name) for f in dataclasses.fields(RecyclingRecipe)
              if getattr(args, f.name) is not None}
    given = {name: _flag_name(name) for name in fields}  # field -> how it was given, for messages
    for kwarg in [k for k in model_kwargs if k in RECYCLE_KWARGS]:
        name = RECYCLE_KWARGS[kwarg]
        if name in fields:
            raise InvalidArgument(f'{name} is given twice: as {_flag_name(name)} and as --model-kwargs '
                                  f'{kwarg}=...; give it once.')
        fields[name] = model_kwargs.pop(kwarg)
        given[name] = f'--model-kwargs {kwarg}'
    default = next(f.default for f in dataclasses.fields(RecyclingRecipe) if f.name == 'strategy')
    check_strategy_reads(fields.get('strategy', default), given, given.get)
    return RecyclingRecipe(**fields)


def _statistics_used(record: Dict[str, Any], path: Any) -> str:
    """What the record says the strategy read: the statistics file (``path``), the data-free proxy, or nothing."""
    if 'stats_file' in record:
        return f', statistics {path}'
    return ', statistics: the data-free weight proxy' if record.get('stats') == 'weights-proxy' else ''


COMMAND = Command(
    'recycle', 'turn dense donors into a MoE checkpoint folder',
    'Build a MoE model and fill it from dense timm donors: the trunk donor (same width) gives attention, embeddings '
    'and norms, the expert donor (same depth, same or wider) is cut into experts by the chosen strategy. Writes '
    'model.safetensors + config.json (model args and the recycling recipe), loadable with '
    'timm.create_model("local-dir:FOLDER", pretrained=True).', '''\
example:
  weights-tools recycle --model moejet_vit_tiny --num-classes 10 \\
      --trunk vit_tiny_patch16_224.augreg_in21k --experts vit_small_patch16_224.augreg_in21k \\
      --strategy importance --stats vit_small_digits_stats.safetensors --seed 3407 --output ./moejet_tiny
  python -c "import timm, timm_moejet; timm.create_model('local-dir:./moejet_tiny', pretrained=True)"''', (
        option('--model', default=None, help='the MoE architecture, a registered timm name (default: the trunk '
                                             'donor\'s own ViT architecture with MoE layers, see create_moejet_from)'),
        option('--trunk', required=True,
               help='trunk donor: a timm name with its tag (from the Hub cache), ORG/REPO or hf-hub:ORG/REPO, a Hub '
                    'folder or a weights file (.safetensors, or .pth read with weights_only=True)'),
        recipe_options(), MODEL_SETTINGS, folder_output('the folder to write'),
    ))


def run(args: argparse.Namespace) -> int:
    model_kwargs = model_kwargs_from(args)
    recipe = recipe_from_args(args, model_kwargs)
    check_output_free(args.output, args.overwrite, 'output folder',
                      {'trunk donor': args.trunk, 'expert donor': recipe.experts, 'statistics file': recipe.stats},
                      folder=True)
    model = build_recycled_model(args.model, args.trunk, recipe, init_seed=recipe.seed, **model_kwargs)
    model.pretrained_cfg = dict(model.pretrained_cfg, tag='recycled')
    out = save_hub_folder(model.eval(), args.output, args.overwrite)
    n = count_params(model)['total']
    used = _statistics_used(model.pretrained_cfg['recycling'], recipe.stats)
    print(f'recycled {model.pretrained_cfg["architecture"]} ({n / 1e6:.2f}M parameters, MoE blocks '
          f'{list(model.moe_layers())}) from trunk {args.trunk} and experts {recipe.experts or args.trunk} with '
          f'strategy {recipe.strategy!r}, seed {recipe.seed}{used} to {out}/')
    return 0
