""" The MoE Jetpack recipe in miniature, on the real digits: donors, recycling, and the training arms.

Shared by ``python -m benchmarks.digits.demo`` and ``benchmarks/convergence.py``.

* Upstream / downstream: class-disjoint, like ImageNet-21k -> CIFAR. Donors are pre-trained on digits 0-4 (all
  their images); the arms are fine-tuned on digits 5-9 with a small labelled set (20% of each class, ~180 images)
  and tested on the remaining ~720, so training from scratch is data-starved and transfer matters.
* V-JetMoE arms: ViTs on the 8x8 images with 2x2 patches (16 tokens + class token), depth 4, MoE in blocks 2-3
  (the second half, as in the paper). Narrow donor and MoE trunk: width 32; wide (expert) donor: width 64. The MoE
  layer keeps the paper's proportions: 8 core experts (hidden 4 x 32) + 16 universal experts (hidden 32),
  1 slot each (24 slots for 17 tokens; the paper has 294 for 197).
* C-JetMoE arms: ConvNeXts on the digits upscaled to 16x16, a 1x1 stem, depths (1, 1, 3, 1) on 16x16, 8x8, 4x4
  and 2x2 maps, widths (16, 32, 64, 128); one wide donor (32, 64, 128, 256) plays ConvNeXt-T: the dense baseline
  takes its weights by Weight Selection, C-JetMoE its trunk by Weight Selection and its experts from its MLPs, as
  C-JetMoE-F does. MoE in the last three blocks (the second half, as "10:18" of 18): 8 core + 16 universal experts
  on the 16 positions of stage 3, 2 + 4 on the 4 positions of stage 4.
"""
import dataclasses
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import timm
import torch
import torch.nn as nn

from timm_moejet.recycling import ActivationStats, RecyclingRecipe, collect_statistics, recycle_into, select_state_dict

from .data import digits_tensors, stratified_split
from .train_loop import FinetuneConfig, evaluate, train_classifier

__all__ = [
    'Arm', 'ARMS', 'ARM_GROUPS', 'DONORS', 'UPSTREAM_CLASSES', 'DOWNSTREAM_CLASSES', 'DigitsData', 'load_data',
    'dense_model', 'moe_model', 'pretrain_donor', 'recycle_moe', 'run_arm',
]

Tensors = Tuple[torch.Tensor, torch.Tensor]

UPSTREAM_CLASSES = (0, 1, 2, 3, 4)
DOWNSTREAM_CLASSES = (5, 6, 7, 8, 9)
DOWNSTREAM_TRAIN_FRACTION = 0.2
UPSTREAM_TEST_FRACTION = 0.1
DATA_SPLIT_SEED = 0  # the split stays fixed; seeds vary donors, initialisation, recycling and data order

IMAGE_SIZE = 8
CONVNEXT_IMAGE_SIZE = 16
_VIT = dict(img_size=IMAGE_SIZE, patch_size=2, depth=4, global_pool='avg', drop_path_rate=0.1)
NARROW = dict(_VIT, embed_dim=32, num_heads=2)
WIDE = dict(_VIT, embed_dim=64, num_heads=4)
MOE = dict(NARROW, moe_blocks=(2, 3), num_core_experts=8, num_univ_experts=16)

_CONVNEXT = dict(patch_size=1, depths=(1, 1, 3, 1), drop_path_rate=0.1)
CONVNEXT_NARROW = dict(_CONVNEXT, dims=(16, 32, 64, 128))
CONVNEXT_WIDE = dict(_CONVNEXT, dims=(32, 64, 128, 256))
# tokens // 2 core and twice as many universal experts per stage: the model's defaults at its img_size
CONVNEXT_MOE = dict(CONVNEXT_NARROW, img_size=CONVNEXT_IMAGE_SIZE, moe_blocks=(3, 4, 5))


@dataclasses.dataclass(frozen=True)
class Family:
    """A model family of the miniature: its label and the image size its models see."""
    label: str
    image_size: int


FAMILIES = {'vit': Family('V-JetMoE (ViT)', IMAGE_SIZE), 'convnext': Family('C-JetMoE (ConvNeXt)', CONVNEXT_IMAGE_SIZE)}


@dataclasses.dataclass(frozen=True)
class Donor:
    """A dense donor pre-trained upstream (one per seed): its family and timm model."""
    family: str
    model_name: str
    kwargs: Dict[str, object]


DONORS = {
    'narrow': Donor('vit', 'vit_tiny_patch16_224', NARROW),
    'wide': Donor('vit', 'vit_tiny_patch16_224', WIDE),
    # convnext_tiny, not convnext_femto: femto's MLP is a 1x1 conv (conv_mlp=True), C-JetMoE needs the linear one
    'convnext_wide': Donor('convnext', 'convnext_tiny', CONVNEXT_WIDE),
}

