""" Safe checkpoint reading, state-dict helpers and atomic writing.

Weights are read from ``.safetensors`` or from ``.pth``/``.pt``/``.bin`` with ``weights_only=True`` (never
unpickled), and written as safetensors through a temporary file and a rename, so a failed write leaves nothing.
"""
import argparse
import contextlib
import ctypes
import errno
import logging
import os
import pickle
import re
import shutil
import signal
import sys
import threading
import uuid
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Mapping, Optional, Union

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from timm.models import clean_state_dict

from ..errors import InvalidCheckpoint, NotFound, OutputExists, OutputNotWritable
from .names import LOCAL_DIR, WEIGHT_SUFFIXES

__all__ = ['load_state_dict_file', 'select_weights', 'unwrap_state_dict', 'check_state_dict_fits',
           'save_safetensors_atomic', 'atomic_write_bytes', 'atomic_output_dir', 'clean_stale_temporaries',
           'signals_deferred', 'check_output_apart', 'refuse_existing']

_logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]
TORCH_SUFFIXES = tuple(s for s in WEIGHT_SUFFIXES if s != '.safetensors')


# training checkpoints keep the weights under one of these keys (timm's train.py, mmengine, DDP wrappers)
_WEIGHT_KEYS = ('state_dict', 'model')
_EMA_KEYS = ('state_dict_ema', 'model_ema')


