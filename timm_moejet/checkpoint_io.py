""" Safe checkpoint reading, state-dict helpers and atomic writing.

Weights are read from ``.safetensors`` or from ``.pth``/``.pt``/``.bin`` with ``weights_only=True`` (never
unpickled), and written as safetensors through a temporary file and a rename, so a failed write leaves nothing.
"""
import contextlib
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Mapping, Optional, Union

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import InvalidCheckpoint, NotFound, OutputExists

__all__ = ['load_state_dict_file', 'unwrap_state_dict', 'check_state_dict_fits', 'save_safetensors_atomic',
           'atomic_write_bytes', 'atomic_output_dir']

PathLike = Union[str, os.PathLike]
TORCH_SUFFIXES = ('.pth', '.pt', '.bin', '.tar')


def load_state_dict_file(path: PathLike) -> Dict[str, torch.Tensor]:
    """Read a state dict from a safetensors or torch file.

    Args:
        path: ``.safetensors``, or ``.pth``/``.pt``/``.bin``/``.pth.tar`` (loaded with ``weights_only=True``).

    Returns:
        The loaded dict (wrappers such as ``state_dict`` are left for the caller).

    Raises:
        FileNotFoundError: If the file does not exist.
        ValueError: If the file is not a readable checkpoint of a supported format.
    """
    path = Path(path)
    if not path.is_file():
        raise NotFound(f'checkpoint file not found: {path}')
    suffix = ''.join(path.suffixes[-2:]) if path.name.endswith('.pth.tar') else path.suffix
    if suffix == '.safetensors':
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise InvalidCheckpoint(f'{path} is not a readable safetensors file ({e}).') from e
    if suffix in TORCH_SUFFIXES or suffix == '.pth.tar':
        try:
            sd = torch.load(str(path), map_location='cpu', weights_only=True)
        except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError ... on bad files
            raise InvalidCheckpoint(f'{path} is not a readable torch checkpoint with weights_only=True '
                             f'({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}).') from e
        if not isinstance(sd, Mapping):
            raise InvalidCheckpoint(f'{path} does not hold a state dict (found {type(sd).__name__}).')
        return dict(sd)
    raise InvalidCheckpoint(f'{path}: unsupported checkpoint format {suffix!r}; use .safetensors, .pth, .pt or .bin.')


def unwrap_state_dict(state_dict: Mapping[str, Any]) -> Dict[str, torch.Tensor]:
    """Strip training wrappers: a ``state_dict``/``model`` entry and ``module.``/``model.``/``backbone.`` key prefixes
    (DDP, mmpretrain)."""
    for wrapper in ('state_dict', 'model'):
        if wrapper in state_dict and isinstance(state_dict[wrapper], Mapping):
            state_dict = state_dict[wrapper]
    out = {}
    for k, v in state_dict.items():
        for prefix in ('module.', 'model.', 'backbone.'):
            if k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


def check_state_dict_fits(state_dict: Mapping[str, torch.Tensor], model: nn.Module, source: str) -> None:
    """Raise an ``InvalidCheckpoint`` naming every missing/unexpected key and every shape mismatch."""
    expected = model.state_dict()
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


def _umask_mode(directory: bool = False) -> int:
    # mkstemp/mkdtemp create 0600/0700; give the result the permissions a plain open()/mkdir() would
    mask = os.umask(0)
    os.umask(mask)
    return (0o777 if directory else 0o666) & ~mask


def _give_umask_modes(folder: Path) -> None:
    """Give everything written into ``folder`` the modes a plain open()/mkdir() would (writers such as
    safetensors create 0600 files)."""
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            os.chmod(os.path.join(root, name), _umask_mode(directory=True))
        for name in files:
            os.chmod(os.path.join(root, name), _umask_mode())


def _atomic_write(path: PathLike, write: Callable[[str], None], overwrite: bool) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it into place; on failure remove it."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise OutputExists(f'{path} exists; pass overwrite to replace it.')
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f'.{path.name}.', suffix='.tmp', dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, _umask_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


@contextlib.contextmanager
def atomic_output_dir(path: PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success it is renamed to ``path``, on failure removed.

    An existing folder is replaced only with ``overwrite`` (moved aside first, deleted after the rename).

    Raises:
        FileExistsError: If ``path`` exists (also if it appeared while the body ran) and not ``overwrite``.
        NotADirectoryError: If ``path`` exists and is not a folder.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise OutputExists(f'{path} exists; pass overwrite to replace it.')
    if path.exists() and not path.is_dir():
        raise OutputExists(f'{path} exists and is not a folder.')
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f'.{path.name}.', suffix='.tmp', dir=path.parent))
    try:
        os.chmod(tmp, _umask_mode(directory=True))
        yield tmp
        _give_umask_modes(tmp)
        if path.exists():
            if not overwrite:
                raise OutputExists(f'{path} appeared while it was being written; pass overwrite to replace it.')
            old = path.with_name(f'.{path.name}.{uuid.uuid4().hex[:8]}.old')
            os.rename(path, old)
            os.rename(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_safetensors_atomic(
        tensors: Mapping[str, torch.Tensor],
        path: PathLike,
        metadata: Optional[Dict[str, str]] = None,
        overwrite: bool = True,
) -> Path:
    """Write tensors as safetensors via a temporary file in the same folder, then rename into place."""
    cpu = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    return _atomic_write(path, lambda tmp: save_file(cpu, tmp, metadata=metadata), overwrite)


def atomic_write_bytes(data: bytes, path: PathLike, overwrite: bool = True) -> Path:
    """Write bytes via a temporary file in the same folder, then rename into place."""
    return _atomic_write(path, lambda tmp: Path(tmp).write_bytes(data), overwrite)
