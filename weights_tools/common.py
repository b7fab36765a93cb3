""" Shared pieces of the weights_tools commands: model and donor loading, Hub folders, atomic outputs. """
import ast
import contextlib
import dataclasses
import difflib
import json
import os
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

__all__ = [
    'CommandError', 'resolve_device', 'parse_model_kwargs', 'check_output_free', 'atomic_output_dir', 'load_model',
    'load_donor_model', 'load_donor_state_dict', 'save_hub_folder', 'hub_export_config', 'read_folder_config',
    'json_safe',
]

HUB_PREFIXES = ('hf-hub:', 'local-dir:')
WEIGHT_SUFFIXES = ('.safetensors', '.pth', '.pt', '.bin', '.tar')


class CommandError(Exception):
    """Bad input to a command: reported as one line on stderr with exit status 2."""


def resolve_device(name: str) -> torch.device:
    """A torch device from ``--device``, refusing one this machine does not have (before any work starts)."""
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise CommandError(f'--device {name!r} is not a torch device ({e}).') from e
    if device.type == 'cuda':
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (device.index is not None and device.index >= count):
            raise CommandError(f'--device {name}: this machine has {count} CUDA device(s); use cpu or cuda:0..'
                               f'{max(count - 1, 0)}.')
    elif device.type == 'mps' and not (hasattr(torch.backends, 'mps') and torch.backends.mps.is_available()):
        raise CommandError(f'--device {name}: MPS is not available on this machine.')
    return device


