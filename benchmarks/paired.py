""" Paired comparisons over seeds: the mean difference, its 95% t-interval, and what it says about a claim.

Two arms run with the same seed share the donors, the recycling draw and the data order, so their difference per
seed removes most of the seed-to-seed spread; the interval is the Student t-interval of those differences. A claim
"A is above B" is *held* when the interval of A - B lies above zero, *not held* when it lies below zero, and
*undecided* when it contains zero. No scipy needed: the t quantile is computed here (``t_quantile``).

Bad input (a NaN or infinite run, a confidence outside (0, 1), a negative sd) raises timm-moejet's
``InvalidArgument`` (a ``ValueError``) with a message that names the value and what to do.
"""
import dataclasses
import math
import numbers
import statistics
from typing import Optional, Sequence

from timm_moejet.errors import InvalidArgument, InvalidArgumentType
from timm_moejet.settings import integer, real

__all__ = ['PairedDifference', 'paired_difference', 't_quantile', 'verdict', 'seeds_needed', 'HELD', 'NOT_HELD',
           'UNDECIDED']

HELD, NOT_HELD, UNDECIDED = 'held', 'not held', 'undecided'


def _t_cdf(t: float, df: int) -> float:
    """Student t CDF through the regularised incomplete beta function (continued fraction, Numerical Recipes)."""
    x = df / (df + t * t)
    a, b = df / 2., 0.5
    # I_x(a, b) by Lentz's continued fraction; converges fast for x < (a + 1) / (a + b + 2), else use symmetry
    def betacf(a: float, b: float, x: float) -> float:
        tiny = 1e-300
        c, d = 1., 1. - (a + b) * x / (a + 1.)
        d = 1. / (d if abs(d) > tiny else tiny)
        h = d
        for m in range(1, 300):
            m2 = 2 * m
            for aa in (m * (b - m) * x / ((a + m2 - 1.) * (a + m2)),
                       -(a + m) * (a + b + m) * x / ((a + m2) * (a + m2 + 1.))):
                d = 1. + aa * d
                d = 1. / (d if abs(d) > tiny else tiny)
                c = 1. + aa / c
                c = c if abs(c) > tiny else tiny
                h *= d * c
            if abs(d * c - 1.) < 1e-15:
                break
        return h

    log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
                 if 0. < x < 1. else None)
    if log_front is None:
        ibeta = 0. if x <= 0. else 1.
    elif x < (a + 1.) / (a + b + 2.):
        ibeta = math.exp(log_front) * betacf(a, b, x) / a
    else:
        ibeta = 1. - math.exp(log_front) * betacf(b, a, 1. - x) / b
    tail = 0.5 * ibeta  # P(T > |t|)
    return 1. - tail if t > 0 else tail


_PROBABILITY = real(0., 1., min_open=True, max_open=True)


def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (bisection on the CDF, to 1e-12)."""
    p = _PROBABILITY('p', p)
    df = integer(1)('df', df)
    if p == 0.5:
        return 0.
    if p < 0.5:
        return -t_quantile(1. - p, df)
    lo, hi = 0., 1.
    while _t_cdf(hi, df) < p:
        hi *= 2.
    for _ in range(200):
        mid = (lo + hi) / 2.
        if _t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12:
            break
    return (lo + hi) / 2.


@dataclasses.dataclass(frozen=True)
class PairedDifference:
    """Mean of ``a - b`` over paired seeds, the sd of the differences and the two-sided t-interval."""
    n: int
    mean: float
    sd: float
    low: float
    high: float
    confidence: float

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def paired_difference(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> PairedDifference:
    """The paired difference ``a - b`` (seed by seed) with its ``confidence`` t-interval.

    Args:
        a: One value per seed.
        b: The other arm's value for the same seeds, in the same order.
        confidence: Two-sided coverage of the interval, in (0, 1).

    Returns:
        n, mean, sd of the differences and the interval ``mean +- t_{(1+confidence)/2, n-1} * sd / sqrt(n)``.
    """
    if len(a) != len(b):
        raise InvalidArgument(f'paired samples need the same length, got {len(a)} and {len(b)}.')
    if len(a) < 2:
        raise InvalidArgument(f'a paired interval needs at least 2 pairs, got {len(a)}.')
    confidence = _PROBABILITY('confidence', confidence)
    diffs = [x - y for x, y in zip(_runs('a', a), _runs('b', b))]
    n = len(diffs)
    mean = statistics.fmean(diffs)
    sd = statistics.stdev(diffs)
    half = t_quantile((1. + confidence) / 2., n - 1) * sd / math.sqrt(n)
    return PairedDifference(n, mean, sd, mean - half, mean + half, confidence)


def _runs(name: str, values: Sequence[float]) -> Sequence[float]:
    """The values of one arm, each a finite number (statistics.stdev fails on NaN and inf with an AttributeError)."""
    for i, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            raise InvalidArgumentType(f'{name}[{i}] is {v!r} ({type(v).__name__}), not a number; give one number per '
                                      f'seed.')
        if not math.isfinite(v):
            raise InvalidArgument(f'{name}[{i}] is {v}: a run without a finite value (diverged, or not measured) has '
                                  f'no paired difference; rerun that seed, or leave pair {i} out of both arms.')
    return values


def verdict(diff: PairedDifference, direction: int = 1) -> str:
    """What the interval says of the claim "the difference is above zero" (``direction=1``) or below (-1)."""
    if direction not in (1, -1):
        raise InvalidArgument(f'direction must be 1 or -1, got {direction!r}.')
    low, high = (diff.low, diff.high) if direction == 1 else (-diff.high, -diff.low)
    if low > 0.:
        return HELD
    if high < 0.:
        return NOT_HELD
    return UNDECIDED


def seeds_needed(sd: float, delta: float, confidence: float = 0.95, max_seeds: int = 100000) -> Optional[int]:
    """Fewest paired seeds whose ``confidence`` interval half-width is below ``|delta|`` at paired sd ``sd``.

    The half-width is ``t_{(1+confidence)/2, n-1} * sd / sqrt(n)``: with ``n`` such seeds, a true difference of
    ``delta`` would give an interval that excludes zero about half the time (more seeds for a surer answer).
    None when ``delta`` is 0 or more than ``max_seeds`` would be needed.
    """
    sd = real(0.)('sd', sd)
    delta = real()('delta', delta)
    q = (1. + _PROBABILITY('confidence', confidence)) / 2.
    max_seeds = integer(2)('max_seeds', max_seeds)
    if delta == 0.:
        return None
    if sd == 0.:
        return 2
    # t quantiles exceed the normal one, so fewer than (z * sd / delta)^2 seeds never suffice: start the search there
    ratio = statistics.NormalDist().inv_cdf(q) * sd / abs(delta)
    lower = ratio * ratio  # inf rather than OverflowError for extreme ratios
    if lower > max_seeds:
        return None
    n = max(2, math.floor(lower))
    while n <= max_seeds:
        if t_quantile(q, n - 1) * sd / math.sqrt(n) < abs(delta):
            return n
        n += 1
    return None
