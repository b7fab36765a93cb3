""" The GPU cost model's command: the MoE/dense table of an eager bf16 step on an H200 or H100, modeled on this CPU.

    python -m benchmarks.gpu_model --device h200 --batch-size 256            # this checkout
    python -m benchmarks.gpu_model --ref main                               # and a checkout of main, side by side
    python -m benchmarks.gpu_model --pairs layer tiny --top 15 --json out.json
    python -m benchmarks.gpu_model --fit                                    # refit the constants to the H200 data
"""
import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from torch._subclasses.fake_tensor import DataDependentOutputException

from benchmarks.throughput import PAIRS

from .cost import DEVICES, FITTED, Constants
from .fit import errors, fit
from .pairs import MODES, Records, modeled, record_pairs, top_ops, unknown_ops
from .report import compare_table, copy_table, error_table, ratio_table, top_table

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_PAIRS = ('tiny', 'small', 'convnext_femto', 'layer')
MODEL_PAIRS = ('layer', 'tiny', 'small', 'convnext_femto', 'layer_softmax', 'tiny_pruned50')


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog='python -m benchmarks.gpu_model', description=__doc__.splitlines()[0])
    parser.add_argument('--device', default='h200', choices=sorted(DEVICES), help='the GPU modeled (default h200)')
    parser.add_argument('--batch-size', type=int, default=256, help='batch of every pair (default 256)')
    parser.add_argument('--pairs', nargs='+', default=list(DEFAULT_PAIRS), choices=MODEL_PAIRS,
                        help='pairs as benchmarks.throughput defines them (default: tiny small convnext_femto layer)')
    parser.add_argument('--top', type=int, default=12, help='costliest op kinds listed per MoE step (default 12)')
    parser.add_argument('--json', default=None, help='write the results to this JSON file')
    parser.add_argument('--ref', default=None,
                        help='also model a checkout of this git ref (a temporary worktree) and print both tables')
    parser.add_argument('--fit', action='store_true',
                        help='fit the constants to the H200 measurements (needs --device h200, batch 256, every '
                             'measured pair) and print them with their errors; with --ref, fitted on the ref and '
                             'used for both')
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error(f'--batch-size must be >= 1, got {args.batch_size}')
    if args.top < 0:
        parser.error(f'--top must be >= 0, got {args.top}')
    if args.fit and (args.device != 'h200' or args.batch_size != 256 or not set(DEFAULT_PAIRS) <= set(args.pairs)):
        parser.error('--fit fits the H200 measurements at batch 256 of tiny, small, convnext_femto and layer: '
                     'drop --device/--batch-size/--pairs')
    missing = [p for p in args.pairs if p not in PAIRS]
    if len(missing) == len(args.pairs):
        parser.error(f'--pairs: this checkout\'s benchmarks.throughput has none of {", ".join(missing)}')
    if missing:  # an older checkout (--ref) may lack a pair: model the others
        print(f'skipped: this checkout\'s benchmarks.throughput has no pair {", ".join(missing)}', file=sys.stderr)
        args.pairs = [p for p in args.pairs if p in PAIRS]
    return args


def run_model(args: argparse.Namespace, constants: Optional[Constants] = None) -> Dict[str, Any]:
    """Record the pairs, model them on ``args.device`` with ``constants`` (default: fitted with ``--fit``, else
    :data:`FITTED`) and return the results (what ``--json`` writes)."""
    records: Records = record_pairs(args.pairs, args.batch_size, MODES)
    device = DEVICES[args.device]
    if constants is None:
        constants = fit(records, device) if args.fit else FITTED
    table = modeled(records, device, constants)
    return dict(
        device=device.name, batch_size=args.batch_size, constants=dataclasses.asdict(constants),
        unknown_ops=unknown_ops(records),
        pairs={f'{p}/{m}': row for (p, m), row in table.items()},
        top={f'{p}/{m}': top_ops(records[p, 'moe', m], device, constants, args.top) for p in args.pairs for m in MODES},
        errors=errors(table) if args.device == 'h200' and args.batch_size == 256 else [])


