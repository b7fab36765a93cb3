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

from ..errors import InvalidArgument, InvalidCheckpoint, NotFound, Unreachable
from .official import is_official_state_dict
from .read import atomic_output_dir, check_state_dict_fits, load_state_dict_file, unwrap_state_dict

__all__ = ['load_weights_into', 'read_folder_config', 'check_timm_config', 'check_weights_readable',
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
    return check_timm_config(config, path)


def check_timm_config(config: Any, path: PathLike, require_architecture: bool = True) -> Dict[str, Any]:
    """Refuse a ``config.json`` whose entries are not of the types timm reads (a JSON list as ``model_args``
    would fail deep inside timm), naming the file and the entry.

    Raises:
        InvalidCheckpoint: On a config that is not an object, lacks ``architecture``, or has an entry of another type.
    """
    if not isinstance(config, dict) or (require_architecture and 'architecture' not in config):
        raise InvalidCheckpoint(f'{path} has no "architecture" entry; it is not a timm model config.')
    if 'architecture' in config and (not isinstance(config['architecture'], str) or not config['architecture']):
        raise InvalidCheckpoint(f'{path}: "architecture" must be a timm model name, got '
                                f'{json.dumps(config["architecture"])[:80]}.')
    if 'architecture' in config:
        if not timm.is_model(split_model_name_tag(config['architecture'])[0]):
            raise InvalidCheckpoint(f'{path}: "architecture" names {config["architecture"]!r}, which timm does not '
                                    f'know (is the package that registers it imported?).')
    for key in ('model_args', 'pretrained_cfg'):
        if config.get(key) is not None and not isinstance(config[key], dict):
            raise InvalidCheckpoint(f'{path}: "{key}" must be a JSON object, got {type(config[key]).__name__} '
                                    f'{json.dumps(config[key])[:80]}.')
    return config


def check_weights_readable(folder: PathLike) -> None:
    """The safetensors weights of a Hub folder have a readable header that fits the file's size (checked without
    reading the tensors), so a corrupt or truncated file is named here rather than failing inside timm's loader.

    Raises:
        InvalidCheckpoint: Naming the file.
    """
    from safetensors import safe_open

    for name in ('model.safetensors',):
        path = Path(folder) / name
        if not path.is_file():
            continue
        try:
            with safe_open(os.fspath(path), 'pt') as f:
                for key in f.keys():
                    f.get_slice(key).get_shape()
        except Exception as e:  # safetensors raises several types on a bad header or a short file
            raise InvalidCheckpoint(f'{path} is not a readable safetensors file ({type(e).__name__}: '
                                    f'{str(e).splitlines()[0] if str(e) else ""}).') from e


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
        try:
            return timm.models.push_to_hf_hub(model, repo_id, model_config=model_config, model_card=model_card,
                                              safe_serialization=True, **push_kwargs)
        except Exception as e:
            if _is_network_error(e):
                raise Unreachable(f'pushing {repo_id}: the Hugging Face Hub could not be reached ({type(e).__name__}; '
                                  f'offline mode, no network or no DNS). Push again once online.') from e
            raise


def _is_network_error(e: BaseException) -> bool:
    """Offline mode, refused connections, DNS failures and time-outs, whatever HTTP library raised them."""
    names = {c.__name__ for c in type(e).__mro__}
    return bool(names & {'OfflineModeIsEnabled', 'ConnectionError', 'ConnectError', 'Timeout', 'TimeoutException',
                         'TimeoutError', 'NameResolutionError', 'NetworkError'})
