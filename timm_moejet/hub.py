""" Models to and from timm Hub folders and the Hub, and the errors of Hub access (donors: ``donors.py``).

* :func:`read_folder_config` / :func:`load_weights_into`: a Hub folder's config, a weights file into a model.
* :func:`save_hub_folder` / :func:`push_to_hub`: timm's ``save_for_hf`` / ``push_to_hf_hub`` with the recycling
  record kept and load-time options left out, written atomically.

Errors are typed (``timm_moejet.errors``): ``NotFound`` for what cannot be found (naming the repo or path, and
whether the Hub was reachable), ``InvalidArgument`` for a bad name, ``InvalidCheckpoint`` for weights that do not
fit.
"""
import contextlib
import dataclasses
import difflib
import json
import logging
import os
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Union

import timm
import torch
import torch.nn as nn
from huggingface_hub.errors import (
    EntryNotFoundError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
)
from timm.models import PretrainedCfg, split_model_name_tag

from .checkpoint_io import atomic_output_dir, check_state_dict_fits, load_state_dict_file, unwrap_state_dict
from .errors import InvalidArgument, InvalidCheckpoint, NotFound
from .official import is_official_state_dict

__all__ = ['check_model_name', 'load_weights_into', 'read_folder_config',
           'hub_export_config', 'save_hub_folder', 'push_to_hub', 'check_repo_id', 'hub_errors_named']

_logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]
# config.json entries timm writes itself; anything else at its top level is ours (e.g. an import record)
STANDARD_CONFIG_KEYS = {'architecture', 'num_classes', 'num_features', 'global_pool', 'model_args', 'pretrained_cfg',
                         'label_names', 'label_descriptions'}
# pretrained_cfg entries timm's PretrainedCfg does not know but the MoE entrypoints take out and put back on load
_MOE_CFG_RECORDS = ('recycling',)


@contextlib.contextmanager
def hub_errors_named(what: str) -> Iterator[None]:
    """Turn huggingface_hub's "not cached / not reachable / no such repo" into a ``NotFound`` naming ``what``."""
    try:
        yield
    except (LocalEntryNotFoundError, OfflineModeIsEnabled, ConnectionError, TimeoutError) as e:
        raise NotFound(f'{what} is not in the local Hugging Face cache and the Hub was not reachable '
                       f'({type(e).__name__}; offline mode or no network). Download it once online, or point '
                       f'HF_HUB_CACHE at a cache that holds it.') from e
    except RepositoryNotFoundError as e:
        raise NotFound(f'{what} does not exist on the Hub ({type(e).__name__}).') from e
    except EntryNotFoundError as e:
        raise NotFound(f'{what} has no weights file on the Hub ({type(e).__name__}).') from e


def check_model_name(name: str) -> str:
    """Refuse a model name timm does not know, suggesting close ones; returns the architecture (no tag)."""
    arch = split_model_name_tag(name)[0]
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=3)
        hint = f'; did you mean {", ".join(close)}?' if close else '; see timm.list_models().'
        raise InvalidArgument(f'unknown model name {name!r}{hint}')
    return arch


def read_folder_config(folder: PathLike) -> Dict[str, Any]:
    """The ``config.json`` of a timm Hub folder, with a clear error when it is missing or not a timm config."""
    path = Path(folder) / 'config.json'
    if not path.is_file():
        raise InvalidCheckpoint(f'{folder} is a folder without config.json, not a timm Hub folder '
                                f'(expected config.json + model.safetensors).')
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InvalidCheckpoint(f'{path} is not valid JSON ({e}).') from e
    if not isinstance(config, dict) or 'architecture' not in config:
        raise InvalidCheckpoint(f'{path} has no "architecture" entry; it is not a timm model config.')
    return config


def load_weights_into(model: nn.Module, checkpoint: PathLike, ema: bool = False) -> None:
    """Strictly load a weights file (or a training checkpoint's weights, its EMA weights with ``ema``) into
    ``model``, naming every missing/unexpected/mismatched key first."""
    state_dict = unwrap_state_dict(load_state_dict_file(checkpoint, ema=ema))
    if is_official_state_dict(state_dict):
        raise InvalidCheckpoint(f'{checkpoint} holds official MoE Jetpack key names; convert it with '
                                f'weights-tools import-official (timm_moejet.load_official).')
    check_state_dict_fits(state_dict, model, os.fspath(checkpoint))
    model.load_state_dict(state_dict, strict=True)


