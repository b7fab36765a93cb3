""" Sharded training checkpoints of FSDP2 models (``torch.distributed.checkpoint``), and their export to a Hub folder.

A checkpoint is a folder ``epoch_N`` in which every rank writes its own shards (model and optimizer state, one
DCP checkpoint) and rank 0 a ``moejet_train.json`` record: the model (name, kwargs, classes), the recipe fingerprint
a resume must match, and the position (epoch, optimizer updates). It is written by the atomic writer: every rank into
one hidden folder, a barrier, then rank 0 renames it into place, so an interrupted save leaves the previous
checkpoints as they were; ``latest`` names the newest. DCP re-shards on load: a checkpoint written by N processes
resumes on M, or loads into one unsharded model for export.

``python -m timm_moejet.sharded_checkpoint CHECKPOINT OUTPUT`` writes ``model.safetensors`` + ``config.json``
(timm's Hub layout, as ``weights-tools export`` writes it) from a checkpoint, in one process.
"""
import argparse
import contextlib
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Tuple

import torch
import torch.nn as nn

from ..checkpoint_io import atomic_output_dir, atomic_write_bytes, write_json
from ..errors import InvalidArgument, InvalidCheckpoint, MoEJetError, NotFound, OutputExists
from .history import prune_checkpoints

__all__ = ['RECORD', 'save_checkpoint', 'load_checkpoint', 'read_record', 'resolve_checkpoint', 'check_shards',
           'check_fingerprint', 'build_model_from_record', 'export_checkpoint']

RECORD = 'moejet_train.json'
LATEST = 'latest'
CHECKPOINTS = 'checkpoints'  # a run folder's folder of checkpoints
TRAINED_TAG = 'trained'  # the pretrained tag of an exported model (its config.json)
# what a record holds, and of which type
RECORD_ENTRIES = dict(model=str, model_kwargs=dict, fingerprint=dict, epoch=int, num_updates=int)


def _rank() -> int:
    import torch.distributed as dist
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    import torch.distributed as dist
    if dist.is_initialized():
        dist.barrier()


