""" The one atomic writer (``timm_moejet.checkpoint_io.atomic``): every output appears complete or not at all.

A write killed at any point, a full or read-only disk, Ctrl-C or SIGTERM in the swap of an output, a symlinked
output, what a SIGKILL leaves behind, and folders written by every rank of a process group.
"""
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from timm_moejet.checkpoint_io import (
    atomic,
    atomic_output_dir,
    atomic_write_bytes,
    read_state_dict,
    save_safetensors_atomic,
)

ROOT = Path(__file__).resolve().parents[1]


def test_round_trip_and_permissions(tmp_path):
    path = save_safetensors_atomic({'w': torch.arange(6.).reshape(2, 3)}, tmp_path / 'm.safetensors', {'k': 'v'})
    assert torch.equal(read_state_dict(path)['w'], torch.arange(6.).reshape(2, 3))
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~mask


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    def half_write(tensors, filename, metadata=None):
        with open(filename, 'wb') as f:
            f.write(b'partial')
        raise OSError('disk full')

    target = tmp_path / 'm.safetensors'
    save_safetensors_atomic({'w': torch.ones(1)}, target)
    monkeypatch.setattr(atomic, 'save_file', half_write)
    with pytest.raises(OSError, match='disk full'):
        save_safetensors_atomic({'w': torch.zeros(1)}, target)
    # the old file is intact and no temporary file is left
    assert [p.name for p in tmp_path.iterdir()] == ['m.safetensors']
    assert torch.equal(read_state_dict(target)['w'], torch.ones(1))


def test_no_overwrite_without_permission(tmp_path):
    target = atomic_write_bytes(b'old', tmp_path / 'f.bin')
    with pytest.raises(FileExistsError, match='f.bin already exists'):
        atomic_write_bytes(b'new', target, overwrite=False)
    assert target.read_bytes() == b'old'


def test_atomic_output_dir(tmp_path):
    target = tmp_path / 'out'
    with atomic_output_dir(target) as tmp:
        (tmp / 'a.txt').write_text('first')
    assert (target / 'a.txt').read_text() == 'first'
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o777 & ~mask
    with pytest.raises(FileExistsError, match='pass overwrite'):
        with atomic_output_dir(target):
            pass
    # a failing body leaves the old folder as it was and no temporary folder
    with pytest.raises(RuntimeError, match='boom'):
        with atomic_output_dir(target, overwrite=True) as tmp:
            (tmp / 'a.txt').write_text('second')
            raise RuntimeError('boom')
    assert [p.name for p in tmp_path.iterdir()] == ['out'] and (target / 'a.txt').read_text() == 'first'
    with atomic_output_dir(target, overwrite=True) as tmp:
        (tmp / 'b.txt').write_text('second')
    assert sorted(p.name for p in target.iterdir()) == ['b.txt']
    assert [p.name for p in tmp_path.iterdir()] == ['out']


def _umask() -> int:
    import os
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_exported_files_share_one_mode(tmp_path):
    """model.safetensors was written 0600 beside a 0644 config.json; every file gets the umask's mode."""
    import os
    import stat

    from weights_tools.cli import main

    assert main(['export', 'moejet_vit_test', '--output', str(tmp_path / 'out')]) == 0
    modes = {p.name: stat.S_IMODE(os.stat(p).st_mode) for p in (tmp_path / 'out').iterdir()}
    assert modes == {'config.json': 0o666 & ~_umask(), 'model.safetensors': 0o666 & ~_umask()}


def _leftovers(folder: Path, name: str):
    """Hidden temporaries or moved-aside copies of the output ``name`` (anything '.name.*')."""
    return sorted(p.name for p in Path(folder).iterdir() if p.name.startswith(f'.{name}.'))


def _write_output(target: Path, content: str, overwrite: bool = True) -> None:
    with atomic_output_dir(target, overwrite=overwrite) as tmp:
        (tmp / 'f.txt').write_text(content)


