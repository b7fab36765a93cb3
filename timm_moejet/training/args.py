""" The trainer's command line: train.py's option names, defaults and ``--config`` YAML, for what it supports.

A recipe moves between timm's ``train.py`` and ``python -m timm_moejet.train`` unchanged, as far as the options go.
What a resume must share with the checkpoint (:func:`fingerprint`) and the checks made before anything runs
(:func:`check_args`) are here too.
"""
import argparse
import difflib
import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch.nn as nn
import yaml
from timm.utils import ParseKwargs

from ..errors import InvalidArgument, InvalidArgumentType, NotFound, OutputExists, OutputNotWritable
from .config_keys import split_config

__all__ = ['build_parser', 'parse_args', 'check_args', 'fingerprint', 'output_dir']

PROG = 'python -m timm_moejet.train'
DESCRIPTION = ('Fine-tune a MoE Jetpack model sharded with FSDP2 (torchrun: one process per device), from timm\'s own '
               'parts and with train.py\'s option names.')


def _data_options(a: Callable[..., Any]) -> None:
    """Data: the dataset, its loader and augmentation."""
    a('--data-dir', default=None, help='dataset root')
    a('--dataset', default='', help='timm dataset ("" image folder, "torch/...", "hfds/...", ...) or "synthetic"')
    a('--train-split', default='train')
    a('--dataset-download', action='store_true', help='download a torch/ or tfds/ dataset that is not there yet')
    a('--train-num-samples', type=int, default=None, help='samples of an iterable dataset; synthetic: its size')
    a('--val-split', default=None,
      help='validation split, "" for none (default: validation where the dataset has it; synthetic: with '
           '--val-num-samples)')
    a('--val-num-samples', type=int, default=None, help='validation samples of an iterable dataset or synthetic')
    a('--val-interval', type=int, default=1, help='validate every N epochs (and after the last)')
    a('-vb', '--validation-batch-size', type=int, default=None, help='validation batch size per process (default: -b)')
    a('--crop-pct', type=float, default=None, help='validation center crop fraction (default: the model\'s)')
    a('--img-size', type=int, default=None, help='input image size (default: the model\'s)')
    a('--input-size', type=int, nargs=3, default=None, help='input dimensions (C H W)')
    a('--mean', type=float, nargs='+', default=None)
    a('--std', type=float, nargs='+', default=None)
    a('--interpolation', default='')
    a('--train-interpolation', default='', help='training resize interpolation (default: the model\'s)')
    a('--workers', '-j', type=int, default=4)
    a('--pin-mem', action='store_true')
    a('--no-aug', action='store_true', help='no training augmentation (resize and center crop)')
    a('--hflip', type=float, default=0.5)
    a('--aa', default=None, help='auto-augment policy, e.g. rand-m9-mstd0.5-inc1')
    a('--reprob', type=float, default=0.)
    a('--remode', default='pixel')
    a('--mixup', type=float, default=0.)
    a('--cutmix', type=float, default=0.)
    a('--mixup-prob', type=float, default=1.)
    a('--mixup-switch-prob', type=float, default=0.5)
    a('--smoothing', type=float, default=0.1)


def _model_options(a: Callable[..., Any]) -> None:
    """The model."""
    a('--model', default='moejet_vit_tiny')
    a('--pretrained', action='store_true')
    a('--num-classes', type=int, default=None)
    a('--drop', type=float, default=0.)
    a('--drop-path', type=float, default=None)
    a('--model-kwargs', nargs='*', default={}, action=ParseKwargs)
    a('--grad-checkpointing', action='store_true')
    a('--torchcompile', nargs='?', default=None, const='inductor',
      help='compile every block with this torch.compile backend (default when given: inductor)')
    a('--torchcompile-mode', default=None, help='torch.compile mode (e.g. max-autotune)')
    a('--model-ema', action='store_true', help='keep an exponential moving average of the weights (sharded)')
    a('--model-ema-decay', type=float, default=0.9998)
    a('--model-ema-warmup', action='store_true', help='warm the EMA decay up over the first updates (timm ModelEmaV3)')
    a('--model-ema-force-cpu', action='store_true', help='not supported: the EMA is sharded like the model')


