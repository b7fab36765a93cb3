""" Which sharded checkpoints a run keeps (train.py's ``--checkpoint-hist``): the best by ``--eval-metric``, and the
one just saved.

Every ``epoch_N/moejet_train.json`` records the epoch's validation metric (``metric``, ``eval_metric``; None for an
epoch without validation). After each save, the checkpoint just saved is kept, and the ``keep`` best, ranked by
that metric (higher is better, lower for ``loss``); among equals and without a metric the one just saved first,
then the newer; checkpoints newer than the one just saved (left by a run that was resumed from an earlier one) rank
last. The folder's ``best`` file names the best one, as ``latest`` names the one just saved. A run without validation
keeps the one just saved and the ``keep - 1`` newest others.
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


def rank_checkpoints(records: Dict[int, Dict[str, Any]], saved: Optional[int] = None) -> List[int]:
    """Epochs from the best to the worst by their records' metric: among equals (and those without a metric)
    ``saved`` first, then the newer; epochs after ``saved`` last."""
    saved = max(records) if saved is None else saved
    return sorted(records, key=lambda e: (e <= saved, *_score(records[e]), e == saved, e), reverse=True)


def _records(root: Path) -> Dict[int, Dict[str, Any]]:
    records = {}
    for path in root.glob('epoch_*'):
        if path.name[6:].isdigit() and not path.is_symlink():
            try:
                records[int(path.name[6:])] = json.loads((path / 'moejet_train.json').read_text())
            except (OSError, ValueError):
                records[int(path.name[6:])] = {}  # unreadable: ranks with the epochs without a metric
    return records


def prune_checkpoints(root: Path, keep: int, saved: int) -> Optional[int]:
    """Delete the checkpoints under ``root`` that are neither ``saved`` nor among the ``keep`` best; write
    ``best``. Returns the best epoch (None without validation metrics). Rank 0 only."""
    records = _records(root)
    if not records:
        return None
    ranked = rank_checkpoints(records, saved)
    kept = set(ranked[:max(keep, 1)]) | {saved}
    for epoch in set(records) - kept:
        shutil.rmtree(root / f'epoch_{epoch}', ignore_errors=True)
    best = ranked[0] if records[ranked[0]].get('metric') is not None else None
    if best is not None:
        atomic_write_bytes(f'epoch_{best}'.encode(), root / BEST)
    return best
