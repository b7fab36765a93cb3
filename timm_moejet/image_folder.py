""" Image folders for calibration and router diagnostics: timm's dataset and the model's eval transform, a
class-balanced seeded subset. """
import os
import random
from collections import defaultdict
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Subset

from .errors import InvalidArgument, NotFound

__all__ = ['image_loader', 'balanced_indices']


def balanced_indices(targets: List[int], limit: Optional[int], seed: int) -> List[int]:
    """A seeded, class-balanced random subset: classes take turns, each contributing its shuffled images.

    Args:
        targets: The class of every image.
        limit: How many images at most (None: all of them, still shuffled per class).
        seed: Seed of the shuffle (the same seed gives the same subset).

    Returns:
        Dataset indices, classes interleaved so any prefix is balanced too.
    """
    rng = random.Random(seed)
    by_class: Dict[int, List[int]] = defaultdict(list)
    for i, t in enumerate(targets):
        by_class[int(t)].append(i)
    queues = []
    for cls in sorted(by_class):
        idx = by_class[cls]
        rng.shuffle(idx)
        queues.append(idx)
    out: List[int] = []
    total = len(targets) if limit is None else min(limit, len(targets))
    depth = 0
    while len(out) < total:
        for q in queues:
            if depth < len(q) and len(out) < total:
                out.append(q[depth])
        depth += 1
    return out


def image_loader(
        folder: str,
        model: nn.Module,
        limit: Optional[int] = None,
        batch_size: int = 32,
        seed: int = 0,
        workers: int = 0,
        split: str = 'validation',
) -> Tuple[DataLoader, Dict[str, int]]:
    """A DataLoader of (images, targets) over an image folder, with the model's eval preprocessing.

    Args:
        folder: An image folder (``class_name/*.png`` ...; a ``validation``/``val`` split subfolder is used
            when present) or a folder of images.
        model: Supplies the data config (input size, interpolation, crop, mean, std).
        limit: Use at most this many images, class-balanced and seeded.
        batch_size: Images per batch.
        seed: Seed of the subset.
        split: Split subfolder to use when the folder has split subfolders (``train``, ``validation`` ...).
        workers: DataLoader worker processes.

    Returns:
        The loader and a summary (``images``, ``classes``, ``available``).

    Raises:
        NotFound: If the folder does not exist or holds no images.
        InvalidArgument: If limit or batch size are not positive.
    """
    from timm.data import create_dataset, create_transform, resolve_data_config

    if not os.path.isdir(folder):
        raise NotFound(f'image folder {folder} does not exist or is not a folder.')
    if limit is not None and limit < 1:
        raise InvalidArgument(f'limit must be a positive number of images, got {limit}.')
    if batch_size < 1:
        raise InvalidArgument(f'batch size must be >= 1, got {batch_size}.')
    try:
        dataset = create_dataset('', root=folder, split=split, is_training=False)
    except RuntimeError as e:  # timm: 'Found 0 images in subfolders of ...'
        raise NotFound(f'image folder {folder} holds no images ({e}).') from e
    if len(dataset) == 0:
        raise NotFound(f'image folder {folder} holds no images (supported: .png, .jpg, .jpeg).')
    data_config = resolve_data_config({}, model=model)
    dataset.transform = create_transform(**data_config, is_training=False)
    samples = getattr(getattr(dataset, 'reader', None), 'samples', None)
    targets = [int(t) for _, t in samples] if samples is not None else [0] * len(dataset)
    indices = balanced_indices(targets, limit, seed)
    subset = Subset(dataset, indices)
    loader = DataLoader(subset, batch_size=batch_size, shuffle=False, num_workers=workers,
                        generator=torch.Generator().manual_seed(seed))
    summary = dict(images=len(indices), available=len(dataset), classes=len({targets[i] for i in indices}))
    return loader, summary