PRETRAIN = FinetuneConfig(epochs=40, batch_size=64, lr=3e-3, warmup_epochs=2)
DOWNSTREAM = FinetuneConfig(epochs=40, batch_size=32, lr=3e-3, warmup_epochs=3)
# the paper fine-tunes recycled models with layer decay 0.6 and trains from scratch without it
PRETRAINED_LAYER_DECAY = 0.6


def _check_image_size(data: 'DigitsData', family: str) -> None:
    size = data.upstream_train[0].shape[-1]
    if size != FAMILIES[family].image_size:
        raise ValueError(f'{family} models see {FAMILIES[family].image_size} px digits, got {size} px: '
                         f'load_data(image_size=FAMILIES[{family!r}].image_size).')


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


def load_data(downstream_train_fraction: float = DOWNSTREAM_TRAIN_FRACTION, image_size: int = IMAGE_SIZE) -> DigitsData:
    """The class-disjoint upstream/downstream split (fixed, seed ``DATA_SPLIT_SEED``: the same images at any size)."""
    upstream = digits_tensors(image_size, classes=UPSTREAM_CLASSES)
    downstream = digits_tensors(image_size, classes=DOWNSTREAM_CLASSES)
    up_test, up_train = _split(upstream, UPSTREAM_TEST_FRACTION)
    down_train, down_test = _split(downstream, downstream_train_fraction)
    return DigitsData(up_train, up_test, down_train, down_test)


def dense_model(donor: str = 'narrow', num_classes: int = len(DOWNSTREAM_CLASSES)) -> nn.Module:
    """A small dense timm model of the architecture of ``DONORS[donor]``."""
    spec = DONORS[donor]
    return timm.create_model(spec.model_name, num_classes=num_classes, **spec.kwargs)


def moe_model(num_classes: int = len(DOWNSTREAM_CLASSES), **overrides) -> nn.Module:
    """The V-JetMoE model: the narrow ViT with SpheroMoE layers in blocks 2 and 3 (``overrides``: of ``MOE``)."""
    return timm.create_model('moejet_vit_test', num_classes=num_classes, **dict(MOE, **overrides))


def convnext_model(moe: bool, num_classes: int = len(DOWNSTREAM_CLASSES), **overrides) -> nn.Module:
    """The narrow ConvNeXt, dense or with SpheroMoE layers in its last three blocks (C-JetMoE; ``overrides``: of
    ``CONVNEXT_MOE``)."""
    if moe:
        return timm.create_model('moejet_convnext_test', num_classes=num_classes, **dict(CONVNEXT_MOE, **overrides))
    if overrides:
        raise ValueError(f'MoE settings {sorted(overrides)} need moe=True.')
    return timm.create_model('convnext_tiny', num_classes=num_classes, **CONVNEXT_NARROW)


def pretrain_donor(
        donor_name: str,
        data: DigitsData,
        seed: int,
        on_epoch: Optional[Callable[[int, float, float], None]] = None,
        cfg: FinetuneConfig = PRETRAIN,
) -> Tuple[nn.Module, float]:
    """Pre-train the dense donor ``DONORS[donor_name]`` upstream; returns it and its upstream test accuracy."""
    _check_image_size(data, DONORS[donor_name].family)
    torch.manual_seed(seed)
    donor = dense_model(donor_name, num_classes=len(UPSTREAM_CLASSES))
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
        **overrides,
) -> nn.Module:
    """A MoE model recycled from the donors: trunk from ``narrow``, experts cut from ``wide``'s MLPs.

    Strategies that need statistics (``importance``, ``graph``) get them from the wide donor on the upstream
    training images (calibration never sees downstream data). ``overrides``: MoE settings of ``moe_model``.
    """
    torch.manual_seed(seed)
    model = moe_model(**overrides)
    recipe = RecyclingRecipe(strategy=strategy, seed=seed)
    stats = _statistics(wide, data, recipe, 'digits-wide-donor', progress)
    return recycle_into(
        model, narrow.state_dict(), wide.state_dict(), recipe, stats=stats,
        trunk_id='digits-narrow-donor', expert_id='digits-wide-donor')


def _statistics(donor: nn.Module, data: DigitsData, recipe: RecyclingRecipe, donor_id: str,
                progress: bool) -> Optional[ActivationStats]:
    """Activation statistics of ``donor`` on upstream images, where the strategy needs them."""
    if not recipe.strategy_obj.needs_stats:
        return None
    return collect_statistics(donor, _calibration_batches(data.upstream_train[0]), progress=progress,
                              donor_id=donor_id, coactivation=recipe.strategy_obj.needs_coactivation)


