""" The one reader of weights: every state dict timm-moejet reads comes through :func:`read_state_dict`.

It stands on timm's own loaders: ``timm.models.load_state_dict`` for files (safetensors, or ``.pth``/``.pt``/
``.bin``/``.pth.tar`` with ``weights_only=True``: never unpickled), ``timm.models.load_state_dict_from_hf`` for Hub
repositories. What is ours, each where timm has no equivalent: one-line errors naming the file, EMA weights only when
asked for (timm falls back to the plain weights), the folder's weights file (timm's rule for it is not public),
safetensors paths that are not UTF-8, :func:`check_weights_file`, which names a damaged file before anything reads it
(cached Hub downloads included), and :func:`strip_wrappers`, the one place that strips training wrappers.
"""
import argparse
import json
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

import torch
import torch.nn as nn
from safetensors import SafetensorError
from timm.models import clean_state_dict, load_state_dict, load_state_dict_from_hf

from ..errors import InvalidArgument, InvalidCheckpoint, NotFound
from ..moe_keys import current_key_names
from .names import FOLDER_WEIGHT_NAMES, HF_HUB, WEIGHT_SUFFIXES, PathLike

__all__ = ['read_state_dict', 'folder_weights', 'strip_wrappers', 'check_state_dict_fits', 'check_weights_file',
           'is_damaged_file_error', 'read_json']


def read_json(path: PathLike) -> Any:
    """The JSON value of a file we or timm wrote (a config, statistics), or ``InvalidCheckpoint`` naming the file."""
    try:
        return json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InvalidCheckpoint(f'{path} is not valid JSON ({e}).') from e


# training checkpoints keep the weights under one of these keys (timm's train.py, mmengine, DDP wrappers)
_WEIGHT_KEYS = ('state_dict', 'model')
_EMA_KEYS = ('state_dict_ema', 'model_ema')
# prefixes of a wrapped model's keys: mmpretrain's classifier and backbone (DDP's and torch.compile's are timm's)
_MODEL_PREFIXES = ('model.', 'backbone.')
_FLATTENED = 'state_dict.'  # a wrapper flattened into one safetensors file (the official reference files)


def strip_wrappers(state_dict: Mapping[str, Any]) -> Dict[str, Any]:
    """The model weights inside training wrappers, with the wrappers' key prefixes removed (the one place).

    A ``state_dict``/``model`` entry (or its flattened ``state_dict.<key>`` form), the ``module.``/``_orig_mod.``
    prefixes of DDP and ``torch.compile`` (timm's ``clean_state_dict``), then mmpretrain's ``model.``/``backbone.``.
    A plain state dict comes back as it is.
    """
    for wrapper in _WEIGHT_KEYS:
        if wrapper in state_dict and isinstance(state_dict[wrapper], Mapping):
            state_dict = state_dict[wrapper]
    if any(k.startswith(_FLATTENED) for k in state_dict):
        state_dict = {k[len(_FLATTENED):]: v for k, v in state_dict.items() if k.startswith(_FLATTENED)}
    out = {}
    for k, v in clean_state_dict(dict(state_dict)).items():
        for prefix in _MODEL_PREFIXES:
            if k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f'{type(e).__name__}: {text[0]}' if text else type(e).__name__


def _check_ema(path: Path) -> None:
    """Refuse a checkpoint without EMA weights when they are asked for (ours: timm's loader would quietly give the
    plain weights). Reads only the structure: tensors go to the meta device."""
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            checkpoint = torch.load(os.fspath(path), map_location='meta', weights_only=True)
    except Exception:  # not readable: the load itself names the problem
        return
    if not isinstance(checkpoint, Mapping) or not any(isinstance(checkpoint.get(k), Mapping) for k in _EMA_KEYS):
        raise InvalidCheckpoint(f'{path} has no EMA weights ({" or ".join(_EMA_KEYS)}); train with --model-ema, or '
                                f'load its plain weights.')


