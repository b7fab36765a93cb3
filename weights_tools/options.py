""" The command line declared: a command is a :class:`Command` (name, words, example, options), an option an
:class:`Option`; the options several commands share are declared here once, with their argument-level checks.

A command module (``weights_tools/commands/<name>.py``) holds its ``COMMAND`` and ``run(args) -> int``; it parses
nothing itself and words nothing itself: the library does the work and raises typed errors, ``cli.py`` words them.
"""
import argparse
import ast
import dataclasses
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple, Union

import torch

from timm_moejet.checkpoint_io import check_output_apart, refuse_existing
from timm_moejet.errors import InvalidArgument
from timm_moejet.settings import SEED as SEED_CHECK
from timm_moejet.settings import Check, integer

__all__ = ['Option', 'Group', 'Command', 'option', 'checked', 'MODEL_SOURCE', 'MODEL_SETTINGS', 'DEVICE', 'SEED',
           'BATCH_SIZE', 'WORKERS', 'LIMIT', 'file_output', 'folder_output', 'model_kwargs_from', 'resolve_device',
           'check_file_output', 'check_output_free']


@dataclasses.dataclass(frozen=True)
class Option:
    """One option: the arguments of argparse's ``add_argument``. Calling it gives a variant (another default or
    help) of the same option."""
    flags: Tuple[str, ...]
    settings: Mapping[str, Any]

    def __call__(self, **changes: Any) -> 'Option':
        return Option(self.flags, {**self.settings, **changes})

    def add_to(self, parser: Any) -> None:
        parser.add_argument(*self.flags, **self.settings)


def option(*flags: str, **settings: Any) -> Option:
    """Declare an option as ``add_argument`` takes it."""
    return Option(flags, settings)


@dataclasses.dataclass(frozen=True)
class Group:
    """Options shown under a title, or of which at most one may be given (``exclusive``)."""
    options: Tuple[Option, ...]
    title: str = ''
    exclusive: bool = False

    def add_to(self, parser: argparse.ArgumentParser) -> None:
        group = parser.add_mutually_exclusive_group() if self.exclusive else parser.add_argument_group(self.title)
        for item in self.options:
            item.add_to(group)


@dataclasses.dataclass(frozen=True)
class Command:
    """A ``weights-tools`` command: its name, one help line, a description, an example and its options."""
    name: str
    help: str
    description: str
    example: str
    options: Sequence[Union[Option, Group, Sequence[Option]]]

    def add_to(self, subparsers: Any, parent: argparse.ArgumentParser, formatter: type) -> argparse.ArgumentParser:
        """Add the command's parser to ``subparsers``."""
        parser = subparsers.add_parser(self.name, parents=[parent], formatter_class=formatter, epilog=self.example,
                                       help=self.help, description=self.description)
        for item in self.options:
            for one in (item if isinstance(item, (tuple, list)) else (item,)):
                one.add_to(parser)
        return parser


def checked(check: Check) -> Callable[[str], int]:
    """An argparse ``type`` for an int option, checked by one of the library's checks (argparse then reports
    'argument --x: must be ..., got ...')."""
    def convert(text: str) -> int:
        try:
            return check('value', int(text))
        except (ValueError, InvalidArgument):
            raise argparse.ArgumentTypeError(f'must be {check.allowed}, got {text}') from None
    return convert


SEED_ARG = checked(SEED_CHECK)
COUNT_ARG = checked(integer(1))  # sizes and counts: batch size, images, ...
NON_NEGATIVE_ARG = checked(integer(0))  # class counts, worker processes

# the model a command reads: a name, a Hub folder or id, with optional weights
MODEL_SETTINGS = (
    option('--num-classes', type=NON_NEGATIVE_ARG, default=None, help='classifier size (create_model num_classes)'),
    option('--model-kwargs', nargs='*', default=None, metavar='KEY=VALUE',
           help='extra create_model kwargs, values parsed as Python literals'),
)
MODEL_SOURCE = (
    option('model', metavar='MODEL', help='the model: a timm model name (e.g. moejet_vit_tiny), a Hub folder '
                                          '(config.json + model.safetensors), local-dir:FOLDER or hf-hub:ORG/REPO'),
    option('--checkpoint', metavar='FILE', default=None,
           help='weights for a named model: .safetensors, or .pth/.pt/.pth.tar read with weights_only=True (a state '
                'dict, or a training checkpoint such as train.py\'s checkpoint-*.pth.tar)'),
    option('--ema', action='store_true', help='take the EMA weights of a training checkpoint (train.py --model-ema)'),
    option('--pretrained', action='store_true',
           help='load the named model\'s pretrained weights (MoE names: recycled from dense donors)'),
    *MODEL_SETTINGS,
)
DEVICE = option('--device', default='cpu', help='torch device, e.g. cpu or cuda')
SEED = option('--seed', type=SEED_ARG, default=0, help='seed of the class-balanced random image subset')
BATCH_SIZE = option('--batch-size', type=COUNT_ARG, default=32, help='images per forward')
WORKERS = option('--workers', type=NON_NEGATIVE_ARG, default=0, help='DataLoader worker processes')
LIMIT = option('--limit', type=COUNT_ARG, default=None, help='use at most this many images (class-balanced)')
OVERWRITE = option('--overwrite', action='store_true', help='replace an existing output')


def file_output(what: str) -> Tuple[Option, Option]:
    """``--output``/``-o`` naming a ``.safetensors`` file, and ``--overwrite``."""
    return option('--output', '-o', required=True, metavar='FILE.safetensors', help=what), OVERWRITE


def folder_output(what: str) -> Tuple[Option, Option]:
    """``--output``/``-o`` naming a folder, and ``--overwrite``."""
    return option('--output', '-o', required=True, metavar='FOLDER', help=what), OVERWRITE


def _literal(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def model_kwargs_from(args: argparse.Namespace) -> Dict[str, Any]:
    """The create_model kwargs of ``--model-kwargs`` (values parsed as Python literals, else kept as strings, as in
    train.py) and ``--num-classes``."""
    kwargs: Dict[str, Any] = {}
    for item in args.model_kwargs or ():
        key, sep, value = item.partition('=')
        if not sep or not key:
            raise InvalidArgument(f'--model-kwargs entries must look like key=value, got {item!r}.')
        kwargs[key] = _literal(value)
    if args.num_classes is not None:
        if 'num_classes' in kwargs:
            raise InvalidArgument(f'the number of classes is given twice: as --num-classes {args.num_classes} and as '
                                  f'--model-kwargs num_classes={kwargs["num_classes"]}; give it once.')
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


def check_output_free(path: str, overwrite: bool, what: str = 'output',
                      inputs: Optional[Mapping[str, Any]] = None, folder: Optional[bool] = None) -> Path:
    """Refuse an output that is, contains or lies inside one of the ``inputs`` (role -> path or name), an existing
    output unless ``--overwrite``, and one of the other kind (``folder``: a folder, else a file); checked before any
    slow work starts."""
    check_output_apart(path, inputs or {}, what)
    refuse_existing(path, overwrite, what, '--overwrite', folder)  # the writers' own policy, before slow work
    return Path(path)


def check_file_output(args: argparse.Namespace, inputs: Mapping[str, Any]) -> Path:
    """A :func:`file_output`: a ``.safetensors`` path, free, not one of the inputs."""
    if not args.output.endswith('.safetensors'):
        raise InvalidArgument(f'--output must be a .safetensors file, got {args.output}.')
    return check_output_free(args.output, args.overwrite, 'output file', inputs, folder=False)
