""" Entmax-1.5: a sparse alternative to softmax.

Exact implementation of the sort-based algorithm of Peters, Niculae and Martins,
"Sparse Sequence-to-Sequence Models" (ACL 2019), written for this project.

entmax15(z) = argmax_p <p, z> + H^T_{1.5}(p) = [z / 2 - tau]_+^2, with tau chosen so that the output sums to 1.

The threshold is found without autograd; the gradient is then attached through a first-order identity on tau
(its exact derivative is sqrt(p) / sum(sqrt(p)), from implicit differentiation of sum([z/2 - tau]_+^2) = 1).
This keeps the function a plain composition of tensor ops, so it scripts, traces (fx), compiles and
differentiates without a custom ``autograd.Function``.
"""
import torch
from timm.layers import register_notrace_function

__all__ = ['entmax15', 'entmax15_threshold']


def entmax15_threshold(z: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Exact threshold tau of entmax-1.5 for already halved, max-shifted scores.

    Args:
        z: Scores already divided by 2 (any shape).
        dim: Dimension to normalise over.

    Returns:
        tau with ``dim`` kept as size 1, such that ``sum(clamp(z - tau, 0) ** 2, dim) == 1``.
    """
    d = z.shape[dim]
    z_srt, _ = torch.sort(z, dim=dim, descending=True)
    view = [1] * z.dim()
    view[dim] = d
    rho = torch.arange(1, d + 1, device=z.device, dtype=z.dtype).view(view)
    mean = z_srt.cumsum(dim) / rho
    mean_sq = (z_srt * z_srt).cumsum(dim) / rho
    ss = rho * (mean_sq - mean * mean)
    delta = (1. - ss) / rho
    tau = mean - torch.sqrt(torch.clamp(delta, min=0.))
    support = (tau <= z_srt).sum(dim=dim, keepdim=True)
    return tau.gather(dim, support - 1)


@register_notrace_function  # data-dependent threshold: a leaf for torch.fx feature extraction
def entmax15(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Entmax-1.5 over ``dim``: non-negative, sums to 1, exact zeros below the threshold.

    Args:
        x: Input scores.
        dim: Dimension to normalise over.

    Returns:
        Probabilities of the same shape as ``x``.
    """
    z = x / 2
    z = z - z.amax(dim=dim, keepdim=True).detach()
    with torch.no_grad():
        tau = entmax15_threshold(z, dim)
        root = torch.clamp(z - tau, min=0.)
        # d tau / d z = sqrt(p) / sum(sqrt(p)) = root / sum(root), exact on the support
        dtau = root / root.sum(dim=dim, keepdim=True)
    if z.requires_grad:
        tau = tau + (dtau * (z - z.detach())).sum(dim=dim, keepdim=True)
    out = torch.clamp(z - tau, min=0.)
    return out * out
