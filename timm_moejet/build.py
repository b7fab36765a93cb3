""" Building models: registered names, Hub folders, and MoE models filled from named dense donors.

This module stands above ``models`` (the architectures and their pretrained tags) and ``recycling`` (the state-dict
transforms and timm's pretrained filter), and is the one place that puts them together:

* :func:`create_moejet_from`: a MoE Jetpack ViT with the architecture of any dense timm ``VisionTransformer``
  donor, recycled from it on load (through the pretrained filter, as every pretrained tag).
* :func:`build_recycled_model`: a MoE model filled from donors named as :func:`timm_moejet.donors.load_donor`
  takes them (the ``weights-tools recycle`` command).
* :func:`build_selected_model`: a dense model initialised from a larger donor by Weight Selection.
* :func:`load_model` / :func:`create_model`: a model to export, inspect or push, and ``timm.create_model`` with
  an unknown kwarg worded as an ``InvalidArgument``.
"""
import contextlib
import dataclasses
import os
from typing import Any, Dict, Optional, Tuple

import timm
import torch
import torch.nn as nn
from timm.layers import to_2tuple
from timm.models import PretrainedCfg, resolve_pretrained_cfg, split_model_name_tag

from .checkpoint_io.donors import load_donor, locate_donor
from .checkpoint_io.hub import (
    STANDARD_CONFIG_KEYS,
    check_weights_readable,
    hub_errors_named,
    load_weights_into,
    read_folder_config,
    read_hub_config,
)
from .checkpoint_io.names import HF_HUB, LOCAL_DIR, WEIGHT_SUFFIXES, PathLike, check_model_name, parse_source
from .checkpoint_io.read import folder_weights
from .errors import InvalidArgument, MoEJetError, NotFound
from .family import family_of_model
from .layers import experts_to_be_loaded
from .models.moejet_vit import VIT, check_vit_donor, vit_architecture
from .recycling import RECYCLE_KWARGS, RecyclingRecipe, recycle, resolve_inputs, select_state_dict
from .recycling.recycle import record_on

__all__ = ['create_model', 'load_model', 'create_moejet_from', 'build_recycled_model', 'build_selected_model',
           'moejet_vit_kwargs']



def create_model(name: str, **kwargs: Any) -> nn.Module:
    """``timm.create_model``, a constructor refusing its kwargs (an unknown one, a value timm or torch checks, such as
    a dropout rate above 1) and pretrained weights that do not exist reported as an ``InvalidArgument``."""
    try:
        return timm.create_model(name, **kwargs)
    except TypeError as e:  # an unknown constructor kwarg reaches the model class
        raise InvalidArgument(f'{name}: {e}{_close_kwargs(name, str(e))}') from e
    except MoEJetError:
        raise
    except (ValueError, AssertionError) as e:  # a value timm's or torch's constructors refuse
        raise InvalidArgument(f'{name}: {e or "its constructor refuses these kwargs"}') from e
    except RuntimeError as e:
        if not str(e).startswith('No pretrained weights exist'):
            raise
        raise InvalidArgument(f'{name} has no pretrained weights; build it without pretrained (random weights), or '
                              f'give its weights as a checkpoint.') from e


def _close_kwargs(name: str, message: str) -> str:
    """'; did you mean ...?' for the unknown kwarg a constructor names in ``message``: the close ones among the
    kwargs of the model's class (every ``__init__`` of its bases), its MoE settings and the recycling kwargs."""
    import difflib
    import inspect
    import re

    from .layers import SpheroMoESettings
    from .models.placement import MoEPlacement
    from .settings import kwarg_names

    unknown = re.search(r"unexpected keyword argument '(\w+)'", message)
    try:
        cls = type(timm.create_model(name, device='meta')) if unknown else None
    except Exception:  # noqa: BLE001  (only a hint: the message stands without it)
        cls = None
    if cls is None:
        return ''
    valid = {*kwarg_names(SpheroMoESettings), *kwarg_names(MoEPlacement), *RECYCLE_KWARGS}
    for base in cls.__mro__:
        if '__init__' in base.__dict__:
            valid.update(p for p, v in inspect.signature(base.__init__).parameters.items()
                         if p != 'self' and v.kind not in (v.VAR_POSITIONAL, v.VAR_KEYWORD))
    close = difflib.get_close_matches(unknown.group(1), sorted(valid), n=3)
    return f'; did you mean {", ".join(close)}?' if close else ''


