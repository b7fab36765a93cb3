""" The arguments of timm's ``train.py``, read from its source without running it, and a check of config values.

timm's ``train.py`` is in timm's GitHub repository only (neither the wheel nor the sdist on PyPI has it), so the
tests read a table of its arguments (``tests/fixtures/timm_train_args.json``), written by this module from a
``train.py``::

    python tests/timm_train_args.py /path/to/pytorch-image-models/train.py "where it came from" \
        > tests/fixtures/timm_train_args.json

``train.py --config FILE`` loads the YAML with ``yaml.safe_load`` and passes it to ``parser.set_defaults``: keys are
argument *dests* (``warmup_epochs``) and values reach the script as YAML typed them, without the argument's
``type`` conversion. So a value must already have the argument's type: ``4e-3`` (a string to YAML 1.1) where a
float is due is an error here, as it would be a crash in the middle of train.py.
"""
import ast
import json
import sys
from typing import Any, Dict, List

__all__ = ['extract_arguments', 'check_value', 'check_config']

_TYPES = {'int': int, 'float': float, 'str': str}


def _literal(node: ast.AST) -> Any:
    try:
        return ast.literal_eval(node)
    except ValueError:
        return None


def _name(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return ast.unparse(node)


def extract_arguments(source: str) -> Dict[str, Dict[str, Any]]:
    """Every ``*.add_argument(...)`` of ``source`` by dest: its flags, type name, action, nargs and choices."""
    args: Dict[str, Dict[str, Any]] = {}
    for node in ast.walk(ast.parse(source)):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr == 'add_argument'):
            continue
        flags = [a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
        kw = {k.arg: k.value for k in node.keywords if k.arg}
        if 'dest' in kw:
            dest = _literal(kw['dest'])
        else:
            long = [f for f in flags if f.startswith('--')] or [f for f in flags if f.startswith('-')] or flags
            dest = long[0].lstrip('-').replace('-', '_')
        spec = {'flags': flags}
        if 'type' in kw:
            spec['type'] = _name(kw['type'])
        if 'action' in kw:
            spec['action'] = _literal(kw['action']) if isinstance(kw['action'], ast.Constant) else _name(kw['action'])
        if 'nargs' in kw:
            spec['nargs'] = _literal(kw['nargs'])
        if 'choices' in kw and _literal(kw['choices']) is not None:
            spec['choices'] = list(_literal(kw['choices']))
        args[dest] = spec
    return args


def _scalar_ok(value: Any, type_name: str) -> bool:
    if isinstance(value, bool):
        return False
    if type_name == 'float':
        return isinstance(value, (int, float))
    if type_name == 'int':
        return isinstance(value, int)
    if type_name == 'str':
        return isinstance(value, str)
    return True  # a custom type callable: train.py's own check


def check_value(key: str, value: Any, spec: Dict[str, Any]) -> List[str]:
    """What is wrong with ``value`` for the argument ``spec`` (an empty list when nothing)."""
    action = spec.get('action')
    if action in ('store_true', 'store_false'):
        return [] if isinstance(value, bool) else [f'{key}: a flag takes true or false, got {value!r}']
    if action == 'ParseKwargs':
        return [] if isinstance(value, dict) else [f'{key}: takes a mapping, got {value!r}']
    if action not in (None, 'store'):
        return [f'{key}: action {action!r} is not checked here']
    type_name = spec.get('type', 'str')
    nargs = spec.get('nargs')
    if value is None:
        return []  # None is the "unset" default of train.py's optional arguments
    if nargs in ('+', '*') or isinstance(nargs, int):
        if not isinstance(value, list):
            return [f'{key}: takes a list (nargs={nargs!r}), got {value!r}']
        errors = []
        if isinstance(nargs, int) and len(value) != nargs:
            errors.append(f'{key}: takes {nargs} values, got {len(value)}')
        if nargs == '+' and not value:
            errors.append(f'{key}: takes at least one value')
        errors += [f'{key}: item {v!r} is not {type_name}' for v in value if not _scalar_ok(v, type_name)]
        return errors
    if not _scalar_ok(value, type_name):
        return [f'{key}: must be {type_name}, got {type(value).__name__} {value!r}']
    if 'choices' in spec and value not in spec['choices']:
        return [f'{key}: must be one of {spec["choices"]}, got {value!r}']
    return []


def check_config(config: Dict[str, Any], arguments: Dict[str, Dict[str, Any]]) -> List[str]:
    """What is wrong with a ``train.py --config`` mapping: unknown keys and mistyped values."""
    if not isinstance(config, dict):
        return [f'a config is a mapping of train.py arguments, got {type(config).__name__}']
    errors = []
    for key, value in config.items():
        if key not in arguments:
            errors.append(f'{key}: not an argument of train.py')
        else:
            errors += check_value(key, value, arguments[key])
    return errors


if __name__ == '__main__':
    if len(sys.argv) != 3:
        raise SystemExit('usage: python tests/timm_train_args.py PATH/TO/train.py SOURCE_DESCRIPTION')
    with open(sys.argv[1]) as f:
        table = extract_arguments(f.read())
    print(json.dumps({'source': sys.argv[2], 'arguments': table}, indent=1, sort_keys=True))
