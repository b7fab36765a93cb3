""" The trainer's command line: train.py's option names, defaults and ``--config`` YAML, for what it supports.

A recipe moves between timm's ``train.py`` and ``python -m timm_moejet.train`` unchanged, as far as the options go.
What a resume must share with the checkpoint (:func:`fingerprint`) and the checks made before anything runs
(:func:`check_args`) are here too.
"""
import argparse
import difflib
import json
import logging
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import yaml
from timm.utils import ParseKwargs

from ..errors import InvalidArgument, InvalidArgumentType, NotFound, OutputExists
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


def build_parser() -> argparse.ArgumentParser:
    """The parser, one argument group per section."""
    parser = argparse.ArgumentParser(prog=PROG, description=DESCRIPTION,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument('--config', default='', help='YAML file of argument defaults (as timm train.py --config)')
    for title, options in (('data', _data_options), ('model', _model_options), ('optimization', _optimizer_options),
                           ('sharding, checkpoints and output', _run_options)):
        options(parser.add_argument_group(title).add_argument)
    return parser


def _read_config(path: str) -> Dict[str, Any]:
    """The top-level mapping of a ``--config`` YAML."""
    try:
        with open(path) as f:
            config = yaml.safe_load(f)
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


# options that count something, and their least value
_AT_LEAST = dict(epochs=1, batch_size=1, grad_accum_steps=1, log_interval=1, checkpoint_hist=1, lr_base_size=1,
                 workers=0, warmup_epochs=0, cooldown_epochs=0, train_num_samples=1)
_WHY = dict(checkpoint_hist=' (the newest checkpoint is always kept: 1 keeps it alone)')
SCHEDULERS = ('cosine', 'tanh', 'step', 'multistep', 'poly')  # timm's, less plateau (it needs a validation metric)


def _suggest(name: str, names: List[str]) -> str:
    close = difflib.get_close_matches(name, names, n=1, cutoff=0.6)
    return f'did you mean {close[0]}? ' if close else ''


def _check_counts(args: argparse.Namespace) -> None:
    for name, least in _AT_LEAST.items():
        value = getattr(args, name)
        if value is not None and value < least:
            raise InvalidArgument(f'--{name.replace("_", "-")} must be at least {least}, got {value}'
                                  f'{_WHY.get(name, "")}. Nothing was run.')


def _check_names(args: argparse.Namespace) -> None:
    """The model, optimizer and schedule exist (timm's names)."""
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


def check_args(args: argparse.Namespace, world_size: int, output_dir: Path) -> None:
    """Refuse what cannot run, before the process group, the model or any output exists."""
    if args.amp and args.amp_dtype != 'bfloat16':
        raise InvalidArgument(f'--amp-dtype {args.amp_dtype} is not supported with FSDP2 here; use bfloat16.')
    if args.num_classes is None:
        raise InvalidArgument('--num-classes is required.')
    _check_counts(args)
    _check_names(args)
    _check_data(args)
    if not args.resume and (output_dir / 'checkpoints').exists():
        raise OutputExists(f'{output_dir} holds checkpoints of an earlier run: pass --resume {output_dir} '
                           f'to continue it, or another --experiment.')
