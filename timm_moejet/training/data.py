""" The trainer's data: timm's datasets and training loader, and ``--dataset synthetic`` for smoke tests. """
import argparse
import tarfile
from typing import Any, Optional

import torch
import torch.nn as nn

from ..errors import InvalidArgument

__all__ = ['SyntheticImages', 'train_dataset', 'check_batches', 'train_loader']


class SyntheticImages(torch.utils.data.Dataset):
    """``--dataset synthetic``: random images (fixed by their index, RGB or converted to ``mode``) with labels
    ``index % num_classes``, for smoke tests and exact-continuation checks without data on disk. ``create_loader``
    sets ``transform``."""

    def __init__(self, num_samples: int, size: int, num_classes: int, mode: str = 'RGB') -> None:
        self.num_samples, self.size, self.num_classes, self.mode = num_samples, size, num_classes, mode
        self.transform = None

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int):
        from PIL import Image
        g = torch.Generator().manual_seed(index)
        pixels = torch.randint(0, 256, (self.size, self.size, 3), generator=g, dtype=torch.uint8)
        img = Image.fromarray(pixels.numpy()).convert(self.mode)
        return (self.transform(img) if self.transform is not None else img), index % self.num_classes


def train_dataset(args: argparse.Namespace) -> Optional[Any]:
    """timm's training dataset of ``--dataset``, built (and checked) before the process group or the model exist;
    None for ``--dataset synthetic``, which :func:`train_loader` makes at the model's input size.

    Raises:
        InvalidArgument: timm cannot read the data, or it holds no sample.
    """
    from timm.data import create_dataset

    from .args import image_mode

    if args.dataset == 'synthetic':
        return None
    where = f'--data-dir {args.data_dir}' + (f' (--dataset {args.dataset})' if args.dataset else '')
    try:
        dataset = create_dataset(args.dataset, root=args.data_dir, split=args.train_split, is_training=True,
                                 batch_size=args.batch_size, seed=args.seed, num_samples=args.train_num_samples,
                                 download=args.dataset_download, input_img_mode=image_mode(args))
    except (RuntimeError, OSError, ValueError, tarfile.TarError) as e:  # timm's readers: no images, a bad tar, ...
        raise InvalidArgument(f'{where}: timm cannot read the training data ({e}).') from e
    if hasattr(dataset, '__len__') and len(dataset) == 0:
        raise InvalidArgument(f'{where} holds no training samples (split {args.train_split!r}).')
    _check_classes(dataset, args.num_classes, where)
    return dataset


def _check_classes(dataset: Any, num_classes: int, where: str) -> None:
    """An image folder or tar has a class folder per class, at least 2 and at most ``--num-classes`` (a label
    past the head would stop the run at its first batch)."""
    classes = getattr(getattr(dataset, 'reader', None), 'class_to_idx', None)
    if not classes:
        return
    names = ', '.join(sorted(classes)[:5]) + (', ...' if len(classes) > 5 else '')
    if len(classes) < 2:
        found = 'images but no class folders' if '' in classes else f'one class folder ({names})'
        raise InvalidArgument(f'{where} holds {found}; the training images go in one folder per class '
                              f'(train/<class>/*.jpg), at least 2.')
    if len(classes) > num_classes:
        raise InvalidArgument(f'{where} holds {len(classes)} classes ({names}), more than --num-classes '
                              f'{num_classes}: raise --num-classes to {len(classes)} (or more).')


def check_batches(args: argparse.Namespace, dataset: Optional[Any], world: int) -> None:
    """Refuse data smaller than one global batch: the training loader drops an incomplete last batch, so an epoch
    would make no update."""
    samples = args.train_num_samples if dataset is None else len(dataset) if hasattr(dataset, '__len__') else None
    if samples is not None and -(-samples // world) < args.batch_size:
        raise InvalidArgument(f'the training data has {samples} samples, fewer than one batch of {args.batch_size} '
                              f'on each of {world} process(es): lower -b/--batch-size.')


def _check_input_size(model: nn.Module, input_size: tuple) -> None:
    """Images of the size and channels the model is built for: a ViT's or Mixer's patch embedding refuses another
    size at the first forward, after the run's folder exists; other channels would be trained as RGB unnoticed."""
    from timm.layers import PatchEmbed

    stem = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)  # the first layer of each family
    if stem is not None and input_size[0] != stem.in_channels:
        raise InvalidArgument(f'the model takes {stem.in_channels}-channel images and --input-size gives '
                              f'{input_size[0]}: pass --input-size {stem.in_channels} H W (or --model-kwargs '
                              f'in_chans=... to build the model for them).')
    embed = next((m for m in model.modules() if isinstance(m, PatchEmbed)), None)
    if embed is None or not embed.strict_img_size or embed.img_size is None:
        return
    if tuple(input_size[-2:]) != tuple(embed.img_size):
        h, w = embed.img_size
        raise InvalidArgument(f'the model takes {h} x {w} images and the data would be {input_size[-2]} x '
                              f'{input_size[-1]}: pass --img-size {h} (or --model-kwargs img_size=... to build the '
                              f'model for the other size).')


def train_loader(args: argparse.Namespace, model: nn.Module, device: torch.device,
                 dataset: Optional[Any] = None) -> Any:
    """timm's training loader of ``dataset`` (from :func:`train_dataset`; synthetic when None) with the model's data
    config; every world size sees the same global batches (torch's ``DistributedSampler``, seed 0 + epoch, on one
    process too)."""
    from timm.data import create_loader, resolve_data_config

    from .args import image_mode

    data_config = resolve_data_config(vars(args), model=model)
    _check_input_size(model, data_config['input_size'])
    if dataset is None:
        dataset = SyntheticImages(args.train_num_samples, data_config['input_size'][-1], args.num_classes,
                                  image_mode(args))
    # distributed=True on one process too: DistributedSampler gives every world size the same global batches
    return create_loader(
        dataset, input_size=data_config['input_size'], batch_size=args.batch_size, is_training=True,
        no_aug=args.no_aug, re_prob=args.reprob, re_mode=args.remode, hflip=args.hflip, auto_augment=args.aa,
        interpolation=args.train_interpolation or data_config['interpolation'], mean=data_config['mean'],
        std=data_config['std'], num_workers=args.workers, distributed=True, pin_memory=args.pin_mem, device=device,
        use_prefetcher=False, persistent_workers=False)
