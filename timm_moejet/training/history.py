""" Which sharded checkpoints a run keeps (train.py's ``--checkpoint-hist``): the best by ``--eval-metric``, and the
latest.

Every ``epoch_N/moejet_train.json`` records the epoch's validation metric (``metric``, ``eval_metric``; None for an
epoch without validation). After each save, the ``keep`` best checkpoints are kept, ranked by that metric (higher
is better, lower for ``loss``; epochs without one rank last, newer before older), and the latest in any case; the
folder's ``best`` file names the best one, as ``latest`` names the newest. A run without validation keeps the
``keep`` newest. Checkpoints after the latest (left by a run that was resumed from an earlier one) are left alone:
the resumed run replaces them as it reaches them.
"""
import json
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from ..checkpoint_io import atomic_write_bytes

__all__ = ['BEST', 'rank_checkpoints', 'prune_checkpoints']

BEST = 'best'


def _score(record: Dict[str, Any]) -> Tuple[int, float]:
    metric = record.get('metric')
    if metric is None:
        return 0, 0.
    return 1, -metric if record.get('eval_metric') == 'loss' else metric


def rank_checkpoints(records: Dict[int, Dict[str, Any]]) -> List[int]:
    """Epochs from the best to the worst by their records' metric (the newest first among equals and among those
    without a metric)."""
    return sorted(records, key=lambda epoch: (*_score(records[epoch]), epoch), reverse=True)


def _records(root: Path) -> Dict[int, Dict[str, Any]]:
    records = {}
    for path in root.glob('epoch_*'):
        if path.name[6:].isdigit():
            try:
                records[int(path.name[6:])] = json.loads((path / 'moejet_train.json').read_text())
            except (OSError, ValueError):
                records[int(path.name[6:])] = {}  # unreadable: ranks with the epochs without a metric
    return records


def prune_checkpoints(root: Path, keep: int, latest: int) -> Optional[int]:
    """Delete the checkpoints under ``root`` up to epoch ``latest`` that are neither among the ``keep`` best nor the
    latest; write ``best``. Returns the best epoch (None without validation metrics). Rank 0 only."""
    records = {epoch: record for epoch, record in _records(root).items() if epoch <= latest}
    if not records:
        return None
    ranked = rank_checkpoints(records)
    kept = set(ranked[:max(keep, 1)]) | {latest}
    for epoch in set(records) - kept:
        shutil.rmtree(root / f'epoch_{epoch}', ignore_errors=True)
    best = ranked[0] if records[ranked[0]].get('metric') is not None else None
    if best is not None:
        atomic_write_bytes(f'epoch_{best}'.encode(), root / BEST)
    return best
