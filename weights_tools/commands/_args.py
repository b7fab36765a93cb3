""" Argument groups and argument-level checks shared by several commands. """
import argparse
import ast
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence

import torch

from timm_moejet.checkpoint_io import check_output_apart, refuse_existing
from timm_moejet.errors import InvalidArgument
from timm_moejet.settings import SEED, Check, integer


def checked(check: Check) -> Callable[[str], int]:
    """An argparse ``type`` for an int option, checked by one of the library's checks (argparse then reports
    'argument --x: must be ..., got ...')."""
    def convert(text: str) -> int:
        try:
            return check('value', int(text))
        except (ValueError, InvalidArgument):
            raise argparse.ArgumentTypeError(f'must be {check.allowed}, got {text}') from None
    return convert


SEED_ARG = checked(SEED)
COUNT_ARG = checked(integer(1))  # sizes and counts: batch size, images, ...
NON_NEGATIVE_ARG = checked(integer(0))  # class counts, worker processes


def add_model_args(parser: argparse.ArgumentParser, what: str = 'model') -> None:
    """MODEL positional plus --checkpoint / --pretrained / --num-classes / --model-kwargs."""
    parser.add_argument('model', metavar='MODEL',
                        help=f'the {what}: a timm model name (e.g. moejet_vit_tiny), a Hub folder '
                             f'(config.json + model.safetensors), local-dir:FOLDER or hf-hub:ORG/REPO')
    parser.add_argument('--checkpoint', metavar='FILE', default=None,
                        help='weights for a named model: .safetensors, or .pth/.pt/.pth.tar read with '
                             'weights_only=True (a state dict, or a training checkpoint such as train.py\'s '
                             'checkpoint-*.pth.tar)')
    parser.add_argument('--ema', action='store_true',
                        help='take the EMA weights of a training checkpoint (train.py --model-ema)')
    parser.add_argument('--pretrained', action='store_true',
                        help='load the named model\'s pretrained weights (MoE names: recycled from dense donors)')
    add_model_kwargs(parser, 'of a named model')


def add_model_kwargs(parser: argparse.ArgumentParser, whose: str) -> None:
    """--num-classes / --model-kwargs."""
    parser.add_argument('--num-classes', type=NON_NEGATIVE_ARG, default=None, help=f'classifier size {whose}')
    parser.add_argument('--model-kwargs', nargs='*', default=None, metavar='KEY=VALUE',
                        help=f'extra create_model kwargs {whose}, values parsed as Python literals')


def parse_model_kwargs(items: Optional[Sequence[str]]) -> Dict[str, Any]:
    """``['k=v', ...]`` to a dict, values parsed as Python literals (else kept as strings), like train.py."""
    kwargs: Dict[str, Any] = {}
    for item in items or ():
        key, sep, value = item.partition('=')
        if not sep or not key:
            raise InvalidArgument(f'--model-kwargs entries must look like key=value, got {item!r}.')
        try:
            kwargs[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            kwargs[key] = value
    return kwargs


def model_kwargs_from(args: argparse.Namespace) -> Dict[str, Any]:
    """The create_model kwargs of --model-kwargs and --num-classes."""
    kwargs = parse_model_kwargs(args.model_kwargs)
    if args.num_classes is not None:
        kwargs['num_classes'] = args.num_classes
    return kwargs


def resolve_device(name: str) -> torch.device:
    """A torch device from ``--device``, refusing one this machine does not have (before any work starts)."""
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise InvalidArgument(f'--device {name!r} is not a torch device ({e}).') from e
    if device.type == 'meta':
        raise InvalidArgument(f'--device {name}: the meta device holds no values; use cpu or cuda.')
    if device.type == 'cuda':
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (device.index is not None and device.index >= count):
            raise InvalidArgument(f'--device {name}: this machine has {count} CUDA device(s); use cpu or cuda:0..'
                                  f'{max(count - 1, 0)}.')
    elif device.type == 'mps' and not (hasattr(torch.backends, 'mps') and torch.backends.mps.is_available()):
        raise InvalidArgument(f'--device {name}: MPS is not available on this machine.')
    return device


def add_output_args(parser: argparse.ArgumentParser, what: str, folder: bool = False) -> None:
    """``--output``/``-o`` (a ``.safetensors`` file, or a folder) and ``--overwrite``."""
    kind = 'folder' if folder else 'file'
    parser.add_argument('--output', '-o', required=True, metavar='FOLDER' if folder else 'FILE.safetensors', help=what)
    parser.add_argument('--overwrite', action='store_true', help=f'replace an existing output {kind}')


def check_file_output(args: argparse.Namespace, inputs: Dict[str, Any]) -> Path:
    """A ``--output`` of :func:`add_output_args` (file form): a ``.safetensors`` path, free, not one of the inputs."""
    if not args.output.endswith('.safetensors'):
        raise InvalidArgument(f'--output must be a .safetensors file, got {args.output}.')
    return check_output_free(args.output, args.overwrite, 'output file', inputs)


def check_output_free(path: str, overwrite: bool, what: str = 'output', inputs: Optional[Dict[str, Any]] = None
                      ) -> Path:
    """Refuse an output that is, contains or lies inside one of the ``inputs`` (role -> path or name), and an existing
    output unless ``--overwrite``; checked before any slow work starts."""
    check_output_apart(path, inputs or {}, what)
    refuse_existing(path, overwrite, what, '--overwrite')  # the writers' own policy, checked before slow work
    return Path(path)
