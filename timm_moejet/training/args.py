""" The trainer's command line: train.py's option names, defaults and ``--config`` YAML, for what it supports.

A recipe moves between timm's ``train.py`` and ``python -m timm_moejet.train`` unchanged, as far as the options go.
What a resume must share with the checkpoint (:func:`fingerprint`) and the checks made before anything runs
(:func:`check_args`) are here too.
"""
import argparse
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import yaml
from timm.utils import ParseKwargs

from ..errors import InvalidArgument, OutputExists

__all__ = ['build_parser', 'parse_args', 'check_args', 'fingerprint', 'output_dir']

PROG = 'python -m timm_moejet.train'
DESCRIPTION = ('Fine-tune a MoE Jetpack model sharded with FSDP2 (torchrun: one process per device), from timm\'s own '
               'parts and with train.py\'s option names.')


def _data_options(a: Callable[..., Any]) -> None:
    """Data: the dataset, its loader and augmentation."""
    a('--data-dir', default=None, help='dataset root')
    a('--dataset', default='', help='timm dataset ("" image folder, "torch/...", "hfds/...", ...) or "synthetic"')
    a('--train-split', default='train')
    a('--train-num-samples', type=int, default=None, help='samples of an iterable dataset; synthetic: its size')
    a('--val-split', default='validation', help='validation split ("" for none); synthetic: needs --val-num-samples')
    a('--val-num-samples', type=int, default=None, help='validation samples of an iterable dataset or synthetic')
    a('--val-interval', type=int, default=1, help='validate every N epochs (and after the last)')
    a('-vb', '--validation-batch-size', type=int, default=None, help='validation batch size per process (default: -b)')
    a('--crop-pct', type=float, default=None, help='validation center crop fraction (default: the model\'s)')
    a('--img-size', type=int, default=None, help='input image size (default: the model\'s)')
    a('--input-size', type=int, nargs=3, default=None, help='input dimensions (C H W)')
    a('--mean', type=float, nargs='+', default=None)
    a('--std', type=float, nargs='+', default=None)
    a('--interpolation', default='')
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
    a('--grad-accum-steps', type=int, default=1)
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
    a('--resume', default='', help='a sharded checkpoint (epoch_N, or the checkpoints folder: its latest)')
    a('--checkpoint-hist', type=int, default=10, help='checkpoints to keep: the best by --eval-metric, and the latest')
    a('--eval-metric', default='top1', help='validation metric that ranks the checkpoints: top1, top5 or loss')
    a('--log-interval', type=int, default=50)
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


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """train.py's parsing: ``--config`` YAML sets defaults, the command line overrides them."""
    parser = build_parser()
    config = argparse.ArgumentParser(add_help=False)
    config.add_argument('--config', default='')
    known, remaining = config.parse_known_args(argv)
    if known.config:
        try:
            with open(known.config) as f:
                parser.set_defaults(**(yaml.safe_load(f) or {}))
        except (OSError, yaml.YAMLError) as e:
            raise InvalidArgument(f'cannot read --config {known.config}: {e}') from e
    return parser.parse_args(remaining)


def output_dir(args: argparse.Namespace) -> Path:
    """The run's folder: ``--output``/``--experiment`` (default ``output/train/<model>``)."""
    return Path(args.output or 'output/train') / (args.experiment or args.model.replace('/', '_'))


def fingerprint(args: argparse.Namespace, world_size: int) -> Dict[str, Any]:
    """What a resume must share with the checkpoint: the model and what fixes the sequence of updates."""
    return dict(model=args.model, model_kwargs=args.model_kwargs, num_classes=args.num_classes,
                opt=args.opt, global_batch=args.batch_size * world_size * args.grad_accum_steps,
                dataset=args.dataset, train_split=args.train_split, train_num_samples=args.train_num_samples,
                amp=args.amp, seed=args.seed)


def check_args(args: argparse.Namespace, world_size: int, output_dir: Path) -> None:
    """Refuse what cannot run, before the process group, the model or any output exists."""
    if args.amp and args.amp_dtype != 'bfloat16':
        raise InvalidArgument(f'--amp-dtype {args.amp_dtype} is not supported with FSDP2 here; use bfloat16.')
    if args.num_classes is None:
        raise InvalidArgument('--num-classes is required.')
    if args.batch_size < 1 or args.grad_accum_steps < 1:
        raise InvalidArgument('--batch-size and --grad-accum-steps must be positive.')
    if args.dataset == 'synthetic' and not args.train_num_samples:
        raise InvalidArgument('--dataset synthetic needs --train-num-samples.')
    if not args.resume and (output_dir / 'checkpoints').exists():
        raise OutputExists(f'{output_dir} holds checkpoints of an earlier run: pass --resume {output_dir}/checkpoints '
                           f'to continue it, or another --experiment.')
