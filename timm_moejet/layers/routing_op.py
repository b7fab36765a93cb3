""" The routing weights from the routing scores as one operator, and its backward as one operator.

From the scores ``raw`` [B, N, S] (float32 cosine numerators), the per-token scales and the training noise, the
operator ``moejet::routing_weights`` gives dispatch (a softmax over the N tokens for each slot) and combine (an
entmax-1.5 over the S slots on the halved scores, or a softmax), and ``moejet::routing_weights_backward`` their
gradient, in closed form:

    d = raw * dispatch_scale + noise                 dispatch = softmax(d, dim=1)
    c = raw * combine_scale + noise (/ 2 if sparse)   combine = entmax15_halved(c, dim=-1) or softmax(c, dim=-1)

Both are registered with ``torch.library`` (torch >= 2.5, the package's floor) with fake implementations, so eager
code, ``torch.compile`` (one opaque node forward, one backward) and ``torch.export`` see one operator on every
device. Their implementations:

* CUDA with Triton (``routing_triton.available()``; Triton ships with torch's CUDA builds): Triton kernels that read
  the scores once and write each result once; the noise is drawn in the kernel (Philox) from a seed taken from
  torch's CUDA generator, on the host, without synchronisation.
* everywhere else: the tensor ops below (the CPU, CUDA without Triton), with the noise of ``torch.randn_like``.

Either way the noise comes from torch's generator for the scores' device, so ``torch.manual_seed`` reproduces a run
and a recomputation under gradient checkpointing (which restores the RNG state) sees the same noise.

TorchScript (which cannot script a Python operator), torch.jit tracing, the TorchScript and dynamo ONNX exporters and
timm's ``set_layer_config(exportable=True)`` get the same function as plain tensor ops (:func:`routing_weights_ops`),
differentiated by autograd; for torch.fx :func:`routing_weights` is a leaf (one call node, the operator at run time).

The weights are written in the dtype their consumers compute in: under autocast the bmm's that dispatch and combine
the tokens run in the autocast dtype, so the operator writes dispatch and combine in it (the forward values are those
autocast's own cast would give; the backward reads the rounded weights: tolerance in ``tests/test_routing_op.py``).
"""
from typing import Any, Optional, Tuple

import torch
from timm.layers import is_exportable, register_notrace_function

from .entmax import entmax15_halved
from .expert_ops import autocast_dtype

__all__ = ['routing_weights', 'routing_weights_ops', 'routing_weights_backward_ops', 'draw_seed']

# the entmax threshold has data-dependent control flow: a leaf for plain torch.fx too (timm's tracer already
# treats it as one through register_notrace_function)
torch.fx.wrap('entmax15_halved')


