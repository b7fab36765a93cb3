""" Settings defined once: each knob is a dataclass field carrying its default, its check and its doc line.

A settings class (``SpheroMoESettings``, ``RecyclingRecipe``) is a frozen dataclass whose fields are declared with
:func:`setting`. Constructing it checks every value (``__post_init__`` calls :func:`check_fields`), so a value is
validated in exactly one place; the ``create_model`` kwarg names, the docstrings and the tables in the docs are
derived from the same fields (:func:`kwarg_names`, :func:`markdown_table`).
"""
import dataclasses
import math
import numbers
import os
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from .errors import InvalidArgument, InvalidArgumentType

__all__ = [
    'Check', 'setting', 'check_fields', 'kwarg_names', 'from_kwargs', 'markdown_table', 'integer', 'real',
    'boolean', 'choice', 'optional', 'text', 'path', 'int_sequence', 'SEED',
]


def _got(value: Any) -> str:
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + '...'
    return f'{text} ({type(value).__name__})'


class Check:
    """A value check: ``check(label, value)`` returns the (normalised) value or raises with a one-line message.

    Attributes:
        allowed: What is allowed, in words ('an int >= 0', ...), for messages and doc tables.
    """

    def __init__(self, allowed: str, fn: Callable[[str, Any], Any]) -> None:
        self.allowed = allowed
        self._fn = fn

    def __call__(self, label: str, value: Any) -> Any:
        return self._fn(label, value)


def integer(min_value: Optional[int] = None, max_value: Optional[int] = None) -> Check:
    """An int (not a bool) within the bounds."""
    if min_value is not None and max_value is not None:
        allowed = f'an int in [{min_value}, {max_value}]'
    elif min_value is not None:
        allowed = f'an int >= {min_value}'
    else:
        allowed = 'an int'

    def fn(label: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise InvalidArgumentType(f'{label} must be {allowed}, got {_got(value)}.')
        if (min_value is not None and value < min_value) or (max_value is not None and value > max_value):
            raise InvalidArgument(f'{label} must be {allowed}, got {value}.')
        return int(value)
    return Check(allowed, fn)


def real(min_value: float = -math.inf, max_value: float = math.inf, min_open: bool = False,
         max_open: bool = False) -> Check:
    """A finite real number (int or float, not a bool) in an interval."""
    lo, hi = '(' if min_open else '[', ')' if max_open else ']'
    if min_value == -math.inf and max_value == math.inf:
        allowed = 'a finite number'
    elif max_value == math.inf:
        allowed = f'a number {">" if min_open else ">="} {min_value:g}'
    else:
        allowed = f'a number in {lo}{min_value:g}, {max_value:g}{hi}'

    def fn(label: str, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise InvalidArgumentType(f'{label} must be {allowed}, got {_got(value)}.')
        v = float(value)
        below = v < min_value or (min_open and v == min_value)
        above = v > max_value or (max_open and v == max_value)
        if not math.isfinite(v) or below or above:
            raise InvalidArgument(f'{label} must be {allowed}, got {value}.')
        return v
    return Check(allowed, fn)


def boolean() -> Check:
    """True or False."""
    def fn(label: str, value: Any) -> bool:
        if not isinstance(value, bool):
            raise InvalidArgumentType(f'{label} must be True or False, got {_got(value)}.')
        return value
    return Check('True or False', fn)


def choice(options: Callable[[], Sequence[str]]) -> Check:
    """One of the strings ``options()`` returns (a callable, so a table that grows later is read when checking)."""
    def fn(label: str, value: Any) -> str:
        valid = tuple(options())
        if not isinstance(value, str) or value not in valid:
            raise InvalidArgument(f'{label} must be one of {", ".join(valid)}; got {_got(value)}.')
        return value
    return Check('one of ' + ', '.join('{}'.format(o) for o in options()), fn)


def text() -> Check:
    """A non-empty string."""
    def fn(label: str, value: Any) -> str:
        if not isinstance(value, str) or not value:
            raise InvalidArgumentType(f'{label} must be a non-empty string, got {_got(value)}.')
        return value
    return Check('a non-empty string', fn)


def path() -> Check:
    """A file system path (str or os.PathLike), returned as a str."""
    def fn(label: str, value: Any) -> str:
        if not isinstance(value, (str, os.PathLike)) or not os.fspath(value):
            raise InvalidArgumentType(f'{label} must be a file path, got {_got(value)}.')
        return os.fspath(value)
    return Check('a file path', fn)


def int_sequence(min_value: Optional[int] = None) -> Check:
    """A list or tuple of distinct ints (>= ``min_value`` if given), returned as a tuple."""
    item = integer(min_value)

    def fn(label: str, value: Any) -> Tuple[int, ...]:
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple, range)):
            raise InvalidArgumentType(f'{label} must be a list of ints (block indices), got {_got(value)}.')
        out = tuple(item(f'{label} entry', v) for v in value)
        if len(set(out)) != len(out):
            raise InvalidArgument(f'{label} has repeated entries: {list(out)}.')
        return out
    return Check('a list of distinct ints' + (f' >= {min_value}' if min_value is not None else ''), fn)


