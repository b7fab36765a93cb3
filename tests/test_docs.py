"""The settings tables in docs/ are generated from the settings' own fields (default, check, doc).

``python tests/test_docs.py`` rewrites every ``<!-- settings: NAME -->`` block from the code; the test fails with
the expected table when a doc has drifted from it.
"""
import re
import sys
from pathlib import Path

import pytest

from timm_moejet.layers import SpheroMoESettings
from timm_moejet.models.placement import MoEPlacement
from timm_moejet.recycling import RecyclingRecipe
from timm_moejet.settings import markdown_table

DOCS = Path(__file__).resolve().parents[1] / 'docs'
SETTINGS = {cls.__name__: cls for cls in (MoEPlacement, SpheroMoESettings, RecyclingRecipe)}
BLOCK = re.compile(r'(<!-- settings: (\w+) -->\n)(.*?)(<!-- /settings -->)', re.S)


def _render(text: str) -> str:
    return BLOCK.sub(lambda m: m.group(1) + markdown_table(SETTINGS[m.group(2)]) + '\n' + m.group(4), text)


def _pages():
    return sorted(p for p in DOCS.glob('*.md') if BLOCK.search(p.read_text()))


def test_every_settings_class_has_a_table():
    names = {m.group(2) for p in _pages() for m in BLOCK.finditer(p.read_text())}
    assert names == set(SETTINGS), f'settings without a docs table: {set(SETTINGS) - names}'


@pytest.mark.parametrize('page', _pages(), ids=lambda p: p.name)
def test_settings_tables_match_the_code(page):
    text = page.read_text()
    expected = _render(text)
    assert text == expected, f'{page} is out of date: run python tests/test_docs.py\n\n{expected}'


if __name__ == '__main__':
    for page in _pages():
        page.write_text(_render(page.read_text()))
        print(f'updated {page}', file=sys.stderr)