def recycle_convnext(wide: nn.Module, data: DigitsData, seed: int, strategy: str = 'importance',
                     expert_donor: Optional[nn.Module] = None, **overrides) -> nn.Module:
    """C-JetMoE recycled from the wide ConvNeXt alone: trunk by Weight Selection, experts from its MLPs.

    ``expert_donor``: cut the experts from this model's MLPs instead (Sparse Upcycling copies the MLPs of a dense
    model of the MoE's own width). ``overrides``: MoE settings of ``convnext_model``.
    """
    torch.manual_seed(seed)
    model = convnext_model(moe=True, **overrides)
    recipe = RecyclingRecipe(strategy=strategy, seed=seed, trunk_fit='select')
    experts = wide if expert_donor is None else expert_donor
    expert_id = 'digits-convnext-wide-donor' if expert_donor is None else 'digits-convnext-selected'
    stats = _statistics(experts, data, recipe, expert_id, progress=False)
    return recycle_into(model, wide.state_dict(), experts.state_dict(), recipe, stats=stats,
                        trunk_id='digits-convnext-wide-donor', expert_id=expert_id)


def select_convnext(wide: nn.Module) -> nn.Module:
    """The narrow dense ConvNeXt by Weight Selection from the wide one (the paper's "Dense (21k)" baseline)."""
    model = convnext_model(moe=False)
    return _without_head(model, select_state_dict(model, wide.state_dict()))


def _without_head(model: nn.Module, state: Dict[str, torch.Tensor]) -> nn.Module:
    """Load ``state`` into ``model`` except the classifier (another number of classes)."""
    head = model.pretrained_cfg['classifier'] + '.'
    missing, unexpected = model.load_state_dict({k: v for k, v in state.items() if not k.startswith(head)},
                                                strict=False)
    if unexpected or {k for k in missing if not k.startswith(head)}:
        raise RuntimeError(f'donor does not fit: missing {missing}, unexpected {unexpected}')
    return model


@dataclasses.dataclass(frozen=True)
class Arm:
    """One training arm: its label, family, role in the paper's comparison, donors and how it is built.

    ``build(data, seed, donors, strategy)`` gets the pre-trained donors by name (``DONORS``). An ablation arm names
    the default-recipe arm it differs from in one knob (``reference``) and the knob's setting (``knob``).
    """
    label: str
    family: str
    role: str  # 'dense_scratch', 'dense_pretrained', 'moe_scratch', 'moe_jetpack' or 'ablation'
    donors: Tuple[str, ...]
    build: Callable[[DigitsData, int, Dict[str, nn.Module], str], nn.Module]
    reference: Optional[str] = None
    knob: str = ''
    group: str = 'main'  # 'main', 'recycling' or 'spheromoe'


ARMS = {
    'dense_scratch': Arm('Dense from scratch', 'vit', 'dense_scratch', (), lambda *_: dense_model('narrow')),
    'dense_donor': Arm('Dense from pre-trained donor', 'vit', 'dense_pretrained', ('narrow',),
                       lambda d, s, donors, st: _without_head(dense_model('narrow'), donors['narrow'].state_dict())),
    'moe_scratch': Arm('SpheroMoE from scratch', 'vit', 'moe_scratch', (), lambda *_: moe_model()),
    'moe_jetpack': Arm('MoE Jetpack (recycled)', 'vit', 'moe_jetpack', ('narrow', 'wide'),
                       lambda d, s, donors, st: recycle_moe(donors['narrow'], donors['wide'], d, s, strategy=st)),
    'convnext_scratch': Arm('ConvNeXt from scratch', 'convnext', 'dense_scratch', (),
                            lambda *_: convnext_model(moe=False)),
    'convnext_select': Arm('ConvNeXt by Weight Selection', 'convnext', 'dense_pretrained', ('convnext_wide',),
                           lambda d, s, donors, st: select_convnext(donors['convnext_wide'])),
    'convnext_moe_scratch': Arm('C-JetMoE from scratch', 'convnext', 'moe_scratch', (),
                                lambda *_: convnext_model(moe=True)),
    'convnext_jetpack': Arm('C-JetMoE (recycled)', 'convnext', 'moe_jetpack', ('convnext_wide',),
                            lambda d, s, donors, st: recycle_convnext(donors['convnext_wide'], d, s, strategy=st)),
}


def _vit_strategy_arm(strategy: str) -> Arm:
    if strategy == 'upcycle':
        # Sparse Upcycling copies the MLP of a dense model of the MoE's own width: the narrow donor's
        build = lambda d, s, donors, st: recycle_moe(donors['narrow'], donors['narrow'], d, s, strategy='upcycle')
    else:
        build = lambda d, s, donors, st: recycle_moe(donors['narrow'], donors['wide'], d, s, strategy=strategy)
    return Arm(f'MoE Jetpack, {strategy} recycling', 'vit', 'ablation', ('narrow', 'wide'), build,
               reference='moe_jetpack', knob=f'strategy={strategy}', group='recycling')