def optional(check: Check, none_means: str = '') -> Check:
    """None, or a value that passes ``check``."""
    def fn(label: str, value: Any) -> Any:
        return None if value is None else check(label, value)
    return Check(f'{check.allowed}, or None' + (f' ({none_means})' if none_means else ''), fn)


# a seed torch.Generator.manual_seed accepts
SEED = integer(0, 2 ** 63 - 1)


def setting(default: Any, check: Check, doc: str, kwarg: Optional[str] = None) -> Any:
    """Declare a settings field: its default, check and doc line; ``kwarg`` names it among ``create_model`` kwargs
    (default: the field name)."""
    return dataclasses.field(default=default, metadata=dict(check=check, doc=doc, kwarg=kwarg))


def _settings_fields(cls_or_obj: Any) -> List[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls_or_obj) if 'check' in f.metadata]


def kwarg_names(cls: Any) -> Dict[str, str]:
    """``create_model`` kwarg name -> field name, for every setting of ``cls``."""
    return {(f.metadata['kwarg'] or f.name): f.name for f in _settings_fields(cls)}


def check_fields(obj: Any) -> None:
    """Check (and normalise, on a frozen dataclass too) every setting of ``obj``, naming each by its ``create_model``
    kwarg in messages; call from ``__post_init__``."""
    for f in _settings_fields(obj):
        object.__setattr__(obj, f.name, f.metadata['check'](f.metadata['kwarg'] or f.name, getattr(obj, f.name)))


def from_kwargs(cls: Any, kwargs: Dict[str, Any], pop: bool = True) -> Any:
    """Build ``cls`` from the ``create_model`` kwargs it owns (popped from ``kwargs`` unless ``pop`` is False); its
    constructor checks the values under their kwarg names, so messages name what the caller wrote."""
    values = {}
    for f in _settings_fields(cls):
        name = f.metadata['kwarg'] or f.name
        if name in kwargs:
            values[f.name] = kwargs.pop(name) if pop else kwargs[name]
    return cls(**values)  # its __post_init__ checks each value, once


def unknown_kwargs_message(owner: str, unknown: Iterable[str], valid: Iterable[str]) -> str:
    """The message for keyword arguments a settings class does not know."""
    return f'{owner} got unknown argument(s) {sorted(unknown)}; valid ones are {", ".join(sorted(valid))}.'


def markdown_table(cls: Any, names: str = 'kwarg') -> str:
    """A Markdown table of the settings of ``cls``: name, default, allowed values, meaning."""
    rows = ['| setting | default | allowed | meaning |', '|---|---|---|---|']
    for f in _settings_fields(cls):
        name = (f.metadata['kwarg'] or f.name) if names == 'kwarg' else f.name
        rows.append(f'| `{name}` | `{f.default!r}` | {f.metadata["check"].allowed} | {f.metadata["doc"]} |')
    return '\n'.join(rows)
