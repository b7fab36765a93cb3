""" Rules the package's own code keeps (read from its source, nothing run): the seams the architecture relies on.

* no private timm or torch API outside ``timm_moejet/layers/`` (whose CPU fast path needs dispatch internals);
* no test of a family's name outside the family modules: the rest of the package asks the family;
* one atomic writer: files are renamed into place in ``checkpoint_io/atomic.py`` only;
* every state dict is read through ``checkpoint_io/read.py`` (no ``torch.load``/``load_file`` elsewhere);
* no function over 80 lines.
"""
import ast
import re
from pathlib import Path
from typing import Iterator, List, Tuple

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ('timm_moejet', 'weights_tools')
FAMILY_MODULES = {'timm_moejet/models/moejet_vit.py', 'timm_moejet/models/moejet_convnext.py',
                  'timm_moejet/models/moejet_mixer.py'}
MAX_FUNCTION_LINES = 80


def _sources() -> Iterator[Tuple[str, str]]:
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob('*.py')):
            rel = path.relative_to(ROOT).as_posix()
            if not rel.startswith('timm_moejet/layers/'):
                yield rel, path.read_text()


def _private_uses(source: str) -> List[str]:
    """Imports of private timm/torch modules or names, and attributes such as ``torch._dynamo`` or
    ``model._model_args``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split('.')[0] in ('timm', 'torch'):
            if any(p.startswith('_') for p in node.module.split('.')) or \
                    any(a.name.startswith('_') for a in node.names):
                found.append(f'from {node.module} import {", ".join(a.name for a in node.names)}')
        elif isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.split('.')[0] in ('timm', 'torch')
                      and any(p.startswith('_') for p in a.name.split('.'))]
        elif isinstance(node, ast.Attribute) and node.attr.startswith('_') and not node.attr.startswith('__'):
            base = node.value
            while isinstance(base, ast.Attribute):
                base = base.value
            if isinstance(base, ast.Name) and (base.id in ('timm', 'torch') or node.attr == '_model_args'):
                found.append(ast.unparse(node))
    return found


def test_no_private_timm_or_torch_api():
    found = {rel: uses for rel, source in _sources() if (uses := _private_uses(source))}
    assert found == {}


def test_the_rule_finds_private_apis():
    assert set(_private_uses('from timm.data.dataset_factory import _search_split\nmodel._model_args = {}\n'
                             'import torch._dynamo\nx = torch._C._foo()')) == {
        'from timm.data.dataset_factory import _search_split', 'model._model_args', 'torch._dynamo', 'torch._C._foo',
        'torch._C'}


# a comparison with a family's name, or an attribute that carries one
_FAMILY_NAME_TEST = re.compile(r"family\.name\s*[!=]=|[!=]=\s*'(?:vit|convnext|mixer)'|recycling_family")


def test_no_family_name_is_tested_outside_the_family_modules():
    found = [f'{rel}:{i}' for rel, source in _sources() if rel not in FAMILY_MODULES
             for i, line in enumerate(source.splitlines(), 1) if _FAMILY_NAME_TEST.search(line)]
    assert found == []


@pytest.mark.parametrize('call, home', [
    (r'os\.(?:replace|rename)\(', 'timm_moejet/checkpoint_io/atomic.py'),
    (r'torch\.load\(|safetensors\.torch\.load_file|load_state_dict_from_hf\(|timm\.models\.load_state_dict\b|'
     r'\bload_state_dict\((?!.*strict)', 'timm_moejet/checkpoint_io/read.py'),
])
def test_one_writer_and_one_reader(call, home):
    pattern = re.compile(call)
    found = [f'{rel}:{i}: {line.strip()}' for rel, source in _sources() if rel != home
             for i, line in enumerate(source.splitlines(), 1)
             if pattern.search(line) and not line.lstrip().startswith('#') and 'weights_only=False' not in line]
    assert found == []


def test_no_function_is_longer_than_80_lines():
    long = [f'{rel}:{node.name} ({node.end_lineno - node.lineno + 1} lines)' for rel, source in _sources()
            for node in ast.walk(ast.parse(source))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert long == []
