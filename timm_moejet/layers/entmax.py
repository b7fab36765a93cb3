""" Entmax-1.5: a sparse alternative to softmax, exact, without a full sort where it can.

entmax15(x) = argmax_p <p, x> + H^T_{1.5}(p) = [x / 2 - tau]_+^2, with tau chosen so that the output sums to 1
(Peters, Niculae and Martins, "Sparse Sequence-to-Sequence Models", ACL 2019). Written for this project.

Two exact ways to find tau:

* ``entmax15_threshold``: the sort-based algorithm of the paper (the reference; a full sort of every row).
* ``entmax15_threshold_newton``: Newton steps on ``sqrt(f(tau)) - 1``, ``f(tau) = sum([z - tau]_+^2)``, from a
  lower bound. ``sqrt(f)`` is convex and decreasing, so the steps climb monotonically towards tau from below and
  the set ``{z > tau}`` shrinks towards the true support. The closed-form tau of that set is then *verified*: it
  is the exact threshold iff it leaves the same set above it (then ``f(tau) = 1`` with the right support, and
  the root is unique). Rows that fail after a few more steps fall back to the sort. At the released initial
  temperature (support about 170 of 294 slots) three steps settle every row; each step is a handful of passes
  over the scores, against a full sort.

The gradient is the closed form of implicit differentiation: with r = [z - tau]_+, d out / d z applied to g is
``2 r (g - sum(g r) / sum(r))``. Eager and compiled code use an ``autograd.Function``; TorchScript, which cannot
script one, uses an equivalent composition of tensor ops.

Export: ``torch.compile`` and ``torch.export`` (the dynamo ONNX exporter) take a fixed number of Newton steps and a
``torch.cond`` sort fallback (an ONNX ``If``). The TorchScript ONNX exporter traces: it cannot inline the
``autograd.Function`` (its ``out=`` ops), and a trace holds only the path its example input took through the Newton
loop. So while tracing, or under timm's ``set_layer_config(exportable=True)``, the threshold is the sort-based one:
straight-line ops, the same exact result.
"""
from typing import Optional, Tuple

import torch
from timm.layers import is_exportable, register_notrace_function

__all__ = ['entmax15', 'entmax15_halved', 'entmax15_threshold', 'entmax15_threshold_newton']