# create_model kwargs that are arguments of load_model itself (the command line's own options)
_OWN_ARGUMENTS = {'pretrained': 'pretrained (--pretrained)', 'checkpoint_path': 'checkpoint (--checkpoint)'}


def _check_load_arguments(spec: str, checkpoint: Optional[PathLike], pretrained: bool, kwargs: Dict[str, Any],
                          ema: bool) -> None:
    """Refuse arguments of ``load_model`` that contradict each other, before anything is read or built."""
    for key, own in _OWN_ARGUMENTS.items():
        if key in kwargs:
            raise InvalidArgument(f'{key} is not a model kwarg here: give it as {own}.')
    if pretrained and checkpoint:
        raise InvalidArgument(f'both pretrained weights and the checkpoint {checkpoint} would give the weights of '
                              f'{spec}; give one of them.')
    if ema and not checkpoint:
        raise InvalidArgument('ema takes the EMA weights of a training checkpoint; give the checkpoint too (or leave '
                              'ema out).')


def load_model(
        spec: str,
        checkpoint: Optional[PathLike] = None,
        pretrained: bool = False,
        model_kwargs: Optional[Dict[str, Any]] = None,
        ema: bool = False,
) -> Tuple[nn.Module, Dict[str, Any]]:
    """Build a model from a registered name, a Hub folder, ``local-dir:``/``hf-hub:`` id, with optional weights.

    Args:
        spec: A timm model name (optionally with a tag), a folder holding ``config.json`` + weights, or a
            ``local-dir:``/``hf-hub:`` name.
        checkpoint: Weights for a named model (our key names; loaded strictly after a shape check).
        pretrained: Load the name's pretrained weights (for MoE names: recycling from the dense donors).
        model_kwargs: Extra ``create_model`` kwargs.
        ema: Load the EMA weights of a training checkpoint (timm's train.py ``--model-ema``).

    Returns:
        The model and the extra top-level config entries of its source folder (e.g. ``imported_from``).

    Raises:
        InvalidArgument: If ``model_kwargs`` ask a folder or Hub model for another number of classes than its
            checkpoint has (its trained head would be replaced by a random one), hold ``pretrained`` or
            ``checkpoint_path`` (arguments of their own), or ``pretrained`` comes with a ``checkpoint``, ``ema``
            without one, ``pretrained`` for a name without pretrained weights.
        NotFound: If ``spec`` is a path that does not exist.
    """
    kwargs = dict(model_kwargs or {})
    _check_load_arguments(spec, checkpoint, pretrained, kwargs, ema)
    if spec.startswith((HF_HUB, LOCAL_DIR)) or os.path.isdir(spec):
        source = parse_source(spec, 'model')
        if checkpoint:
            raise InvalidArgument(f'a weights file applies to a model name, not to the folder/Hub model {spec}.')
        extra: Dict[str, Any] = {}
        if source.kind == 'folder':
            config = read_folder_config(source.path)
            extra = {k: v for k, v in config.items() if k not in STANDARD_CONFIG_KEYS}
            check_model_name(config['architecture'])
            check_weights_readable(source.path)
            spec = f'local-dir:{source.path.resolve()}'
        else:
            config = read_hub_config(source.location) or {}
        _refuse_other_classes(kwargs.get('num_classes'), config, source.name, source.timm_name())
        with hub_errors_named(f'model {spec!r}'):
            return create_model(spec, pretrained=True, **kwargs), extra
    if spec.endswith(WEIGHT_SUFFIXES) or os.path.isfile(spec):
        raise InvalidArgument(f'{spec} is a weights file: give the architecture as the model name and the file as '
                              f'the checkpoint (or use import-official for official MoE Jetpack checkpoints).')
    if os.sep in spec or '/' in spec or spec.startswith(('.', '~')):  # a path: timm names hold no slash
        raise NotFound(f'model folder {spec} does not exist (a model is a timm name, a Hub folder, local-dir:FOLDER '
                       f'or hf-hub:ORG/REPO).')
    check_model_name(spec)
    with hub_errors_named(f'pretrained weights of {spec}'), \
            experts_to_be_loaded() if checkpoint else contextlib.nullcontext():  # the checkpoint fills every expert
        model = create_model(spec, pretrained=pretrained, **kwargs)
    if checkpoint:
        load_weights_into(model, checkpoint, ema=ema)
    return model, {}


