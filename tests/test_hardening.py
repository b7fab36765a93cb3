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


def test_statistics_files_without_the_one_metadata_entry_are_refused(tmp_path):
    import json

    from safetensors.torch import save_file

    from timm_moejet.errors import InvalidCheckpoint

    # a layout no release wrote (two metadata entries): refused, naming what is missing
    save_file({'blocks.0.hidden.l2': torch.ones(3)}, str(tmp_path / 'old.safetensors'),
              metadata={'format': 'timm_moejet.activation_stats.v1', 'identity': json.dumps({'hub_id': 'org/x'})})
    with pytest.raises(InvalidCheckpoint, match='not an activation statistics file'):
        ActivationStats.load(tmp_path / 'old.safetensors')


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
    from timm_moejet.checkpoint_io import atomic_output_dir

    with atomic_output_dir(target, overwrite=overwrite) as tmp:
        (tmp / 'f.txt').write_text(content)


@pytest.mark.parametrize('failure', [KeyboardInterrupt, OSError])
def test_overwrite_failing_in_the_swap_keeps_the_old_output(tmp_path, monkeypatch, failure):
    """An exception or Ctrl-C at the moment the new folder replaces the old one: one of them is complete at the
    path afterwards (here the old one), and no hidden copy is left."""
    import os

    from timm_moejet import checkpoint_io

    target = tmp_path / 'out'
    _write_output(target, 'old')
    real_rename = os.rename
    # the two-rename path (filesystems without an atomic exchange): fail the second rename, tmp -> target
    monkeypatch.setattr(checkpoint_io, '_exchange', lambda a, b: False, raising=False)

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

    from timm_moejet import checkpoint_io

    # Python's own Ctrl-C handler, whatever this process inherited (a background shell starts it with SIGINT ignored)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    target = tmp_path / 'out'
    _write_output(target, 'old')
    if not exchange:
        monkeypatch.setattr(checkpoint_io, '_exchange', lambda a, b: False, raising=False)
    real_rename = os.rename

    def rename(src, dst):  # the first rename of the swap (or the only one) gets a Ctrl-C on its heels
        out = real_rename(src, dst)
        signal.raise_signal(signal.SIGINT)
        return out

    monkeypatch.setattr(os, 'rename', rename)
    real_exchange = getattr(checkpoint_io, '_exchange', None)
    if exchange and real_exchange is not None:
        def exchange_then_interrupt(a, b):
            done = real_exchange(a, b)
            signal.raise_signal(signal.SIGINT)
            return done
        monkeypatch.setattr(checkpoint_io, '_exchange', exchange_then_interrupt)
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


_SIGTERM_RUN = '''
import os, signal, sys
from pathlib import Path
import timm.models
from weights_tools.cli import main

def slow_save(model, save_directory, **kwargs):
    (Path(save_directory) / 'model.safetensors').write_bytes(b'half')
    os.kill(os.getpid(), signal.SIGTERM)
    raise AssertionError('SIGTERM did not stop the write')

timm.models.save_for_hf = slow_save
sys.exit(main(['export', 'moejet_vit_test', '--output', sys.argv[1]]))
'''