@pytest.mark.parametrize('failure', [KeyboardInterrupt, OSError])
def test_overwrite_failing_in_the_swap_keeps_the_old_output(tmp_path, monkeypatch, failure):
    """An exception or Ctrl-C at the moment the new folder replaces the old one: one of them is complete at the
    path afterwards (here the old one), and no hidden copy is left."""
    import os

    target = tmp_path / 'out'
    _write_output(target, 'old')
    real_rename = os.rename
    # the two-rename path (filesystems without an atomic exchange): fail the second rename, tmp -> target
    monkeypatch.setattr(atomic, '_exchange', lambda a, b: False)

    failed = []

    def rename(src, dst):
        if Path(dst) == target and not failed:  # the new folder's rename into place, once
            failed.append(dst)
            raise failure('injected')
        return real_rename(src, dst)

    monkeypatch.setattr(os, 'rename', rename)
    with pytest.raises(failure):
        _write_output(target, 'new')
    monkeypatch.setattr(os, 'rename', real_rename)
    assert failed and (target / 'f.txt').read_text() == 'old'
    assert _leftovers(tmp_path, 'out') == []


@pytest.mark.parametrize('exchange', [True, False])
def test_ctrl_c_during_the_swap_is_held_until_the_new_output_is_in_place(tmp_path, monkeypatch, exchange):
    """SIGINT arriving inside the swap does not cut it in half: the swap completes, then KeyboardInterrupt."""
    import os
    import signal

    # Python's own Ctrl-C handler, whatever this process inherited (a background shell starts it with SIGINT ignored)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    target = tmp_path / 'out'
    _write_output(target, 'old')
    if not exchange:
        monkeypatch.setattr(atomic, '_exchange', lambda a, b: False)
    real_rename = os.rename

    def rename(src, dst):  # the first rename of the swap (or the only one) gets a Ctrl-C on its heels
        out = real_rename(src, dst)
        signal.raise_signal(signal.SIGINT)
        return out

    monkeypatch.setattr(os, 'rename', rename)
    real_exchange = atomic._exchange
    if exchange and real_exchange is not None:
        def exchange_then_interrupt(a, b):
            done = real_exchange(a, b)
            signal.raise_signal(signal.SIGINT)
            return done
        monkeypatch.setattr(atomic, '_exchange', exchange_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        _write_output(target, 'new')
    monkeypatch.setattr(os, 'rename', real_rename)
    signal.signal(signal.SIGINT, previous)
    assert (target / 'f.txt').read_text() == 'new'
    assert _leftovers(tmp_path, 'out') == []


def test_overwrite_of_a_symlinked_output_leaves_no_hidden_link(tmp_path):
    target_dir = tmp_path / 'real'
    _write_output(target_dir, 'linked')
    link = tmp_path / 'out'
    link.symlink_to(target_dir, target_is_directory=True)
    _write_output(link, 'new')
    assert not link.is_symlink() and (link / 'f.txt').read_text() == 'new'
    assert (target_dir / 'f.txt').read_text() == 'linked'  # the link's target is left alone
    assert _leftovers(tmp_path, 'out') == []


def test_stale_temporaries_of_the_same_output_are_cleaned(tmp_path):
    """Temporaries of a run killed with SIGKILL (its pid is gone) are removed by the next run; a live run's are not,
    nor anything not named by this tool."""
    import os

    dead = subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'], capture_output=True,
                          text=True).stdout.strip()
    stale = tmp_path / f'.out.moejet-tmp-{dead}-deadbeef'
    stale.mkdir()
    (stale / 'model.safetensors').write_bytes(b'x' * 100)
    stale_file = tmp_path / f'.out.moejet-tmp-{dead}-feedface.tmp'
    stale_file.write_bytes(b'y')
    live = tmp_path / f'.out.moejet-tmp-{os.getpid()}-cafecafe'
    live.mkdir()
    mine = tmp_path / '.out.notes'
    mine.write_text('keep')
    _write_output(tmp_path / 'out', 'new')
    assert _leftovers(tmp_path, 'out') == sorted([live.name, mine.name])


