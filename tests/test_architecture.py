""" The seams between building, recycling and the command line: the recipe's inputs are resolved once and the
pretrained filter does no I/O; the recycle command's flags are the recipe's fields; weight-source names are read in
one place; an imported official model names its real architecture. """
import builtins
import dataclasses
import io
import json
import os

import huggingface_hub
import huggingface_hub.file_download
import pytest
import safetensors
import safetensors.torch
import timm
import torch
from hub_cache import build_hub_cache, official_state_dict, pretrained_tag_repos, repo_snapshot, use_offline_hub
from safetensors.torch import load_file

import timm_moejet
from timm_moejet.checkpoint_io import donors
from timm_moejet.checkpoint_io.hub import save_hub_folder
from timm_moejet.errors import InvalidArgument, NotFound
from timm_moejet.recycling import (
    PretrainedFilter,
    RecyclingRecipe,
    checkpoint_filter_fn,
    resolve_inputs,
    weight_proxy_statistics,
)
from weights_tools.cli import main

TINY = 'timm/vit_tiny_patch16_224.augreg_in21k'
SMALL = 'timm/vit_small_patch16_224.augreg_in21k'
REDUCED = dict(num_core_experts=3, num_univ_experts=5)


@pytest.fixture(scope='module')
def cache(tmp_path_factory):
    return build_hub_cache(tmp_path_factory.mktemp('hub'), pretrained_tag_repos(['moejet_vit_tiny.recycled_in21k']))


@pytest.fixture
def hub(cache, monkeypatch):
    return use_offline_hub(monkeypatch, cache)


def _fail(*args, **kwargs):
    raise AssertionError('file or Hub access during the pretrained filter')


_IO = [(builtins, 'open'), (io, 'open'), (os, 'open'), (os, 'stat'), (os, 'listdir'), (os, 'scandir'),
       (torch, 'load'), (safetensors, 'safe_open'), (safetensors.torch, 'load_file'),
       (huggingface_hub, 'hf_hub_download'), (huggingface_hub.file_download, 'hf_hub_download'),
       (timm.models, 'load_state_dict_from_hf'), (donors, 'load_donor'), (donors, 'locate_donor')]


def test_pretrained_filter_does_no_io(hub, tmp_path):
    small = load_file(str(repo_snapshot(hub, SMALL) / 'model.safetensors'))
    stats_file = weight_proxy_statistics(small, list(range(6, 12)), hub_id=SMALL).save(tmp_path / 'stats.safetensors')
    recipe = RecyclingRecipe(experts=SMALL, stats=stats_file, seed=5)
    expected = timm.create_model('moejet_vit_tiny', pretrained=True, recycle_stats=stats_file, recycle_seed=5,
                                 **REDUCED)
    inputs = resolve_inputs(recipe)  # located, loaded and checked once, before any model is built
    assert inputs.experts is not None and inputs.stats is not None
    trunk = load_file(str(repo_snapshot(hub, TINY) / 'model.safetensors'))
    model = timm.create_model('moejet_vit_tiny', **REDUCED)
    model.pretrained_cfg = dict(model.pretrained_cfg, source='hf-hub', hf_hub_id=TINY)
    with pytest.MonkeyPatch.context() as mp:
        for owner, name in _IO:
            mp.setattr(owner, name, _fail)
        with pytest.raises(AssertionError, match='file or Hub access'):  # the patches are in effect
            open(stats_file)
        cfg = dict(model.pretrained_cfg)
        pretrained_filter = PretrainedFilter(recipe, inputs)
        out = pretrained_filter(trunk, model)
    reference = expected.state_dict()
    assert set(out) == set(reference)
    for key, value in out.items():
        if not key.startswith('head.') and not key.endswith('slot_queries'):
            assert torch.equal(value, reference[key]), key
    # the filter returns the record; the model's config is timm's to set
    assert model.pretrained_cfg == cfg
    assert pretrained_filter.record == expected.pretrained_cfg['recycling']
    assert pretrained_filter.record['stats_file'] == 'stats.safetensors'


def test_a_recipe_is_a_value_and_its_inputs_are_checked_when_resolved(tmp_path):
    recipe = RecyclingRecipe(stats=tmp_path / 'missing.safetensors', experts='org/not-cached')
    assert recipe.stats == str(tmp_path / 'missing.safetensors')  # no file-system check in the constructor
    assert dataclasses.replace(recipe, experts=None).experts is None  # None: the trunk donor, no sentinel
    assert RecyclingRecipe(experts=False).experts is None  # what create_model passes on (timm drops None)
    with pytest.raises(NotFound, match='missing.safetensors'):
        resolve_inputs(recipe)
    with pytest.raises(InvalidArgument, match='must be one of'):
        RecyclingRecipe(strategy='nope')