def _ref_results(ref: str, argv: Sequence[str]) -> Dict[str, Any]:
    """The same command on a temporary ``git worktree`` of ``ref``: that checkout's layers and pairs, this
    checkout's model."""
    with tempfile.TemporaryDirectory(prefix='gpu_model_') as tmp:
        tree, out = Path(tmp) / 'tree', Path(tmp) / 'out.json'
        added = subprocess.run(['git', '-C', str(ROOT), 'worktree', 'add', '--detach', str(tree), ref],
                               capture_output=True, text=True)
        if added.returncode != 0:
            sys.exit(f'python -m benchmarks.gpu_model: error: --ref {ref}: git worktree add failed: '
                     f'{added.stderr.strip().splitlines()[-1] if added.stderr.strip() else added.returncode}')
        try:
            boot = ('import sys; sys.path.insert(0, sys.argv[1]); import benchmarks, timm_moejet; '
                    'assert timm_moejet.__file__.startswith(sys.argv[1]), timm_moejet.__file__; '
                    'benchmarks.__path__.append(sys.argv[2]); from benchmarks.gpu_model.__main__ import main; '
                    'sys.exit(main(sys.argv[3:]))')
            cmd = [sys.executable, '-c', boot, str(tree), str(ROOT / 'benchmarks'), *argv, '--json', str(out)]
            env = dict(os.environ, PYTHONPATH=str(tree))
            # its tables come back through the JSON and are printed here; its errors go to stderr as they come
            if subprocess.run(cmd, cwd=tree, env=env, stdout=subprocess.DEVNULL).returncode != 0:
                sys.exit(f'python -m benchmarks.gpu_model: error: the model failed on --ref {ref} (output above)')
            return json.loads(out.read_text())
        finally:
            subprocess.run(['git', '-C', str(ROOT), 'worktree', 'remove', '--force', str(tree)], capture_output=True)


def _print(results: Dict[str, Any], title: str) -> None:
    print(f'## {title}\n')
    print('constants: ' + ', '.join(f'{k} {v:.3g}' for k, v in results['constants'].items()) + '\n')
    print(ratio_table(results) + '\n')
    print(copy_table(results) + '\n')
    if results['errors']:
        print(error_table(results['errors']) + '\n')
    for key, rows in results['top'].items():
        if rows:
            print(f'costliest ops, MoE {key}:\n' + top_table(rows) + '\n')
    if results['unknown_ops']:
        print('not aten ops, each charged as one kernel over its bytes: ' + ', '.join(results['unknown_ops']) + '\n')


def _own_argv(argv: Sequence[str]) -> List[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in ('--ref', '--json'):
            skip = True
        elif not a.startswith(('--ref=', '--json=')):
            out.append(a)
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    out: Dict[str, Any] = {}
    if args.ref:  # with --fit, the constants are fitted on the ref (the code that was measured) and used for both
        before = _ref_results(args.ref, _own_argv(argv))
        _print(before, f'{args.ref}: {before["device"]}, bf16 autocast, batch {args.batch_size}, eager (modeled)')
        out['ref'] = dict(before, ref=args.ref)
    try:
        results = run_model(args, Constants(**out['ref']['constants']) if args.fit and args.ref else None)
    except DataDependentOutputException as e:  # fake tensors hold no values to read
        print(f'python -m benchmarks.gpu_model: error: the step reads a tensor\'s value on the host ({e.func}), '
              'which the model cannot record: it models code without host synchronisation', file=sys.stderr)
        return 1
    _print(results, f'this checkout: {results["device"]}, bf16 autocast, batch {args.batch_size}, eager (modeled)')
    out['current'] = results
    if args.ref:
        print(f'## MoE/dense, {args.ref} -> this checkout\n\n' + compare_table(out['ref'], results) + '\n')
    if args.json:
        from timm_moejet.checkpoint_io import write_json
        write_json(out if args.ref else results, args.json)
    return 0


if __name__ == '__main__':
    from benchmarks.entry import run_main
    sys.exit(run_main(main, 'python -m benchmarks.gpu_model'))
