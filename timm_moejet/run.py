""" ``python -m timm_moejet.run SCRIPT [ARGS...]``: run one of timm's scripts with the MoE Jetpack models registered.

timm's scripts (train.py, validate.py, benchmark.py, inference.py, onnx_export.py, onnx_validate.py, ...) live in
timm's repository only, not in its wheel or sdist, and timm finds plugin models only once their package is imported.
train.py can import one itself (``--device-modules timm_moejet``); the others cannot. This launcher imports
``timm_moejet`` (which registers ``moejet_*``/``softmoe_*``), sets ``sys.argv`` to ``[SCRIPT, *ARGS]``, puts the
script's folder first on ``sys.path`` and runs the file as ``__main__`` (``runpy.run_path``), like
``python SCRIPT ARGS...``; the exit status is the script's.
"""
import os
import runpy
import sys
import textwrap
from typing import List, Optional, Sequence

import timm_moejet  # noqa: F401  (registers the models before the script looks them up)
from timm_moejet.interrupt import run_main

__all__ = ['main', 'run_script']

PROG = 'python -m timm_moejet.run'
EXIT_BAD_INPUT = 2

HELP = textwrap.dedent(f'''\
    usage: {PROG} SCRIPT [ARGS...]

    Runs a timm script file (train.py, validate.py, benchmark.py, inference.py, onnx_export.py, onnx_validate.py, ...)
    with the MoE Jetpack models registered with timm: imports timm_moejet, sets sys.argv to [SCRIPT, ARGS...], puts
    the script's folder first on sys.path and runs SCRIPT as __main__, like "python SCRIPT ARGS..."; the exit status
    is the script's. Only train.py can import a plugin itself (--device-modules timm_moejet); the other scripts see
    moejet_* models only through this launcher.

    The scripts are in timm's repository only, not in the timm package: clone
    https://github.com/huggingface/pytorch-image-models and name them by path. Run from outside the clone: in its
    root, "import timm" finds the clone's timm/ folder (the working folder comes first on sys.path) instead of the
    installed timm.

    examples (from a checkout of timm-moejet, TIMM_REPO a clone of timm's repository, out/digits64 written by
    "python -m benchmarks.digits.data out/digits64 --image-size 64"):
      {PROG} $TIMM_REPO/train.py --data-dir out/digits64 --model moejet_vit_test --num-classes 10 \\
          --input-size 3 64 64 --batch-size 64 --opt adamw --lr 2e-3 --weight-decay 0.05 --warmup-epochs 1 \\
          --epochs 30 --device cpu --workers 2 --output out/runs --experiment moejet_test_digits
      {PROG} $TIMM_REPO/validate.py out/digits64 --model moejet_vit_test --num-classes 10 \\
          --checkpoint out/runs/moejet_test_digits/model_best.pth.tar --device cpu --workers 2 \\
          --results-file out/validate.json --results-format json
      {PROG} $TIMM_REPO/benchmark.py --model moejet_vit_test --bench both --device cpu --batch-size 32 \\
          --num-bench-iter 10 --num-warm-iter 2 --results-file out/benchmark.json --results-format json
      {PROG} $TIMM_REPO/inference.py out/digits64 --model moejet_vit_test --num-classes 10 \\
          --checkpoint out/runs/moejet_test_digits/model_best.pth.tar --device cpu --workers 2 \\
          --results-dir out/predictions --results-format csv --topk 1 --fullname --include-index --no-console-results
      {PROG} $TIMM_REPO/onnx_export.py out/moejet_vit_test.onnx --model moejet_vit_test --num-classes 10 \\
          --checkpoint out/runs/moejet_test_digits/model_best.pth.tar --check-forward
      {PROG} $TIMM_REPO/onnx_validate.py out/digits64/validation --onnx-input out/moejet_vit_test.onnx \\
          --batch-size 64 --img-size 64 --mean 0.5 0.5 0.5 --std 0.5 0.5 0.5 --crop-pct 0.9 --interpolation bicubic
    (inference.py needs pandas; more in docs/timm_scripts.md)
    ''')


def _note_shadowed_timm() -> None:
    """One line on stderr when ``timm`` came from the working folder's ``timm/`` (run in a clone of timm's repo)."""
    import timm

    folder = os.path.dirname(os.path.abspath(timm.__file__))
    if folder == os.path.join(os.getcwd(), 'timm'):
        print(f'{PROG}: note: timm {timm.__version__} is imported from {folder} (the working folder), not the '
              f'installed timm; run from another folder to use the installed one', file=sys.stderr)


def _exit_status(code: object) -> int:
    """The process exit status Python gives ``SystemExit(code)`` (a message is printed on stderr, status 1)."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def run_script(script: str, args: Sequence[str] = ()) -> int:
    """Run ``script`` as ``__main__`` with ``sys.argv = [script, *args]`` and its folder first on ``sys.path``.

    ``sys.argv`` and ``sys.path`` are restored afterwards. An exception the script raises propagates, as it would
    from ``python script``.

    Args:
        script: Path of a Python file.
        args: The script's command-line arguments.

    Returns:
        The script's exit status (0 when it ends without ``sys.exit``).
    """
    saved_argv, saved_path = sys.argv[:], sys.path[:]
    sys.argv = [script, *args]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    try:
        runpy.run_path(script, run_name='__main__')
    except SystemExit as e:
        return _exit_status(e.code)
    finally:
        sys.argv, sys.path[:] = saved_argv, saved_path
    return 0


def _usage_error(message: str) -> int:
    print(f'{PROG}: error: {message} (see {PROG} --help)', file=sys.stderr)
    return EXIT_BAD_INPUT


def main(argv: Optional[List[str]] = None) -> int:
    """The command line; returns the exit status (the script's, or 2 for a missing script or no arguments)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv:
        print(HELP, file=sys.stderr, end='')
        return EXIT_BAD_INPUT
    script, args = argv[0], argv[1:]
    if script in ('-h', '--help'):
        print(HELP, end='')
        return 0
    if script.startswith('-'):
        return _usage_error(f'unknown option {script}; the first argument is the script to run')
    if not os.path.exists(script):
        return _usage_error(f'{script} does not exist; timm\'s scripts are in a clone of its repository, '
                            f'https://github.com/huggingface/pytorch-image-models, not in the timm package')
    if not os.path.isfile(script):
        return _usage_error(f'{script} is not a file')
    if not os.access(script, os.R_OK):
        return _usage_error(f'{script} cannot be read: permission denied')
    try:
        with open(script, 'rb') as f:
            f.read(1)
    except OSError as e:
        return _usage_error(f'{script} cannot be read ({e.strerror or e})')
    _note_shadowed_timm()
    return run_script(script, args)


if __name__ == '__main__':
    sys.exit(run_main(PROG, main))