def test_filter_refuses_an_unresolved_expert_donor(hub):
    trunk = load_file(str(repo_snapshot(hub, TINY) / 'model.safetensors'))
    model = timm.create_model('moejet_vit_tiny', **REDUCED)
    with pytest.raises(InvalidArgument, match='not resolved'):
        checkpoint_filter_fn(trunk, model, recipe=RecyclingRecipe(experts=SMALL))


def test_recycle_help_lists_every_recipe_field(capsys):
    assert main(['recycle', '--help']) == 0
    text = ''.join(capsys.readouterr().out.split())  # argparse wraps lines at spaces and hyphens
    for field in dataclasses.fields(RecyclingRecipe):
        flag = '--' + field.name.replace('_', '-')
        assert f'{flag}{field.name.upper()}' in text, flag
        for part in (field.metadata['doc'], f'Allowed:{field.metadata["check"].allowed}.', f'Default:{field.default}.'):
            assert ''.join(part.split()) in text, (flag, part)


@pytest.mark.parametrize('argv, parts', [
    (['--graph-parts', '4'], 4),
    (['--model-kwargs', 'recycle_graph_parts=6'], 6),
])
def test_graph_parts_reaches_the_recipe(argv, parts, hub, tmp_path, capsys):
    trunk = str(repo_snapshot(hub, TINY) / 'model.safetensors')
    out = tmp_path / 'moe'
    assert main(['recycle', '--model', 'moejet_vit_tiny', '--trunk', trunk, '--strategy', 'graph',
                 '--graph-method', 'spectral', '--num-classes', '3', '--output', str(out), *argv]
                + ([] if '--model-kwargs' in argv else ['--model-kwargs']) + ['num_core_experts=3',
                                                                              'num_univ_experts=5']) == 0
    record = json.loads((out / 'config.json').read_text())['pretrained_cfg']['recycling']
    assert (record['strategy'], record['graph_method'], record['graph_parts']) == ('graph', 'spectral', parts)
    capsys.readouterr()


def test_a_recipe_field_given_twice_is_refused(hub, tmp_path, capsys):
    trunk = str(repo_snapshot(hub, TINY) / 'model.safetensors')
    assert main(['recycle', '--model', 'moejet_vit_tiny', '--trunk', trunk, '--graph-parts', '4',
                 '--model-kwargs', 'recycle_graph_parts=6', '--output', str(tmp_path / 'x')]) == 2
    assert 'graph_parts is given twice' in capsys.readouterr().err
    with pytest.raises(InvalidArgument, match='belong to the recipe'):
        timm_moejet.build_recycled_model('moejet_vit_tiny', trunk, recycle_graph_parts=8)


def test_imported_vit_base_names_its_architecture(tmp_path):
    config = dict(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12, num_classes=2,
                  global_pool='avg', moe_layers=[11], core_experts=1, univ_experts=1)
    ours = timm.create_model('moejet_vit_base', num_classes=2, moe_blocks=(11,), num_core_experts=1,
                             num_univ_experts=1)
    model = timm_moejet.load_official(official_state_dict(ours.state_dict()), config)
    save_hub_folder(model, tmp_path / "base")
    saved = json.loads((tmp_path / 'base' / 'config.json').read_text())
    assert saved['architecture'] == 'moejet_vit_base_patch16_224'
    assert saved['model_args']['embed_dim'] == 768
    # another geometry is the generic moejet_vit, its architecture all in model_args (never a size it is not)
    from timm_moejet.checkpoint_io.official import _architecture_for, official_config_to_kwargs
    assert _architecture_for(official_config_to_kwargs(dict(config, embed_dim=512, num_heads=8))) == 'moejet_vit'
    assert _architecture_for(official_config_to_kwargs(dict(config, embed_dim=384, num_heads=6))) == \
        'moejet_vit_small_patch16_224'


@pytest.mark.parametrize('training', [True, False])
def test_eval_mode_restores_the_mode_on_every_exit(training):
    from timm_moejet.modes import eval_mode
    model = torch.nn.Sequential(torch.nn.Dropout(0.5)).train(training)
    with eval_mode(model):
        assert not model.training and not model[0].training
    assert model.training == model[0].training == training
    with pytest.raises(RuntimeError, match='inside'):
        with eval_mode(model):
            raise RuntimeError('inside')
    assert model.training == model[0].training == training


def test_one_place_restores_the_train_mode():
    """Every switch to eval mode and back goes through ``eval_mode`` (no hand-written save and restore)."""
    import pathlib
    root = pathlib.Path(timm_moejet.__file__).parent
    by_hand = [str(p.relative_to(root)) for p in root.rglob('*.py')
               if 'was_training' in p.read_text() and p.name != 'modes.py']
    assert by_hand == []