def test_sigterm_is_handled_like_ctrl_c(tmp_path):
    proc = subprocess.run([sys.executable, '-c', _SIGTERM_RUN, str(tmp_path / 'out')], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 143, (proc.returncode, proc.stderr[-2000:])
    assert 'terminated' in proc.stderr and 'no output was written' in proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_interrupt_after_the_output_is_in_place_says_so(tmp_path, monkeypatch, capsys):
    from timm_moejet.checkpoint_io import hub
    from weights_tools.cli import main

    real_save = hub.save_hub_folder

    def save_then_interrupt(*args, **kwargs):
        real_save(*args, **kwargs)
        raise KeyboardInterrupt
    monkeypatch.setattr(hub, 'save_hub_folder', save_then_interrupt)
    assert main(['export', 'moejet_vit_test', '--output', str(tmp_path / 'out')]) == 130
    err = capsys.readouterr().err
    assert 'no output was written' not in err and f'{tmp_path / "out"} was written completely' in err, err
    assert sorted(p.name for p in (tmp_path / 'out').iterdir()) == ['config.json', 'model.safetensors']


@pytest.fixture(scope='module')
def dense_folder(tmp_path_factory):
    """A dense donor as a timm Hub folder and as a weights file, and the digits as an image folder."""
    from safetensors.torch import save_file
    from timm.models import save_for_hf

    from benchmarks.digits.data import write_digits_image_folder

    root = tmp_path_factory.mktemp('hardening')
    torch.manual_seed(0)
    donor = timm.create_model('vit_tiny_patch16_224', embed_dim=64, depth=4, num_heads=2, img_size=64, num_classes=3)
    save_for_hf(donor, str(root / 'donor'), safe_serialization=True)
    save_file(donor.state_dict(), str(root / 'donor.safetensors'))
    write_digits_image_folder(str(root / 'digits'), image_size=16)
    return root


def _tree_digest(path: Path) -> dict:
    return {str(p.relative_to(path)): _sha(p) for p in sorted(Path(path).rglob('*')) if p.is_file()}


@pytest.mark.parametrize('argv, input_name', [
    (['calibrate', '--donor', '{root}/donor', '--images', '{root}/digits', '--limit', '8',
      '--output', '{root}/donor/model.safetensors', '--overwrite'], 'donor'),
    (['recycle', '--model', 'moejet_vit_test', '--trunk', '{root}/donor', '--strategy', 'uniform',
      '--output', '{root}/donor', '--overwrite'], 'donor'),
    (['recycle', '--model', 'moejet_vit_test', '--trunk', '{root}/donor/model.safetensors', '--strategy', 'uniform',
      '--output', '{root}', '--overwrite'], 'donor'),
    (['export', 'local-dir:{root}/donor', '--output', '{root}/donor/export', '--overwrite'], 'donor'),
    (['inspect', 'moejet_vit_test', '--images', '{root}/digits', '--limit', '4',
      '--plot', '{root}/digits/train/0/p.png', '--overwrite'], 'digits'),
])
def test_no_output_overwrites_an_input(dense_folder, argv, input_name, capsys):
    """An output that is, contains or lives inside one of the command's inputs is refused, --overwrite or not."""
    from weights_tools.cli import main

    before = _tree_digest(dense_folder)
    status = main([a.format(root=dense_folder) for a in argv])
    err = capsys.readouterr().err
    assert status == 2 and any(w in err for w in ('is the', 'lies inside the', 'contains the')), err
    assert str(dense_folder / input_name) in err, err
    assert _tree_digest(dense_folder) == before


@pytest.mark.parametrize('role, key, value', [
    ('trunk', 'blocks.1.attn.qkv.weight', float('nan')),
    ('expert', 'blocks.3.mlp.fc2.bias', float('inf')),
])
def test_non_finite_donor_weights_are_refused_naming_the_tensor(dense_folder, tmp_path, capsys, role, key, value):
    from safetensors.torch import load_file, save_file

    from weights_tools.cli import main

    sd = load_file(str(dense_folder / 'donor.safetensors'))
    sd[key] = sd[key].clone()
    sd[key].view(-1)[3] = value
    save_file(sd, str(tmp_path / 'bad.safetensors'))
    good, bad = str(dense_folder / 'donor.safetensors'), str(tmp_path / 'bad.safetensors')
    trunk, experts = (bad, good) if role == 'trunk' else (good, bad)
    status = main(['recycle', '--model', 'moejet_vit_test', '--trunk', trunk, '--experts', experts,
                   '--output', str(tmp_path / 'moe')])
    err = capsys.readouterr().err
    assert status == 2 and f'{role} donor' in err and key in err and 'NaN or Inf' in err, err
    assert not (tmp_path / 'moe').exists()


def test_statistics_are_not_recorded_for_strategies_that_ignore_them(dense_folder, tmp_path, capsys, caplog):
    """random/uniform read no statistics: a file given anyway (here of another donor) is named in a warning and
    left out of the record, which lists only what shaped the weights."""
    import json

    from weights_tools.cli import main

    other = {f'blocks.{i}.hidden.l2': torch.ones(256) for i in range(4)}  # statistics of another donor
    ActivationStats(other, hub_id='org/other', weights_hash='0' * 64).save(tmp_path / 'other.safetensors')
    status = main(['recycle', '--model', 'moejet_vit_test', '--trunk', str(dense_folder / 'donor.safetensors'),
                   '--strategy', 'random', '--stats', str(tmp_path / 'other.safetensors'),
                   '--output', str(tmp_path / 'moe')])
    assert status == 0, capsys.readouterr().err
    warned = [r.getMessage() for r in caplog.records if r.levelname == 'WARNING']
    assert any('does not use activation statistics' in m and 'other.safetensors' in m for m in warned), warned
    record = json.loads((tmp_path / 'moe' / 'config.json').read_text())['pretrained_cfg']['recycling']
    assert record['strategy'] == 'random' and not any('stats' in k for k in record), record


class _HistoryBufferLike:
    """Stands in for the Python objects mmengine stores beside the weights (message hub buffers)."""

    def __init__(self):
        self.values = [1, 2]


def _train_py_checkpoint(path: Path, model, ema_model) -> None:
    """What timm's train.py (CheckpointSaver) writes: weights, EMA weights, optimizer state and its argparse args."""
    import argparse

    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(1, 3, 64, 64)).sum().backward()
    optimizer.step()
    torch.save({'epoch': 3, 'arch': 'moejet_vit_test', 'state_dict': model.state_dict(),
                'optimizer': optimizer.state_dict(), 'version': 2, 'metric': 41.5,
                'args': argparse.Namespace(model='moejet_vit_test', lr=0.1, model_ema=True),
                'state_dict_ema': ema_model.state_dict()}, path)


