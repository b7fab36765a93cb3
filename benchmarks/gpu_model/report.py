""" The model's tables, as Markdown. """
from typing import Any, Dict, List, Sequence

__all__ = ['ratio_table', 'copy_table', 'compare_table', 'error_table', 'top_table']


def _table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    return '\n'.join(['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)] +
                     ['| ' + ' | '.join(r) + ' |' for r in rows])


def ratio_table(results: Dict[str, Any]) -> str:
    """Per pair: modeled ms of MoE and dense, the ratio, and the kernels, for eval and train (forward+backward)."""
    rows = []
    pairs = dict.fromkeys(k.split('/')[0] for k in results['pairs'])
    for pair in pairs:
        cells = [pair]
        for mode in ('eval', 'train'):
            row = results['pairs'].get(f'{pair}/{mode}')
            if row is None:
                cells += ['-'] * 3
                continue
            cells += [f'{row["moe"]["seconds"] * 1e3:.2f} / {row["dense"]["seconds"] * 1e3:.2f}',
                      f'**{row["ratio"]:.2f}x**', f'{row["moe"]["kernels"]} / {row["dense"]["kernels"]}']
        rows.append(cells)
    return _table(['pair', 'eval ms (moe / dense)', 'eval ratio', 'eval kernels', 'train ms (moe / dense)',
                   'train ratio', 'train kernels'], rows)


def copy_table(results: Dict[str, Any]) -> str:
    """Copies and dtype casts (``_to_copy``, ``copy_``, ``clone``) per step: kernels and modeled device ms."""
    rows = []
    for key, row in results['pairs'].items():
        rows.append([key.replace('/', ' ')] + [f'{row[r]["copy_kernels"]} / {row[r]["copy_s"] * 1e3:.2f}'
                                               for r in ('moe', 'dense')])
    return _table(['pair, mode', 'MoE copies and casts: kernels / ms', 'dense: kernels / ms'], rows)


def compare_table(before: Dict[str, Any], after: Dict[str, Any]) -> str:
    """MoE/dense ratios and MoE kernels of two checkouts, pair by pair."""
    rows = []
    for key, row in after['pairs'].items():
        old = before['pairs'].get(key)
        rows.append([key.replace('/', ' '), f'{old["ratio"]:.2f}x' if old else '-', f'**{row["ratio"]:.2f}x**',
                     f'{old["moe"]["kernels"] if old else "-"} -> {row["moe"]["kernels"]}'])
    return _table(['pair, mode', 'before', 'after', 'MoE kernels'], rows)


def error_table(rows: List[Dict[str, Any]]) -> str:
    """The H200 measurements against the model."""
    return _table(['measured on an H200', 'measured', 'modeled', 'error'],
                  [[r['what'], f'{r["measured"]:.3g}', f'{r["modeled"]:.3g}', f'{r["error"] * 100:+.0f}%']
                   for r in rows])


def top_table(rows: List[Dict[str, Any]]) -> str:
    """The costliest op kinds of one step."""
    return _table(['op', 'dtype', 'calls', 'kernels', 'GB moved', 'ms'],
                  [[r['op'], r['dtype'], str(r['count']), str(r['kernels']), f'{r["gbytes"]:.2f}', f'{r["ms"]:.3f}']
                   for r in rows])
