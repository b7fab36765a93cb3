""" The paper's recipes in ``configs/`` are valid ``train.py --config`` files.

Every key must be an argument of timm's ``train.py`` and every value of that argument's type (``train.py`` passes
the YAML to ``parser.set_defaults`` unconverted). The arguments come from ``tests/fixtures/timm_train_args.json``,
read from ``train.py``'s source by ``tests/timm_train_args.py`` (see there: ``train.py`` is not on PyPI, so CI cannot
download it). With ``TIMM_SCRIPTS_DIR`` set to a folder holding a ``train.py`` (as for ``test_timm_scripts.py``), the
configs are also checked against that file's own arguments.
"""
import json
import os
import re
from pathlib import Path

import pytest
import yaml
from timm_train_args import check_config, check_value, extract_arguments

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / 'configs').glob('*.yaml'))
TABLE = json.loads((Path(__file__).parent / 'fixtures' / 'timm_train_args.json').read_text())
ARGUMENTS = TABLE['arguments']

# the paper's Table 1 datasets for V-JetMoE-T, and ImageNet for V-JetMoE-S and C-JetMoE-F
EXPECTED = {f'{d}_vjetmoe_t' for d in ('imagenet', 'cifar10', 'cifar100', 'flowers', 'pets', 'stl10', 'food101',
                                       'dtd')} | {'imagenet_vjetmoe_s', 'imagenet_cjetmoe_f'}


def _load(path: Path) -> dict:
    with open(path) as f:
        return yaml.safe_load(f)


def test_every_paper_recipe_has_a_config():
    assert {p.stem for p in CONFIGS} == EXPECTED


@pytest.mark.parametrize('path', CONFIGS, ids=lambda p: p.stem)
def test_config_keys_and_types_are_train_py_arguments(path):
    config = _load(path)
    assert check_config(config, ARGUMENTS) == []


@pytest.mark.parametrize('path', CONFIGS, ids=lambda p: p.stem)
def test_config_states_its_sources_and_the_paper_accuracy(path):
    text = path.read_text()
    assert re.search(r'# Paper accuracy \(top-1, %\): \S+ \d+\.\d on ', text), 'no paper accuracy line'
    config = _load(path)
    # every value line carries its source, except the few that only name the run
    bare = [line for line in text.splitlines() if re.match(r'^[a-z_]+:', line) and '#' not in line
            and line.split(':')[0] not in {'device_modules', 'model', 'num_classes', 'dataset_download', 'train_split',
                                           'val_split', 'batch_size', 'grad_accum_steps', 'opt', 'clip_mode',
                                           'lr_base_size', 'amp_dtype'}]
    assert bare == []
    assert config['device_modules'] == ['timm_moejet']


def test_configs_build_registered_models():
    import timm

    import timm_moejet  # noqa: F401  (registers the models)
    for path in CONFIGS:
        assert timm.is_model(_load(path)['model']), path.stem


def test_global_batch_and_lr_follow_the_paper():
    # Table 7: 512 downstream, Table 6 / released config: 4096 on ImageNet; lr 4e-3 at that batch
    for path in CONFIGS:
        c = _load(path)
        batch = c['batch_size'] * c['grad_accum_steps']
        assert batch == (4096 if path.stem.startswith('imagenet') else 512), path.stem
        assert c['lr_base_size'] == batch and c['lr_base'] == 4e-3 and c['lr_base_scale'] == 'linear', path.stem
        assert 'lr' not in c, f'{path.stem}: a fixed lr would bypass the batch scaling'


@pytest.mark.parametrize('config, message', [
    ({'warmup_epoch': 5}, 'warmup_epoch: not an argument'),  # misspelt key
    ({'warmup-epochs': 5}, 'not an argument'),  # the flag spelling, not the dest
    ({'lr_base': '4e-3'}, 'lr_base: must be float'),  # YAML 1.1 reads 4e-3 as a string
    ({'epochs': 300.0}, 'epochs: must be int'),
    ({'amp': 'yes please'}, 'amp: a flag takes true or false'),
    ({'mixup': True}, 'mixup: must be float'),
    ({'opt_betas': 0.9}, 'opt_betas: takes a list'),
    ({'input_size': [3, 224]}, 'input_size: takes 3 values'),
    ({'device_modules': ['timm_moejet', 3]}, "item 3 is not str"),
    ({'model_kwargs': 'moe_combine=softmax'}, 'model_kwargs: takes a mapping'),
])
def test_checker_rejects_bad_configs(config, message):
    errors = check_config(config, ARGUMENTS)
    assert any(message in e for e in errors), errors


def test_checker_reads_yaml_as_train_py_does(tmp_path):
    # the exact failure a user hits: "lr_base: 4e-3" is a str to yaml.safe_load, "4.0e-3" a float
    assert check_config(yaml.safe_load('lr_base: 4e-3'), ARGUMENTS) != []
    assert check_config(yaml.safe_load('lr_base: 4.0e-3'), ARGUMENTS) == []


def test_extract_arguments_reads_argparse_source():
    source = '''
import argparse
parser = argparse.ArgumentParser()
group = parser.add_argument_group('x')
group.add_argument('-b', '--batch-size', type=int, default=128)
group.add_argument('--opt-betas', default=None, type=float, nargs='+')
group.add_argument('--torchscript', dest='torchscript', action='store_true')
group.add_argument('--model-kwargs', nargs='*', default={}, action=utils.ParseKwargs)
group.add_argument('--mode', type=str, default='a', choices=('a', 'b'))
'''
    table = extract_arguments(source)
    assert table == {
        'batch_size': {'flags': ['-b', '--batch-size'], 'type': 'int'},
        'opt_betas': {'flags': ['--opt-betas'], 'type': 'float', 'nargs': '+'},
        'torchscript': {'flags': ['--torchscript'], 'action': 'store_true'},
        'model_kwargs': {'flags': ['--model-kwargs'], 'nargs': '*', 'action': 'ParseKwargs'},
        'mode': {'flags': ['--mode'], 'type': 'str', 'choices': ['a', 'b']},
    }
    assert check_value('mode', 'c', table['mode']) and not check_value('mode', 'b', table['mode'])


def test_table_has_train_py_core_arguments():
    # a truncated or foreign table would let any config through
    for dest in ('model', 'lr', 'lr_base', 'epochs', 'warmup_epochs', 'layer_decay', 'drop_path', 'mixup', 'cutmix',
                 'smoothing', 'aa', 'reprob', 'model_ema', 'grad_accum_steps', 'device_modules', 'config'):
        assert dest in ARGUMENTS, dest
    assert len(ARGUMENTS) > 150


@pytest.mark.skipif(not os.environ.get('TIMM_SCRIPTS_DIR'), reason='opt-in: TIMM_SCRIPTS_DIR holds a train.py')
def test_configs_against_a_train_py_checkout():
    source = (Path(os.environ['TIMM_SCRIPTS_DIR']) / 'train.py').read_text()
    arguments = extract_arguments(source)
    for path in CONFIGS:
        assert check_config(_load(path), arguments) == [], path.stem