def _convnext_strategy_arm(strategy: str) -> Arm:
    if strategy == 'upcycle':
        # the MLPs copied are those of the narrow dense ConvNeXt (by Weight Selection): the MoE's own width
        build = lambda d, s, donors, st: recycle_convnext(
            donors['convnext_wide'], d, s, strategy='upcycle', expert_donor=select_convnext(donors['convnext_wide']))
    else:
        build = lambda d, s, donors, st: recycle_convnext(donors['convnext_wide'], d, s, strategy=strategy)
    return Arm(f'C-JetMoE, {strategy} recycling', 'convnext', 'ablation', ('convnext_wide',), build,
               reference='convnext_jetpack', knob=f'strategy={strategy}', group='recycling')


# SpheroMoE ablations: (arm suffix, label, knob, ViT overrides, ConvNeXt overrides); every other setting is the default
_SPHEROMOE_KNOBS = (
    ('core_only', 'core experts only', 'num_univ_experts=0', dict(num_univ_experts=0), dict(num_univ_experts=0)),
    ('univ_only', 'universal experts only', 'num_core_experts=0', dict(num_core_experts=0),
     dict(num_core_experts=0, num_univ_experts=(0, 0, 16, 4))),
    ('softmax', 'softmax combine', 'moe_combine=softmax', dict(moe_combine='softmax'), dict(moe_combine='softmax')),
    # ViT depth 4: blocks 2-3 are the last half, block 3 the last third; ConvNeXt's 6 blocks: 3-5 and 4-5
    ('last_third', 'MoE in the last third', 'moe_blocks=last third', dict(moe_blocks=(3,)), dict(moe_blocks=(4, 5))),
)


def _spheromoe_arms() -> Dict[str, Arm]:
    arms = {}
    for suffix, label, knob, vit, convnext in _SPHEROMOE_KNOBS:
        arms[f'moe_jetpack_{suffix}'] = Arm(
            f'MoE Jetpack, {label}', 'vit', 'ablation', ('narrow', 'wide'),
            lambda d, s, donors, st, o=vit: recycle_moe(donors['narrow'], donors['wide'], d, s, strategy=st, **o),
            reference='moe_jetpack', knob=knob, group='spheromoe')
        arms[f'convnext_jetpack_{suffix}'] = Arm(
            f'C-JetMoE, {label}', 'convnext', 'ablation', ('convnext_wide',),
            lambda d, s, donors, st, o=convnext: recycle_convnext(donors['convnext_wide'], d, s, strategy=st, **o),
            reference='convnext_jetpack', knob=knob, group='spheromoe')
    return arms


ABLATION_STRATEGIES = ('graph', 'uniform', 'random', 'upcycle')
ARMS.update({f'moe_jetpack_{st}': _vit_strategy_arm(st) for st in ABLATION_STRATEGIES})
ARMS.update({f'convnext_jetpack_{st}': _convnext_strategy_arm(st) for st in ABLATION_STRATEGIES})
ARMS.update(_spheromoe_arms())
ARM_GROUPS = {g: tuple(a for a, spec in ARMS.items() if spec.group == g) for g in ('main', 'recycling', 'spheromoe')}


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
        data: The digits split at the image size of the arm's family (``FAMILIES``).
        seed: Seeds initialisation, recycling and data order.
        donors: The pre-trained donors by ``DONORS`` name (those the arm names in ``Arm.donors``).
        strategy: Recycling strategy of the recycled arms.
        cfg: Downstream recipe; pre-trained arms get layer decay ``PRETRAINED_LAYER_DECAY``.
        on_epoch: Progress callback ``(epoch, train_loss, test_acc)``.
        model: The arm's model, already built (e.g. recycled); trained in place. None: built here.
    """
    if arm not in ARMS:
        raise ValueError(f'arm must be one of {tuple(ARMS)}, got {arm!r}.')
    spec = ARMS[arm]
    _check_image_size(data, spec.family)
    missing = [d for d in spec.donors if d not in (donors or {})]
    if missing and model is None:
        raise ValueError(f'arm {arm!r} needs the pre-trained donors {missing} (donors={{name: model}}).')
    torch.manual_seed(seed)
    if model is None:
        model = spec.build(data, seed, donors or {}, strategy)
    if spec.donors:
        cfg = FinetuneConfig(**dict(vars(cfg), layer_decay=PRETRAINED_LAYER_DECAY))
    return train_classifier(model, data.downstream_train, data.downstream_test, cfg, seed=seed, on_epoch=on_epoch)


def epochs_to_reach(curve: Sequence[float], target: float) -> Optional[int]:
    """First epoch (1-based) at which ``curve`` reaches ``target``; None if never."""
    for i, acc in enumerate(curve):
        if acc >= target:
            return i + 1
    return None
