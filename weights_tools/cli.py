""" ``python -m weights_tools``: calibrate, recycle, export, push, import-official, inspect.

Each command lives in ``weights_tools/commands/<name>.py`` with ``add_parser(subparsers, parent, formatter)`` and
``run(args) -> int``; it parses its arguments and calls the library. Errors are worded by their type: the library's
input errors (``timm_moejet.errors.MoEJetError``: bad argument, unreadable or mismatched checkpoint, donor not
found, occupied output) and the operating system's file errors are one line on stderr with exit status 2;
``--debug`` shows the traceback instead. Anything else is unexpected: exit status 1, also one line unless ``--debug``.
"""
import argparse
import logging
import signal
import sys
import textwrap
from typing import List, Optional

__all__ = ['main', 'build_parser']

_COMMANDS = ('calibrate', 'recycle', 'export', 'push', 'import_official', 'inspect')

EXIT_BAD_INPUT = 2
EXIT_FAILURE = 1


def _is_input_error(e: BaseException) -> bool:
    from timm_moejet.errors import MoEJetError

    return isinstance(e, (MoEJetError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
                          PermissionError))


def _one_line(e: BaseException) -> str:
    msg = ' '.join(part.strip() for part in str(e).splitlines() if part.strip())
    return msg or type(e).__name__


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

    parser = argparse.ArgumentParser(
        prog='weights_tools',
        formatter_class=_Formatter,
        description='Calibrate and recycle dense timm models into MoE Jetpack models, export/push them in timm\'s '
                    'Hub layout, import official checkpoints and inspect the routers.',
        epilog=textwrap.dedent('''\
            examples:
              python -m weights_tools calibrate --donor vit_small_patch16_224.augreg_in21k --images ./imgs \
                  --output stats.safetensors
              python -m weights_tools recycle --model moejet_vit_tiny --trunk vit_tiny_patch16_224.augreg_in21k \
                  --experts vit_small_patch16_224.augreg_in21k --stats stats.safetensors --output ./moejet_tiny
              python -m weights_tools inspect ./moejet_tiny --images ./imgs --plot routers.png
            run "python -m weights_tools COMMAND --help" for the options and an example of each command.'''),
    )
    parser.add_argument('--debug', action='store_true', help='show the full traceback on errors')
    # the same flag after the command name; SUPPRESS keeps it from overwriting the top-level value
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument('--debug', action='store_true', default=argparse.SUPPRESS,
                        help='show the full traceback on errors')
    parent.add_argument('-q', '--quiet', action='store_true', default=argparse.SUPPRESS,
                        help='log warnings only (no progress information)')
    subparsers = parser.add_subparsers(dest='command', metavar='COMMAND', required=True)
    for name in _COMMANDS:
        module = import_module(f'.commands.{name}', __package__)
        sub = module.add_parser(subparsers, parent, _Formatter)
        sub.set_defaults(_run=module.run)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Run the command line; returns the exit status (also for ``--help`` and usage errors)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or an argparse usage error (2)
        return int(e.code or 0) if not isinstance(e.code, str) else EXIT_BAD_INPUT
    debug = getattr(args, 'debug', False)
    quiet = getattr(args, 'quiet', False)
    logging.basicConfig(level=logging.WARNING, format='%(levelname)s %(name)s: %(message)s')
    for name in ('timm_moejet', 'weights_tools'):
        logging.getLogger(name).setLevel(logging.WARNING if quiet else logging.INFO)
    try:
        import timm_moejet  # noqa: F401  (registers the moejet_*/softmoe_* models with timm)
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print(f'weights_tools {args.command}: interrupted; no output was written.', file=sys.stderr)
        return 128 + signal.SIGINT
    except Exception as e:
        if debug:
            raise
        status = EXIT_BAD_INPUT if _is_input_error(e) else EXIT_FAILURE
        hint = '' if status == EXIT_BAD_INPUT else ' (unexpected; rerun with --debug for the traceback)'
        print(f'weights_tools {args.command}: error: {_one_line(e)}{hint}', file=sys.stderr)
        return status
