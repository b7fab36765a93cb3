""" Validation for the FSDP2 trainer: train.py's ``--val-split`` eval loader from timm's parts, top-1/top-5/loss over
every rank, and the run's ``summary.csv`` (timm's ``update_summary``).

The validation set is split over the ranks as the training batches are (rank ``r`` of ``N`` takes samples
``r, r + N, ...``), padded so that every rank runs the same number of forwards (each one is a collective under
FSDP2); the padding is labelled -1 and counted nowhere, so the metrics are those of every sample exactly once, on
any number of processes (timm's ``OrderedDistributedSampler`` counts the padding).
"""
import argparse
import csv
import io
import logging
import os
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..checkpoint_io import atomic_write_bytes
from ..errors import InvalidArgument, InvalidCheckpoint
from .data import SyntheticImages

__all__ = ['check_validation_args', 'validation_enabled', 'split_folder', 'eval_loader', 'validate', 'METRICS',
           'write_summary', 'read_summary', 'truncate_summary']

_logger = logging.getLogger('timm_moejet.train')

METRICS = ('top1', 'top5', 'loss')
# timm's split synonyms for image folders (create_dataset's search for a split folder)
_EVAL_SYNONYMS = ('val', 'valid', 'validation', 'eval', 'evaluation')


def validation_enabled(args: argparse.Namespace) -> bool:
    """Validation runs with a ``--val-split`` ('' turns it off; see :func:`check_validation_args` for the default);
    on synthetic images only with ``--val-num-samples``."""
    if args.dataset == 'synthetic':
        return bool(args.val_split) and bool(args.val_num_samples)
    return bool(args.val_split)


def split_folder(root: Path, split: str) -> Optional[Path]:
    """The folder timm's ``create_dataset`` reads a split of an image folder from, or None where there is none."""
    name = split.split('[')[0]
    candidates = [name] + ([s for s in _EVAL_SYNONYMS if s != name] if name in _EVAL_SYNONYMS else [])
    return next((root / c for c in candidates if (root / c).is_dir()), None)


def _is_folder(args: argparse.Namespace) -> bool:
    """An image folder (or tar) on disk: timm's ``create_dataset`` for a dataset name without a ``/`` prefix."""
    return args.dataset != 'synthetic' and '/' not in args.dataset and bool(args.data_dir) \
        and os.path.isdir(args.data_dir)


def check_validation_args(args: argparse.Namespace) -> None:
    """Settle ``--val-split`` and refuse validation options that cannot run, before anything is built.

    Without ``--val-split``, train.py's 'validation' is used where the dataset has it (an image folder without such
    a folder trains without validation, as before validation existed). Refused: a metric timm's validate does not
    report, an interval below 1, an image folder without the ``--val-split`` folder named (timm would silently
    validate on the dataset root, training images included)."""
    if args.dataset == 'synthetic' and args.val_split and not args.val_num_samples:
        raise InvalidArgument(f'--val-split {args.val_split} of --dataset synthetic needs --val-num-samples (its '
                              f'size); without it nothing would be validated.')
    if args.val_split is None:
        missing = _is_folder(args) and split_folder(Path(args.data_dir), 'validation') is None
        args.val_split = '' if missing else 'validation'
    if args.eval_metric not in METRICS:
        raise InvalidArgument(f'--eval-metric {args.eval_metric!r} is not reported; use one of {", ".join(METRICS)}.')
    if args.val_interval < 1:
        raise InvalidArgument(f'--val-interval must be 1 or more (epochs), got {args.val_interval}.')
    if args.validation_batch_size is not None and args.validation_batch_size < 1:
        raise InvalidArgument('--validation-batch-size must be positive.')
    if not validation_enabled(args) or not _is_folder(args):
        return
    if split_folder(Path(args.data_dir), args.val_split) is None:
        raise InvalidArgument(f'--val-split {args.val_split}: {args.data_dir} has no such folder (nor a synonym: '
                              f'{", ".join(_EVAL_SYNONYMS)}); name the validation folder, or pass --val-split "" to '
                              f'train without validation.')