def test_timm_train_py_checkpoints_load_with_their_ema(tmp_path, capsys):
    from timm_moejet.build import load_model
    from weights_tools.cli import main

    torch.manual_seed(0)
    model = timm.create_model('moejet_vit_test', num_classes=3)
    ema = timm.create_model('moejet_vit_test', num_classes=3)
    for name in ('checkpoint-3.pth.tar', 'model_best.pth.tar'):
        _train_py_checkpoint(tmp_path / name, model, ema)
        for use_ema, reference in ((False, model), (True, ema)):
            out = tmp_path / f'{name}-{use_ema}'
            argv = ['export', 'moejet_vit_test', '--num-classes', '3', '--checkpoint', str(tmp_path / name),
                    '--output', str(out)] + (['--ema'] if use_ema else [])
            assert main(argv) == 0, capsys.readouterr().err
            loaded, _ = load_model(f'local-dir:{out}')
            assert all(torch.equal(v, reference.state_dict()[k]) for k, v in loaded.state_dict().items())
    torch.save({'state_dict': model.state_dict()}, tmp_path / 'no_ema.pth')
    status = main(['export', 'moejet_vit_test', '--num-classes', '3', '--checkpoint', str(tmp_path / 'no_ema.pth'),
                   '--ema', '--output', str(tmp_path / 'x')])
    assert status == 2 and 'no EMA weights' in capsys.readouterr().err


def test_mmengine_checkpoints_as_far_as_weights_only_allows(tmp_path):
    from timm_moejet.checkpoint_io import load_state_dict_file

    sd = {'backbone.blocks.0.weight': torch.ones(2)}
    torch.save({'meta': {'mmengine_version': '0.10.4', 'epoch': 300, 'seed': 3407}, 'state_dict': sd},
               tmp_path / 'plain.pth')
    assert list(load_state_dict_file(tmp_path / 'plain.pth')) == ['backbone.blocks.0.weight']
    torch.save({'meta': {'epoch': 300}, 'state_dict': sd, 'message_hub': _HistoryBufferLike()}, tmp_path / 'mm.pth')
    with pytest.raises(ValueError, match=r'_HistoryBufferLike.*weights_only.*state_dict'):
        load_state_dict_file(tmp_path / 'mm.pth')


def _dense_folder_for(tmp_path: Path, name: str, architecture: str, model_args: dict, pretrained_cfg: dict,
                      donor_kwargs: dict) -> Path:
    """A timm Hub folder holding dense ViT weights whose config.json names a MoE architecture."""
    import json

    from hub_cache import DenseDonor, dense_vit_state_dict
    from safetensors.torch import save_file

    folder = tmp_path / name
    folder.mkdir()
    save_file(dense_vit_state_dict(DenseDonor('vit_tiny_patch16_224', **donor_kwargs)),
              str(folder / 'model.safetensors'))
    (folder / 'config.json').write_text(json.dumps(dict(architecture=architecture, num_classes=10,
                                                        model_args=model_args, pretrained_cfg=pretrained_cfg)))
    return folder