def test_a_swap_cut_by_sigkill_is_repaired_by_the_next_run(tmp_path):
    """Without an atomic exchange a SIGKILL between the two renames leaves no output, only the moved-aside old one;
    the next run puts it back before anything else."""
    dead = subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'], capture_output=True,
                          text=True).stdout.strip()
    old = tmp_path / f'.out.moejet-old-{dead}-0badf00d'
    old.mkdir()
    (old / 'f.txt').write_text('old')
    with pytest.raises(FileExistsError):  # the restored output is there again: no overwrite without asking
        _write_output(tmp_path / 'out', 'new', overwrite=False)
    assert (tmp_path / 'out' / 'f.txt').read_text() == 'old' and _leftovers(tmp_path, 'out') == []


@pytest.mark.parametrize('name', ['.ws2.safetensors.moejet-tmp-4294967296-abcdef12.tmp',
                                  '.ws2.safetensors.moejet-tmp-99999999999999999999999-abcdef12.tmp',
                                  '.ws2.safetensors.moejet-tmp-0-abcdef12.tmp',
                                  '.ws2.safetensors.moejet-tmp-12-xyz.tmp'])
def test_stale_cleanup_ignores_names_it_did_not_make(tmp_path, name):
    (tmp_path / name).write_text('not ours')
    save_safetensors_atomic({'a': torch.ones(2)}, tmp_path / 'ws2.safetensors')
    assert (tmp_path / name).read_text() == 'not ours'
    assert (tmp_path / 'ws2.safetensors').is_file()


@pytest.mark.parametrize('code, words', [(30, 'read-only'), (28, 'no space left'), (13, 'permission denied')])
def test_unwritable_outputs_name_the_users_path(tmp_path, monkeypatch, code, words):
    """EROFS / ENOSPC / EACCES while the temporary is written: exit 2 naming the output, not the temporary."""
    def failing_save(tensors, path, metadata=None):
        raise OSError(code, os.strerror(code), path)

    monkeypatch.setattr(atomic, 'save_file', failing_save)
    out = tmp_path / 'ws.safetensors'
    from timm_moejet.errors import OutputNotWritable
    with pytest.raises(OutputNotWritable, match=words) as info:
        save_safetensors_atomic({'a': torch.ones(2)}, out)
    assert str(out) in str(info.value) and 'moejet-tmp' not in str(info.value)
    assert list(tmp_path.iterdir()) == []


_KILLED_WRITE = '''
import os, signal, sys
from pathlib import Path
import torch
from timm_moejet.checkpoint_io import atomic, save_safetensors_atomic

real = atomic.save_file

def save_then_die(tensors, path, metadata=None):
    real(tensors, path, metadata=metadata)  # the new file is complete, but only in the hidden staging folder
    os.kill(os.getpid(), signal.SIGKILL)

atomic.save_file = save_then_die
save_safetensors_atomic({'w': torch.zeros(3)}, sys.argv[1])
'''


def test_a_write_killed_with_sigkill_leaves_the_old_output_and_the_next_write_cleans_up(tmp_path):
    """SIGKILL in the middle of a write (nothing can run after it): the old output is still there, whole; what the
    dead process left is hidden beside it, and the next write of the same output removes it."""
    target = tmp_path / 'w.safetensors'
    save_safetensors_atomic({'w': torch.ones(3)}, target)
    proc = subprocess.run([sys.executable, '-c', _KILLED_WRITE, str(target)], cwd=ROOT, capture_output=True)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert torch.equal(read_state_dict(target)['w'], torch.ones(3))
    assert len(_leftovers(tmp_path, 'w.safetensors')) == 1  # the dead run's staging folder
    save_safetensors_atomic({'w': torch.full((3,), 2.)}, target)
    assert torch.equal(read_state_dict(target)['w'], torch.full((3,), 2.))
    assert _leftovers(tmp_path, 'w.safetensors') == []