def _refuse_other_classes(num_classes: Any, config: Dict[str, Any], name: str, timm_name: str) -> None:
    """A checkpoint's model loads with its own head: another ``num_classes`` would replace the trained head with a
    random one (timm's way of starting a fine-tune, not of exporting or inspecting the checkpoint)."""
    classes = config.get('num_classes', (config.get('pretrained_cfg') or {}).get('num_classes'))
    if num_classes is not None and classes is not None and num_classes != classes:
        raise InvalidArgument(
            f'num_classes={num_classes} conflicts with {name}, whose checkpoint has {classes} classes: its trained '
            f'head would be replaced by a random one. Leave num_classes out to keep it (for a new head on purpose: '
            f'timm.create_model({timm_name!r}, pretrained=True, num_classes={num_classes}), then fine-tune).')


def _donor_model(spec: str) -> nn.Module:
    """The donor's architecture on the meta device (a timm name with or without tag, hf-hub: or local-dir:)."""
    source = parse_source(spec, 'donor') if isinstance(spec, str) else None
    if source is None or source.kind == 'file':
        raise InvalidArgument(f'the architecture of donor {spec!r} is not known from its name: name it as a timm '
                              f'model with its tag, hf-hub:ORG/REPO or local-dir:FOLDER, or give the MoE '
                              f'architecture (--model).')
    if source.kind == 'timm':
        check_model_name(spec)
        arch, tag = split_model_name_tag(spec)
        try:
            resolve_pretrained_cfg(arch, pretrained_cfg=tag or None)
        except RuntimeError as e:  # timm: 'Invalid pretrained tag (...) for ...'
            raise InvalidArgument(f'{spec}: {e}') from e
    if source.kind == 'folder':
        read_folder_config(source.path)  # a folder's config.json is checked before timm reads it
    with hub_errors_named(f'config of donor {spec!r}'):
        return create_model(source.timm_name(), pretrained=False, device='meta')


