""" timm Hub folders and the Hugging Face Hub: their configs, their errors, writing and uploading models.

* :func:`hub_errors_named`: huggingface_hub's "not cached / not reachable / no such repo" as a ``NotFound`` naming
  what was looked for.
* :func:`read_folder_config` / :func:`read_hub_config`: a model's ``config.json``, checked before timm builds from it.
* :func:`load_weights_into`: a weights file into a model, strictly.
* :func:`save_hub_folder` / :func:`push_to_hub`: timm's ``save_for_hf`` layout (``model.safetensors`` +
  ``config.json``), written atomically or uploaded, with the recycling record kept and load-time options left out.
"""
import contextlib
import dataclasses
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Dict, Iterator, Optional

import timm
import torch.nn as nn
from huggingface_hub.errors import (
    EntryNotFoundError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
)
from timm.models import PretrainedCfg, filter_pretrained_cfg, load_model_config_from_hf, split_model_name_tag

from ..errors import InvalidArgument, InvalidCheckpoint, NotFound, Unreachable
from ..family import family_of_model
from .atomic import atomic_output_dir
from .names import PathLike, is_repo_id
from .official import is_official_state_dict
from .read import check_state_dict_fits, check_weights_file, folder_weights, read_json, read_state_dict

__all__ = ['hub_errors_named', 'read_folder_config', 'read_hub_config', 'check_timm_config', 'check_weights_readable',
           'load_weights_into', 'save_hub_folder', 'push_to_hub', 'check_repo_id', 'STANDARD_CONFIG_KEYS',
           'MOE_CFG_RECORDS']

# config.json entries timm writes itself; anything else at its top level is ours (e.g. an import record)
STANDARD_CONFIG_KEYS = {'architecture', 'num_classes', 'num_features', 'global_pool', 'model_args', 'pretrained_cfg',
                        'label_names', 'label_descriptions'}
# pretrained_cfg entries timm's PretrainedCfg does not know but the MoE entrypoints take out and put back on load:
# how the weights were recycled, and how they were pruned
MOE_CFG_RECORDS = ('recycling', 'pruning')
# create_model kwargs that configure loading (the dense->MoE filter), not the architecture: never in model_args
_LOAD_TIME_KWARGS = 'recycle_'


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


def read_folder_config(folder: PathLike) -> Dict[str, Any]:
    """The ``config.json`` of a timm Hub folder, checked (ours: timm's reader of local folders is not public)."""
    path = Path(folder) / 'config.json'
    if not path.is_file():
        raise InvalidCheckpoint(f'{folder} is a folder without config.json, not a timm Hub folder '
                                f'(expected config.json + model.safetensors).')
    return check_timm_config(read_json(path), path)


def read_hub_config(repo: str, cache_dir: Optional[PathLike] = None) -> Optional[Dict[str, Any]]:
    """A Hub repository's ``config.json`` as timm's ``load_model_config_from_hf`` reads it (architecture,
    model_args, pretrained_cfg), checked; None when the repository has none or cannot be reached (reading its
    weights then names the repository)."""
    what = f'config.json of Hub repository {repo!r}'
    try:
        with hub_errors_named(what):
            pretrained_cfg, architecture, model_args = load_model_config_from_hf(repo, cache_dir=cache_dir)
    except (NotFound, KeyError):  # none, or not a timm model's (no architecture): the weights alone
        return None
    except (ValueError, AttributeError, TypeError) as e:  # not JSON, or not the layout timm reads
        raise InvalidCheckpoint(f'{what} is not a timm model config ({type(e).__name__}: {e}).') from e
    # the source timm records (hf_hub_id, source) is where the weights were, not what a model built from them loads
    pretrained_cfg = filter_pretrained_cfg(pretrained_cfg, remove_source=True, remove_null=False)
    config = dict(architecture=architecture, model_args=model_args, pretrained_cfg=pretrained_cfg)
    return check_timm_config(config, what, require_architecture=False)


def check_weights_readable(folder: PathLike) -> None:
    """The weights file of a Hub folder is readable as its format (checked without reading the tensors), so a
    corrupt, truncated or empty file is named here rather than failing inside timm's loader.

    Raises:
        NotFound: If the folder holds no weights file.
        InvalidCheckpoint: Naming the file.
    """
    check_weights_file(folder_weights(Path(folder)))


def load_weights_into(model: nn.Module, checkpoint: PathLike, ema: bool = False) -> None:
    """Strictly load a weights file (or a training checkpoint's weights, its EMA weights with ``ema``) into
    ``model``, naming every missing/unexpected/mismatched key first."""
    state_dict = read_state_dict(checkpoint, ema=ema)
    if is_official_state_dict(state_dict):
        raise InvalidCheckpoint(f'{checkpoint} holds official MoE Jetpack key names; convert it with '
                                f'weights-tools import-official (timm_moejet.load_official).')
    check_state_dict_fits(state_dict, model, os.fspath(checkpoint))
    model.load_state_dict(state_dict, strict=True)


