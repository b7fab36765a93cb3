""" Model EMA for the FSDP2 trainer: timm's ``ModelEmaV3`` (train.py's ``--model-ema``), kept sharded like the model.

timm's ``ModelEmaV3`` deep-copies the whole model onto every rank. Here the EMA is a second model of the same
architecture, sharded with the same FSDP2 plan (:func:`~timm_moejet.training.sharding.shard_model`), so every rank
holds the EMA of its own shards only (4 bytes per local element, float32) and no rank ever holds a full copy. Its
update is local (each rank interpolates its shards towards the model's, no communication); its forward gathers units
as the model's does. The decay, its warm-up and the update after every optimizer step are ``ModelEmaV3``'s.
"""
import argparse
from typing import Iterator, Tuple

import torch
import torch.nn as nn

from ..errors import InvalidArgument

__all__ = ['check_ema_args', 'ema_decay', 'ShardedEma']


def check_ema_args(args: argparse.Namespace) -> None:
    """Refuse EMA options the sharded EMA does not support, before anything runs."""
    if args.model_ema_force_cpu:
        raise InvalidArgument('--model-ema-force-cpu is not supported: the EMA is kept sharded like the model (no full '
                              'copy on one rank), and is validated beside it; drop the option.')
    if not 0. <= args.model_ema_decay < 1.:
        raise InvalidArgument(f'--model-ema-decay must be in [0, 1), got {args.model_ema_decay} (at 1 the EMA would '
                              f'keep the initial weights).')


def ema_decay(decay: float, step: int, warmup: bool, warmup_gamma: float = 1., warmup_power: float = 2 / 3) -> float:
    """``ModelEmaV3.get_decay``: 0 at the first update (the EMA starts as a copy), then ``decay``, or with
    ``warmup`` ``1 - (1 + step / gamma) ** -power`` capped at ``decay``."""
    step = max(0, step - 1)
    if step <= 0:
        return 0.
    if warmup:
        return max(min(1 - (1 + step / warmup_gamma) ** -warmup_power, decay), 0.)
    return decay


def _local(t: torch.Tensor) -> torch.Tensor:
    """A tensor's own shard (a ``DTensor``'s local tensor), or the tensor."""
    return t.to_local() if hasattr(t, 'to_local') else t


def _pairs(ema: nn.Module, model: nn.Module) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """The EMA's and the model's local parameter and buffer shards, matched by name."""
    ema_state = dict(ema.named_parameters())
    ema_state.update(ema.named_buffers())
    model_state = dict(model.named_parameters())
    model_state.update(model.named_buffers())
    if ema_state.keys() != model_state.keys():
        raise InvalidArgument('the EMA model and the model have different parameters; build both alike.')
    for name, e in ema_state.items():
        yield _local(e.detach()), _local(model_state[name].detach())


class ShardedEma:
    """The exponential moving average of a sharded model, in a sharded copy of it.

    Args:
        module: A model of the same architecture as the trained one, sharded with the same plan; its weights are
            replaced by the model's at :meth:`reset` (and then by the average).
        decay: ``--model-ema-decay``.
        warmup: ``--model-ema-warmup``.
    """

    def __init__(self, module: nn.Module, decay: float, warmup: bool) -> None:
        self.module, self.decay, self.warmup = module, decay, warmup
        self.module.eval()
        self.module.requires_grad_(False)

    @torch.no_grad()
    def reset(self, model: nn.Module) -> None:
        """Copy the model's shards (the EMA of a run that starts, or resumes a checkpoint without one)."""
        for e, m in _pairs(self.module, model):
            e.copy_(m)

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """After optimizer update ``step`` (1 for the first): floating shards move towards the model's by
        ``1 - decay``, the others are copied (``ModelEmaV3.apply_update_``)."""
        weight = 1. - ema_decay(self.decay, step, self.warmup)
        for e, m in _pairs(self.module, model):
            if e.is_floating_point():
                e.lerp_(m.to(e.dtype), weight)
            else:
                e.copy_(m)