def parse_model_kwargs(items: Optional[Sequence[str]]) -> Dict[str, Any]:
    """``['k=v', ...]`` to a dict, values parsed as Python literals (else kept as strings), like train.py."""
    kwargs: Dict[str, Any] = {}
    for item in items or ():
        key, sep, value = item.partition('=')
        if not sep or not key:
            raise CommandError(f'--model-kwargs entries must look like key=value, got {item!r}.')
        try:
            kwargs[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            kwargs[key] = value
    return kwargs


def check_output_free(path: os.PathLike, overwrite: bool, what: str = 'output') -> Path:
    """Refuse an existing output unless ``overwrite``; checked before any slow work starts."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise CommandError(f'{what} {path} already exists; pass --overwrite to replace it.')
    return path


@contextlib.contextmanager
def atomic_output_dir(path: os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """``timm_moejet.checkpoint_io.atomic_output_dir`` with the CLI's messages for an occupied output."""
    from timm_moejet.checkpoint_io import atomic_output_dir as _atomic_output_dir

    path = check_output_free(path, overwrite, 'output folder')
    if path.exists() and not path.is_dir():
        raise CommandError(f'output {path} exists and is not a folder.')
    with _atomic_output_dir(path, overwrite) as tmp:
        yield tmp


def json_safe(value: Any) -> Any:
    """Tuples to lists, tensors to lists/numbers, paths to strings: what ``json.dump`` accepts."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


_CFG_FIELDS = None


def _pretrained_cfg_fields() -> set:
    global _CFG_FIELDS
    if _CFG_FIELDS is None:
        from timm.models import PretrainedCfg
        _CFG_FIELDS = {f.name for f in dataclasses.fields(PretrainedCfg)}
    return _CFG_FIELDS


# pretrained_cfg entries timm's PretrainedCfg does not know but the moejet entrypoints pop and re-attach on load
_MOE_CFG_RECORDS = ('recycling',)


@contextlib.contextmanager
def hub_export_config(model: nn.Module, extra_config: Optional[Dict[str, Any]] = None) -> Iterator[Dict[str, Any]]:
    """Make ``model`` exportable with timm's ``save_for_hf`` for the duration; yield the extra top-level entries.

    * timm rebuilds ``PretrainedCfg(**config['pretrained_cfg'])`` when loading a Hub folder, which fails on keys it
      does not know. The ``recycling`` record of a MoE model stays in ``pretrained_cfg`` (the moejet entrypoints
      take it out before timm sees it and put it back on the model); any other unknown key goes to the top level
      of ``config.json``, where timm's loader ignores it.
    * ``recycle_*`` factory kwargs are load-time options of the dense->MoE filter, not architecture: they are left
      out of ``model_args`` (a ``recycle_stats`` path would not exist where the folder is loaded).
    """
    from timm_moejet.models.moejet import MoEVisionTransformer

    cfg = dict(getattr(model, 'pretrained_cfg', None) or {})
    extra = dict(extra_config or {})
    keep = set(_pretrained_cfg_fields())
    if isinstance(model, MoEVisionTransformer):
        keep.update(_MOE_CFG_RECORDS)
        for key in _MOE_CFG_RECORDS:
            if key in extra and key not in cfg:
                cfg[key] = extra.pop(key)
    for key in [k for k in cfg if k not in keep]:
        extra[key] = cfg.pop(key)
    had_args = hasattr(model, '_model_args')
    original_cfg, original_args = model.pretrained_cfg, getattr(model, '_model_args', None)
    model.pretrained_cfg = json_safe(cfg)
    if had_args:
        model._model_args = {k: v for k, v in original_args.items() if not k.startswith('recycle_')}
    try:
        yield json_safe(extra)
    finally:
        model.pretrained_cfg = original_cfg
        if had_args:
            model._model_args = original_args


def save_hub_folder(
        model: nn.Module,
        output: os.PathLike,
        overwrite: bool = False,
        extra_config: Optional[Dict[str, Any]] = None,
) -> Path:
    """Write ``model.safetensors`` + ``config.json`` (timm's Hub layout) atomically into the folder ``output``."""
    from timm.models import save_for_hf

    with atomic_output_dir(output, overwrite) as tmp, hub_export_config(model, extra_config) as model_config:
        save_for_hf(model, str(tmp), model_config=model_config, safe_serialization=True)
    return Path(output)


def read_folder_config(folder: os.PathLike) -> Dict[str, Any]:
    """The ``config.json`` of a Hub folder, with a clear error when it is missing or not JSON."""
    path = Path(folder) / 'config.json'
    if not path.is_file():
        raise CommandError(f'{folder} is a folder without config.json, not a timm Hub folder '
                           f'(expected config.json + model.safetensors).')
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CommandError(f'{path} is not valid JSON ({e}).') from e
    if not isinstance(config, dict) or 'architecture' not in config:
        raise CommandError(f'{path} has no "architecture" entry; it is not a timm model config.')
    return config


def _check_model_name(name: str) -> None:
    import timm
    from timm.models import split_model_name_tag

    arch = split_model_name_tag(name)[0]
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=3)
        hint = f'; did you mean {", ".join(close)}?' if close else '; see timm.list_models().'
        raise CommandError(f'unknown model name {name!r}{hint}')


def _extra_from_folder(config: Dict[str, Any]) -> Dict[str, Any]:
    standard = {'architecture', 'num_classes', 'num_features', 'global_pool', 'model_args', 'pretrained_cfg',
                'label_names', 'label_descriptions'}
    return {k: v for k, v in config.items() if k not in standard}


def load_model(
        spec: str,
        checkpoint: Optional[str] = None,
        pretrained: bool = False,
        model_kwargs: Optional[Dict[str, Any]] = None,
) -> Tuple[nn.Module, Dict[str, Any]]:
    """Build a model from a registered name, a Hub folder, ``local-dir:``/``hf-hub:`` id, with optional weights.

    Args:
        spec: A timm model name (optionally with a tag), a folder holding ``config.json`` + weights, or a
            ``local-dir:``/``hf-hub:`` name.
        checkpoint: Weights for a named model (our key names; loaded strictly after a shape check).
        pretrained: Load the name's pretrained weights (for MoE names: recycling from the dense donors).
        model_kwargs: Extra ``create_model`` kwargs.

    Returns:
        The model and the extra top-level config entries of its source folder (e.g. ``recycling``).
    """
    import timm

    kwargs = dict(model_kwargs or {})
    extra: Dict[str, Any] = {}
    path = Path(spec)
    if spec.startswith(HUB_PREFIXES) or path.is_dir():
        if checkpoint:
            raise CommandError(f'--checkpoint applies to a model name, not to the folder/Hub model {spec}.')
        if spec.startswith('local-dir:'):
            path = Path(spec[len('local-dir:'):])
        if not spec.startswith('hf-hub:'):
            if not path.is_dir():
                raise CommandError(f'model folder {path} does not exist.')
            extra = _extra_from_folder(read_folder_config(path))
            spec = f'local-dir:{path.resolve()}'
        model = timm.create_model(spec, pretrained=True, **kwargs)
        return model, extra
    if path.suffix in WEIGHT_SUFFIXES or path.is_file():
        raise CommandError(f'{spec} is a weights file: give the architecture as the model name and the file with '
                           f'--checkpoint (or use import-official for official MoE Jetpack checkpoints).')
    _check_model_name(spec)
    model = timm.create_model(spec, pretrained=pretrained, **kwargs)
    if checkpoint:
        load_weights_into(model, checkpoint)
    return model, extra


def load_weights_into(model: nn.Module, checkpoint: str) -> None:
    """Strictly load a state dict file into ``model``, naming every missing/unexpected/mismatched key first."""
    from timm_moejet.checkpoint_io import load_state_dict_file
    from timm_moejet.official import check_state_dict_fits, is_official_state_dict, unwrap_state_dict

    state_dict = unwrap_state_dict(load_state_dict_file(checkpoint))
    if is_official_state_dict(state_dict):
        raise CommandError(f'{checkpoint} holds official MoE Jetpack key names; convert it with import-official.')
    check_state_dict_fits(state_dict, model, checkpoint)
    model.load_state_dict(state_dict, strict=True)


def _num_classes_of(state_dict: Dict[str, torch.Tensor]) -> int:
    head = state_dict.get('head.weight')
    return int(head.shape[0]) if head is not None else 0


def load_donor_model(spec: str, arch: Optional[str] = None) -> Tuple[nn.Module, str]:
    """A dense donor as a runnable model: a timm name (Hub cache), ``hf-hub:`` id, Hub folder, or weights file.

    Args:
        spec: The donor.
        arch: The timm architecture of a weights file (a file holds no architecture).

    Returns:
        The model (eval mode) and a donor id for the statistics record.
    """
    import timm

    from timm_moejet.checkpoint_io import load_state_dict_file
    from timm_moejet.official import unwrap_state_dict

    path = Path(spec)
    if path.is_file() or path.suffix in WEIGHT_SUFFIXES:
        if not path.is_file():
            raise FileNotFoundError(f'donor file {path} does not exist.')
        if not arch:
            raise CommandError(f'donor {path} is a weights file: name its timm architecture with --donor-arch '
                               f'(e.g. vit_tiny_patch16_224).')
        _check_model_name(arch)
        state_dict = unwrap_state_dict(load_state_dict_file(path))
        model = timm.create_model(arch, pretrained=False, num_classes=_num_classes_of(state_dict))
        from timm_moejet.official import check_state_dict_fits
        check_state_dict_fits(state_dict, model, str(path))
        model.load_state_dict(state_dict, strict=True)
        donor_id = str(path.resolve())
    else:
        # no head: statistics and recycling never read it, and a cached donor's head may differ from its cfg's
        model, _ = load_model(spec, pretrained=True, model_kwargs=dict(num_classes=0))
        donor_id = spec
    return model.eval(), donor_id


def load_donor_state_dict(spec: str) -> Dict[str, torch.Tensor]:
    """A dense donor's state dict: weights file, Hub folder, ``hf-hub:`` id or timm name (through the Hub cache)."""
    from timm_moejet.checkpoint_io import load_state_dict_file
    from timm_moejet.official import unwrap_state_dict

    path = Path(spec)
    if path.is_file() or path.suffix in WEIGHT_SUFFIXES:
        if not path.is_file():
            raise FileNotFoundError(f'donor file {path} does not exist.')
        return unwrap_state_dict(load_state_dict_file(path))
    model, _ = load_model(spec, pretrained=True, model_kwargs=dict(num_classes=0))  # the head is never recycled
    return model.state_dict()


def describe_counts(counts: Dict[str, float]) -> List[str]:
    """Human-readable parameter lines."""
    return [f'{k:>10}: {v / 1e6:9.3f} M' for k, v in counts.items()]
