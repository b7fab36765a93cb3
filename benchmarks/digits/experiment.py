""" The MoE Jetpack recipe in miniature, on the real digits: donors, recycling, and the four training arms.

Shared by ``python -m benchmarks.digits.demo`` and ``benchmarks/convergence.py``.

* Upstream / downstream: class-disjoint, like ImageNet-21k -> CIFAR. Donors are pre-trained on digits 0-4 (all
  their images); the arms are fine-tuned on digits 5-9 with a small labelled set (20% of each class, ~180 images)
  and tested on the remaining ~720, so training from scratch is data-starved and transfer matters.
* Models: ViTs on the 8x8 images with 2x2 patches (16 tokens + class token), depth 4, MoE in blocks 2-3 (the
  second half, as in the paper). Narrow donor and MoE trunk: width 32; wide (expert) donor: width 64. The MoE
  layer keeps the paper's proportions: 8 core experts (hidden 4 x 32) + 16 universal experts (hidden 32),
  1 slot each (24 slots for 17 tokens; the paper has 294 for 197).
"""
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import timm
import torch
import torch.nn as nn

from timm_moejet.recycling import RecyclingRecipe, collect_statistics, recycle_into

from .data import digits_tensors, stratified_split
from .train_loop import FinetuneConfig, evaluate, train_classifier

__all__ = [
    'ARMS', 'UPSTREAM_CLASSES', 'DOWNSTREAM_CLASSES', 'DigitsData', 'load_data', 'dense_model', 'moe_model',
    'pretrain_donor', 'recycle_moe', 'run_arm',
]

Tensors = Tuple[torch.Tensor, torch.Tensor]

UPSTREAM_CLASSES = (0, 1, 2, 3, 4)
DOWNSTREAM_CLASSES = (5, 6, 7, 8, 9)
DOWNSTREAM_TRAIN_FRACTION = 0.2
UPSTREAM_TEST_FRACTION = 0.1
DATA_SPLIT_SEED = 0  # the split stays fixed; seeds vary donors, initialisation, recycling and data order

IMAGE_SIZE = 8
_VIT = dict(img_size=IMAGE_SIZE, patch_size=2, depth=4, global_pool='avg', drop_path_rate=0.1)
NARROW = dict(_VIT, embed_dim=32, num_heads=2)
WIDE = dict(_VIT, embed_dim=64, num_heads=4)
MOE = dict(NARROW, moe_blocks=(2, 3), num_core_experts=8, num_univ_experts=16)

# arm name -> (MoE?, pre-trained?)
ARMS = {
    'dense_scratch': (False, False),
    'dense_donor': (False, True),
    'moe_scratch': (True, False),
    'moe_jetpack': (True, True),
}
ARM_LABELS = {
    'dense_scratch': 'Dense from scratch',
    'dense_donor': 'Dense from pre-trained donor',
    'moe_scratch': 'SpheroMoE from scratch',
    'moe_jetpack': 'MoE Jetpack (recycled)',
}

PRETRAIN = FinetuneConfig(epochs=40, batch_size=64, lr=3e-3, warmup_epochs=2)
DOWNSTREAM = FinetuneConfig(epochs=40, batch_size=32, lr=3e-3, warmup_epochs=3)
# the paper fine-tunes recycled models with layer decay 0.6 and trains from scratch without it
PRETRAINED_LAYER_DECAY = 0.6


class DigitsData:
    """Upstream (train/test) and downstream (train/test) tensors."""

    def __init__(self, upstream_train: Tensors, upstream_test: Tensors, downstream_train: Tensors,
                 downstream_test: Tensors) -> None:
        self.upstream_train = upstream_train
        self.upstream_test = upstream_test
        self.downstream_train = downstream_train
        self.downstream_test = downstream_test

    def sizes(self) -> Dict[str, int]:
        return {k: len(getattr(self, k)[1]) for k in
                ('upstream_train', 'upstream_test', 'downstream_train', 'downstream_test')}


def _split(data: Tensors, fraction: float) -> Tuple[Tensors, Tensors]:
    first, second = stratified_split(data[1].numpy(), fraction, seed=DATA_SPLIT_SEED)
    first, second = torch.from_numpy(first), torch.from_numpy(second)
    return (data[0][first], data[1][first]), (data[0][second], data[1][second])


def load_data(downstream_train_fraction: float = DOWNSTREAM_TRAIN_FRACTION) -> DigitsData:
    """The class-disjoint upstream/downstream split (fixed, seed ``DATA_SPLIT_SEED``)."""
    upstream = digits_tensors(IMAGE_SIZE, classes=UPSTREAM_CLASSES)
    downstream = digits_tensors(IMAGE_SIZE, classes=DOWNSTREAM_CLASSES)
    up_test, up_train = _split(upstream, UPSTREAM_TEST_FRACTION)
    down_train, down_test = _split(downstream, downstream_train_fraction)
    return DigitsData(up_train, up_test, down_train, down_test)


def dense_model(width: str = 'narrow', num_classes: int = len(DOWNSTREAM_CLASSES)) -> nn.Module:
    """A small timm ``VisionTransformer`` ('narrow': width 32, 'wide': width 64)."""
    args = {'narrow': NARROW, 'wide': WIDE}[width]
    return timm.create_model('vit_tiny_patch16_224', num_classes=num_classes, **args)