def _torch_load(path: Path) -> Any:
    """``torch.load(weights_only=True)``, allowing the ``argparse.Namespace`` that timm's train.py stores beside
    the weights (as timm's own loader does); anything else that is not plain data is refused with a message."""
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(str(path), map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:
        try:
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        except Exception:  # not a readable zip/pickle at all
            unsafe = []
        unsafe = [g for g in unsafe if g != 'argparse.Namespace']
        if unsafe:
            raise InvalidCheckpoint(
                f'{path} holds Python objects besides the weights ({", ".join(unsafe[:4])}); loading with '
                f'weights_only=True refuses to unpickle them, because a pickle can run code. If you trust the file '
                f'(an mmengine/mmpretrain checkpoint, say), keep only its weights once: torch.save(torch.load(path, '
                f'weights_only=False)["state_dict"], "weights.pth").') from e
        raise InvalidCheckpoint(f'{path} is not a readable torch checkpoint with weights_only=True '
                                f'({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}).') from e
    except Exception as e:  # torch raises RuntimeError, EOFError ... on bad files
        raise InvalidCheckpoint(f'{path} is not a readable torch checkpoint with weights_only=True '
                                f'({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}).') from e


def select_weights(checkpoint: Mapping[str, Any], ema: bool = False, source: str = 'checkpoint') -> Dict[str, Any]:
    """The model weights of a training checkpoint (``state_dict``/``model``, or with ``ema`` the EMA weights
    ``state_dict_ema``/``model_ema``); a plain state dict is returned as it is.

    Raises:
        InvalidCheckpoint: If ``ema`` and the checkpoint has no EMA weights.
    """
    keys = _EMA_KEYS if ema else _WEIGHT_KEYS
    for key in keys:
        if isinstance(checkpoint.get(key), Mapping):
            return dict(checkpoint[key])
    if ema:
        raise InvalidCheckpoint(f'{source} has no EMA weights ({" or ".join(_EMA_KEYS)}); train with --model-ema, '
                                f'or load its plain weights.')
    return dict(checkpoint)


def _utf8(path: Path) -> bool:
    try:
        os.fsdecode(path).encode('utf-8')
        return True
    except UnicodeEncodeError:  # a file name of other bytes (decoded with surrogate escapes)
        return False


def load_state_dict_file(path: PathLike, ema: bool = False) -> Dict[str, torch.Tensor]:
    """Read model weights from a safetensors file or a torch checkpoint.

    Args:
        path: ``.safetensors``, or ``.pth``/``.pt``/``.bin``/``.pth.tar`` (loaded with ``weights_only=True``): a state
            dict, or a training checkpoint (timm's train.py ``checkpoint-*.pth.tar``/``model_best.pth.tar``,
            mmpretrain/mmengine), whose weights are picked out.
        ema: Take a training checkpoint's EMA weights (train.py ``--model-ema``).

    Returns:
        The weights (training wrappers and ``module.``-style prefixes are removed by :func:`unwrap_state_dict`).

    Raises:
        NotFound: If the file does not exist.
        InvalidCheckpoint: If the file is not a readable checkpoint of a supported format, holds Python objects
            ``weights_only`` refuses, or has no EMA weights when asked for them.
    """
    path = Path(path)
    if not path.is_file():
        raise NotFound(f'checkpoint file not found: {path}')
    if not os.access(path, os.R_OK):
        raise InvalidCheckpoint(f'{path} cannot be read: permission denied (mode '
                                f'{oct(os.stat(path).st_mode & 0o777)[2:]:0>3}).')
    suffix = ''.join(path.suffixes[-2:]) if path.name.endswith('.pth.tar') else path.suffix
    if suffix == '.safetensors':
        if ema:
            raise InvalidCheckpoint(f'{path} is a safetensors file of plain weights: it has no EMA weights.')
        try:
            if not _utf8(path):  # safetensors takes only UTF-8 paths: read the bytes through Python instead
                from safetensors.torch import load as load_bytes
                return load_bytes(path.read_bytes())
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise InvalidCheckpoint(f'{path} is not a readable safetensors file ({e}).') from e
    if suffix in TORCH_SUFFIXES or suffix == '.pth.tar':
        checkpoint = _torch_load(path)
        if not isinstance(checkpoint, Mapping):
            raise InvalidCheckpoint(f'{path} does not hold a state dict (found {type(checkpoint).__name__}).')
        return select_weights(checkpoint, ema, str(path))
    raise InvalidCheckpoint(f'{path}: unsupported checkpoint format {suffix!r}; use .safetensors, .pth, .pt or .bin.')


def unwrap_state_dict(state_dict: Mapping[str, Any]) -> Dict[str, torch.Tensor]:
    """Strip training wrappers: a ``state_dict``/``model`` entry, the ``module.``/``_orig_mod.`` key prefixes of DDP
    and ``torch.compile`` (timm's ``clean_state_dict``), then mmpretrain's ``model.``/``backbone.``."""
    for wrapper in ('state_dict', 'model'):
        if wrapper in state_dict and isinstance(state_dict[wrapper], Mapping):
            state_dict = state_dict[wrapper]
    out = {}
    for k, v in clean_state_dict(dict(state_dict)).items():
        for prefix in ('model.', 'backbone.'):
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


def check_output_apart(output: PathLike, inputs: Mapping[str, Any], what: str = 'output') -> None:
    """Refuse an output that is, contains or lies inside one of the inputs (by real path, links followed).

    Args:
        output: The output path.
        inputs: Role -> input (a path, ``local-dir:PATH``, or something that is not a path, such as a Hub id, which
            is skipped; None entries are skipped).
        what: How to name the output in the message.

    Raises:
        OutputExists: Naming the output, the input and their relation.
    """
    out = os.path.realpath(os.fspath(output))
    for role, value in inputs.items():
        if value is None:
            continue
        name = os.fspath(value)
        name = name[len(LOCAL_DIR):] if name.startswith(LOCAL_DIR) else name
        if not os.path.exists(name):
            continue
        src = os.path.realpath(name)
        if out == src:
            relation = 'is the'
        elif os.path.commonpath([out, src]) == src:
            relation = 'lies inside the'
        elif os.path.commonpath([out, src]) == out:
            relation = 'contains the'
        else:
            continue
        raise OutputExists(f'{what} {output} {relation} {role} {value}; writing it would destroy that input. '
                           f'Write the output elsewhere.')


def _give_umask_modes(folder: Path) -> None:
    """Give everything written into ``folder`` the modes a plain open()/mkdir() would (writers such as
    safetensors create 0600 files)."""
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            os.chmod(os.path.join(root, name), _umask_mode(directory=True))
        for name in files:
            os.chmod(os.path.join(root, name), _umask_mode())


# Temporaries and moved-aside outputs are named '.<output name>.moejet-<kind>-<pid>-<random>', so a later run can
# recognise the ones of a dead process (SIGKILL leaves them behind) and nothing else.
_MARK = re.compile(r'^\.(?P<name>.+)\.moejet-(?P<kind>tmp|old)-(?P<pid>[1-9][0-9]{0,6})-[0-9a-f]{8}(?:\.tmp)?$')
_MAX_PID = 1 << 22  # Linux's largest pid_max; a larger number is not a pid this module wrote


def _hidden_name(path: Path, kind: str) -> Path:
    return path.with_name(f'.{path.name}.moejet-{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}')


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):  # another user's live process; not a pid: not ours
        return True
    return True


def _remove(path: Path) -> None:
    """Remove a file, a link (not what it points to) or a folder tree."""
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