def _json_safe(value: Any) -> Any:
    """Tuples to lists, tensors to lists/numbers, paths to strings: what ``json.dump`` accepts."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


@contextlib.contextmanager
def hub_export_config(model: nn.Module, extra_config: Optional[Dict[str, Any]] = None) -> Iterator[Dict[str, Any]]:
    """Make ``model`` exportable with timm's ``save_for_hf`` for the duration; yield the extra top-level entries.

    * timm rebuilds ``PretrainedCfg(**config['pretrained_cfg'])`` when loading a Hub folder, which fails on keys it
      does not know. The ``recycling`` record of a MoE model stays in ``pretrained_cfg`` (the MoE entrypoints take
      it out before timm sees it and put it back on the model); any other unknown key goes to the top level of
      ``config.json``, where timm's loader ignores it.
    * ``recycle_*`` factory kwargs are load-time options of the dense->MoE filter, not architecture: they are left
      out of ``model_args`` (a ``recycle_stats`` path would not exist where the folder is loaded).
    """
    cfg = dict(getattr(model, 'pretrained_cfg', None) or {})
    extra = dict(extra_config or {})
    keep = {f.name for f in dataclasses.fields(PretrainedCfg)}
    if getattr(model, 'recycling_family', None):
        keep.update(_MOE_CFG_RECORDS)
        for key in _MOE_CFG_RECORDS:
            if key in extra and key not in cfg:
                cfg[key] = extra.pop(key)
    for key in [k for k in cfg if k not in keep]:
        extra[key] = cfg.pop(key)
    had_args = hasattr(model, '_model_args')
    original_cfg, original_args = model.pretrained_cfg, getattr(model, '_model_args', None)
    model.pretrained_cfg = _json_safe(cfg)
    if had_args:
        model._model_args = {k: v for k, v in original_args.items() if not k.startswith('recycle_')}
    try:
        yield _json_safe(extra)
    finally:
        model.pretrained_cfg = original_cfg
        if had_args:
            model._model_args = original_args


def save_hub_folder(
        model: nn.Module,
        output: PathLike,
        overwrite: bool = False,
        extra_config: Optional[Dict[str, Any]] = None,
) -> Path:
    """Write ``model.safetensors`` + ``config.json`` (timm's Hub layout) atomically into the folder ``output``.

    Raises:
        OutputExists: If ``output`` exists and not ``overwrite``.
    """
    with atomic_output_dir(output, overwrite) as tmp, hub_export_config(model, extra_config) as model_config:
        timm.models.save_for_hf(model, str(tmp), model_config=model_config, safe_serialization=True)
    return Path(output)


def check_repo_id(repo_id: str) -> str:
    """Refuse a Hub repository id that is not ``ORG/NAME`` or ``NAME``."""
    parts = repo_id.split('/') if isinstance(repo_id, str) else []
    if not 1 <= len(parts) <= 2 or not all(parts) or any(c.isspace() for c in repo_id):
        raise InvalidArgument(f'the Hub repository must look like ORG/NAME (or NAME), got {repo_id!r}.')
    return repo_id


def push_to_hub(
        model: nn.Module,
        repo_id: str,
        extra_config: Optional[Dict[str, Any]] = None,
        **push_kwargs: Any,
) -> str:
    """Upload ``model`` with timm's ``push_to_hf_hub`` (safetensors only, config.json, a model card).

    Args:
        model: The model.
        repo_id: ``ORG/NAME`` or ``NAME``.
        extra_config: Extra top-level config entries (e.g. the source folder's).
        **push_kwargs: ``commit_message``, ``token``, ``revision``, ``private``, ``create_pr`` of timm's function.

    Returns:
        What the Hub answered (the commit URL).
    """
    check_repo_id(repo_id)
    description = f'{type(model).__name__} exported with timm-moejet.'
    if (model.pretrained_cfg or {}).get('recycling') or (extra_config or {}).get('recycling'):
        description += ' Recycled from dense checkpoints; recipe in config.json, pretrained_cfg.recycling.'
    model_card = dict(
        description=description,
        usage='```python\nimport timm, timm_moejet\n'
              f"model = timm.create_model('hf-hub:{repo_id}', pretrained=True)\n```",
        details={'Model Type': 'Image classification / feature backbone', 'Library': 'timm + timm-moejet'},
    )
    with hub_export_config(model, extra_config) as model_config:
        return timm.models.push_to_hf_hub(model, repo_id, model_config=model_config, model_card=model_card,
                              safe_serialization=True, **push_kwargs)
