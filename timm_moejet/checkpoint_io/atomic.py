""" The one atomic writer: every output of timm-moejet appears complete or not at all.

A file is written into a hidden staging folder beside it, under its own name (so a writer that adds files named
after it, such as an ONNX graph's external weights ``NAME.data``, names them rightly), and renamed into place, the
files beside it first and the file itself last. A folder is written as a hidden folder beside it and swapped into
place; with ``distributed=True`` every rank of ``torch.distributed`` writes its part into rank 0's hidden folder, a
barrier waits for all of them, then rank 0 swaps it into place (sharded checkpoints).

Whatever happens (an exception, Ctrl-C, SIGTERM, a full disk), the old or the new output is complete at its path
afterwards. A run killed with SIGKILL leaves its hidden temporaries, named ``.<name>.moejet-<tmp|old>-<pid>-<hex>``,
which the next write of the same output removes (or puts back, for an output moved aside) once their process is gone.
An existing output is replaced only when asked; a file system that refuses the write is an ``OutputNotWritable``
naming the user's path.
"""
import contextlib
import ctypes
import errno
import json
import logging
import math
import os
import re
import shutil
import signal
import sys
import threading
import uuid
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Mapping, Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from ..errors import InvalidArgument, OutputExists, OutputNotWritable
from .names import LOCAL_DIR, PathLike

__all__ = ['write_file', 'atomic_write_bytes', 'write_json', 'json_safe', 'save_safetensors_atomic',
           'atomic_output_dir', 'refuse_existing', 'check_output_apart', 'clean_stale_temporaries',
           'signals_deferred']

_logger = logging.getLogger(__name__)


# Temporaries and moved-aside outputs are named '.<output name>.moejet-<kind>-<pid>-<random>', so a later run can
# recognise the ones of a dead process (SIGKILL leaves them behind) and nothing else.
_MARK = re.compile(r'^\.(?P<name>.+)\.moejet-(?P<kind>tmp|old)-(?P<pid>[1-9][0-9]{0,6})-[0-9a-f]{8}(?:\.tmp)?$')
_MAX_PID = 1 << 22  # Linux's largest pid_max; a larger number is not a pid this module wrote
# what the file system answers when an output cannot be written where the user asked
_NOT_WRITABLE = {errno.EROFS: 'the file system is read-only', errno.EACCES: 'permission denied',
                 errno.EPERM: 'permission denied', errno.ENOSPC: 'no space left on the device',
                 errno.EDQUOT: 'disk quota exceeded', errno.ENOTDIR: 'a parent of it is a file, not a folder',
                 errno.EEXIST: 'a parent of it is a file, not a folder'}


def refuse_existing(path: PathLike, overwrite: bool, what: str = '', how: str = 'overwrite',
                    folder: Optional[bool] = None) -> None:
    """The overwrite policy of every writer: an existing output (a link too) is replaced only with ``overwrite``.

    Writers check it when they start and again when they swap the output into place; a caller with slow work ahead
    (the command line) may check it first, so that it fails before that work.

    Args:
        path: The output.
        overwrite: Whether an existing output may be replaced.
        what: How to name the output in the message ('output folder', ...).
        how: How the caller asks for overwriting ('overwrite', '--overwrite', ...), for the message.
        folder: Whether the output is a folder (True) or a file (False); None: either. An output of the other kind
            (a file where a folder is to be written, a folder where a file is) is never replaced.

    Raises:
        InvalidArgument: If ``path`` is empty.
        OutputExists: If ``path`` exists and not ``overwrite``, or is of the other kind.
    """
    named = f'{what + " " if what else ""}{path}'
    if not os.fspath(path):
        raise InvalidArgument(f'{what or "the output"} is an empty path; name the {what or "output"} to write.')
    if os.path.lexists(path) and not overwrite:
        raise OutputExists(f'{named} already exists; pass {how} to replace it.')
    if folder is True and os.path.lexists(path) and not os.path.isdir(path):
        kind = 'a link to no folder' if os.path.islink(path) else 'a file, not a folder'
        raise OutputExists(f'{named} is {kind}; name another path for the output folder, or remove it first.')
    if folder is False and os.path.isdir(path) and not os.path.islink(path):
        raise OutputExists(f'{named} is a folder; a file cannot replace it. Name a file path, or remove the folder '
                           f'first.')


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


def _umask_mode(directory: bool = False) -> int:
    # mkdtemp-like creation is 0600/0700; give the result the permissions a plain open()/mkdir() would
    mask = os.umask(0)
    os.umask(mask)
    return (0o777 if directory else 0o666) & ~mask


def _give_umask_modes(path: Path) -> None:
    """Give ``path`` and everything in it the modes a plain open()/mkdir() would (writers such as safetensors create
    0600 files)."""
    os.chmod(path, _umask_mode(directory=path.is_dir()))
    for root, dirs, files in os.walk(path):
        for name in dirs:
            os.chmod(os.path.join(root, name), _umask_mode(directory=True))
        for name in files:
            os.chmod(os.path.join(root, name), _umask_mode())


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
        if code in _NOT_WRITABLE and not isinstance(e, (OutputExists, OutputNotWritable, FileNotFoundError)):
            raise OutputNotWritable(f'cannot write {path}: {_NOT_WRITABLE[code]} ({os.strerror(code)}).') from e
        raise