def entmax15_threshold(z: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Exact threshold tau of entmax-1.5 for already halved, max-shifted scores (sort-based reference).

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


def _sorted_threshold(z: torch.Tensor, dim: int) -> torch.Tensor:
    """The sort-based threshold of unshifted scores."""
    z_max = z.amax(dim=dim, keepdim=True)
    return entmax15_threshold(z - z_max, dim) + z_max


def _lower_bound(z: torch.Tensor, dim: int) -> torch.Tensor:
    # tau >= max - 1 (the top score alone must not exceed 1) and tau >= mean - 1/sqrt(d) (Jensen: f(tau) >=
    # d (mean - tau)^2 below the mean); the second is far tighter when the support is wide
    d = z.shape[dim]
    return torch.maximum(z.amax(dim=dim, keepdim=True) - 1., z.mean(dim=dim, keepdim=True) - d ** -0.5)


def _root_stats(z: torch.Tensor, tau: torch.Tensor, root: torch.Tensor, dim: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Writes root = [z - tau]_+ (reusing the buffer) and returns its sum and 2-norm along ``dim``."""
    torch.sub(z, tau, out=root)
    root.clamp_(min=0.)
    return root.sum(dim=dim, keepdim=True), torch.linalg.vector_norm(root, 2., dim=dim, keepdim=True)


def _newton_step(tau: torch.Tensor, s1: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    # Newton on sqrt(f) - 1: (sqrt f)' = -s1 / sqrt(f); s1 > 0 while tau < max
    return tau + (norm - 1.) * norm / s1.clamp(min=1e-30)


def _support_size(root: torch.Tensor, dim: int, buf: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Number of positive entries of root >= 0, as root's dtype (sign then sum: count_nonzero is ~10x slower)."""
    if buf is None:
        return torch.sign(root).sum(dim=dim, keepdim=True)
    torch.sign(root, out=buf)
    return buf.sum(dim=dim, keepdim=True)


def _closed_form(tau: torch.Tensor, s1: torch.Tensor, norm: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Exact tau of the support {z > tau} from the moments of r = [z - tau]_+ (z = tau + r on the support)."""
    k = k.clamp(min=1.)
    mean_r = s1 / k
    ss = norm * norm - s1 * mean_r
    return tau + mean_r - torch.sqrt(torch.clamp((1. - ss) / k, min=0.))


def _fallback_rows(z: torch.Tensor, tau: torch.Tensor, ok: torch.Tensor, dim: int) -> torch.Tensor:
    """tau with the rows where ``ok`` is False replaced by the sort-based threshold (only those rows sorted)."""
    d = z.shape[dim]
    z_rows = z.movedim(dim, -1).reshape(-1, d)
    tau_rows = tau.movedim(dim, -1).reshape(-1, 1).clone()
    bad = torch.nonzero(~ok.movedim(dim, -1).reshape(-1)).squeeze(1)
    tau_rows.index_copy_(0, bad, _sorted_threshold(z_rows.index_select(0, bad), -1))
    shape = list(tau.movedim(dim, -1).shape)
    return tau_rows.reshape(shape).movedim(-1, dim)


def entmax15_threshold_newton(
        z: torch.Tensor,
        dim: int = -1,
        num_steps: int = 3,
        max_steps: int = 8,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Exact entmax-1.5 threshold by verified Newton steps, sort only for rows that do not settle.

    Args:
        z: Halved scores (no max shift needed).
        dim: Dimension to normalise over.
        num_steps: Newton steps before the first verified closed-form candidate.
        max_steps: Steps after which unsettled rows are sorted.

    Returns:
        (tau with ``dim`` kept as size 1, root = [z - tau]_+ of the shape of ``z``). No autograd.
    """
    with torch.no_grad():
        if z.device.type == 'meta':  # shape propagation only: no values to verify
            tau = _lower_bound(z, dim)
            return tau, torch.clamp(z - tau, min=0.)
        root = torch.empty_like(z)
        buf = torch.empty_like(z)
        tau = _lower_bound(z, dim)
        cand = tau
        ok = torch.zeros_like(tau, dtype=torch.bool)
        for step in range(max_steps + 1):
            s1, norm = _root_stats(z, tau, root, dim)
            if step >= num_steps:
                k = _support_size(root, dim, buf)
                cand = _closed_form(tau, s1, norm, k)
                torch.sub(z, cand, out=root)
                root.clamp_(min=0.)
                ok = _support_size(root, dim, buf) == k
                if bool(ok.all()):
                    return cand, root
            tau = torch.where(ok, cand, _newton_step(tau, s1, norm))
        tau = _fallback_rows(z, cand, ok, dim)
        torch.sub(z, tau, out=root)
        root.clamp_(min=0.)
        return tau, root


@torch.jit.unused
def _threshold_compiled(z: torch.Tensor, dim: int, num_steps: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Fixed step count and a ``torch.cond`` fallback: no data-dependent Python branch, so no graph break."""
    tau = _lower_bound(z, dim)
    for _ in range(num_steps):
        r = torch.clamp(z - tau, min=0.)
        tau = _newton_step(tau, r.sum(dim=dim, keepdim=True), torch.linalg.vector_norm(r, 2., dim=dim, keepdim=True))
    r = torch.clamp(z - tau, min=0.)
    k = _support_size(r, dim)
    cand = _closed_form(tau, r.sum(dim=dim, keepdim=True), torch.linalg.vector_norm(r, 2., dim=dim, keepdim=True), k)
    ok = (_support_size(torch.clamp(z - cand, min=0.), dim) == k).all()

    def _keep(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return t.clone()

    def _sort(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return _sorted_threshold(z, dim)

    tau = torch.cond(ok, _keep, _sort, (z, cand))
    return tau, torch.clamp(z - tau, min=0.)


class _Entmax15Halved(torch.autograd.Function):
    """[z - tau]_+^2 with the closed-form backward ``2 r (g - sum(g r) / sum(r))``."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, dim: int, num_steps: int) -> torch.Tensor:
        if torch.compiler.is_compiling():
            _, root = _threshold_compiled(z, dim, num_steps)
        else:
            _, root = entmax15_threshold_newton(z, dim, num_steps)
        ctx.dim = dim
        if not ctx.needs_input_grad[0]:
            return root.mul_(root)  # nothing to save: square the fresh buffer in place
        ctx.save_for_backward(root)
        return root * root

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        root, = ctx.saved_tensors
        dim = ctx.dim
        g_root = grad * root
        q = g_root.sum(dim=dim, keepdim=True) / root.sum(dim=dim, keepdim=True)
        return torch.addcmul(g_root, root, q, value=-1.).mul_(2.), None, None


def _entmax15_halved_sorted(z: torch.Tensor, dim: int) -> torch.Tensor:
    """The same function from the sort-based threshold alone: straight-line tensor ops that a tracer records
    faithfully (autograd differentiates the closed-form tau of the support, which is the implicit gradient)."""
    out = torch.clamp(z - _sorted_threshold(z, dim), min=0.)
    return out * out


@torch.jit.unused
def _entmax15_halved_function(z: torch.Tensor, dim: int, num_steps: int) -> torch.Tensor:
    if torch.jit.is_tracing() or is_exportable():
        # a trace keeps one path through the Newton loop and its fallback: export the sort, exact for any input
        return _entmax15_halved_sorted(z, dim)
    return _Entmax15Halved.apply(z, dim, num_steps)


def _entmax15_halved_graph(z: torch.Tensor, dim: int, num_steps: int) -> torch.Tensor:
    """The same function as a composition of tensor ops (TorchScript cannot script an autograd.Function)."""
    tau, root = entmax15_threshold_newton(z.detach(), dim, num_steps)
    if z.requires_grad:
        # first-order identity: tau's gradient is root / sum(root), attached through a zero-valued term
        dtau = root / root.sum(dim=dim, keepdim=True)
        tau = tau + (dtau * (z - z.detach())).sum(dim=dim, keepdim=True)
    out = torch.clamp(z - tau, min=0.)
    return out * out


@register_notrace_function  # data-dependent threshold: a leaf for torch.fx feature extraction
def entmax15_halved(z: torch.Tensor, dim: int = -1, num_steps: int = 3) -> torch.Tensor:
    """``entmax15(2 * z)``: for scores already halved (a caller that scales anyway saves a pass).

    Args:
        z: Halved scores.
        dim: Dimension to normalise over.
        num_steps: Newton steps before the verified closed form (any value gives the exact result).

    Returns:
        Probabilities of the shape of ``z``.
    """
    if torch.jit.is_scripting():
        return _entmax15_halved_graph(z, dim, num_steps)
    return _entmax15_halved_function(z, dim, num_steps)


@register_notrace_function  # data-dependent threshold: a leaf for torch.fx feature extraction
def entmax15(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Entmax-1.5 over ``dim``: non-negative, sums to 1, exact zeros below the threshold.

    Args:
        x: Input scores.
        dim: Dimension to normalise over.

    Returns:
        Probabilities of the same shape as ``x``.
    """
    return entmax15_halved(x / 2, dim)
