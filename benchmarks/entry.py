""" The command-line entry of the benchmarks: a missing optional dependency is one line and exit status 2, Ctrl-C
one line and exit status 130 (``timm_moejet.interrupt``). """
import sys
from typing import Callable, Sequence, Tuple

from timm_moejet.errors import MissingExtra
from timm_moejet.extras import require
from timm_moejet.interrupt import interrupted

__all__ = ['run_main']


def run_main(main: Callable[[], object], prog: str, needs: Sequence[Tuple[str, str, str]] = ()) -> object:
    """Run ``main()``; a ``MissingExtra`` becomes one line on stderr and exit status 2, as in ``weights-tools``, and
    Ctrl-C one line and exit status 130.

    Args:
        main: The benchmark's main function, called without arguments (it reads ``sys.argv``).
        prog: The command, for the message (``python -m benchmarks.digits.demo``).
        needs: ``(module, extra, feature)`` checked before ``main`` starts, so a long run does not fail at its end.

    Returns:
        What ``main`` returned.
    """
    try:
        for module, extra, feature in needs:
            require(module, extra, feature)
        return main()
    except MissingExtra as e:
        print(f'{prog}: error: {e}', file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(interrupted(prog))
