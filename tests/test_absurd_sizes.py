""" Absurd sizes are refused before anything is allocated; the meta device still builds them.

Every size setting of every family (widths, hidden sizes, expert counts, slots, classes, image and patch sizes, the
number of blocks) is tried with a value no machine can hold: ``create_model`` raises the project's
``InvalidArgument`` at once, naming what the parameters would need and the largest tensor (or the bound on blocks),
and the command line says it in one line with exit status 2. The check compares the parameters' bytes with the
memory of the device, so it is tried with a small pretend memory too.
"""
import time

import pytest
import timm
import torch

import timm_moejet  # noqa: F401  (registers the models)
from timm_moejet.errors import InvalidArgument
from weights_tools.cli import main

HUGE = 10 ** 9  # a billion hidden units, experts, slots, classes, ...
BEYOND_INT64 = 10 ** 19

ABSURD = [
    ('moejet_vit_test', dict(core_hidden=HUGE)),
    ('moejet_vit_test', dict(univ_hidden=HUGE)),
    ('moejet_vit_test', dict(num_core_experts=HUGE)),
    ('moejet_vit_test', dict(num_univ_experts=HUGE)),
    ('moejet_vit_test', dict(slots_per_expert=HUGE)),
    ('moejet_vit_test', dict(embed_dim=2 ** 20, num_heads=1)),
    ('moejet_vit_test', dict(num_classes=10 ** 12)),
    ('moejet_vit_test', dict(img_size=10 ** 7)),
    ('moejet_vit_test', dict(img_size=10 ** 5, patch_size=1)),
    ('moejet_vit_test', dict(embed_dim=BEYOND_INT64, num_heads=1)),
    ('moejet_vit_test', dict(img_size=BEYOND_INT64)),
    ('softmoe_vit_test', dict(num_core_experts=HUGE)),
    ('moejet_convnext_test', dict(dims=(16, 32, 2 ** 20, 128))),
    ('moejet_convnext_test', dict(num_core_experts=HUGE)),
    ('moejet_convnext_test', dict(img_size=10 ** 6)),
    ('moejet_convnext_test', dict(core_hidden=HUGE)),
    ('moejet_mixer_test', dict(embed_dim=2 ** 20)),
    ('moejet_mixer_test', dict(img_size=10 ** 6)),
    ('moejet_mixer_test', dict(num_univ_experts=HUGE)),
    ('moejet_mixer_test', dict(mlp_ratio=(0.5, float(HUGE)))),
]
TOO_DEEP = [
    ('moejet_vit_test', dict(depth=HUGE), 'depth 1000000000 is more blocks'),
    ('moejet_mixer_test', dict(num_blocks=HUGE), 'num_blocks 1000000000 is more blocks'),
    ('moejet_convnext_test', dict(depths=(1, 1, HUGE, 1)), 'a total of 1000000003 is more blocks'),
]


@pytest.mark.parametrize('name, kwargs', ABSURD, ids=lambda x: x if isinstance(x, str) else repr(x))
def test_absurd_sizes_are_refused_before_allocating(name, kwargs):
    start = time.perf_counter()
    with pytest.raises(InvalidArgument, match=f'^{name}: (its parameters need .* GiB, more than the .* of memory|the '
                                              f'sizes given make a tensor too large)'):
        timm.create_model(name, **kwargs)
    assert time.perf_counter() - start < 30, 'refused only after trying'


@pytest.mark.parametrize('name, kwargs, says', TOO_DEEP)
def test_absurd_depths_are_refused_before_building_blocks(name, kwargs, says):
    start = time.perf_counter()
    with pytest.raises(InvalidArgument, match=says):
        timm.create_model(name, **kwargs)
    assert time.perf_counter() - start < 30


@pytest.mark.parametrize('name, kwargs', ABSURD[:3] + ABSURD[12:13] + ABSURD[16:17])
def test_the_meta_device_still_builds_them(name, kwargs):
    model = timm.create_model(name, device='meta', **kwargs)
    assert sum(p.numel() for p in model.parameters()) > HUGE


def test_the_bound_is_the_memory_of_the_device(monkeypatch):
    """moejet_vit_test holds about 4 MB of parameters: refused on a pretend 1 MB machine, built on the real one."""
    from timm_moejet.models import budget

    monkeypatch.setattr(budget, '_host_memory', lambda: 2 ** 20)
    with pytest.raises(InvalidArgument, match=r'need 0\.0 GiB, more than the 0\.0 GiB of memory of this machine\'s '
                                              r'cpu \(the largest tensor: blocks\.\d\.mlp\.core\.fc1\.weight'):
        timm.create_model('moejet_vit_test')
    timm.create_model('moejet_vit_test', device='meta')
    monkeypatch.undo()
    assert budget.device_memory(torch.device('cpu')) > 2 ** 20
    timm.create_model('moejet_vit_test')


def test_the_command_line_refuses_an_absurd_size_in_one_line(tmp_path, capsys):
    out = tmp_path / 'new'
    assert main(['export', 'moejet_vit_test', '--model-kwargs', f'core_hidden={HUGE}', '--output', str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and 'its parameters need' in err and 'core.fc1.weight' in err, err
    assert not out.exists()