def _portable_config(config: Dict[str, Any], moe: bool) -> Dict[str, Any]:
    """timm's ``config.json`` made loadable as it is: timm rebuilds ``PretrainedCfg(**pretrained_cfg)`` on load,
    which fails on keys it does not know, so those go to the top level (where timm's loader ignores them), except
    the records of a MoE model (``MOE_CFG_RECORDS``: the MoE entrypoints take them out before timm sees them); and
    ``recycle_*`` kwargs, options of loading rather than architecture (a ``recycle_stats`` path would not exist
    elsewhere), are left out of ``model_args``."""
    config = dict(config)
    cfg = dict(config.get('pretrained_cfg') or {})
    keep = {f.name for f in dataclasses.fields(PretrainedCfg)} | (set(MOE_CFG_RECORDS) if moe else set())
    for key in MOE_CFG_RECORDS if moe else ():
        if key in config and key not in cfg:
            cfg[key] = config.pop(key)
    for key in [k for k in cfg if k not in keep]:
        config[key] = cfg.pop(key)
    config['pretrained_cfg'] = cfg
    if 'model_args' in config:
        config['model_args'] = {k: v for k, v in config['model_args'].items() if not k.startswith(_LOAD_TIME_KWARGS)}
    return config


def save_hub_folder(
        model: nn.Module,
        output: PathLike,
        overwrite: bool = False,
        extra_config: Optional[Dict[str, Any]] = None,
) -> Path:
    """Write ``model.safetensors`` + ``config.json`` (timm's ``save_for_hf``) atomically into the folder ``output``.

    Args:
        model: The model.
        output: The folder.
        overwrite: Replace an existing folder.
        extra_config: Extra top-level ``config.json`` entries (e.g. an import record of the source folder).

    Raises:
        OutputExists: If ``output`` exists and not ``overwrite``.
    """
    with atomic_output_dir(output, overwrite) as tmp:
        timm.models.save_for_hf(model, os.fspath(tmp), model_config=dict(extra_config or {}), safe_serialization=True)
        path = tmp / 'config.json'
        config = _portable_config(json.loads(path.read_text()), moe=family_of_model(model) is not None)
        path.write_text(json.dumps(config, indent=2))  # inside the temporary folder: atomic with it
    return Path(output)


def check_repo_id(repo_id: str) -> str:
    """Refuse a Hub repository id to push to that is not ``ORG/NAME`` or ``NAME``."""
    if not isinstance(repo_id, str) or '@' in repo_id or not is_repo_id(repo_id, org_required=False):
        raise InvalidArgument(f'the Hub repository must look like ORG/NAME (or NAME), got {repo_id!r}.')
    return repo_id


def _model_card(model: nn.Module, repo_id: str, record: bool) -> str:
    """A README.md for the Hub (timm's card generator is not public)."""
    description = f'{type(model).__name__} exported with timm-moejet.'
    if record:
        description += ' Recycled from dense checkpoints; recipe in config.json, pretrained_cfg.recycling.'
    return (f'---\ntags:\n- image-classification\n- timm\n- timm-moejet\nlibrary_name: timm\nlicense: apache-2.0\n'
            f'---\n# Model card for {repo_id.split("/")[-1]}\n\n{description}\n\n## Model Details\n'
            f'- **Model Type:** Image classification / feature backbone\n- **Library:** timm + timm-moejet\n\n'
            f'## Model Usage\n```python\nimport timm, timm_moejet\n'
            f"model = timm.create_model('hf-hub:{repo_id}', pretrained=True)\n```\n")


def push_to_hub(
        model: nn.Module,
        repo_id: str,
        extra_config: Optional[Dict[str, Any]] = None,
        *,
        commit_message: str = 'Add model',
        token: Optional[str] = None,
        revision: Optional[str] = None,
        private: bool = False,
        create_pr: bool = False,
) -> str:
    """Upload ``model`` as :func:`save_hub_folder` writes it (safetensors only, config.json) with a model card.

    timm's ``push_to_hf_hub`` would write the load-time ``recycle_*`` kwargs into ``model_args``, so the folder is
    written here and uploaded with huggingface_hub.

    Args:
        model: The model.
        repo_id: ``ORG/NAME`` or ``NAME``.
        extra_config: Extra top-level config entries (e.g. the source folder's).
        commit_message: The commit message.
        token: Hub token (default: the logged-in token or HF_TOKEN).
        revision: Branch to push to.
        private: Create the repository as private.
        create_pr: Open a pull request instead of committing.

    Returns:
        What the Hub answered (the commit URL).
    """
    from huggingface_hub import HfApi

    check_repo_id(repo_id)
    api = HfApi(token=token, library_name='timm', library_version=timm.__version__)
    record = bool((model.pretrained_cfg or {}).get('recycling') or (extra_config or {}).get('recycling'))
    try:
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        has_card = api.file_exists(repo_id=repo_id, filename='README.md', revision=revision)
        with tempfile.TemporaryDirectory() as tmp:
            folder = save_hub_folder(model, Path(tmp) / 'model', extra_config=extra_config)
            if not has_card:
                (folder / 'README.md').write_text(_model_card(model, repo_id, record), encoding='utf-8')
            return api.upload_folder(repo_id=repo_id, folder_path=folder, revision=revision, create_pr=create_pr,
                                     commit_message=commit_message)
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

