""" Image folders for calibration and router diagnostics: timm's dataset and the model's eval transform, a
class-balanced seeded subset. """
import os
import random
from collections import defaultdict
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset, Subset

from .errors import InvalidArgument, InvalidCheckpoint, NotFound

__all__ = ['image_loader', 'balanced_indices', 'find_images', 'split_folder', 'read_image']

# the sub-folder names timm's datasets take for a split (timm's own search for them is not public)
_SPLIT_SYNONYMS = (('train', 'training'), ('val', 'valid', 'validation', 'eval', 'evaluation'))


def split_folder(root: str, split: str) -> str:
    """The sub-folder of ``root`` holding ``split`` (its own name, else a synonym: ``val`` for ``validation``), or
    ``root`` itself when it has none, as timm's datasets look for one.

    Raises:
        InvalidArgument: If ``split`` is no split name timm knows and is not a sub-folder of a ``root`` that holds
            split folders (a typo such as ``trian`` would otherwise read every split).
    """
    name = split.split('[')[0]
    if os.path.exists(os.path.join(root, name)):
        return os.path.join(root, name)
    for synonyms in _SPLIT_SYNONYMS:
        if name in synonyms:
            for synonym in synonyms:
                if os.path.exists(os.path.join(root, synonym)):
                    return os.path.join(root, synonym)
            return root
    splits = sorted(s for synonyms in _SPLIT_SYNONYMS for s in synonyms if os.path.isdir(os.path.join(root, s)))
    if splits:
        raise InvalidArgument(f'split {split!r}: {root} has no such folder; its split folders are {", ".join(splits)}.'
                              f' Name one of them as the split.')
    return root


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


def find_images(root: str) -> Tuple[List[Tuple[str, int]], Dict[str, int]]:
    """The images under ``root`` and their classes (the name of the folder holding each, as timm's image folder).

    Unlike timm's walk, a folder reached again through a symbolic link (a loop such as ``ln -s .. a/up``) is not
    entered twice, and a file reached through two links is listed once: the work is bounded by what is on disk.

    Returns:
        ``(path, class index)`` pairs sorted by path, and the class name -> index map.
    """
    from timm.data.readers.img_extensions import get_img_extensions
    from timm.data.readers.reader_image_folder import natural_key

    types = get_img_extensions(as_set=True)
    seen_dirs, seen_files = set(), set()
    found: List[Tuple[str, str]] = []
    for folder, subdirs, files in os.walk(root, followlinks=True):
        st = os.stat(folder)
        if (st.st_dev, st.st_ino) in seen_dirs:
            subdirs[:] = []
            continue
        seen_dirs.add((st.st_dev, st.st_ino))
        subdirs.sort()
        label = os.path.basename(os.path.relpath(folder, root)) if folder != root else ''
        for name in sorted(files):
            if os.path.splitext(name)[1].lower() not in types:
                continue
            path = os.path.join(folder, name)
            real = os.path.realpath(path)
            if real not in seen_files:
                seen_files.add(real)
                found.append((path, label))
    class_to_idx = {c: i for i, c in enumerate(sorted({label for _, label in found}, key=natural_key))}
    samples = sorted(((path, class_to_idx[label]) for path, label in found), key=lambda s: natural_key(s[0]))
    return samples, class_to_idx


class _ImageFiles(Dataset):
    """Images and their classes; an image that cannot be decoded is an error naming it (timm's dataset would
    silently give the next image instead, counting that one twice)."""

    def __init__(self, samples: List[Tuple[str, int]], transform) -> None:
        self.samples = samples
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def check_headers(self, indices: List[int]) -> None:
        """Open every image of ``indices`` without decoding it, so an unreadable one or a decompression bomb is
        named before any work."""
        for i in indices:
            self._read(self.samples[i][0], decode=False)

    @staticmethod
    def _read(path: str, decode: bool = True):
        return read_image(path, decode)

    def __getitem__(self, index: int):
        path, target = self.samples[index]
        return self.transform(self._read(path)), target


def read_image(path: str, decode: bool = True):
    """An image file as an RGB PIL image; with ``decode=False`` only its header is read (None is returned), so an
    unreadable image is named before any slow work.

    Raises:
        NotFound: If ``path`` is not a file.
        InvalidCheckpoint: If it cannot be decoded (truncated, corrupt, not an image, a decompression bomb).
    """
    from PIL import Image

    if not os.path.isfile(path):
        raise NotFound(f'image {path} does not exist or is not a file.')
    try:
        with Image.open(path) as img:
            return img.convert('RGB') if decode else None
    except Image.DecompressionBombError as e:
        raise InvalidCheckpoint(f'image {path} is too large to decode safely ({e}).') from e
    except (OSError, ValueError, SyntaxError) as e:  # PIL: truncated, corrupt or not an image
        raise InvalidCheckpoint(f'image {path} cannot be read ({type(e).__name__}: {e}); remove or replace '
                                f'it.') from e


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
        InvalidArgument: If limit or batch size are not positive, or the split is a typo (see split_folder).
    """
    from timm.data import create_transform, resolve_data_config

    if not os.path.isdir(folder):
        raise NotFound(f'image folder {folder} does not exist or is not a folder.')
    if limit is not None and limit < 1:
        raise InvalidArgument(f'limit must be a positive number of images, got {limit}.')
    if batch_size < 1:
        raise InvalidArgument(f'batch size must be >= 1, got {batch_size}.')
    samples, _ = find_images(split_folder(folder, split))
    if not samples:
        raise NotFound(f'image folder {folder} holds no images (supported: .png, .jpg, .jpeg).')
    data_config = resolve_data_config({}, model=model)
    dataset = _ImageFiles(samples, create_transform(**data_config, is_training=False))
    targets = [t for _, t in samples]
    indices = balanced_indices(targets, limit, seed)
    dataset.check_headers(indices)
    subset = Subset(dataset, indices)
    loader = DataLoader(subset, batch_size=batch_size, shuffle=False, num_workers=workers,
                        generator=torch.Generator().manual_seed(seed))
    summary = dict(images=len(indices), available=len(dataset), classes=len({targets[i] for i in indices}))
    return loader, summary
