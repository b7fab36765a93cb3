""" The trainer's data: timm's datasets and training loader, and ``--dataset synthetic`` for smoke tests. """
import argparse
from typing import Any

import torch
import torch.nn as nn

__all__ = ['SyntheticImages', 'train_loader']


class SyntheticImages(torch.utils.data.Dataset):
    """``--dataset synthetic``: random RGB images (fixed by their index) with labels ``index % num_classes``, for
    smoke tests and exact-continuation checks without data on disk. ``create_loader`` sets ``transform``."""

    def __init__(self, num_samples: int, size: int, num_classes: int) -> None:
        self.num_samples, self.size, self.num_classes = num_samples, size, num_classes
        self.transform = None

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int):
        from PIL import Image
        g = torch.Generator().manual_seed(index)
        pixels = torch.randint(0, 256, (self.size, self.size, 3), generator=g, dtype=torch.uint8)
        img = Image.fromarray(pixels.numpy())
        return (self.transform(img) if self.transform is not None else img), index % self.num_classes


def train_loader(args: argparse.Namespace, model: nn.Module, device: torch.device) -> Any:
    """timm's training loader of ``--dataset`` with the model's data config; every world size sees the same global
    batches (torch's ``DistributedSampler``, seed 0 + epoch, on one process too)."""
    from timm.data import create_dataset, create_loader, resolve_data_config

    data_config = resolve_data_config(vars(args), model=model)
    if args.dataset == 'synthetic':
        dataset = SyntheticImages(args.train_num_samples, data_config['input_size'][-1], args.num_classes)
    else:
        dataset = create_dataset(args.dataset, root=args.data_dir, split=args.train_split, is_training=True,
                                 batch_size=args.batch_size, seed=args.seed, num_samples=args.train_num_samples)
    # distributed=True on one process too: DistributedSampler gives every world size the same global batches
    return create_loader(
        dataset, input_size=data_config['input_size'], batch_size=args.batch_size, is_training=True,
        no_aug=args.no_aug, re_prob=args.reprob, re_mode=args.remode, hflip=args.hflip, auto_augment=args.aa,
        interpolation=data_config['interpolation'], mean=data_config['mean'], std=data_config['std'],
        num_workers=args.workers, distributed=True, pin_memory=args.pin_mem, device=device, use_prefetcher=False,
        persistent_workers=False)