def test_a_model_config_cannot_make_the_loader_read_other_files(tmp_path, monkeypatch):
    """config.json of a local-dir:/hf-hub: model is data from the checkpoint: its model_args may not name other
    files or repos (only the caller's kwargs can), and its tag may not pull the tag's expert donor from the Hub."""
    from hub_cache import build_hub_cache, use_offline_hub
    from safetensors.torch import load_file, save_file

    from timm_moejet.recycling import weight_proxy_statistics

    small = dict(depth=4, model_kwargs=dict(embed_dim=64, num_heads=2, img_size=64))
    secret, stats = tmp_path / 'secret.safetensors', tmp_path / 'stats.safetensors'
    save_file({'w': torch.ones(1)}, str(secret))
    tampered = _dense_folder_for(tmp_path, 'tampered', 'moejet_vit_test',
                                 dict(num_classes=10, recycle_stats=str(stats), recycle_experts=str(secret)),
                                 dict(num_classes=10), small)
    weight_proxy_statistics(load_file(str(tampered / 'model.safetensors')), [2, 3]).save(stats)
    with pytest.raises(ValueError, match=r'config.*recycle_experts, recycle_stats.*caller'):
        timm.create_model(f'local-dir:{tampered}', pretrained=True)
    cache = build_hub_cache(tmp_path / 'hub', {'evil/tampered': {
        'model.safetensors': (tampered / 'model.safetensors').read_bytes(),
        'config.json': (tampered / 'config.json').read_bytes()}})
    use_offline_hub(monkeypatch, cache)
    with pytest.raises(ValueError, match=r'config.*recycle_experts, recycle_stats.*caller'):
        timm.create_model('hf-hub:evil/tampered', pretrained=True)

    # the caller may name files
    clean = _dense_folder_for(tmp_path, 'clean', 'moejet_vit_test', dict(num_classes=10), dict(num_classes=10), small)
    model = timm.create_model(f'local-dir:{clean}', pretrained=True, recycle_stats=str(stats))
    assert model.pretrained_cfg['recycling']['stats_file'] == 'stats.safetensors'

    # a dense folder that claims a recycling tag is its own (only) donor: the tag's expert repo is not fetched
    use_offline_hub(monkeypatch, tmp_path / 'empty_cache')
    tagged = _dense_folder_for(tmp_path, 'tagged', 'moejet_vit_tiny', dict(num_core_experts=3, num_univ_experts=5),
                               dict(tag='recycled_in21k', num_classes=10), dict(depth=12))
    model = timm.create_model(f'local-dir:{tagged}', pretrained=True)
    assert model.pretrained_cfg['recycling']['experts'] == f'local-dir:{tagged}'


@pytest.mark.parametrize('kwargs, match', [
    (dict(moe_blocks=2), r'moe_blocks must be a list of ints \(block indices\), got 2 \(int\)'),
    (dict(num_core_experts='4'), r"num_core_experts must be an int >= 0, got '4' \(str\)"),
    (dict(moe_drop_path_rate=2), r'moe_drop_path_rate must be a number in \[0, 1\), got 2\.'),
    (dict(num_classes=-5), r'num_classes must be an int >= 0, got -5'),
])
def test_bad_model_kwargs_are_named_with_the_value_given(kwargs, match):
    with pytest.raises(ValueError, match=match):
        timm.create_model('moejet_vit_test', **kwargs)


def test_official_config_values_are_checked():
    from timm_moejet.checkpoint_io.official import official_config_to_kwargs

    config = dict(embed_dim='64', depth=4, num_heads=2, moe_layers=[2, 3], core_experts=8)
    with pytest.raises(ValueError, match=r"embed_dim must be an int >= 1, got '64' \(str\)"):
        official_config_to_kwargs(config)
    with pytest.raises(ValueError, match=r'moe_layers must be a list of ints'):
        official_config_to_kwargs(dict(config, embed_dim=64, moe_layers=3))


