""" Fit the model's constants to the H200 measurements, and the model's error on each measurement.

The objective is the sum of squared log errors over every measured figure: the absolute step times where the
measurement gave them (ViT-T eval and train, the layer's eval) and the MoE/dense ratios of every pair and mode.
Coordinate descent over a log grid of each constant, a few sweeps: the model is cheap once the ops are recorded.
"""
import dataclasses
import math
from typing import Any, Dict, List, Tuple

from .cost import FITTED, Constants, Device
from .measured import MEASURED_RATIOS, MEASURED_S
from .pairs import Records, modeled

__all__ = ['errors', 'fit']

# the range searched for each constant
_BOUNDS = dict(gemm_efficiency=(0.1, 0.95), bandwidth_efficiency=(0.1, 0.95), grouped_conv_efficiency=(0.01, 0.95),
               launch_s=(1e-6, 40e-6),
               view_s=(0.1e-6, 10e-6), kernel_floor_s=(0.5e-6, 10e-6))


def errors(table: Dict[Tuple[str, str], Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Each measured figure next to the model's, with the relative error (modeled / measured - 1)."""
    rows = []
    for (pair, mode), ratio in MEASURED_RATIOS.items():
        if (pair, mode) not in table:
            continue
        row = table[pair, mode]
        for what, measured, model in [(f'{pair} {mode} MoE/dense', ratio, row['ratio'])] + [
                (f'{pair} {mode} {role} ms', MEASURED_S[pair, mode][i] * 1e3, row[role]['seconds'] * 1e3)
                for i, role in enumerate(('moe', 'dense')) if (pair, mode) in MEASURED_S]:
            rows.append(dict(what=what, measured=measured, modeled=model, error=model / measured - 1))
    return rows


def _loss(records: Records, device: Device, c: Constants) -> float:
    rows = errors(modeled(records, device, c))
    return sum(math.log1p(r['error']) ** 2 for r in rows)


def fit(records: Records, device: Device, sweeps: int = 4, points: int = 9) -> Constants:
    """Constants minimising the squared log error of the model against the H200 measurements."""
    best = FITTED
    best_loss = _loss(records, device, best)
    for sweep in range(sweeps):
        for name, (lo, hi) in _BOUNDS.items():
            centre = getattr(best, name)
            span = (hi / lo) ** (0.5 / (sweep + 1))  # the grid narrows around the best value each sweep
            grid = [min(hi, max(lo, centre * span ** (2 * i / (points - 1) - 1))) for i in range(points)]
            for value in grid:
                trial = dataclasses.replace(best, **{name: value})
                loss = _loss(records, device, trial)
                if loss < best_loss:
                    best, best_loss = trial, loss
    return best