def _scaled_logits(raw: torch.Tensor, dispatch_scale: torch.Tensor, combine_scale: torch.Tensor,
                   noise_std: float, sparse: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """The dispatch and combine logits: the scaled scores plus the training noise (halved for the entmax)."""
    if noise_std > 0.:
        noise = torch.randn_like(raw).mul_(noise_std)
        return torch.addcmul(noise, raw, dispatch_scale), \
            torch.addcmul(noise * 0.5 if sparse else noise, raw, combine_scale)
    return raw * dispatch_scale, raw * combine_scale


def routing_weights_ops(raw: torch.Tensor, dispatch_scale: torch.Tensor, combine_scale: torch.Tensor,
                        noise_std: float, sparse: bool, out_dtype: Optional[torch.dtype] = None,
                        ) -> Tuple[torch.Tensor, torch.Tensor]:
    """The routing weights as tensor ops (autograd differentiates them).

    Args:
        raw: Scores [B, N, S] (float32): tokens . L2-normalised slot queries.
        dispatch_scale: [B, N, 1]: 1 / (||token|| + eps) / dispatch temperature.
        combine_scale: [B, N, 1]: the same with the combine temperature (halved for entmax-1.5).
        noise_std: Std of the Gaussian noise added to the scaled scores (0: none).
        sparse: Combine with entmax-1.5 (on the halved scores) instead of softmax.
        out_dtype: The dtype of the weights (default: the scores').

    Returns:
        dispatch [B, N, S] (softmax over N) and combine [B, N, S] (over S).
    """
    dispatch_logits, combine_logits = _scaled_logits(raw, dispatch_scale, combine_scale, noise_std, sparse)
    dispatch = torch.softmax(dispatch_logits, dim=1)
    if sparse:
        combine = entmax15_halved(combine_logits, dim=-1)
    else:
        combine = torch.softmax(combine_logits, dim=-1)
    if out_dtype is not None:
        return dispatch.to(out_dtype), combine.to(out_dtype)
    return dispatch, combine


def routing_weights_backward_ops(grad_dispatch: torch.Tensor, grad_combine: torch.Tensor, dispatch: torch.Tensor,
                                 combine: torch.Tensor, raw: torch.Tensor, dispatch_scale: torch.Tensor,
                                 combine_scale: torch.Tensor, sparse: bool,
                                 ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients of the scores and of the two scales (in the scores' dtype), from the weights' gradients and
    the weights (in theirs).

    Softmax over N: ``gd = D (gD - sum_N(gD D))``; softmax over S likewise; entmax-1.5 of halved scores with
    ``s = sqrt(C)`` (the root of the threshold): ``gc = 2 (s gC - s sum_S(s gC) / sum_S(s))``.
    """
    dtype = raw.dtype
    dispatch, grad_dispatch = dispatch.to(dtype), grad_dispatch.to(dtype)
    combine, grad_combine = combine.to(dtype), grad_combine.to(dtype)
    g_dispatch = dispatch * (grad_dispatch - (grad_dispatch * dispatch).sum(dim=1, keepdim=True))
    if sparse:
        root = combine.sqrt()
        g_root = root * grad_combine
        ratio = g_root.sum(dim=-1, keepdim=True) / root.sum(dim=-1, keepdim=True)
        g_combine = torch.addcmul(g_root, root, ratio, value=-1.).mul_(2.)
    else:
        g_combine = combine * (grad_combine - (grad_combine * combine).sum(dim=-1, keepdim=True))
    g_raw = torch.addcmul(g_dispatch * dispatch_scale, g_combine, combine_scale)
    return g_raw, (g_dispatch * raw).sum(dim=-1, keepdim=True), (g_combine * raw).sum(dim=-1, keepdim=True)


_UNSET = object()
_triton: Any = _UNSET


def _triton_kernels(device: torch.device) -> Optional[Any]:
    """The Triton kernels module for ``device`` (CUDA with Triton), else None; imported on first use."""
    global _triton
    if device.type != 'cuda':
        return None
    if _triton is _UNSET:
        try:
            from . import routing_triton
        except ImportError:  # a build without the kernels (or without Triton)
            _triton = None
        else:
            _triton = routing_triton if routing_triton.available() else None
    return _triton


def draw_seed(device: torch.device) -> int:
    """A seed for the kernels' Philox noise from torch's default generator of the CUDA ``device``, on the host (no
    synchronisation): its seed and offset, then the offset advanced as a kernel drawing random numbers advances it,
    so ``torch.manual_seed`` and a restored RNG state (gradient checkpointing) give the same seed."""
    gen = torch.cuda.default_generators[device.index if device.index is not None else torch.cuda.current_device()]
    offset = gen.get_offset()
    gen.set_offset(offset + 4)
    return (gen.initial_seed() * 0x9E3779B97F4A7C15 + offset) % (1 << 62)


@torch.library.custom_op('moejet::routing_weights', mutates_args=())
def _routing_weights_op(raw: torch.Tensor, dispatch_scale: torch.Tensor, combine_scale: torch.Tensor,
                        noise_std: float, sparse: bool, out_dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    kernels = _triton_kernels(raw.device)
    if kernels is not None:
        seed = draw_seed(raw.device) if noise_std > 0. else 0
        return kernels.routing_forward(raw, dispatch_scale, combine_scale, noise_std, seed, sparse, out_dtype)
    # below autograd here: the tensor ops record nothing (the entmax squares its root in place)
    dispatch, combine = routing_weights_ops(raw, dispatch_scale, combine_scale, noise_std, sparse, out_dtype)
    return dispatch.contiguous(), combine.contiguous()


@_routing_weights_op.register_fake
def _routing_weights_fake(raw, dispatch_scale, combine_scale, noise_std, sparse, out_dtype):
    return torch.empty_like(raw, dtype=out_dtype, memory_format=torch.contiguous_format), \
        torch.empty_like(raw, dtype=out_dtype, memory_format=torch.contiguous_format)


@torch.library.custom_op('moejet::routing_weights_backward', mutates_args=())
def _routing_weights_backward_op(grad_dispatch: torch.Tensor, grad_combine: torch.Tensor, dispatch: torch.Tensor,
                                 combine: torch.Tensor, raw: torch.Tensor, dispatch_scale: torch.Tensor,
                                 combine_scale: torch.Tensor, sparse: bool,
                                 ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    kernels = _triton_kernels(raw.device)
    if kernels is not None:
        return kernels.routing_backward(grad_dispatch, grad_combine, dispatch, combine, raw, dispatch_scale,
                                        combine_scale, sparse)
    g_raw, g_dispatch_scale, g_combine_scale = routing_weights_backward_ops(
        grad_dispatch, grad_combine, dispatch, combine, raw, dispatch_scale, combine_scale, sparse)
    return g_raw.contiguous(), g_dispatch_scale.contiguous(), g_combine_scale.contiguous()


@_routing_weights_backward_op.register_fake
def _routing_weights_backward_fake(grad_dispatch, grad_combine, dispatch, combine, raw, dispatch_scale,
                                   combine_scale, sparse):
    like = dict(dtype=raw.dtype, memory_format=torch.contiguous_format)
    return torch.empty_like(raw, **like), torch.empty_like(dispatch_scale, **like), \
        torch.empty_like(combine_scale, **like)


def _setup_context(ctx, inputs, output) -> None:
    raw, dispatch_scale, combine_scale, _, sparse, _ = inputs
    ctx.save_for_backward(*output, raw, dispatch_scale, combine_scale)
    ctx.sparse = sparse


def _backward(ctx, grad_dispatch: torch.Tensor, grad_combine: torch.Tensor):
    g_raw, g_dispatch_scale, g_combine_scale = torch.ops.moejet.routing_weights_backward(
        grad_dispatch, grad_combine, *ctx.saved_tensors, ctx.sparse)
    return g_raw, g_dispatch_scale, g_combine_scale, None, None, None


_routing_weights_op.register_autograd(_backward, setup_context=_setup_context)


def _plain_ops() -> bool:
    """Tracers and exporters that need the operator as tensor ops."""
    return torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or is_exportable()


@torch.jit.unused
def _routing_weights_eager(raw: torch.Tensor, dispatch_scale: torch.Tensor, combine_scale: torch.Tensor,
                           noise_std: float, sparse: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    out_dtype = autocast_dtype(raw)
    if _plain_ops():
        return routing_weights_ops(raw, dispatch_scale, combine_scale, noise_std, sparse, out_dtype)
    return torch.ops.moejet.routing_weights(raw, dispatch_scale, combine_scale, float(noise_std), bool(sparse),
                                            raw.dtype if out_dtype is None else out_dtype)


@register_notrace_function  # one call node for torch.fx feature extraction: the operator at run time
def routing_weights(raw: torch.Tensor, dispatch_scale: torch.Tensor, combine_scale: torch.Tensor,
                    noise_std: float, sparse: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """Dispatch and combine weights from the scores, through the operator where it can run.

    Args: as :func:`routing_weights_ops`. Under autocast the weights are in the autocast dtype (what the bmm's that
    use them compute in), else in the scores'.
    """
    if torch.jit.is_scripting():
        return routing_weights_ops(raw, dispatch_scale, combine_scale, noise_std, sparse)
    return _routing_weights_eager(raw, dispatch_scale, combine_scale, noise_std, sparse)