def moe_model(num_classes: int = len(DOWNSTREAM_CLASSES)) -> nn.Module:
    """The MoE model: the narrow ViT with SpheroMoE layers in blocks 2 and 3."""
    return timm.create_model('moejet_vit_test', num_classes=num_classes, **MOE)


def pretrain_donor(
        width: str,
        data: DigitsData,
        seed: int,
        on_epoch: Optional[Callable[[int, float, float], None]] = None,
        cfg: FinetuneConfig = PRETRAIN,
) -> Tuple[nn.Module, float]:
    """Pre-train a dense donor on the upstream classes; returns it and its upstream test accuracy."""
    torch.manual_seed(seed)
    donor = dense_model(width, num_classes=len(UPSTREAM_CLASSES))
    train_classifier(donor, data.upstream_train, data.upstream_test, cfg, seed=seed, on_epoch=on_epoch)
    return donor.eval(), evaluate(donor, *data.upstream_test)


def _calibration_batches(images: torch.Tensor, batch_size: int = 128) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    return [(images[i:i + batch_size], torch.zeros(0)) for i in range(0, len(images), batch_size)]


def recycle_moe(
        narrow: nn.Module,
        wide: nn.Module,
        data: DigitsData,
        seed: int,
        strategy: str = 'importance',
        progress: bool = False,
) -> nn.Module:
    """A MoE model recycled from the donors: trunk from ``narrow``, experts cut from ``wide``'s MLPs.

    Strategies that need statistics (``importance``, ``graph``) get them from the wide donor on the upstream
    training images (calibration never sees downstream data).
    """
    torch.manual_seed(seed)
    model = moe_model()
    recipe = RecyclingRecipe(strategy=strategy, seed=seed)
    stats = None
    if recipe.strategy_obj.needs_stats:
        stats = collect_statistics(
            wide, _calibration_batches(data.upstream_train[0]), progress=progress, donor_id='digits-wide-donor',
            coactivation=recipe.strategy_obj.needs_coactivation)
    return recycle_into(
        model, narrow.state_dict(), wide.state_dict(), recipe, stats=stats,
        trunk_id='digits-narrow-donor', expert_id='digits-wide-donor')


def _build_arm_model(arm: str, data: DigitsData, seed: int, donors: Optional[Dict[str, nn.Module]],
                     strategy: str) -> nn.Module:
    is_moe, pretrained = ARMS[arm]
    if arm == 'moe_jetpack':
        assert donors is not None
        return recycle_moe(donors['narrow'], donors['wide'], data, seed, strategy=strategy)
    if is_moe:
        return moe_model()
    model = dense_model('narrow')
    if pretrained:
        assert donors is not None
        state = {k: v for k, v in donors['narrow'].state_dict().items() if not k.startswith('head.')}
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or set(missing) != {'head.weight', 'head.bias'}:
            raise RuntimeError(f'donor does not fit: missing {missing}, unexpected {unexpected}')
    return model


def run_arm(
        arm: str,
        data: DigitsData,
        seed: int,
        donors: Optional[Dict[str, nn.Module]] = None,
        strategy: str = 'importance',
        cfg: FinetuneConfig = DOWNSTREAM,
        on_epoch: Optional[Callable[[int, float, float], None]] = None,
        model: Optional[nn.Module] = None,
) -> List[float]:
    """Build one arm's model and fine-tune it downstream; returns its per-epoch test accuracy.

    Args:
        arm: One of ``ARMS``.
        data: The digits split.
        seed: Seeds initialisation, recycling and data order.
        donors: ``{'narrow': model, 'wide': model}`` pre-trained upstream (needed by the pre-trained arms).
        strategy: Recycling strategy of the ``moe_jetpack`` arm.
        cfg: Downstream recipe; pre-trained arms get layer decay ``PRETRAINED_LAYER_DECAY``.
        on_epoch: Progress callback ``(epoch, train_loss, test_acc)``.
        model: The arm's model, already built (e.g. recycled); trained in place. None: built here.
    """
    if arm not in ARMS:
        raise ValueError(f'arm must be one of {tuple(ARMS)}, got {arm!r}.')
    pretrained = ARMS[arm][1]
    if pretrained and not donors:
        raise ValueError(f'arm {arm!r} needs the pre-trained donors (donors={{"narrow": ..., "wide": ...}}).')
    torch.manual_seed(seed)
    if model is None:
        model = _build_arm_model(arm, data, seed, donors, strategy)
    if pretrained:
        cfg = FinetuneConfig(**dict(vars(cfg), layer_decay=PRETRAINED_LAYER_DECAY))
    return train_classifier(model, data.downstream_train, data.downstream_test, cfg, seed=seed, on_epoch=on_epoch)


def epochs_to_reach(curve: Sequence[float], target: float) -> Optional[int]:
    """First epoch (1-based) at which ``curve`` reaches ``target``; None if never."""
    for i, acc in enumerate(curve):
        if acc >= target:
            return i + 1
    return None