@pytest.mark.parametrize('folder', [False, True])
def test_a_full_disk_names_the_output_and_leaves_nothing(tmp_path, monkeypatch, folder):
    """ENOSPC while the content is written (a file, or a file of a folder): one typed error naming the user's
    path, the old output untouched, no temporary left."""
    import errno

    from timm_moejet.errors import OutputNotWritable

    target = tmp_path / ('out' if folder else 'f.bin')
    if folder:
        _write_output(target, 'old')
    else:
        atomic_write_bytes(b'old', target)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(OutputNotWritable, match=f'cannot write {target}: no space left') as info:
        if folder:
            with atomic_output_dir(target, overwrite=True) as tmp:
                monkeypatch.setattr(Path, 'write_text', full)
                (tmp / 'f.txt').write_text('new')
        else:
            monkeypatch.setattr(Path, 'write_bytes', full)
            atomic_write_bytes(b'new', target)
    monkeypatch.undo()
    assert 'moejet-tmp' not in str(info.value)
    assert ((target / 'f.txt').read_text() if folder else target.read_bytes().decode()) == 'old'
    assert _leftovers(tmp_path, target.name) == []


def test_overwrite_of_a_symlinked_file_replaces_the_link_not_its_target(tmp_path):
    real = atomic_write_bytes(b'linked', tmp_path / 'real.bin')
    link = tmp_path / 'out.bin'
    link.symlink_to(real)
    with pytest.raises(FileExistsError):  # a link is an existing output too
        atomic_write_bytes(b'new', link, overwrite=False)
    atomic_write_bytes(b'new', link)
    assert not link.is_symlink() and link.read_bytes() == b'new' and real.read_bytes() == b'linked'
    assert _leftovers(tmp_path, 'out.bin') == []


def test_files_written_beside_the_output_appear_before_it(tmp_path):
    """A writer that adds files named after the output (an ONNX graph's external weights) sees the output's own
    name, and they are moved into place first, the output itself last."""
    from timm_moejet.checkpoint_io import write_file

    moved = []
    real_replace = os.replace

    def write(path: Path) -> None:
        assert path.name == 'm.onnx'
        path.with_name('m.onnx.data').write_bytes(b'weights')
        path.write_bytes(b'graph')

    def replace(src, dst):
        moved.append(Path(dst).name)
        return real_replace(src, dst)

    os.replace = replace
    try:
        write_file(tmp_path / 'm.onnx', write)
    finally:
        os.replace = real_replace
    assert moved == ['m.onnx.data', 'm.onnx']
    assert sorted(p.name for p in tmp_path.iterdir()) == ['m.onnx', 'm.onnx.data']


_RANK_WRITES = '''
import os, sys
from pathlib import Path
import torch.distributed as dist
from timm_moejet.checkpoint_io import atomic_output_dir

dist.init_process_group('gloo')
rank = dist.get_rank()
target = Path(sys.argv[1])
with atomic_output_dir(target, overwrite=True, distributed=True) as tmp:
    assert not target.exists() or (target / 'old.txt').exists()  # nobody sees a part-written folder
    (tmp / f'rank{rank}.txt').write_text(str(rank))
assert sorted(p.name for p in target.iterdir()) == ['rank0.txt', 'rank1.txt'], list(target.iterdir())
dist.destroy_process_group()
'''


def test_a_folder_written_by_every_rank_appears_whole(tmp_path):
    """Two gloo processes write their parts into rank 0's hidden folder; after a barrier rank 0 swaps it into
    place, and neither goes on before it is there."""
    import socket

    target = tmp_path / 'epoch_1'
    _write_output(target, 'old')
    (target / 'f.txt').rename(target / 'old.txt')
    with socket.socket() as s:
        s.bind(('localhost', 0))
        port = s.getsockname()[1]
    script = tmp_path / 'ranks.py'
    script.write_text(_RANK_WRITES)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS='1')
    proc = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--nnodes', '1',
                           '--rdzv-backend', 'c10d', '--rdzv-endpoint', f'localhost:{port}', str(script),
                           str(target)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert sorted(p.name for p in target.iterdir()) == ['rank0.txt', 'rank1.txt']
    assert _leftovers(tmp_path, 'epoch_1') == []