def clean_stale_temporaries(path: PathLike) -> None:
    """Remove what dead runs left beside ``path`` (their temporaries), and put back an output that a run killed in
    the middle of replacing it had moved aside. Only names this module makes are touched, only of dead processes."""
    path = Path(path)
    if not path.parent.is_dir():
        return
    for entry in path.parent.iterdir():
        m = _MARK.match(entry.name)
        if m is None or m.group('name') != path.name or int(m.group('pid')) > _MAX_PID or \
                _alive(int(m.group('pid'))):
            continue
        if m.group('kind') == 'old' and not os.path.lexists(path):
            _logger.warning('putting back %s, which an interrupted run had moved aside', path)
            os.rename(entry, path)
        else:
            _remove(entry)


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM for the duration (main thread only), then deliver them: a short critical section
    (the swap of an output) is never cut in half by Ctrl-C or ``kill``."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending = []
    previous = {sig: signal.signal(sig, lambda signum, frame: pending.append(signum))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for sig in pending:
            signal.raise_signal(sig)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux ``renameat2(RENAME_EXCHANGE)``); False where that is not available."""
    if not sys.platform.startswith('linux'):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EPERM):  # not supported here
        return False
    raise OSError(err, os.strerror(err), str(b))


def _swap_into_place(new: Path, path: Path) -> None:
    """Move ``new`` to ``path``, replacing what is there (a folder, a file or a link, not followed); at every moment
    either the old or the new output is complete at ``path``, or (SIGKILL between two renames, where no atomic
    exchange exists) the old one is moved aside under a name the next run recognises and puts back."""
    with signals_deferred():
        if not os.path.lexists(path):
            os.rename(new, path)
            return
        if _exchange(new, path):
            _remove(new)  # now the old output
            return
        old = _hidden_name(path, 'old')
        os.rename(path, old)
        try:
            os.rename(new, path)
        except BaseException:
            os.rename(old, path)
            raise
        _remove(old)


def refuse_existing(path: PathLike, overwrite: bool, what: str = '', how: str = 'overwrite') -> None:
    """The overwrite policy of every writer: an existing output (a link too) is replaced only with ``overwrite``.

    Writers check it when they start and again when they swap the output into place; a caller with slow work ahead
    (the command line) may check it first, so that it fails before that work.

    Args:
        path: The output.
        overwrite: Whether an existing output may be replaced.
        what: How to name the output in the message ('output folder', ...).
        how: How the caller asks for overwriting ('overwrite', '--overwrite', ...), for the message.

    Raises:
        OutputExists: If ``path`` exists and not ``overwrite``.
    """
    if os.path.lexists(path) and not overwrite:
        raise OutputExists(f'{what + " " if what else ""}{path} already exists; pass {how} to replace it.')
# what the file system answers when an output cannot be written where the user asked
_NOT_WRITABLE = {errno.EROFS: 'the file system is read-only', errno.EACCES: 'permission denied',
                 errno.EPERM: 'permission denied', errno.ENOSPC: 'no space left on the device',
                 errno.EDQUOT: 'disk quota exceeded', errno.ENOTDIR: 'a parent of it is a file, not a folder',
                 errno.EEXIST: 'a parent of it is a file, not a folder'}


def _os_errno(e: BaseException) -> Optional[int]:
    if isinstance(e, OSError) and e.errno is not None:
        return e.errno
    m = re.search(r'code: (\d+)', str(e)) if isinstance(e, SafetensorError) else None  # the Rust writer's io error
    return int(m.group(1)) if m else None


@contextlib.contextmanager
def _naming_the_output(path: Path) -> Iterator[None]:
    """An output the file system refuses is an ``OutputNotWritable`` naming the user's path (not the hidden
    temporary beside it)."""
    try:
        yield
    except (OSError, SafetensorError) as e:
        code = _os_errno(e)
        if code in _NOT_WRITABLE and not isinstance(e, (OutputExists, NotFound)):
            raise OutputNotWritable(f'cannot write {path}: {_NOT_WRITABLE[code]} ({os.strerror(code)}).') from e
        raise


def _atomic_write(path: PathLike, write: Callable[[str], None], overwrite: bool) -> Path:
    path = Path(path)
    with _naming_the_output(path):
        return _atomic_write_unnamed(path, write, overwrite)


def _atomic_write_unnamed(path: Path, write: Callable[[str], None], overwrite: bool) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it into place; on failure remove it."""
    path = Path(path)
    clean_stale_temporaries(path)
    refuse_existing(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(str(_hidden_name(path, 'tmp')) + '.tmp')
    try:
        write(str(tmp))
        os.chmod(tmp, _umask_mode())
        with signals_deferred():
            os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


@contextlib.contextmanager
def atomic_output_dir(path: PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success it replaces ``path``, on failure it is removed.

    An existing output is replaced only with ``overwrite``; whatever happens (an exception, Ctrl-C, SIGTERM), the
    old or the new output is complete at ``path`` afterwards. What dead runs left beside ``path`` is cleaned first.

    Raises:
        OutputExists: If ``path`` exists (also if it appeared while the body ran) and not ``overwrite``, or exists
            and is not a folder.
    """
    path = Path(path)
    with _naming_the_output(path):
        clean_stale_temporaries(path)
        refuse_existing(path, overwrite)
        if os.path.lexists(path) and not path.is_dir():
            raise OutputExists(f'{path} exists and is not a folder.')
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _hidden_name(path, 'tmp')
        tmp.mkdir(mode=0o700)
    try:
        os.chmod(tmp, _umask_mode(directory=True))
        yield tmp
        _give_umask_modes(tmp)
        if os.path.lexists(path) and not overwrite:
            raise OutputExists(f'{path} appeared while it was being written; pass overwrite to replace it.')
        with _naming_the_output(path):
            _swap_into_place(tmp, path)
    except BaseException as e:
        _remove(tmp)
        if not isinstance(e, OutputNotWritable) and isinstance(e, OSError) and _os_errno(e) in _NOT_WRITABLE:
            raise OutputNotWritable(f'cannot write {path}: {_NOT_WRITABLE[_os_errno(e)]} '
                                    f'({os.strerror(_os_errno(e))}).') from e
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
