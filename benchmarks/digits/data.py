""" The embedded real dataset: scikit-learn's handwritten digits (1,797 real 8x8 images, 10 classes).

It ships inside scikit-learn, so the demo, the convergence benchmark and the train.py tests run offline.
``write_digits_image_folder`` exports it as a timm image folder (``train/<class>/*.png``,
``validation/<class>/*.png``) for timm's ``train.py``; ``digits_tensors`` gives it in memory.
"""
import os
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from timm_moejet.checkpoint_io import atomic_output_dir
from timm_moejet.errors import MissingExtra

__all__ = ['load_digits_uint8', 'stratified_split', 'digits_tensors', 'write_digits_image_folder']

NUM_DIGIT_CLASSES = 10


def load_digits_uint8() -> Tuple[np.ndarray, np.ndarray]:
    """All digits as uint8 images [1797, 8, 8] (0..255) and int64 labels [1797].

    Raises:
        MissingExtra: If scikit-learn (a dependency of timm-moejet) is not installed.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise MissingExtra('the digits data set needs scikit-learn, which is not installed: '
                           'pip install "scikit-learn>=1.3"') from e
    digits = load_digits()
    # pixel values are counts 0..16 of an original 4x4 block; scale to the full byte range
    images = np.clip(np.round(digits.images * (255. / 16.)), 0, 255).astype(np.uint8)
    return images, digits.target.astype(np.int64)


def _check_fraction(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0. < value < 1.:
        raise ValueError(f'{name} must be a float in (0, 1), got {value!r}.')


def _check_image_size(image_size: int) -> None:
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 8:
        raise ValueError(f'image_size must be an int >= 8 (the digits are 8x8), got {image_size!r}.')


def stratified_split(targets: np.ndarray, fraction: float, seed: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """Split indices per class: about ``fraction`` of each class goes to the first part (at least one each side).

    Args:
        targets: Integer labels [N].
        fraction: Share of each class in the first part, in (0, 1).
        seed: Seed of the shuffle; the same seed gives the same split.

    Returns:
        Sorted index arrays (first, second).
    """
    _check_fraction('fraction', fraction)
    rng = np.random.default_rng(seed)
    first, second = [], []
    for c in np.unique(targets):
        idx = rng.permutation(np.flatnonzero(targets == c))
        k = min(max(1, int(round(fraction * len(idx)))), len(idx) - 1) if len(idx) > 1 else len(idx)
        first.append(idx[:k])
        second.append(idx[k:])
    return np.sort(np.concatenate(first)), np.sort(np.concatenate(second))


def _upscale(images: np.ndarray, image_size: int) -> np.ndarray:
    """uint8 [N, 8, 8] -> uint8 [N, S, S], bilinear (the 8x8 originals are themselves block averages)."""
    x = torch.from_numpy(images).float()[:, None]
    if image_size != images.shape[-1]:
        x = F.interpolate(x, size=(image_size, image_size), mode='bilinear', align_corners=False)
    return x[:, 0].round().clamp_(0, 255).to(torch.uint8).numpy()


def digits_tensors(
        image_size: int = 8,
        classes: Optional[Sequence[int]] = None,
        mean: float = 0.5,
        std: float = 0.5,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The digits as normalised 3-channel float images, for in-memory training loops.

    Args:
        image_size: Output side (>= 8; bilinear upscaling).
        classes: Keep only these digits, relabelled 0..len(classes)-1 in the given order (default: all ten).
        mean: Normalisation mean (same for the 3 channels; 0.5 as the augreg ViT donors use).
        std: Normalisation std.

    Returns:
        images [N, 3, S, S] float32 and labels [N] int64.
    """
    _check_image_size(image_size)
    images, targets = load_digits_uint8()
    if classes is not None:
        classes = list(classes)
        bad = [c for c in classes if c not in range(NUM_DIGIT_CLASSES)]
        if bad or not classes or len(set(classes)) != len(classes):
            raise ValueError(f'classes must be distinct digits 0..9, got {classes!r}.')
        keep = np.isin(targets, classes)
        remap = {c: i for i, c in enumerate(classes)}
        images, targets = images[keep], np.array([remap[t] for t in targets[keep]], dtype=np.int64)
    x = torch.from_numpy(_upscale(images, image_size)).float().div_(255.)
    x = ((x - mean) / std)[:, None].expand(-1, 3, -1, -1).contiguous()
    return x, torch.from_numpy(targets)


def write_digits_image_folder(
        root: str,
        image_size: int = 32,
        val_fraction: float = 0.2,
        seed: int = 0,
        overwrite: bool = False,
) -> Dict[str, int]:
    """Write the digits as a timm image folder: ``root/train/<digit>/*.png`` and ``root/validation/<digit>/*.png``.

    The split is stratified and deterministic for a given ``seed``. The folder is built next to ``root`` and
    moved into place at the end, so a failure leaves nothing half-written.

    Args:
        root: Output folder; it must not exist (or be empty) unless ``overwrite``.
        image_size: Side of the written PNGs (>= 8; bilinear upscaling of the 8x8 originals).
        val_fraction: Share of each class in ``validation``, in (0, 1).
        seed: Seed of the split.
        overwrite: Replace an existing non-empty ``root``.

    Returns:
        Number of images written per split, e.g. ``{'train': 1438, 'validation': 359}``.
    """
    from PIL import Image

    _check_image_size(image_size)
    _check_fraction('val_fraction', val_fraction)
    if not isinstance(root, (str, os.PathLike)):
        raise TypeError(f'root must be a path, got {type(root).__name__}.')
    root = os.path.abspath(os.fspath(root))
    if os.path.exists(root):
        if not os.path.isdir(root):
            raise ValueError(f'root {root!r} exists and is not a folder.')
        if os.listdir(root) and not overwrite:
            raise ValueError(f'root {root!r} is not empty; pass overwrite=True (--overwrite) to replace it.')

    images, targets = load_digits_uint8()
    images = _upscale(images, image_size)
    val_idx, train_idx = stratified_split(targets, val_fraction, seed=seed)
    # built beside root and renamed into place: a failure leaves nothing half-written
    with atomic_output_dir(root, overwrite=True) as tmp:
        counts = {}
        for split, indices in (('train', train_idx), ('validation', val_idx)):
            for c in range(NUM_DIGIT_CLASSES):
                os.makedirs(os.path.join(tmp, split, str(c)))
            for i in indices:
                Image.fromarray(images[i]).save(os.path.join(tmp, split, str(targets[i]), f'{i:04d}.png'))
            counts[split] = int(len(indices))
    return counts


def main(argv: Optional[Sequence[str]] = None) -> None:
    import argparse
    parser = argparse.ArgumentParser(description='Write the scikit-learn digits as a timm image folder.')
    parser.add_argument('root', help='output folder (gets train/ and validation/)')
    parser.add_argument('--image-size', type=int, default=32)
    parser.add_argument('--val-fraction', type=float, default=0.2)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--overwrite', action='store_true')
    args = parser.parse_args(argv)
    try:
        counts = write_digits_image_folder(
            args.root, image_size=args.image_size, val_fraction=args.val_fraction, seed=args.seed,
            overwrite=args.overwrite)
    except (ValueError, TypeError) as e:
        parser.error(str(e))
    print(f'wrote {counts["train"]} train and {counts["validation"]} validation images to {args.root}')


if __name__ == '__main__':
    from benchmarks.entry import run_main
    run_main(main, 'python -m benchmarks.digits.data')