def _optimizer_options(a: Callable[..., Any]) -> None:
    """Optimizer, schedule, precision and seed."""
    a('-b', '--batch-size', type=int, default=128, help='batch size per process')
    a('--grad-accum-steps', type=int, default=1,
      help='micro-batches per update; an epoch\'s trailing partial accumulation is also an update (as train.py)')
    a('--opt', default='sgd')
    a('--opt-eps', type=float, default=None)
    a('--opt-betas', type=float, nargs='+', default=None)
    a('--momentum', type=float, default=0.9)
    a('--weight-decay', type=float, default=2e-5)
    a('--layer-decay', type=float, default=None)
    a('--opt-kwargs', nargs='*', default={}, action=ParseKwargs)
    a('--clip-grad', type=float, default=None, help='clip the gradient norm (the norm over every shard)')
    a('--sched', default='cosine')
    a('--sched-on-updates', action='store_true')
    a('--lr', type=float, default=None)
    a('--lr-base', type=float, default=0.1, help='lr = lr_base * global batch / lr_base_size when --lr is not set')
    a('--lr-base-size', type=int, default=256)
    a('--lr-base-scale', default='', help='"linear", "sqrt" (default: sqrt for adam-like optimizers, else linear)')
    a('--warmup-lr', type=float, default=1e-5)
    a('--min-lr', type=float, default=0.)
    a('--epochs', type=int, default=300)
    a('--warmup-epochs', type=int, default=5)
    a('--warmup-prefix', action='store_true')
    a('--cooldown-epochs', type=int, default=0)
    a('--decay-epochs', type=float, default=90)
    a('--decay-rate', type=float, default=0.1)
    a('--seed', type=int, default=42)
    a('--amp', action='store_true', help='bfloat16 mixed precision (FSDP2 MixedPrecisionPolicy + autocast)')
    a('--amp-dtype', default='bfloat16', help='bfloat16 only: float16 would need a sharded gradient scaler')


def _run_options(a: Callable[..., Any]) -> None:
    """Sharding, checkpoints, output and logging."""
    a('--no-reshard-after-forward', action='store_true',
      help='keep gathered parameters from the forward to the backward (less traffic, more memory)')
    a('--cpu-offload', action='store_true', help='keep shards, gradients and the optimizer step on the CPU')
    a('--output', default='', help='output folder (default: ./output/train)')
    a('--experiment', default='', help='sub-folder of --output (default: the model name)')
    a('--resume', default='',
      help='a sharded checkpoint: epoch_N, or a run folder or its checkpoints folder (their latest)')
    a('--checkpoint-hist', type=int, default=10,
      help='checkpoints to keep, at least 1: the best by --eval-metric (the newest without validation), and the one '
           'just saved')
    a('--eval-metric', default='top1', help='validation metric that ranks the checkpoints: top1, top5 or loss')
    a('--log-interval', type=int, default=50, help='updates between log lines (steps.jsonl has every update)')
    a('--no-export', action='store_true', help='do not write model.safetensors + config.json at the end')


class _Parser(argparse.ArgumentParser):
    """argparse's parser whose usage errors are the project's (one line, status 2), not the usage and an exit."""

    def error(self, message: str):
        raise InvalidArgument(f'{message}; see {PROG} --help.')


def build_parser() -> argparse.ArgumentParser:
    """The parser, one argument group per section."""
    parser = _Parser(prog=PROG, description=DESCRIPTION, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument('--config', default='', help='YAML file of argument defaults (as timm train.py --config)')
    for title, options in (('data', _data_options), ('model', _model_options), ('optimization', _optimizer_options),
                           ('sharding, checkpoints and output', _run_options)):
        options(parser.add_argument_group(title).add_argument)
    return parser


class _NoRepeatsLoader(yaml.SafeLoader):
    """``yaml.safe_load``'s loader, a key given twice in one mapping refused (PyYAML keeps the last one silently)."""


def _mapping_without_repeats(loader: yaml.SafeLoader, node: yaml.MappingNode) -> Dict[Any, Any]:
    seen = []
    for key_node, _ in node.value:
        if key_node.tag == 'tag:yaml.org,2002:merge':  # `<<: *base`: its keys may be overridden here, as YAML says
            continue
        key = loader.construct_object(key_node)
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f'{key!r} is given twice', key_node.start_mark)
        seen.append(key)
    return loader.construct_mapping(node)


_NoRepeatsLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_repeats)


def _read_config(path: str) -> Dict[str, Any]:
    """The top-level mapping of a ``--config`` YAML."""
    try:
        with open(path) as f:
            config = yaml.load(f, Loader=_NoRepeatsLoader)  # noqa: S506  (a SafeLoader)
    except FileNotFoundError as e:
        raise NotFound(f'--config {path} does not exist.') from e
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise InvalidArgument(f'cannot read --config {path}: {e}') from e
    if config is None:
        return {}
    if not isinstance(config, dict):
        raise InvalidArgumentType(f'--config {path}: the top level is a {type(config).__name__}; it must be a mapping '
                                  f'of option names to values (e.g. "epochs: 10").')
    return config


def _of_type(value: Any, kind: type) -> bool:
    if kind is bool or isinstance(value, bool):
        return kind is bool and isinstance(value, bool)
    return isinstance(value, (int, float) if kind is float else kind)


def _check_value(action: argparse.Action, value: Any, where: str) -> None:
    """A YAML value of the type its option parses to (argparse converts command-line strings, not defaults)."""
    if isinstance(action.default, dict) and not isinstance(value, dict):  # --model-kwargs, --opt-kwargs
        raise InvalidArgumentType(f'{where}: {action.dest}: {value!r} must be a mapping (e.g. {{drop_rate: 0.1}}).')
    flag = action.nargs == 0 and isinstance(action.const, bool)  # store_true / store_false
    text = action.type is None and action.nargs in (None, '?') and isinstance(action.default, (str, type(None)))
    if text and not isinstance(value, str) and not (value is None and action.default is None):  # a path, a name
        raise InvalidArgumentType(f'{where}: {action.dest}: {value!r} is not text; write it in quotes.')
    if value is None or not flag and action.type not in (int, float):
        return
    kind = bool if flag else action.type
    many = not flag and action.nargs not in (None, '?')
    if many and not isinstance(value, list):
        raise InvalidArgumentType(f'{where}: {action.dest}: {value!r} must be a list of {kind.__name__}.')
    if not all(_of_type(v, kind) for v in (value if many else [value])):
        raise InvalidArgumentType(f'{where}: {action.dest}: {value!r} is not {kind.__name__}'
                                  f'{" (YAML reads 4e-3 as text: write 4.0e-3)" if isinstance(value, str) else ""}.')


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """train.py's parsing: ``--config`` YAML sets defaults, the command line overrides them. Keys are checked
    (:func:`.config_keys.split_config`): train.py keys that do not change training are named once and left out."""
    parser = build_parser()
    config = argparse.ArgumentParser(add_help=False)
    config.add_argument('--config', default='')
    known, remaining = config.parse_known_args(argv)
    if known.config:
        where = f'--config {known.config}'
        actions = {a.dest: a for a in parser._actions}
        used, left_out = split_config(_read_config(known.config), actions, where)
        for key, value in used.items():
            _check_value(actions[key], value, where)
        if left_out:
            logging.getLogger('timm_moejet.train').warning(
                f'{where}: left out {", ".join(left_out)} (timm train.py keys that do not change training here)')
        parser.set_defaults(**used)
    return parser.parse_args(remaining)


def output_dir(args: argparse.Namespace) -> Path:
    """The run's folder: ``--output``/``--experiment`` (default ``output/train/<model>``)."""
    return Path(args.output or 'output/train') / (args.experiment or args.model.replace('/', '_'))