def save_checkpoint(root: Path, epoch: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    record: Dict[str, Any], keep: int = 10, extra: Optional[Dict[str, nn.Module]] = None) -> Path:
    """Save ``epoch_{epoch}`` under ``root`` (a collective: every rank calls it), with the state of the ``extra``
    models (e.g. ``{'model_ema': ...}``) under their keys. Keeps the one just saved and the ``keep`` best by the
    records' validation metric, the newest without one (:func:`~timm_moejet.training.history.prune_checkpoints`).

    Raises:
        InvalidArgument: ``keep`` is less than 1 (the checkpoint just saved is always kept).
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise InvalidArgument(f'keep must be an int of at least 1 (the checkpoint just saved is always kept), got '
                              f'{keep!r}.')
    root = Path(root)
    final = root / f'epoch_{epoch}'
    model_sd, optim_sd = get_state_dict(model, optimizer)
    # an earlier run's epoch N is replaced only once the new one is complete
    with atomic_output_dir(final, overwrite=True, distributed=True) as tmp:
        state = {'model': model_sd, 'optim': optim_sd}
        state.update({key: get_model_state_dict(module) for key, module in (extra or {}).items()})
        dcp.save(state, checkpoint_id=tmp)
        if _rank() == 0:
            write_json(dict(record, epoch=epoch), tmp / RECORD)
    if _rank() == 0:
        atomic_write_bytes(final.name.encode(), root / LATEST)
        prune_checkpoints(root, keep, saved=epoch)
    _barrier()
    return final


def _latest(root: Path) -> Path:
    """The checkpoint ``root/latest`` names: a file holding a folder name of ``root`` (not a link, not a path)."""
    latest = root / LATEST
    name = latest.read_text().strip() if latest.is_file() and not latest.is_symlink() else ''
    target = root / name
    if latest.is_symlink() or not name or Path(name).name != name or name in ('.', '..') \
            or target.is_symlink() or not target.resolve().is_relative_to(root.resolve()):
        raise InvalidCheckpoint(f'{latest} must be a file naming a checkpoint folder beside it (e.g. epoch_3); it is a '
                                f'link or names something else. Pass the checkpoint folder itself.')
    return target


def resolve_checkpoint(path: os.PathLike) -> Path:
    """A checkpoint folder: ``path`` itself, or the ``latest`` of a folder of them or of a run folder."""
    path = Path(path)
    if path.is_file():
        raise InvalidCheckpoint(f'{path} is a file; give the run folder, its {CHECKPOINTS} folder or a checkpoint '
                                f'folder (epoch_N).')
    if not (path / LATEST).exists() and (path / CHECKPOINTS / LATEST).exists():
        path = path / CHECKPOINTS  # a run folder
    if os.path.lexists(path / LATEST):
        path = _latest(path)
    if not path.is_dir():
        raise NotFound(f'checkpoint {path} does not exist.')
    if not (path / RECORD).is_file() or not (path / '.metadata').is_file():
        raise InvalidCheckpoint(f'{path} is not a sharded timm-moejet checkpoint (no {RECORD} and DCP .metadata); '
                                f'a single-file checkpoint loads with --initial-checkpoint or --pretrained-path.')
    return path


def check_shards(path: os.PathLike) -> Path:
    """A checkpoint folder whose DCP ``.metadata`` reads and whose shard files hold every byte it points to.

    Raises:
        InvalidCheckpoint: naming the damaged file.
    """
    from torch.distributed.checkpoint import FileSystemReader

    path = resolve_checkpoint(path)
    try:
        metadata = FileSystemReader(os.fspath(path)).read_metadata()
        ends: Dict[str, int] = {}
        for info in metadata.storage_data.values():
            ends[info.relative_path] = max(ends.get(info.relative_path, 0), info.offset + info.length)
    except Exception as e:  # a damaged pickle raises anything
        raise InvalidCheckpoint(f'{path / ".metadata"} is damaged ({type(e).__name__}: {e}); resume from an '
                                f'earlier checkpoint.') from e
    for name, end in sorted(ends.items()):
        size = (path / name).stat().st_size if (path / name).is_file() else None
        if size is None or size < end:
            state = 'is missing' if size is None else f'is truncated ({size} of {end} bytes)'
            raise InvalidCheckpoint(f'{path / name} {state}; resume from an earlier checkpoint.')
    return path


def read_record(path: os.PathLike) -> Dict[str, Any]:
    """The ``moejet_train.json`` of a checkpoint folder, once its shards are checked (:func:`check_shards`)."""
    path = check_shards(path)
    try:
        record = json.loads((path / RECORD).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InvalidCheckpoint(f'{path / RECORD} is not valid JSON ({e}).') from e
    if not isinstance(record, dict):
        raise InvalidCheckpoint(f'{path / RECORD} holds a {type(record).__name__}, not the record of a checkpoint.')
    for key, kind in RECORD_ENTRIES.items():
        if key not in record:
            raise InvalidCheckpoint(f'{path / RECORD} has no {key!r} entry.')
        if not isinstance(record[key], kind) or isinstance(record[key], bool):
            raise InvalidCheckpoint(f'{path / RECORD}: {key!r} is {record[key]!r}, not a {kind.__name__}.')
    return record


def check_fingerprint(record: Dict[str, Any], fingerprint: Dict[str, Any], path: os.PathLike) -> None:
    """Refuse to resume a checkpoint of another model or recipe, naming every difference."""
    saved = record['fingerprint']
    diffs = [f'{k}: checkpoint {saved.get(k)!r}, now {fingerprint.get(k)!r}'
             for k in sorted(set(saved) | set(fingerprint)) if saved.get(k) != fingerprint.get(k)]
    if diffs:
        raise InvalidCheckpoint(f'{path} was written by another model or recipe, it cannot be resumed here ('
                                + '; '.join(diffs) + '). Nothing was trained or written.')


@contextlib.contextmanager
def _reading(path: Path) -> Iterator[None]:
    """DCP's errors on reading a checkpoint (a shard damaged inside, a model that does not fit) as
    ``InvalidCheckpoint`` naming the folder."""
    try:
        yield
    except Exception as e:  # DCP wraps every rank's failure in a CheckpointException, its text the ranks' tracebacks
        first = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise InvalidCheckpoint(f'cannot read the shards of {path}: {first}') from e


def load_checkpoint(path: os.PathLike, model: nn.Module, optimizer: Optional[torch.optim.Optimizer],
                    extra: Optional[Dict[str, nn.Module]] = None) -> Dict[str, Any]:
    """Load a checkpoint's shards into a sharded (or plain) model and optimizer, and the ``extra`` models saved
    under their keys, re-sharding as needed (a collective under torch.distributed). Returns its record."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_state_dict,
        set_model_state_dict,
        set_state_dict,
    )

    path = resolve_checkpoint(path)
    record = read_record(path)
    model_sd, optim_sd = get_state_dict(model, optimizer if optimizer is not None else [])
    state = {'model': model_sd, 'optim': optim_sd} if optimizer is not None else {'model': model_sd}
    state.update({key: get_model_state_dict(module) for key, module in (extra or {}).items()})
    with _reading(path):
        dcp.load(state, checkpoint_id=path)
    set_state_dict(model, optimizer if optimizer is not None else [], model_state_dict=state['model'],
                   optim_state_dict=state.get('optim', {}))
    for key, module in (extra or {}).items():
        set_model_state_dict(module, state[key])
    return record


