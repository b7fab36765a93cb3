""" ``weights-tools``: calibrate, recycle, select, export, push, import-official, inspect, prune.

Each command lives in ``weights_tools/commands/<name>.py``: its declaration (``COMMAND``, a
:class:`~weights_tools.options.Command`; options several commands share are declared once in ``options.py``) and
``run(args) -> int``, which calls the library. Errors are worded by their type: the library's
input errors (``timm_moejet.errors.MoEJetError``: bad argument, unreadable or mismatched checkpoint, donor not
found, occupied output) and the operating system's file errors are one line on stderr with exit status 2;
``--debug`` shows the traceback instead. Anything else is unexpected: exit status 1, also one line unless ``--debug``.
"""
import argparse
import logging
import os
import signal
import sys
import textwrap
import threading
from typing import List, Optional

__all__ = ['main', 'build_parser']

_COMMANDS = ('calibrate', 'recycle', 'select', 'export', 'push', 'import_official', 'inspect', 'prune')

EXIT_BAD_INPUT = 2
EXIT_FAILURE = 1


# arguments that name what a command writes (checked after an interrupt: was it written?)
_OUTPUT_ARGS = ('output', 'plot', 'json', 'route_plot', 'save_routing')


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is, so that the same cleanup runs as for Ctrl-C."""


def _raise_terminated(signum, frame):
    raise Terminated()


def _output_states(args: argparse.Namespace) -> dict:
    """Identity (inode, mtime) of each output path now; outputs are only ever replaced by an atomic rename, so a
    changed identity means a complete new output."""
    states = {}
    for name in _OUTPUT_ARGS:
        path = getattr(args, name, None)
        if path:
            try:
                st = os.lstat(path)
                states[str(path)] = (st.st_ino, st.st_mtime_ns)
            except OSError:
                states[str(path)] = None
    return states


def _check_outputs_apart(args: argparse.Namespace) -> None:
    """Refuse two outputs of one command naming the same path (however spelled), or one inside the other, before
    any work: the second write would replace the first."""
    from timm_moejet.errors import InvalidArgument

    named = [(f'--{name}', os.path.realpath(getattr(args, name))) for name in _OUTPUT_ARGS
             if isinstance(getattr(args, name, None), str)]
    for i, (opt_a, a) in enumerate(named):
        for opt_b, b in named[i + 1:]:
            if a == b:
                raise InvalidArgument(f'{opt_a} and {opt_b} name the same path {getattr(args, opt_b[2:])}; give each '
                                      f'output its own path.')
            if b.startswith(a + os.sep) or a.startswith(b + os.sep):
                raise InvalidArgument(f'{opt_a} {getattr(args, opt_a[2:])} and {opt_b} {getattr(args, opt_b[2:])}: '
                                      f'one output lies inside the other; give each output its own path.')


def _is_input_error(e: BaseException) -> bool:
    from timm_moejet.errors import MoEJetError

    return isinstance(e, (MoEJetError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
                          PermissionError))


_MAX_MESSAGE = 480  # characters of one error message; --debug shows the whole exception


def _one_line(e: BaseException) -> str:
    msg = ' '.join(part.strip() for part in str(e).splitlines() if part.strip()) or type(e).__name__
    if len(msg) > _MAX_MESSAGE:
        msg = f'{msg[:_MAX_MESSAGE]} ... ({len(msg) - _MAX_MESSAGE} more characters; --debug shows all)'
    return msg


class _UsageError(Exception):
    """An argparse usage error, reported as one line like the others."""

    def __init__(self, prog: str, message: str) -> None:
        super().__init__(message)
        self.prog = prog


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        raise _UsageError(self.prog, message)


class _Formatter(argparse.HelpFormatter):
    """Wraps one-paragraph descriptions, keeps multi-line examples as written, shows only meaningful defaults."""

    def _fill_text(self, text, width, indent):
        if '\n' in text:
            return ''.join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)

    def _get_help_string(self, action):
        help_text = action.help or ''
        if action.default not in (None, False, argparse.SUPPRESS) and '%(default)' not in help_text:
            help_text += ' (default: %(default)s)'
        return help_text


def build_parser() -> argparse.ArgumentParser:
    from importlib import import_module

    parser = _Parser(
        prog='weights-tools',
        formatter_class=_Formatter,
        description='Calibrate and recycle dense timm models into MoE Jetpack models, export/push them in timm\'s '
                    'Hub layout, import official checkpoints and inspect the routers.',
        epilog=textwrap.dedent('''\
            examples:
              weights-tools calibrate --donor vit_small_patch16_224.augreg_in21k --images ./imgs \\
                  --output stats.safetensors
              weights-tools recycle --model moejet_vit_tiny --trunk vit_tiny_patch16_224.augreg_in21k \\
                  --experts vit_small_patch16_224.augreg_in21k --stats stats.safetensors --output ./moejet_tiny
              weights-tools inspect ./moejet_tiny --images ./imgs --plot routers.png
            run "weights-tools COMMAND --help" for the options and an example of each command.'''),
    )
    parser.add_argument('--debug', action='store_true', help='show the full traceback on errors')
    # the same flag after the command name; SUPPRESS keeps it from overwriting the top-level value
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument('--debug', action='store_true', default=argparse.SUPPRESS,
                        help='show the full traceback on errors')
    parent.add_argument('-q', '--quiet', action='store_true', default=argparse.SUPPRESS,
                        help='log warnings only (no progress information)')
    subparsers = parser.add_subparsers(dest='command', metavar='COMMAND', required=True, parser_class=_Parser)
    for name in _COMMANDS:
        module = import_module(f'.commands.{name}', __package__)
        module.COMMAND.add_to(subparsers, parent, _Formatter).set_defaults(_run=module.run)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Run the command line; returns the exit status (also for ``--help`` and usage errors)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version
        return int(e.code or 0) if not isinstance(e.code, str) else EXIT_BAD_INPUT
    except _UsageError as e:
        print(f'{e.prog}: error: {e} (see {e.prog} --help)', file=sys.stderr)
        return EXIT_BAD_INPUT
    debug = getattr(args, 'debug', False)
    quiet = getattr(args, 'quiet', False)
    logging.basicConfig(level=logging.WARNING, format='%(levelname)s %(name)s: %(message)s')
    for name in ('timm_moejet', 'weights_tools'):
        logging.getLogger(name).setLevel(logging.WARNING if quiet else logging.INFO)
    before = _output_states(args)
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if in_main_thread else None
    try:
        import timm_moejet  # noqa: F401  (registers the moejet_*/softmoe_* models with timm)
        _check_outputs_apart(args)
        return int(args._run(args) or 0)
    except KeyboardInterrupt as e:
        what, sig = ('terminated', signal.SIGTERM) if isinstance(e, Terminated) else ('interrupted', signal.SIGINT)
        written = [path for path, state in _output_states(args).items() if state != before.get(path)]
        if written:
            print(f'weights-tools {args.command}: {what}; {", ".join(written)} was written completely before that.',
                  file=sys.stderr)
        else:
            print(f'weights-tools {args.command}: {what}; no output was written.', file=sys.stderr)
        return 128 + sig
    except Exception as e:
        if debug:
            raise
        status = EXIT_BAD_INPUT if _is_input_error(e) else EXIT_FAILURE
        hint = '' if status == EXIT_BAD_INPUT else ' (unexpected; rerun with --debug for the traceback)'
        print(f'weights-tools {args.command}: error: {_one_line(e)}{hint}', file=sys.stderr)
        return status
    finally:
        if in_main_thread and previous is not None:
            signal.signal(signal.SIGTERM, previous)