def fingerprint(args: argparse.Namespace, world_size: int) -> Dict[str, Any]:
    """What a resume must share with the checkpoint: the model and what fixes the sequence of updates."""
    recorded = dict(model=args.model, model_kwargs=args.model_kwargs, num_classes=args.num_classes,
                    opt=args.opt, global_batch=args.batch_size * world_size * args.grad_accum_steps,
                    dataset=args.dataset, train_split=args.train_split, train_num_samples=args.train_num_samples,
                    amp=args.amp, seed=args.seed)
    return json.loads(json.dumps(recorded))  # as the checkpoint records it (a tuple kwarg reads back as a list)


# options with a range, as an interval ('[0, 1)': 0 <= value < 1); of a list option, every value. A float option
# must also be finite (nan and inf parse as floats)
_INTERVALS = dict(
    epochs='[1, inf)', batch_size='[1, inf)', grad_accum_steps='[1, inf)', log_interval='[1, inf)',
    checkpoint_hist='[1, inf)', lr_base_size='[1, inf)', workers='[0, inf)', warmup_epochs='[0, inf)',
    cooldown_epochs='[0, inf)', train_num_samples='[1, inf)', val_num_samples='[1, inf)', img_size='[1, inf)',
    input_size='[1, inf)', num_classes='[2, inf)', seed=f'[0, {2 ** 31 - 1}]', lr='[0, inf)', lr_base='[0, inf)',
    warmup_lr='[0, inf)', min_lr='[0, inf)', weight_decay='[0, inf)', momentum='[0, inf)', opt_eps='(0, inf)',
    opt_betas='[0, 1)', layer_decay='(0, inf)', clip_grad='(0, inf)', decay_epochs='(0, inf)', decay_rate='(0, inf)',
    smoothing='[0, 1)', mixup='[0, inf)', cutmix='[0, inf)', mixup_prob='[0, 1]', mixup_switch_prob='[0, 1]',
    hflip='[0, 1]', reprob='[0, 1]', drop='[0, 1]', drop_path='[0, 1]', crop_pct='(0, inf)', std='(0, inf)',
)
_WHY = dict(checkpoint_hist=' (the newest checkpoint is always kept: 1 keeps it alone)',
            clip_grad=' (0 would zero every gradient: leave it out not to clip)',
            num_classes=' (a classifier of one class learns nothing)')
SCHEDULERS = ('cosine', 'tanh', 'step', 'multistep', 'poly')  # timm's, less plateau (it needs a validation metric)


def _suggest(name: str, names: List[str]) -> str:
    close = difflib.get_close_matches(name, names, n=1, cutoff=0.6)
    return f'did you mean {close[0]}? ' if close else ''


def _within(value: float, interval: str) -> bool:
    low, high = (float(v) for v in interval[1:-1].split(','))
    return (low < value if interval[0] == '(' else low <= value) and (value < high if interval[-1] == ')'
                                                                        else value <= high)


def _range_words(interval: str) -> str:
    if interval.endswith('inf)'):
        return f'{"at least" if interval[0] == "[" else "above"} {interval[1:].split(",")[0]}'
    return f'in {interval}'


def _check_ranges(args: argparse.Namespace) -> None:
    """Every option with a range (:data:`_INTERVALS`) lies in it, and every float option is finite."""
    floats = [a.dest for a in build_parser()._actions if a.type is float]
    for name in sorted(set(_INTERVALS) | set(floats)):
        value = getattr(args, name)
        for v in (value if isinstance(value, (list, tuple)) else [] if value is None else [value]):
            if not math.isfinite(v):
                raise InvalidArgument(f'--{name.replace("_", "-")} must be a finite number, got {v}. Nothing was run.')
            if name in _INTERVALS and not _within(v, _INTERVALS[name]):
                raise InvalidArgument(f'--{name.replace("_", "-")} must be {_range_words(_INTERVALS[name])}, got '
                                      f'{value}{_WHY.get(name, "")}. Nothing was run.')


def image_channels(args: argparse.Namespace) -> int:
    """The channels of the training images: ``--input-size``'s first value, else the model's ``in_chans``."""
    return args.input_size[0] if args.input_size else args.model_kwargs.get('in_chans', 3)