@pytest.mark.parametrize('argv, fragment', [
    (['recycle', '--trunk', '{donor}', '--seed', str(2 ** 70), '--output', '{out}'],
     'argument --seed: must be an int in [0, 9223372036854775807], got'),
    (['calibrate', '--donor', '{donor}', '--donor-arch', 'vit_tiny_patch16_224', '--images', '{digits}',
      '--seed', str(2 ** 70), '--output', '{out}.safetensors'], 'argument --seed: must be an int in [0, 92233720'),
    (['export', 'moejet_vit_test', '--num-classes', '-5', '--output', '{out}'],
     'argument --num-classes: must be an int >= 0, got -5'),
    (['inspect', 'moejet_vit_test', '--batch-size', '0'], 'argument --batch-size: must be an int >= 1, got 0'),
    (['calibrate', '--donor', 'vit_small_patch16_224.augreg_in21k', '--images', '{digits}', '--output',
      '{out}.safetensors'], "vit_small_patch16_224.augreg_in21k (Hub repository 'timm/vit_small_patch16_224."
                            "augreg_in21k') is not in the local Hugging Face cache and the Hub was not reachable"),
])
def test_bad_arguments_get_one_clear_line(dense_folder, tmp_path, monkeypatch, capsys, argv, fragment):
    from hub_cache import use_offline_hub

    from weights_tools.cli import main

    use_offline_hub(monkeypatch, tmp_path / 'empty_cache')
    args = [a.format(donor=dense_folder / 'donor.safetensors', digits=dense_folder / 'digits', out=tmp_path / 'o')
            for a in argv]
    status = main(args)
    err = capsys.readouterr().err.strip()
    assert status == 2 and fragment in err and len(err.splitlines()) == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ['empty_cache']


def test_a_missing_donor_is_named_before_the_model_is_built(tmp_path, monkeypatch):
    """export moejet_vit_small --pretrained from an empty offline cache failed only after building 1058M
    parameters; the donors are now looked up first."""
    from hub_cache import use_offline_hub

    from timm_moejet.models import MoEVisionTransformer

    use_offline_hub(monkeypatch, tmp_path / 'empty_cache')

    def never(*args, **kwargs):
        raise AssertionError('the model was built before its donors were found')
    monkeypatch.setattr(MoEVisionTransformer, '__init__', never)
    with pytest.raises(FileNotFoundError, match=r"trunk donor 'timm/vit_small_patch16_224.augreg_in21k'.*not reach"):
        timm.create_model('moejet_vit_small', pretrained=True)


def test_long_messages_are_cut_to_a_readable_line(tmp_path, capsys):
    """A checkpoint of another model used to give a 4,500-character line."""
    from safetensors.torch import save_file

    from weights_tools.cli import main

    save_file(timm.create_model('vit_tiny_patch16_224', depth=2).state_dict(), str(tmp_path / 'other.safetensors'))
    status = main(['export', 'moejet_vit_test', '--checkpoint', str(tmp_path / 'other.safetensors'),
                   '--output', str(tmp_path / 'out')])
    err = capsys.readouterr().err.strip()
    assert status == 2 and 'does not fit' in err and len(err.splitlines()) == 1 and len(err) <= 600, (len(err), err)
    assert '--debug' in err


@pytest.mark.parametrize('module, argv', [
    ('pymetis', ['recycle', '--model', 'moejet_vit_test', '--trunk', '{donor}', '--strategy', 'graph',
                 '--output', '{out}']),
    ('matplotlib', ['inspect', 'moejet_vit_test', '--random-images', '2', '--plot', '{out}.png']),
])
def test_a_missing_optional_package_names_its_extra(dense_folder, tmp_path, monkeypatch, capsys, module, argv):
    """pymetis and matplotlib are extras ([graph], [plot]): without them, one line says which extra to install."""
    from weights_tools.cli import main

    for name in list(sys.modules):
        if name == module or name.startswith(module + '.'):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if the package were not installed
    status = main([a.format(donor=dense_folder / 'donor.safetensors', out=tmp_path / 'o') for a in argv])
    err = capsys.readouterr().err.strip()
    extra = 'graph' if module == 'pymetis' else 'plot'
    assert status == 2 and f'needs {module}' in err and f'pip install "timm-moejet[{extra}]"' in err, err
    assert len(err.splitlines()) == 1 and list(tmp_path.iterdir()) == []
