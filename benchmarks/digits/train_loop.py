""" A small in-memory fine-tuning loop built from timm's optimizer and scheduler factories.

It runs the same recipe pieces as timm's ``train.py`` (``create_optimizer_v2`` with layer decay, cosine schedule
with warmup, label smoothing, gradient clipping) on tensors that fit in memory, for the demo and the convergence
benchmark. Real runs use timm's ``train.py`` (see the README).
"""
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import dispatch_clip_grad

from timm_moejet.modes import eval_mode

__all__ = ['FinetuneConfig', 'train_classifier', 'evaluate', 'random_shift']


@dataclass
class FinetuneConfig:
    """Optimisation recipe (the paper's, scaled to small data): AdamW, cosine with warmup, layer decay."""
    epochs: int = 40
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.05
    layer_decay: Optional[float] = None
    warmup_epochs: int = 3
    label_smoothing: float = 0.1
    clip_grad: float = 5.0
    shift: int = 1


def random_shift(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by up to ``max_shift`` pixels (zero-padded in normalised space, i.e. background)."""
    if max_shift <= 0:
        return x
    b, _, h, w = x.shape
    background = x.amin(dim=(1, 2, 3), keepdim=True)
    padded = F.pad(x - background, (max_shift,) * 4) + background
    dy = torch.randint(0, 2 * max_shift + 1, (b,), generator=generator)
    dx = torch.randint(0, 2 * max_shift + 1, (b,), generator=generator)
    return torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(b)])


@torch.no_grad()
def evaluate(model: nn.Module, images: torch.Tensor, targets: torch.Tensor, batch_size: int = 256) -> float:
    """Top-1 accuracy in percent."""
    correct = 0
    with eval_mode(model):
        for i in range(0, len(images), batch_size):
            correct += (model(images[i:i + batch_size]).argmax(-1) == targets[i:i + batch_size]).sum().item()
    return 100. * correct / max(1, len(images))


def train_classifier(
        model: nn.Module,
        train: Tuple[torch.Tensor, torch.Tensor],
        test: Tuple[torch.Tensor, torch.Tensor],
        cfg: FinetuneConfig,
        seed: int = 0,
        on_epoch: Optional[Callable[[int, float, float], None]] = None,
) -> List[float]:
    """Train ``model`` on ``train`` and return the ``test`` accuracy after every epoch.

    Args:
        model: A timm classifier (its ``group_matcher``/``no_weight_decay`` drive layer decay and weight decay).
        train: (images, targets) for training.
        test: (images, targets) for evaluation after each epoch.
        cfg: The recipe.
        seed: Seeds the data order and augmentation.
        on_epoch: Called as ``on_epoch(epoch, train_loss, test_acc)`` after each epoch (progress output).

    Returns:
        Test accuracy (percent) after each of ``cfg.epochs`` epochs.
    """
    images, targets = train
    if len(images) != len(targets) or len(images) == 0:
        raise ValueError(f'train needs as many targets as images (> 0), got {len(images)} and {len(targets)}.')
    gen = torch.Generator().manual_seed(seed)
    optimizer = create_optimizer_v2(
        model, 'adamw', lr=cfg.lr, weight_decay=cfg.weight_decay, layer_decay=cfg.layer_decay)
    steps_per_epoch = -(-len(images) // cfg.batch_size)
    scheduler, _ = create_scheduler_v2(
        optimizer, 'cosine', num_epochs=cfg.epochs, warmup_epochs=cfg.warmup_epochs, warmup_lr=cfg.lr * 1e-3,
        min_lr=cfg.lr * 1e-2, step_on_epochs=False, updates_per_epoch=steps_per_epoch)
    accuracies = []
    num_updates = 0
    for epoch in range(cfg.epochs):
        model.train()
        order = torch.randperm(len(images), generator=gen)
        loss_sum = 0.
        for i in range(0, len(images), cfg.batch_size):
            idx = order[i:i + cfg.batch_size]
            x = random_shift(images[idx], cfg.shift, gen)
            loss = F.cross_entropy(model(x), targets[idx], label_smoothing=cfg.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.clip_grad:
                dispatch_clip_grad(model.parameters(), cfg.clip_grad)
            optimizer.step()
            num_updates += 1
            scheduler.step_update(num_updates)
            loss_sum += loss.item() * len(idx)
        accuracies.append(evaluate(model, *test))
        if on_epoch is not None:
            on_epoch(epoch, loss_sum / len(images), accuracies[-1])
    return accuracies