def _refused_objects(path: Path, e: BaseException) -> InvalidCheckpoint:
    """The message for a ``.pth`` that ``weights_only=True`` refuses: which Python objects, and what to do."""
    try:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(os.fspath(path))
    except Exception:  # not a readable zip/pickle at all
        unsafe = []
    unsafe = [g for g in unsafe if g != 'argparse.Namespace']
    if unsafe:
        return InvalidCheckpoint(
            f'{path} holds Python objects besides the weights ({", ".join(unsafe[:4])}); loading with '
            f'weights_only=True refuses to unpickle them, because a pickle can run code. If you trust the file '
            f'(an mmengine/mmpretrain checkpoint, say), keep only its weights once: torch.save(torch.load(path, '
            f'weights_only=False)["state_dict"], "weights.pth").')
    return InvalidCheckpoint(f'{path} is not a readable torch checkpoint with weights_only=True ({_first_line(e)}).')


def _utf8(path: Path) -> bool:
    try:
        os.fsdecode(path).encode('utf-8')
        return True
    except UnicodeEncodeError:  # a file name of other bytes (decoded with surrogate escapes)
        return False


def _read_file(path: Path, ema: bool) -> Any:
    """timm's ``load_state_dict`` with today's safety and one-line errors naming the file."""
    suffix = ''.join(path.suffixes[-2:]) if path.name.endswith('.pth.tar') else path.suffix
    if suffix == '.safetensors':
        if ema:
            raise InvalidCheckpoint(f'{path} is a safetensors file of plain weights: it has no EMA weights.')
        try:
            if not _utf8(path):  # ours: safetensors opens only UTF-8 paths, so read the bytes through Python
                from safetensors.torch import load as load_bytes
                return load_bytes(path.read_bytes())
            return load_state_dict(os.fspath(path), use_ema=False)
        except (SafetensorError, OSError, ValueError) as e:
            raise InvalidCheckpoint(f'{path} is not a readable safetensors file ({e}).') from e
    if suffix not in WEIGHT_SUFFIXES and suffix != '.pth.tar':
        raise InvalidCheckpoint(f'{path}: unsupported checkpoint format {suffix!r}; use .safetensors, .pth, .pt or '
                                f'.bin.')
    if ema:
        _check_ema(path)
    try:
        return load_state_dict(os.fspath(path), use_ema=ema, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError) as e:
        if 'weights_only' in str(e) or isinstance(e, pickle.UnpicklingError):
            raise _refused_objects(path, e) from e
        raise InvalidCheckpoint(f'{path} is not a readable torch checkpoint with weights_only=True '
                                f'({_first_line(e)}).') from e
    except (AttributeError, TypeError) as e:  # timm's loader on a file that holds no state dict
        raise InvalidCheckpoint(f'{path} does not hold a state dict ({_first_line(e)}).') from e
    except Exception as e:  # torch raises EOFError, zip errors ... on damaged files
        raise InvalidCheckpoint(f'{path} is not a readable torch checkpoint with weights_only=True '
                                f'({_first_line(e)}).') from e


_ZIP_MAGIC = b'PK\x03\x04'  # torch.save's format since torch 1.6
_PICKLE_MAGIC = b'\x80'  # the legacy torch.save format starts with a pickle protocol opcode