def _distributed() -> Any:
    """``torch.distributed`` when a process group is running, else None."""
    import torch.distributed as dist
    return dist if dist.is_available() and dist.is_initialized() else None


@contextlib.contextmanager
def _staging(path: Path, overwrite: bool, folder: bool, dist: Any = None) -> Iterator[Path]:
    """Clean what dead runs left beside ``path``, apply the overwrite policy, create a hidden temporary folder beside
    it and yield it; it is removed on failure. Under a process group (``dist``) rank 0 does this and every rank gets
    its folder (each writes its part into it)."""
    rank0 = dist is None or dist.get_rank() == 0
    tmp = None
    try:
        if rank0:
            clean_stale_temporaries(path)
            refuse_existing(path, overwrite, folder=folder)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = _hidden_name(path, 'tmp')
            tmp.mkdir(mode=0o700)
    finally:
        if dist is not None:  # the other ranks wait for it, also when it failed
            box = [os.fspath(tmp) if tmp is not None else None]
            dist.broadcast_object_list(box, src=0)
            tmp = Path(box[0]) if box[0] is not None else None
    if tmp is None:
        raise OutputNotWritable(f'cannot write {path}: rank 0 could not create it (see its error).')
    try:
        yield tmp
    except BaseException:
        if rank0:
            _remove(tmp)
        raise


def write_file(path: PathLike, write: Callable[[Path], None], overwrite: bool = True) -> Path:
    """Call ``write(tmp)`` on a path named like ``path`` in a hidden folder beside it, then move what it wrote into
    place: files named after it first (an ONNX graph's ``NAME.data``), ``path`` last. On failure nothing is left.

    Raises:
        OutputExists: If ``path`` exists and not ``overwrite``.
        OutputNotWritable: If the file system refuses the write (naming ``path``).
    """
    path = Path(path)
    with _naming_the_output(path), _staging(path, overwrite, folder=False) as tmp:
        write(tmp / path.name)
        # the file itself last: whoever sees it finds what it names in place
        for f in sorted(tmp.iterdir(), key=lambda p: p.name == path.name):
            _give_umask_modes(f)
            with signals_deferred():
                os.replace(f, path.with_name(f.name))
        _remove(tmp)
    return path


def atomic_write_bytes(data: bytes, path: PathLike, overwrite: bool = True) -> Path:
    """Write bytes atomically (see :func:`write_file`)."""
    return write_file(path, lambda tmp: tmp.write_bytes(data), overwrite)


def json_safe(value: Any) -> Any:
    """What ``json.dump`` takes, strictly: tuples as lists, tensors as lists or numbers, paths as strings, NaN and
    infinities (a figure undefined for this model) as null, anything else as its string."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, torch.Tensor):
        return json_safe(value.tolist())
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def write_json(value: Any, path: PathLike, overwrite: bool = True) -> Path:
    """Write ``value`` (made :func:`json_safe`) as indented JSON, atomically."""
    return atomic_write_bytes(json.dumps(json_safe(value), indent=2, allow_nan=False).encode(), path, overwrite)


def save_safetensors_atomic(
        tensors: Mapping[str, torch.Tensor],
        path: PathLike,
        metadata: Optional[Dict[str, str]] = None,
        overwrite: bool = True,
) -> Path:
    """Write tensors as safetensors, atomically (see :func:`write_file`)."""
    cpu = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    return write_file(path, lambda tmp: save_file(cpu, os.fspath(tmp), metadata=metadata), overwrite)


@contextlib.contextmanager
def atomic_output_dir(path: PathLike, overwrite: bool = False, distributed: bool = False) -> Iterator[Path]:
    """Yield a hidden temporary folder beside ``path``; on success it replaces ``path``, on failure it is removed.

    Args:
        path: The output folder.
        overwrite: Replace an existing output.
        distributed: A collective of every rank of the running ``torch.distributed`` process group: each rank writes
            its part into the same folder (rank 0's), a barrier waits for all, then rank 0 swaps it into place and a
            second barrier lets no rank go on before it is there. Without a process group, as ``False``.

    Raises:
        OutputExists: If ``path`` exists (also if it appeared while the body ran) and not ``overwrite``, or exists
            and is not a folder.
        OutputNotWritable: If the file system refuses the write (naming ``path``).
    """
    path = Path(path)
    dist = _distributed() if distributed else None
    with _naming_the_output(path), _staging(path, overwrite, folder=True, dist=dist) as tmp:
        yield tmp
        if dist is not None:
            dist.barrier()  # every rank's part is written
        if dist is None or dist.get_rank() == 0:
            _give_umask_modes(tmp)
            if os.path.lexists(path) and not overwrite:
                raise OutputExists(f'{path} appeared while it was being written; pass overwrite to replace it.')
            _swap_into_place(tmp, path)
    if dist is not None:
        dist.barrier()  # no rank goes on before the output is in place
