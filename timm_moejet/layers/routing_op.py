""" The routing weights from the routing scores: dispatch (softmax over tokens) and combine (entmax-1.5 or softmax
over slots), with the temperature scales and the training noise. """
from typing import Tuple

import torch

from .entmax import entmax15_halved

__all__ = ['routing_weights', 'routing_weights_ops']

# the entmax threshold has data-dependent control flow: a leaf for plain torch.fx too (timm's tracer already
# treats it as one through register_notrace_function)
torch.fx.wrap('entmax15_halved')


def routing_weights_ops(raw: torch.Tensor, dispatch_scale: torch.Tensor, combine_scale: torch.Tensor,
                        noise_std: float, sparse: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """The routing weights as tensor ops (autograd differentiates them).

    Args:
        raw: Scores [B, N, S] (float32): tokens . L2-normalised slot queries.
        dispatch_scale: [B, N, 1]: 1 / (||token|| + eps) / dispatch temperature.
        combine_scale: [B, N, 1]: the same with the combine temperature (halved for entmax-1.5).
        noise_std: Std of the Gaussian noise added to the scaled scores (0: none).
        sparse: Combine with entmax-1.5 (on the halved scores) instead of softmax.

    Returns:
        dispatch [B, N, S] (softmax over N) and combine [B, N, S] (over S).
    """
    if noise_std > 0.:
        noise = torch.randn_like(raw).mul_(noise_std)
        dispatch_logits = torch.addcmul(noise, raw, dispatch_scale)
        combine_logits = torch.addcmul(noise * 0.5 if sparse else noise, raw, combine_scale)
    else:
        dispatch_logits = raw * dispatch_scale
        combine_logits = raw * combine_scale
    dispatch = torch.softmax(dispatch_logits, dim=1)
    if sparse:
        combine = entmax15_halved(combine_logits, dim=-1)
    else:
        combine = torch.softmax(combine_logits, dim=-1)
    return dispatch, combine


def routing_weights(raw: torch.Tensor, dispatch_scale: torch.Tensor, combine_scale: torch.Tensor,
                    noise_std: float, sparse: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """Dispatch and combine weights from the scores (see :func:`routing_weights_ops` for the arguments)."""
    return routing_weights_ops(raw, dispatch_scale, combine_scale, noise_std, sparse)
