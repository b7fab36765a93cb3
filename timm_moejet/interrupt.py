""" Ctrl-C in the project's commands: one line on stderr and exit status 130, also during the heavy imports.

The commands (``weights-tools``, ``python -m timm_moejet.train``, ``python -m timm_moejet.sharded_checkpoint``,
``python -m timm_moejet.run``, ``python -m benchmarks.*``) spend their first seconds importing torch and timm. A
Ctrl-C then, or later, would print a traceback and end the process by SIGINT. Here it ends the command with one line,
``<command>: interrupted``, and exit status 130 (128 + SIGINT): what shells report for a command stopped by Ctrl-C,
so scripts and CI can tell an interruption from a failure, and the same status whether the command is run from a
shell or from Python (where death by the signal reads -2).

* :func:`run_main` runs a command's main function.
* :func:`while_importing` guards imports. ``timm_moejet/__init__.py`` imports everything under it, so that the
  interruption of ``python -m timm_moejet.train`` is caught even before ``train.py`` runs (Python imports the
  package first). It acts only in a process started as one of the commands (:func:`command_name`): importing
  ``timm_moejet`` in a user's program or a notebook leaves KeyboardInterrupt as it is.

Standard library only: this module is imported before torch.
"""
import contextlib
import os
import signal
import sys
import threading
from typing import Callable, Iterator, Optional, Sequence

__all__ = ['EXIT_INTERRUPTED', 'command_name', 'interrupted', 'run_main', 'while_importing']

EXIT_INTERRUPTED = 128 + signal.SIGINT

_PACKAGES = ('timm_moejet', 'weights_tools', 'benchmarks')  # python -m <one of these>.<module>
_SCRIPTS = {'weights_tools': 'weights-tools'}  # console scripts (pyproject.toml), by module: named as the script
_OPTIONS_WITH_VALUE = 'WX'  # python's single-letter options that take a value (besides -c and -m)


def _main_module(argv: Sequence[str]) -> Optional[str]:
    """The MODULE of ``python [options] -m MODULE ...``, from the interpreter's own arguments (None otherwise)."""
    args = iter(argv[1:])
    for arg in args:
        if arg.startswith('--') or arg == '-' or not arg.startswith('-'):
            if arg == '--check-hash-based-pycs':
                next(args, None)
                continue
            return None  # a script, stdin, or the end of the options
        for i, letter in enumerate(arg[1:], 1):  # combined flags: -Im MODULE, -mMODULE
            if letter == 'c':
                return None
            if letter == 'm':
                return arg[i + 1:] or next(args, None)
            if letter in _OPTIONS_WITH_VALUE:
                if not arg[i + 1:]:
                    next(args, None)
                break
    return None


def command_name() -> Optional[str]:
    """How this process was started, when it runs one of the project's commands (``weights-tools``,
    ``python -m timm_moejet.train``, ...); None in any other program."""
    script = os.path.splitext(os.path.basename(sys.argv[0]))[0] if sys.argv else ''
    if script in _SCRIPTS.values():
        return script
    module = _main_module(getattr(sys, 'orig_argv', []))
    if module in _SCRIPTS:
        return _SCRIPTS[module]  # python -m weights_tools speaks as weights-tools, as its messages do
    if module and module.split('.')[0] in _PACKAGES:
        return f'python -m {module}'
    return None


def interrupted(prog: str) -> int:
    """Say on stderr that ``prog`` was interrupted; returns the exit status, 130."""
    print(f'{prog}: interrupted', file=sys.stderr)
    return EXIT_INTERRUPTED


def run_main(prog: str, main: Callable[[], Optional[int]]) -> int:
    """Run a command's main function; returns its exit status, or 130 (with one line) on Ctrl-C."""
    try:
        return int(main() or 0)
    except KeyboardInterrupt:
        return interrupted(prog)


@contextlib.contextmanager
def _interrupts_noted(seen: list) -> Iterator[None]:
    """Note every SIGINT in ``seen`` (still raising KeyboardInterrupt), where Python's own handler is in effect in
    the main thread: an extension module that swallows the KeyboardInterrupt of an import it makes (torch's C module
    importing numpy) cannot hide the Ctrl-C then."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return

    def note(signum, frame):
        seen.append(signum)
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, note)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@contextlib.contextmanager
def while_importing() -> Iterator[None]:
    """Imports under this end a command interrupted by Ctrl-C with one line and status 130 (``SystemExit``), also
    when a library swallowed the interruption (the imports then end, or fail, as if nothing happened); in any other
    program the KeyboardInterrupt goes on as it is."""
    prog = command_name()
    seen: list = []
    try:
        with _interrupts_noted(seen) if prog is not None else contextlib.nullcontext():
            yield
    except KeyboardInterrupt:
        if prog is None:
            raise
        raise SystemExit(interrupted(prog)) from None
    except Exception:
        if seen:  # an import failed because its interruption was swallowed half-way (numpy loaded twice)
            raise SystemExit(interrupted(prog)) from None
        raise
    if seen:
        raise SystemExit(interrupted(prog))