def image_mode(args: argparse.Namespace) -> str:
    """The mode timm's datasets read images in, as train.py chooses it: RGB for 3 channels, grayscale otherwise."""
    return 'RGB' if image_channels(args) == 3 else 'L'


def _check_channels(args: argparse.Namespace) -> None:
    """Images are read as RGB or grayscale; ``--mean``/``--std`` give one value, or one per input channel."""
    channels = image_channels(args)
    if channels not in (1, 3):
        raise InvalidArgument(f'the trainer reads images as RGB (3 channels) or grayscale (1), not {channels} '
                              f'channels: pass --input-size 3 H W or 1 H W (and --model-kwargs in_chans= alike).')
    if channels == 1 and (args.mean is None or args.std is None):
        raise InvalidArgument('grayscale images (1 channel) need their own normalisation: pass --mean M --std S (the '
                              "model's data config holds RGB values).")
    for name in ('mean', 'std'):
        value = getattr(args, name)
        if value is not None and len(value) not in (1, channels):
            raise InvalidArgument(f'--{name} takes 1 value or one per channel ({channels}), got {len(value)}: '
                                  f'{" ".join(map(str, value))}.')


def _check_optimizer(args: argparse.Namespace) -> None:
    """The optimizer takes its settings (``--opt-kwargs``, ``--opt-betas``, ...): timm builds it once over a
    stand-in parameter, before the model exists."""
    from timm.optim import create_optimizer_v2, optimizer_kwargs

    settings = optimizer_kwargs(cfg=argparse.Namespace(**{**vars(args), 'layer_decay': None,
                                                          'lr': args.lr if args.lr is not None else args.lr_base}))
    try:
        create_optimizer_v2(nn.Linear(1, 1), **settings, **args.opt_kwargs)
    except (TypeError, ValueError, IndexError, KeyError, AssertionError) as e:
        raise InvalidArgument(f'--opt {args.opt} refuses its settings (--opt-kwargs, --opt-betas, --opt-eps, '
                              f'--momentum): {type(e).__name__}: {e}.') from e
    except RuntimeError:  # of the device (e.g. fused=True): the stand-in is on the CPU, the model may not be
        pass


def _check_names(args: argparse.Namespace) -> None:
    """The model, optimizer, schedule and lr scaling exist (timm's names)."""
    import timm
    from timm.optim import list_optimizers

    if ':' not in args.model and not timm.is_model(args.model):
        hint = _suggest(args.model, timm.list_models())
        raise InvalidArgument(f'--model {args.model} is not a registered model; {hint}list them with '
                              f'timm.list_models("moejet*").')
    opt = args.opt.lower().split('_')[-1] if args.opt.lower().startswith('lookahead_') else args.opt.lower()
    if opt not in list_optimizers():
        raise InvalidArgument(f'--opt {args.opt} is not one of timm\'s optimizers; {_suggest(opt, list_optimizers())}'
                              f'list them with timm.optim.list_optimizers().')
    if args.sched not in SCHEDULERS:
        raise InvalidArgument(f'--sched {args.sched} is not supported; use one of {", ".join(SCHEDULERS)}.')
    if args.lr_base_scale not in ('', 'linear', 'sqrt'):
        raise InvalidArgument(f'--lr-base-scale {args.lr_base_scale!r} is not one of linear, sqrt (or "" for the '
                              f'optimizer\'s default).')
    if args.model.startswith('local-dir:'):  # a folder with config.json and weights (hf-hub: is looked up later)
        from ..checkpoint_io.hub import read_folder_config
        from ..checkpoint_io.names import parse_source
        read_folder_config(parse_source(args.model, '--model').path)


def _check_data(args: argparse.Namespace) -> None:
    """The data is named: ``--dataset synthetic`` has a size, an image folder or tar (``--dataset`` without a
    ``kind/`` prefix) exists."""
    if args.dataset == 'synthetic':
        if not args.train_num_samples:
            raise InvalidArgument('--dataset synthetic needs --train-num-samples.')
        return
    if '/' in args.dataset:  # torch/, hfds/, tfds/, wds/: timm's readers find (or download) their data
        return
    if not args.data_dir:
        raise InvalidArgument('--data-dir is required: an image folder (train/<class>/*.jpg) or a tar, or pass '
                              '--dataset synthetic.')
    if not Path(args.data_dir).exists():
        raise NotFound(f'--data-dir {args.data_dir} does not exist.')
    _check_train_split(args)


