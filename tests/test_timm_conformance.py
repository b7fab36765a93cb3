"""timm's own model conformance suite (``tests/test_models.py`` of the installed timm's sdist) on our models.

The sdist is downloaded from PyPI at test time (never committed) and run in a subprocess with
``timm_suite/timm_suite_conftest.py`` as its conftest, which makes timm treat ``moejet_*``/``softmoe_*`` like its
own ``vit_*`` models (and the ConvNeXts and MLP-Mixers like timm's). Every test timm runs for its models of the
family must pass for ours.
"""
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import timm
from hub_cache import build_pretrained_tag_cache

HERE = Path(__file__).parent
CACHE = Path(os.environ.get('TIMM_MOEJET_CACHE', Path.home() / '.cache' / 'timm-moejet'))

# what timm runs for its own vit_* models (test_model_inference needs timm's hub reference tensors)
VIT_TESTS = (
    'test_model_forward',
    'test_model_backward',
    'test_model_default_cfgs_non_std',
    'test_model_forward_torchscript',
    'test_model_forward_intermediates_features',
    'test_model_forward_intermediates',
    'test_prune_intermediate_layers_contract',
    'test_model_forward_fx',
    'test_model_backward_fx',
    'test_model_forward_fx_torchscript',
)
# what timm runs for its own ConvNeXts (CNN features instead of token features)
CONVNEXT_TESTS = tuple(t for t in VIT_TESTS if t != 'test_model_default_cfgs_non_std') + (
    'test_model_default_cfgs', 'test_model_forward_features')


def _timm_test_models_file() -> Path:
    """test_models.py from the sdist of the installed timm version, downloaded once into the cache."""
    version = timm.__version__
    target = CACHE / f'timm-{version}-tests' / 'test_models.py'
    if target.is_file():
        return target
    download = CACHE / f'timm-{version}-sdist'
    download.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, '-m', 'pip', 'download', f'timm=={version}', '--no-binary', ':all:', '--no-deps',
           '-d', str(download), '-q']
    proc = subprocess.run(cmd, capture_output=True, text=True)
    archives = sorted(download.glob(f'timm-{version}.tar.gz'))
    assert archives, f'could not download the timm {version} sdist from PyPI:\n{proc.stdout}\n{proc.stderr}'
    with tarfile.open(archives[0]) as tar:
        member = tar.getmember(f'timm-{version}/tests/test_models.py')
        data = tar.extractfile(member).read()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix('.tmp')
    tmp.write_bytes(data)
    tmp.replace(target)
    return target


@pytest.fixture(scope='module')
def suite_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp('timm_suite')
    shutil.copy(_timm_test_models_file(), d / 'test_models.py')
    shutil.copy(HERE / 'timm_suite' / 'timm_suite_conftest.py', d / 'conftest.py')
    return d


def run_timm_suite(suite_dir: Path, select: str = '', node_ids=(), extra_env=None) -> tuple:
    """Run timm's test_models.py (``-k select`` and/or explicit node ids).

    Returns:
        (returncode, output, {test_id: outcome}).
    """
    env = dict(os.environ, HF_HUB_OFFLINE='1', **(extra_env or {}))
    env.pop('GITHUB_ACTIONS', None)
    targets = [f'test_models.py::{n}' for n in node_ids] or ['test_models.py']
    cmd = [sys.executable, '-m', 'pytest', *targets, '-q', '-rA', '-p', 'no:cacheprovider', '-W', 'ignore']
    if select:
        cmd += ['-k', select]
    proc = subprocess.run(cmd, cwd=suite_dir, env=env, capture_output=True, text=True)
    out = proc.stdout + proc.stderr
    pattern = r'^(PASSED|FAILED|ERROR|SKIPPED) test_models\.py::(\S+)'
    outcomes = {m.group(2): m.group(1) for m in re.finditer(pattern, out, re.MULTILINE)}
    return proc.returncode, out, outcomes


def _check(outcomes: dict, out: str, model: str, tests=VIT_TESTS) -> None:
    failed = {k: v for k, v in outcomes.items() if v != 'PASSED'}
    assert not failed, f'timm suite failures: {failed}\n{out[-6000:]}'
    for test in tests:
        hits = [k for k in outcomes if k.startswith(test + '[') and re.search(rf'[-\[]{re.escape(model)}(\.|\])', k)]
        assert hits, f'{test} did not run for {model}; ran: {sorted(outcomes)}\n{out[-3000:]}'


def test_timm_suite_reduced_variants(suite_dir):
    rc, out, outcomes = run_timm_suite(suite_dir, 'moejet_vit_test or softmoe_vit_test')
    assert rc == 0, out[-6000:]
    for model in ('moejet_vit_test', 'softmoe_vit_test'):
        _check(outcomes, out, model)


def test_timm_suite_reduced_convnext(suite_dir):
    rc, out, outcomes = run_timm_suite(suite_dir, 'moejet_convnext_test')
    assert rc == 0, out[-6000:]
    _check(outcomes, out, 'moejet_convnext_test', CONVNEXT_TESTS)


def test_timm_suite_reduced_mixer(suite_dir):
    # the third family, tested as timm tests its MLP-Mixers (the ViT list: NON_STD, token features)
    rc, out, outcomes = run_timm_suite(suite_dir, 'moejet_mixer_test')
    assert rc == 0, out[-6000:]
    _check(outcomes, out, 'moejet_mixer_test')


def test_timm_suite_moejet_vit_tiny(suite_dir, tmp_path):
    # full size (265M parameters): forward, backward, cfg contract, intermediates, and timm's pretrained-load test
    # of the default recycling tag against an offline Hub cache of random-weight donors in the real layout (dense
    # ViT-Ti trunk, ViT-S experts); the scripted and fx variants run the same code on the reduced models above
    cache = build_pretrained_tag_cache(tmp_path / 'hub', ['moejet_vit_tiny.recycled_in21k'])
    node_ids = (
        'test_model_forward[1-moejet_vit_tiny]',
        'test_model_backward[2-moejet_vit_tiny]',
        'test_model_default_cfgs_non_std[1-moejet_vit_tiny.untrained]',
        'test_model_forward_intermediates[1-moejet_vit_tiny]',
        'test_model_load_pretrained[1-moejet_vit_tiny.recycled_in21k]',
    )
    rc, out, outcomes = run_timm_suite(suite_dir, node_ids=node_ids, extra_env=dict(HF_HUB_CACHE=str(cache)))
    assert rc == 0, out[-6000:]
    assert set(outcomes) == set(node_ids) and set(outcomes.values()) == {'PASSED'}, out[-6000:]
