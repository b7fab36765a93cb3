"""Hardening: what a hostile or unlucky user does to the loaders and the command line (one test per finding)."""
import hashlib
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

import timm_moejet  # noqa: F401
from timm_moejet.recycling import ActivationStats


def _sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_statistics_files_are_byte_identical_across_processes(tmp_path):
    """Two separate processes writing the same statistics give the same bytes (metadata order included)."""
    script = (
        'import sys, torch; from timm_moejet.recycling import ActivationStats\n'
        't = {f"blocks.{i}.hidden.l2": torch.arange(4.) + i for i in range(3)}\n'
        'ActivationStats(t, architecture="vit_x", hub_id="org/x", weights_hash="ab" * 32, num_tokens=7)'
        '.save(sys.argv[1])\n')
    digests = set()
    for i in range(3):  # the hash seed of each process differs; a dict-ordered header would vary with it
        out = tmp_path / f's{i}.safetensors'
        subprocess.run([sys.executable, '-c', script, str(out)], check=True, env={'PYTHONHASHSEED': str(i)},
                       cwd=Path(__file__).resolve().parents[1])
        digests.add(_sha(out))
        assert ActivationStats.load(out).identity()['num_tokens'] == 7
    assert len(digests) == 1


def test_statistics_files_of_the_earlier_layout_still_load(tmp_path):
    import json

    from safetensors.torch import save_file

    save_file({'blocks.0.hidden.l2': torch.ones(3)}, str(tmp_path / 'old.safetensors'),
              metadata={'format': 'timm_moejet.activation_stats.v1', 'identity': json.dumps({'hub_id': 'org/x'})})
    assert ActivationStats.load(tmp_path / 'old.safetensors').hub_id == 'org/x'


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