def check_weights_file(path: PathLike) -> Path:
    """Check, without reading the tensors, that ``path`` is a readable weights file of its format, naming it if not:
    a folder in its place, an empty file, a safetensors header that is damaged or describes more bytes than the file
    holds (a truncated download), a zip checkpoint without its central directory (truncated), a ``.pth`` that is
    neither torch format. Also for files inside the Hugging Face cache, which timm would read as they are.

    Raises:
        NotFound: If there is nothing at ``path``.
        InvalidCheckpoint: Naming the file and what is wrong with it.
    """
    path = Path(path)
    again = 'delete it and download or copy it again'
    if path.is_dir():
        raise InvalidCheckpoint(f'{path} is a folder where a weights file should be; {again}.')
    if not path.is_file():
        raise NotFound(f'checkpoint file not found: {path}')
    if not os.access(path, os.R_OK):
        raise InvalidCheckpoint(f'{path} cannot be read: permission denied (mode '
                                f'{oct(os.stat(path).st_mode & 0o777)[2:]:0>3}).')
    if not path.name.endswith(WEIGHT_SUFFIXES):
        return path  # another format: the reader names it
    if path.stat().st_size == 0:
        raise InvalidCheckpoint(f'{path} is empty (0 bytes), a download or copy that did not finish; {again}.')
    if path.suffix == '.safetensors':
        if not _utf8(path):  # safe_open takes UTF-8 paths only: the reader reads the bytes and names what is wrong
            return path
        from safetensors import safe_open
        try:
            with safe_open(os.fspath(path), 'pt') as f:
                for key in f.keys():
                    f.get_slice(key).get_shape()
        except Exception as e:  # safetensors raises several types on a bad header or a short file
            raise InvalidCheckpoint(f'{path} is not a readable safetensors file ({_first_line(e)}); it may be '
                                    f'truncated or damaged: {again}.') from e
        return path
    with open(path, 'rb') as f:
        magic = f.read(len(_ZIP_MAGIC))
    if magic == _ZIP_MAGIC:
        try:
            zipfile.ZipFile(path).close()  # reads the central directory at the end of the file
        except (zipfile.BadZipFile, OSError) as e:
            raise InvalidCheckpoint(f'{path} is a damaged torch checkpoint ({_first_line(e)}); it may be truncated: '
                                    f'{again}.') from e
    elif not magic.startswith(_PICKLE_MAGIC):
        raise InvalidCheckpoint(f'{path} is not a torch checkpoint (neither the zip format of torch.save nor its '
                                f'legacy format); {again}, or name the right file.')
    return path


def folder_weights(folder: Path) -> Path:
    """The weights file of a model folder, in timm's order of preference (ours: timm's rule is not public). A
    folder in a weights file's place is returned too, for :func:`check_weights_file` to name."""
    folder = Path(folder)
    for fname in FOLDER_WEIGHT_NAMES:
        if (folder / fname).exists():
            return folder / fname
    for ext in WEIGHT_SUFFIXES:
        found = sorted(folder.glob(f'*{ext}'))
        if found:
            return found[0]
    raise NotFound(f'{folder} holds no weights file (model.safetensors, pytorch_model.bin, *.pth ...).')


def is_damaged_file_error(e: BaseException) -> bool:
    """Whether ``e`` is what safetensors, torch or zipfile raise on reading a damaged weights file (for readers
    that are not ours: timm's ``load_pretrained``)."""
    return isinstance(e, (SafetensorError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile)) or \
        (isinstance(e, RuntimeError) and 'PytorchStreamReader' in str(e))


def _is_hub_error(e: BaseException) -> bool:
    """huggingface_hub's "not cached / no such repo / not reachable" errors, which the caller words."""
    return type(e).__module__.startswith('huggingface_hub') or isinstance(e, (ConnectionError, TimeoutError))


def _cached_file_error(repo: str, filename: Optional[str], cache_dir: Optional[PathLike],
                       e: BaseException) -> InvalidCheckpoint:
    """The error of a Hub repository's cached weights file that could not be read, naming the file."""
    from huggingface_hub import hf_hub_download

    repo_id, _, revision = repo.partition('@')
    for name in [filename] if filename else FOLDER_WEIGHT_NAMES[:2]:  # timm's order
        try:  # the cached path, whatever is there (a folder in the file's place too)
            cached = hf_hub_download(repo_id, name, revision=revision or None, cache_dir=cache_dir,
                                     local_files_only=True)
        except Exception:  # not cached under this name: the next one
            continue
        try:
            check_weights_file(cached)
        except (InvalidCheckpoint, NotFound) as named:
            return InvalidCheckpoint(str(named))
        return InvalidCheckpoint(f'{cached} (Hub repository {repo_id}) cannot be read ({_first_line(e)}); delete '
                                 f'it and download it again.')
    return InvalidCheckpoint(f'the weights of Hub repository {repo_id} cannot be read ({_first_line(e)}).')


