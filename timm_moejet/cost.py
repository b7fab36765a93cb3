""" Cost accounting: parameters and multiply-accumulates, routing included, counted by torch's FLOP counter. """
from typing import Dict, Optional, Sequence

import torch
import torch.nn as nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from .layers import SpheroMoE
from .modes import eval_mode
from .moe_keys import MOE_KEYS

__all__ = ['num_params', 'count_params', 'count_macs']


def num_params(module: nn.Module) -> int:
    """The number of parameter elements of ``module`` (meta tensors count too)."""
    return sum(p.numel() for p in module.parameters())


def count_params(model: nn.Module) -> Dict[str, int]:
    """Parameter counts.

    Returns:
        ``total``; ``experts`` (in SpheroMoE expert groups); ``router`` (slot queries, slot norms, temperatures);
        ``dense`` (everything else).
    """
    total = num_params(model)
    experts = router = 0
    groups = tuple(f'{g}.' for g in MOE_KEYS.groups)
    for m in model.modules():
        if isinstance(m, SpheroMoE):
            for name, p in m.named_parameters():
                if name.startswith(groups):
                    experts += p.numel()
                else:
                    router += p.numel()
    return dict(total=total, experts=experts, router=router, dense=total - experts - router)


@torch.no_grad()
def count_macs(
        model: nn.Module,
        input_size: Optional[Sequence[int]] = None,
        batch_size: int = 1,
        device: Optional[torch.device] = None,
) -> Dict[str, float]:
    """Multiply-accumulates per image of one eval forward, counted op by op (matmul, bmm, conv, attention).

    Attention is counted in full (QK^T and AV), which the "GMACs" of timm's model cards and of the paper leave out:
    ViT-Ti/16 counts 1.254 here against their 1.08.

    Args:
        model: The model (put in eval mode for the count, then restored).
        input_size: (C, H, W); defaults to the model's ``pretrained_cfg['input_size']``.
        batch_size: Images in the counted forward; the result is divided by it.
        device: Where to run; defaults to the model's device.

    Returns:
        ``macs`` per image and ``gmacs`` per image.
    """
    if input_size is None:
        input_size = getattr(model, 'pretrained_cfg', {}).get('input_size', (3, 224, 224))
    if device is None:
        device = next(model.parameters()).device
    x = torch.randn(batch_size, *input_size, device=device)
    counter = FlopCounterMode(display=False)
    # the math backend decomposes attention into matmuls the counter sees (fused CPU kernels go uncounted)
    with eval_mode(model), counter, sdpa_kernel(SDPBackend.MATH):
        model(x)
    macs = counter.get_total_flops() / 2 / batch_size
    return dict(macs=macs, gmacs=macs / 1e9)
