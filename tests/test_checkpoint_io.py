"""Safe reading and atomic writing of weights."""
import argparse
import os
import stat

import pytest
import torch

from timm_moejet import checkpoint_io
from timm_moejet.checkpoint_io import (
    atomic_output_dir,
    atomic_write_bytes,
    load_state_dict_file,
    save_safetensors_atomic,
)


def test_round_trip_and_permissions(tmp_path):
    path = save_safetensors_atomic({'w': torch.arange(6.).reshape(2, 3)}, tmp_path / 'm.safetensors', {'k': 'v'})
    assert torch.equal(load_state_dict_file(path)['w'], torch.arange(6.).reshape(2, 3))
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
    monkeypatch.setattr(checkpoint_io, 'save_file', half_write)
    with pytest.raises(OSError, match='disk full'):
        save_safetensors_atomic({'w': torch.zeros(1)}, target)
    # the old file is intact and no temporary file is left
    assert [p.name for p in tmp_path.iterdir()] == ['m.safetensors']
    assert torch.equal(load_state_dict_file(target)['w'], torch.ones(1))


def test_no_overwrite_without_permission(tmp_path):
    target = atomic_write_bytes(b'old', tmp_path / 'f.bin')
    with pytest.raises(FileExistsError, match='f.bin already exists'):
        atomic_write_bytes(b'new', target, overwrite=False)
    assert target.read_bytes() == b'old'


class _Payload:
    """An arbitrary Python object, as a malicious checkpoint would carry."""


def test_pth_is_read_with_weights_only(tmp_path):
    # refused, never unpickled (argparse.Namespace, which train.py stores beside the weights, is allowed)
    path = tmp_path / 'evil.pth'
    torch.save({'obj': _Payload(), 'args': argparse.Namespace(lr=1)}, path)
    with pytest.raises(ValueError, match='_Payload.*weights_only=True'):
        load_state_dict_file(path)
    good = tmp_path / 'good.pt'
    torch.save({'w': torch.ones(2)}, good)
    assert torch.equal(load_state_dict_file(good)['w'], torch.ones(2))


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