def build_model_from_record(record: Dict[str, Any], device: Any = 'cpu') -> nn.Module:
    """The (unsharded) model a checkpoint record describes, without pretrained weights (the checkpoint has them)."""
    from ..build import create_model
    from ..layers import experts_to_be_loaded

    with experts_to_be_loaded():  # every expert is about to be loaded from the checkpoint
        model = create_model(record['model'], num_classes=record['num_classes'], **record['model_kwargs'])
    return model.to(device)


def _check_output_apart(output: os.PathLike, inputs: Tuple[Path, ...]) -> None:
    """Refuse an export output that is, holds or lies inside a checkpoint or the folder of checkpoints."""
    out = Path(output).resolve()
    for folder in inputs:
        folder = folder.resolve()
        if out == folder or out.is_relative_to(folder) or folder.is_relative_to(out):
            raise OutputExists(f'the output {output} would overwrite the checkpoints it is exported from ({folder}); '
                               f'write it outside that folder.')


def export_checkpoint(checkpoint: os.PathLike, output: os.PathLike, overwrite: bool = False,
                      ema: bool = False) -> Tuple[Path, nn.Module]:
    """Consolidate a sharded checkpoint into one ``model.safetensors`` + ``config.json`` (in this process only):
    the model's weights, or with ``ema`` those of its model EMA (``--model-ema``).

    Raises:
        OutputExists: ``output`` exists and not ``overwrite``, or it is, holds or lies inside the checkpoint or its
            folder of checkpoints (whatever ``overwrite`` says).
        InvalidCheckpoint / NotFound: not a checkpoint; ``ema`` and the checkpoint holds no EMA weights.
    """
    import torch.distributed.checkpoint as dcp

    from ..checkpoint_io.hub import save_hub_folder


    path = resolve_checkpoint(checkpoint)
    root = (path.parent,) if (path.parent / LATEST).exists() or path.parent.name == CHECKPOINTS else ()
    _check_output_apart(output, (Path(checkpoint), path, *root))
    if os.path.lexists(output) and not overwrite:  # refused before the model is built
        raise OutputExists(f'{output} exists; pass --overwrite (overwrite=True) to replace it.')
    record = read_record(path)
    key = 'model_ema' if ema else 'model'
    if ema and not record.get('model_ema'):
        raise NotFound(f'{path} holds no EMA weights (its run was trained without --model-ema); export the model\'s.')
    model = build_model_from_record(record)
    state = {key: model.state_dict()}
    with warnings.catch_warnings(), _reading(path):  # DCP warns that it loads in one process, the point here
        warnings.filterwarnings('ignore', message='torch.distributed is disabled')
        dcp.load(state, checkpoint_id=path, no_dist=True)
    model.load_state_dict(state[key], strict=True)
    model.pretrained_cfg = dict(model.pretrained_cfg, tag=TRAINED_TAG)  # its weights are no longer the untrained ones
    return save_hub_folder(model, output, overwrite=overwrite), model


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(prog='python -m timm_moejet.sharded_checkpoint',
                                     description='Export a sharded checkpoint as model.safetensors + config.json.')
    parser.add_argument('checkpoint', help='a checkpoint folder (epoch_N) or the folder holding them (its latest)')
    parser.add_argument('output', help='the Hub folder to write')
    parser.add_argument('--overwrite', action='store_true', help='replace an existing output folder')
    parser.add_argument('--ema', action='store_true', help='export the model EMA\'s weights (--model-ema runs)')
    args = parser.parse_args(argv)
    try:
        out, _ = export_checkpoint(args.checkpoint, args.output, overwrite=args.overwrite, ema=args.ema)
    except MoEJetError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    print(f'wrote {out}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
