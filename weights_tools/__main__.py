"""Entry point of ``python -m weights_tools``."""
import sys


def main(argv=None) -> int:
    """The ``weights-tools`` command. Everything is imported here, not above: the console script imports this module
    first, and Ctrl-C during the seconds of importing torch ends in one line and status 130 (timm_moejet.interrupt,
    whose package import is guarded itself)."""
    from timm_moejet.interrupt import run_main

    def run() -> int:
        from .cli import main as cli_main
        return cli_main(argv)
    return run_main('weights-tools', run)


if __name__ == '__main__':
    sys.exit(main())