def read_state_dict(
        source: PathLike,
        ema: bool = False,
        *,
        filename: Optional[str] = None,
        cache_dir: Optional[PathLike] = None,
) -> Dict[str, torch.Tensor]:
    """Read model weights: the one reader of state dicts.

    Args:
        source: A weights file: ``.safetensors``, or ``.pth``/``.pt``/``.bin``/``.pth.tar`` (loaded with
            ``weights_only=True``): a state dict, or a training checkpoint (timm's train.py ``checkpoint-*.pth.tar``/
            ``model_best.pth.tar``, mmpretrain/mmengine), whose weights are picked out. A folder in timm's Hub layout
            (its weights file). Or a Hub repository, ``hf-hub:ORG/REPO[@REVISION]`` (timm's
            ``load_state_dict_from_hf``: safetensors first, from the cache when offline; its access errors are left
            to the caller to word, as it knows what the repository is for).
        ema: Take a training checkpoint's EMA weights (train.py ``--model-ema``); refused when it has none.
        filename: The weights file of a Hub repository (default: ``model.safetensors``, else
            ``pytorch_model.bin``).
        cache_dir: The Hugging Face cache of a Hub repository (default: ``HF_HUB_CACHE``).

    Returns:
        The weights, training wrappers removed (:func:`strip_wrappers`).

    Raises:
        NotFound: If the file does not exist.
        InvalidCheckpoint: If the file is not a readable checkpoint of a supported format, holds Python objects
            ``weights_only`` refuses, or has no EMA weights when asked for them.
    """
    name = os.fspath(source)
    if name.startswith(HF_HUB):
        if ema:
            raise InvalidArgument(f'{name}: EMA weights are read from a training checkpoint file, not a Hub repo.')
        # timm's default file name is tried as model.safetensors first
        hub_kwargs = dict(filename=filename) if filename else {}
        try:
            return strip_wrappers(load_state_dict_from_hf(name[len(HF_HUB):], weights_only=True, cache_dir=cache_dir,
                                                          **hub_kwargs))
        except Exception as e:
            if _is_hub_error(e):
                raise
            raise _cached_file_error(name[len(HF_HUB):], filename, cache_dir, e) from e
    path = Path(source)
    if path.is_dir():
        path = folder_weights(path)
    state_dict = _read_file(check_weights_file(path), ema)
    if not isinstance(state_dict, Mapping):
        raise InvalidCheckpoint(f'{path} does not hold a state dict (found {type(state_dict).__name__}).')
    return strip_wrappers(state_dict)


def check_state_dict_fits(state_dict: Mapping[str, torch.Tensor], model: nn.Module, source: str) -> None:
    """Raise an ``InvalidCheckpoint`` naming every missing/unexpected key and every shape mismatch (router tensors
    under their names from before the router was a module count as today's: the layer renames them on load)."""
    expected = model.state_dict()
    state_dict = current_key_names(state_dict)
    mismatched = [f'{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}'
                  for k, v in state_dict.items() if k in expected and tuple(v.shape) != tuple(expected[k].shape)]
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    problems = []
    if mismatched:
        problems.append('shape mismatch: ' + '; '.join(mismatched[:12]) + (' ...' if len(mismatched) > 12 else ''))
    if missing:
        problems.append(f'missing keys: {missing[:12]}' + (' ...' if len(missing) > 12 else ''))
    if unexpected:
        problems.append(f'unexpected keys: {unexpected[:12]}' + (' ...' if len(unexpected) > 12 else ''))
    if problems:
        raise InvalidCheckpoint(f'{source} does not fit {type(model).__name__}: ' + ' | '.join(problems))