def _check_train_split(args: argparse.Namespace) -> None:
    """An image folder has the ``--train-split`` folder. Without it timm reads the whole folder, labelling images by
    their parent folder's name: a misspelt split, or a folder holding only validation/, would train on validation
    images. Its absence is allowed for the default split of a folder of class folders only."""
    from .validation import split_folder

    root, name = Path(args.data_dir), args.train_split.split('[')[0]
    if not root.is_dir() or (root / name).is_dir():
        return
    if args.train_split != 'train' or split_folder(root, 'validation') is not None:
        raise NotFound(f'--train-split {args.train_split}: {root} has no such folder, and timm would train on all of '
                       f'{root} (validation images too); name the training folder (--train-split) or give the '
                       f'folder of class folders as --data-dir.')


def check_args(args: argparse.Namespace, world_size: int, output_dir: Path) -> None:
    """Refuse what cannot run, before the process group, the model or any output exists."""
    if args.amp and args.amp_dtype != 'bfloat16':
        raise InvalidArgument(f'--amp-dtype {args.amp_dtype} is not supported with FSDP2 here; use bfloat16.')
    if args.num_classes is None:
        raise InvalidArgument('--num-classes is required.')
    _check_ranges(args)
    _check_channels(args)
    _check_names(args)
    _check_optimizer(args)
    _check_data(args)
    _check_output(args, output_dir)


# what a run writes into its folder: a folder holding any of them is an earlier run's
RUN_OUTPUTS = ('checkpoints', 'model', 'model_ema', 'summary.csv', 'steps.jsonl', 'args.yaml')


def _resumes_from(args: argparse.Namespace, folder: Path) -> bool:
    """``--resume`` names a checkpoint of the run in ``folder`` (which it continues), not of another run."""
    from .checkpoint import resolve_checkpoint

    checkpoints = (folder / 'checkpoints').resolve()
    return bool(args.resume) and resolve_checkpoint(args.resume).resolve().parent == checkpoints


def _check_output(args: argparse.Namespace, folder: Path) -> None:
    """The run's folder can be made, and training into it loses nothing: a folder holding an earlier run's outputs is
    written into only by a resume of that run."""
    existing = next(p for p in (folder, *folder.parents) if p.exists() or p.is_symlink())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise OutputNotWritable(f'the run folder {folder} cannot be made: {existing} is '
                                f'{"not a folder" if not existing.is_dir() else "not writable"}; choose another '
                                f'--output (or --experiment).')
    kept = [name for name in RUN_OUTPUTS if (folder / name).exists()]
    if kept and not _resumes_from(args, folder):
        what = 'checkpoints of an earlier run' if 'checkpoints' in kept else f'an earlier run\'s {", ".join(kept)}'
        if args.resume:
            todo = (f'--resume {args.resume} is not one of its checkpoints (a resume writes into --output/'
                    f'--experiment): pass another --experiment')
        else:
            todo = (f'pass --resume {folder} to continue it' if 'checkpoints' in kept else 'move them away') + \
                ', or pass another --experiment'
        raise OutputExists(f'{folder} holds {what}: {todo}. Nothing was written.')
    _check_run_logs(folder)


def _check_run_logs(folder: Path) -> None:
    """The logs a resume continues are files, and the summary reads: rank 0 alone rewrites them, after the
    process group exists, so every rank checks them first (and all refuse alike)."""
    from .validation import read_summary

    for name in ('summary.csv', 'steps.jsonl', 'args.yaml'):
        if (folder / name).exists() and not (folder / name).is_file():
            raise OutputExists(f'{folder / name} is not a file; the run writes its log there: move it away.')
    if (folder / 'summary.csv').exists():
        read_summary(folder / 'summary.csv')