class _RankShard(torch.utils.data.Dataset):
    """Samples ``rank, rank + world, ...`` of a dataset, padded to ``ceil(len / world)`` with target -1."""

    def __init__(self, dataset: Any, rank: int, world: int) -> None:
        self.dataset, self.rank, self.world = dataset, rank, world
        self.length = -(-len(dataset) // world)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, k: int):
        index = self.rank + k * self.world
        if index < len(self.dataset):
            return self.dataset[index]
        image, _ = self.dataset[index % len(self.dataset)]
        return image, -1


class _SyntheticValidation(SyntheticImages):
    """Synthetic validation images: other images than the training ones (indices from 1e6 on)."""

    def __getitem__(self, index: int):
        return super().__getitem__(1_000_000 + index)


def eval_loader(args: argparse.Namespace, model: nn.Module, rank: int, world: int) -> Any:
    """This rank's validation loader: timm's dataset and eval transform (resize, ``--crop-pct`` center crop,
    normalisation) with the model's data config."""
    from timm.data import create_dataset, create_transform, resolve_data_config

    from .args import image_mode

    data_config = resolve_data_config(vars(args), model=model)
    if args.dataset == 'synthetic':
        dataset = _SyntheticValidation(args.val_num_samples, data_config['input_size'][-1], args.num_classes,
                                       image_mode(args))
    else:
        dataset = create_dataset(args.dataset, root=args.data_dir, split=args.val_split, is_training=False,
                                 batch_size=args.batch_size, num_samples=args.val_num_samples,
                                 input_img_mode=image_mode(args))
    dataset.transform = create_transform(
        data_config['input_size'], is_training=False, interpolation=data_config['interpolation'],
        mean=data_config['mean'], std=data_config['std'], crop_pct=data_config['crop_pct'])
    return torch.utils.data.DataLoader(
        _RankShard(dataset, rank, world), batch_size=args.validation_batch_size or args.batch_size, shuffle=False,
        num_workers=args.workers, pin_memory=args.pin_mem)


@torch.no_grad()
def validate(model: nn.Module, loader: Any, device: torch.device, autocast: Callable[[], Any], num_classes: int,
             label: str = '') -> Dict[str, float]:
    """Loss (cross-entropy, as train.py's validate), top-1 and top-5 accuracy (%) over every rank's samples (a
    collective); logs one progress line on rank 0."""
    import torch.distributed as dist

    start = time.time()
    model.eval()
    k = min(5, num_classes)
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss sum, top-1 hits, top-k hits, samples
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        with autocast():
            logits = model(x).float()
        valid = y >= 0
        hits = (logits.topk(k, dim=1).indices == y[:, None]) & valid[:, None]
        loss = F.cross_entropy(logits[valid], y[valid], reduction='sum') if valid.any() else logits.new_zeros(())
        sums += torch.stack([loss.double(), hits[:, 0].sum().double(), hits.any(1).sum().double(),
                             valid.sum().double()])
    dist.all_reduce(sums)
    loss_sum, top1, top5, count = sums.tolist()
    metrics = OrderedDict(loss=loss_sum / count, top1=100. * top1 / count, top5=100. * top5 / count)
    if dist.get_rank() == 0:
        _logger.info(f'Test{label}: {int(count)} images  Loss: {metrics["loss"]:.4f}  Acc@1: {metrics["top1"]:.4f}  '
                     f'Acc@5: {metrics["top5"]:.4f}  ({time.time() - start:.1f} s)')
    return metrics


def write_summary(path: Path, epoch: int, train_loss: float, eval_metrics: Optional[Dict[str, float]],
                  eval_keys: List[str], lr: float) -> None:
    """One row of ``summary.csv`` with timm's ``update_summary`` (train.py's columns: epoch, train_loss, eval_loss,
    eval_top1, eval_top5, lr; an epoch without validation leaves the ``eval_keys`` cells empty)."""
    from timm.utils import update_summary

    eval_metrics = eval_metrics or OrderedDict((k, '') for k in eval_keys)
    update_summary(epoch, OrderedDict(loss=train_loss), eval_metrics, path, lr=lr, write_header=not path.exists())


def read_summary(path: Path) -> List[List[str]]:
    """The rows of a run's ``summary.csv``.

    Raises:
        InvalidCheckpoint: It is not a file of CSV text (damaged, or replaced by something else); named.
    """
    try:
        with open(path, newline='') as f:
            return list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise InvalidCheckpoint(f'{path} cannot be read as the run\'s summary ({type(e).__name__}: {e}); move it '
                                f'away to resume (the resumed run writes a new one).') from e


def _epoch(row: List[str]) -> Optional[int]:
    try:
        return int(row[0])
    except (IndexError, ValueError):
        return None


def truncate_summary(path: Path, epochs: int) -> None:
    """Keep the rows of the first ``epochs`` epochs (a resume from ``epoch_{epochs}`` writes the next ones again),
    and any row that is not an epoch's (a user's note)."""
    if not path.exists():
        return
    rows = read_summary(path)
    kept = rows[:1] + [r for r in rows[1:] if r and (_epoch(r) is None or _epoch(r) < epochs)]
    out = io.StringIO()
    csv.writer(out).writerows(kept)
    atomic_write_bytes(out.getvalue().encode(), path)