def moejet_vit_kwargs(trunk: str, img_size: Any = None) -> Tuple[Dict[str, Any], nn.Module]:
    """The ``moejet_vit`` kwargs for a trunk donor: its architecture plus the paper's MoE settings scaled to it.

    Args:
        trunk: The trunk donor, named as ``create_moejet_from`` takes it.
        img_size: The MoE model's input size (int or (height, width)) when it differs from the donor's: the expert
            counts scale with the tokens at this size (a DINOv2 donor is configured for 518 px: 1369 tokens).

    Returns:
        The kwargs and the donor built on the meta device.
    """
    donor = _donor_model(trunk)
    args = vit_architecture(donor, trunk)
    grid = donor.patch_embed.grid_size
    if img_size is not None:
        size = to_2tuple(img_size)
        grid = tuple(s // p for s, p in zip(size, donor.patch_embed.patch_size))
    core, univ = VIT.expert_counts(grid[0] * grid[1])  # 196 tokens for a 224 px ViT/16: 98 core + 196 universal
    args.update(num_core_experts=core, num_univ_experts=univ)
    return args, donor


def _trunk_overlay(trunk: str, donor: nn.Module, cache_dir: Optional[str]) -> Dict[str, Any]:
    """``pretrained_cfg_overlay`` that makes timm load the trunk donor's weights, with its data config."""
    source = dict(donor.pretrained_cfg or {})
    fields = {f.name for f in dataclasses.fields(PretrainedCfg)}
    weights_keys = ('source', 'file', 'url', 'hf_hub_id', 'hf_hub_filename', 'state_dict', 'custom_load')
    overlay = {k: v for k, v in source.items() if k in fields and k not in weights_keys + ('architecture', 'tag')}
    locate_donor(trunk, cache_dir=cache_dir, role='trunk donor')  # fetched now, or named if missing
    named = parse_source(trunk, 'trunk donor')
    if named.kind == 'folder':
        return dict(overlay, file=str(folder_weights(named.path)))
    overlay['hf_hub_id'] = source.get('hf_hub_id') or named.location
    if source.get('hf_hub_filename'):
        overlay['hf_hub_filename'] = source['hf_hub_filename']
    return overlay


def create_moejet_from(
        trunk: str,
        experts: Optional[str] = None,
        pretrained: bool = True,
        *,
        cache_dir: Optional[str] = None,
        **kwargs: Any,
) -> nn.Module:
    """A MoE Jetpack ViT built from a dense timm ``VisionTransformer`` donor and recycled from it.

    ``create_moejet_from('vit_small_patch14_reg4_dinov2.lvd142m')`` builds the donor's architecture on the meta
    device (no weights fetched), refuses what the recycling cannot carry, reads its constructor arguments and creates
    ``moejet_vit`` with them and the paper's MoE settings scaled to the donor (see ``models/from_donor.py``): MoE in
    the second half, core experts = patch tokens / 2, universal experts = patch tokens. The weights are then recycled
    on load, as for every pretrained tag.

    Args:
        trunk: The trunk donor: a timm name with its tag (``vit_small_patch14_reg4_dinov2.lvd142m``),
            ``hf-hub:ORG/REPO`` or ``local-dir:FOLDER``. Its architecture becomes the MoE model's.
        experts: A wider and/or deeper donor of the same family whose MLPs become the experts (any form
            ``timm_moejet.donors.load_donor`` takes); None: the trunk donor.
        pretrained: Recycle the donors into the model (else: the architecture only, randomly initialised).
        cache_dir: Hugging Face cache folder.
        **kwargs: ``moejet_vit`` kwargs overriding the derived ones: any MoE setting (``num_core_experts``,
            ``moe_blocks``, ...), ``num_classes``, ``recycle_*`` options, ...

    Raises:
        DonorMismatch: If a donor is not a ViT with timm's ``Mlp`` blocks (decided before any weight is fetched).
        NotFound: If a donor is neither cached nor downloadable.
    """
    args, donor = moejet_vit_kwargs(trunk, kwargs.get('img_size'))
    if experts is not None:
        if not isinstance(experts, str) or not experts:
            raise InvalidArgument(f'experts must name a donor, got {experts!r}.')
        if not experts.endswith(WEIGHT_SUFFIXES):
            check_vit_donor(_donor_model(experts), experts)
    args.update(kwargs)
    if pretrained:
        args.setdefault('recycle_experts', experts)
        args['pretrained_cfg_overlay'] = _trunk_overlay(trunk, donor, cache_dir)
    if cache_dir is not None:
        args['cache_dir'] = cache_dir
    return timm.create_model('moejet_vit', pretrained=pretrained, **args)


def build_recycled_model(
        model_name: Optional[str],
        trunk: str,
        recipe: Optional[RecyclingRecipe] = None,
        *,
        init_seed: Optional[int] = None,
        cache_dir: Optional[str] = None,
        **model_kwargs: Any,
) -> nn.Module:
    """Create a MoE model and fill it from donors named as :func:`timm_moejet.donors.load_donor` accepts.

    The donors and the statistics are loaded and checked before the model is built.

    Args:
        model_name: A registered MoE architecture (``moejet_vit_tiny``, ...), or None: ``moejet_vit`` with the
            trunk donor's architecture and the paper's MoE settings scaled to it (see :func:`create_moejet_from`).
        trunk: The trunk donor (timm name with tag, ``ORG/REPO``, ``hf-hub:``, ``local-dir:``, folder or file).
        recipe: How to recycle; ``recipe.experts`` names the expert donor (None: the trunk donor).
        init_seed: Seed of the model's initial values (what is not recycled: head, slot queries); None leaves the
            global RNG as it is.
        cache_dir: Hugging Face cache folder.
        **model_kwargs: ``create_model`` kwargs of the MoE model (not ``recycle_*``: those are the recipe's).

    Returns:
        The model, holding the recycled weights, its recipe recorded in ``pretrained_cfg['recycling']``.
    """
    given = sorted(k for k in model_kwargs if k in RECYCLE_KWARGS)
    if given:  # create_model would take them for a recipe that is never used here
        raise InvalidArgument(f'{", ".join(given)}: recycling settings belong to the recipe '
                              f'(RecyclingRecipe({", ".join(RECYCLE_KWARGS[k] + "=..." for k in given)})).')
    if model_name is None:
        model_kwargs = dict(moejet_vit_kwargs(trunk, model_kwargs.get('img_size'))[0], **model_kwargs)
        model_name = 'moejet_vit'
    check_model_name(model_name)
    recipe = recipe if recipe is not None else RecyclingRecipe()
    inputs = resolve_inputs(recipe, cache_dir)
    trunk_donor = load_donor(trunk, cache_dir=cache_dir, role='trunk donor')
    with torch.random.fork_rng(devices=[]), experts_to_be_loaded():  # recycling fills every expert
        if init_seed is not None:
            torch.manual_seed(init_seed)
        model = create_model(model_name, **model_kwargs)
    if family_of_model(model) is None or not model.moe_layers():
        raise InvalidArgument(f'{model_name} has no SpheroMoE layer; recycling builds MoE models (e.g. '
                              f'moejet_vit_tiny).')
    result = recycle(model, trunk_donor.state_dict, recipe, inputs, trunk_id=str(trunk))
    model.load_state_dict(result.state_dict, strict=True)
    return record_on(model, result.record)


def build_selected_model(
        model_name: str,
        donor: str,
        block_map: str = 'even',
        *,
        init_seed: Optional[int] = None,
        cache_dir: Optional[str] = None,
        **model_kwargs: Any,
) -> nn.Module:
    """A dense timm model initialised from a larger donor of its family by Weight Selection.

    Args:
        model_name: The smaller architecture (``vit_tiny_patch16_224``, ``convnext_femto``, ...).
        donor: The larger donor, named as :func:`timm_moejet.donors.load_donor` takes it.
        block_map: 'even' or 'first': which donor blocks a stage with fewer blocks takes.
        init_seed: Seed of what the donor cannot give (a head for another number of classes); None leaves the
            global RNG as it is.
        cache_dir: Hugging Face cache folder.
        **model_kwargs: ``create_model`` kwargs of the smaller model.

    Returns:
        The model, holding the selected weights (``pretrained_cfg['weight_selection']`` records the donor).
    """
    check_model_name(model_name)
    weights = load_donor(donor, cache_dir=cache_dir, role='donor').state_dict
    with torch.random.fork_rng(devices=[]):
        if init_seed is not None:
            torch.manual_seed(init_seed)
        model = create_model(model_name, **model_kwargs)
    dropped: Dict[str, str] = {}
    state_dict = select_state_dict(model, weights, block_map=block_map, donor_name=str(donor), dropped=dropped)
    model.load_state_dict(state_dict, strict=True)
    model.pretrained_cfg = dict(model.pretrained_cfg or {}, weight_selection=dict(donor=str(donor),
                                                                                  block_map=block_map,
                                                                                  dropped=dropped))
    return model
