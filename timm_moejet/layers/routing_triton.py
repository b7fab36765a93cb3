""" Triton kernels of the routing operator: from the routing scores to dispatch and combine weights, and back.

The math (one definition: ``SpheroMoE.route``; B batch, N tokens, S slots)::

    d_logits = raw * dscale + noise_std * z          dispatch = softmax(d_logits, over N)
    c_logits = raw * cscale + noise_std * z * h      combine  = entmax15_halved(c_logits, over S)   (sparse, h = 1/2)
                                                              or softmax(c_logits, over S)            (h = 1)

``z`` is a standard normal drawn in the kernels with Triton's Philox generator, ``tl.randn(seed, offset)`` at the
element's flat offset ``(b * N + n) * S + s``: the dispatch and the combine program of an element draw the same
value, and :func:`routing_noise` computes the same values with tensor ops on any device (for the CPU path and tests).

Layout (one forward launch, two backward launches):

* forward, one launch of two kinds of programs. The first ``B * ceil(S / BLOCK_S)`` programs each own a column
  block ``[N, BLOCK_S]`` of one batch element: they read its scores once (the whole column in registers when
  N <= 1024; beyond, an online max/sum pass and a second pass that writes) and write the dispatch block once. The
  remaining ``ceil(B * N / ROWS)`` programs each own ``ROWS`` whole rows ``[ROWS, S]``: they read the scores once,
  find the entmax threshold in registers (the bound and Newton steps of :mod:`timm_moejet.layers.entmax`, then the
  closed form of the support, no sort) or the softmax, and write the combine rows once.
* backward, launch 1 (only when dispatch has a gradient): ``B * ceil(S / BLOCK_S)`` column programs read
  ``grad_dispatch`` and ``dispatch`` and write ``colsum[b, s] = sum_N(grad_dispatch * dispatch)`` ([B, S] float32).
  Launch 2: row programs read ``raw``, ``dispatch``, ``grad_dispatch``, ``combine``, ``grad_combine``, the scales
  and ``colsum`` (L2-resident), and write ``g_raw`` [B, N, S] and the row reductions ``g_dscale``, ``g_cscale``
  [B, N, 1], each once. The softmax over tokens needs a sum over N, the combine's a sum over S; a row program
  cannot finish before every column sum is known, hence the second launch.

GPU cost (DRAM bytes per call; E = B * N * S, o = bytes of an output element, g = of a gradient element):
:func:`forward_bytes` = ``2 * 4 E + 2 * o E`` (raw read by the column and by the row programs, both outputs
written), :func:`backward_bytes` = ``(g + o) E`` (launch 1) ``+ (2 g + 2 o + 4 + 4) E`` (launch 2), both plus the
per-token scales and the [B, S] column sums, which they count too. With bfloat16 outputs and gradients that is 3 and
5 float32-sized passes over [B, N, S] (the tensor-op entmax threshold alone makes about 30).
:func:`forward_launches` and :func:`backward_launches` count the kernels. With noise, each element's Philox draw
(10 rounds) runs twice, in its column and in its row program: integer work of the order of a pass's memory time.
Compiled for sm_90 with 8 warps (``tests/test_routing_kernels.py`` compiles them without a GPU), ptxas reports
128 registers for the forward with one-tile dispatch columns, 162 with the two-pass ones, 158 for the entmax
backward rows, 64 for the column sums, no spills.

Precision: everything in float32 in registers; the outputs rounded once to ``out_dtype``, to nearest. The backward
reads the outputs it is given (in ``out_dtype``), as autograd would.

Triton's interpreter (``TRITON_INTERPRET=1``) runs these kernels as they are, Philox included, with one exception
handled here: it truncates float32 to bfloat16 where CUDA rounds, so bfloat16 outputs are rounded by hand
(integer ops, the same bits on both).
"""
from __future__ import annotations  # 'tl.constexpr' stays a name: Triton reads it, and it needs no Triton here

import contextlib
import math
from functools import lru_cache
from typing import Optional, Tuple

import torch

from ..errors import InvalidArgument
from .entmax import NEWTON_STEPS

try:
    import triton
    import triton.language as tl
except ImportError:  # the tensor-op path serves (see available())
    triton = tl = None

__all__ = ['available', 'routing_forward', 'routing_backward', 'routing_noise', 'forward_bytes', 'backward_bytes',
           'forward_launches', 'backward_launches']

MIN_TORCH = (2, 4)  # the operator API the kernels serve (torch.library.custom_op); its CUDA builds ship Triton 3
MAX_SINGLE_TOKENS = 1024  # a dispatch column up to this many tokens stays in registers (one read)
MAX_SLOTS = 16384  # a combine row stays in registers: the threshold needs several passes over it
TILE = 4096  # elements of a [B, N, S] tensor a program holds at once (16 a thread in 8 warps)


def _no_triton(fn=None, **_):
    """Stands in for triton.jit where Triton is missing: the kernels stay plain, never-called functions."""
    return fn if fn is not None else _no_triton


_jit = triton.jit if triton is not None else _no_triton


@lru_cache(maxsize=None)
def available() -> bool:
    """Whether the kernels can run: Triton imports and torch is new enough (no device check: the interpreter,
    ``TRITON_INTERPRET=1`` set before Triton is imported, runs them on the CPU)."""
    version = tuple(int(p) for p in torch.__version__.split('+')[0].split('.')[:2])
    return triton is not None and version >= MIN_TORCH


# ---------------------------------------------------------------------------------------------------------------
# kernels


@_jit
def _store(ptr, offs, x, mask):
    """Store float32 x in the dtype of ptr, rounded to nearest even (for bfloat16 by hand: Triton's interpreter
    truncates float32 to bfloat16, CUDA rounds; this way both round, to the same bits)."""
    if tl.constexpr(ptr.dtype.element_ty == tl.bfloat16):
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        tl.store(ptr + offs, (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=mask)
    else:
        tl.store(ptr + offs, x.to(ptr.dtype.element_ty), mask=mask)


@_jit
def _dispatch_logits(raw_ptr, dscale_ptr, b, rows, cols, N, S, noise_std, seed, HAS_NOISE: tl.constexpr):
    """d_logits of rows x cols of batch element b, -inf outside the tokens."""
    row_ok = rows < N
    ok = row_ok[:, None] & (cols < S)[None, :]
    flat = (b * N + rows).to(tl.int64)
    offs = flat[:, None] * S + cols[None, :]
    x = tl.load(raw_ptr + offs, mask=ok, other=0.).to(tl.float32)
    scale = tl.load(dscale_ptr + flat, mask=row_ok, other=0.).to(tl.float32)
    logits = x * scale[:, None]
    if HAS_NOISE:
        logits += noise_std * tl.randn(seed, offs)
    return tl.where(row_ok[:, None], logits, float('-inf')), offs, ok


@_jit
def _dispatch_columns(raw_ptr, dscale_ptr, out_ptr, b, s0, N, S, noise_std, seed, HAS_NOISE: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr, SINGLE: tl.constexpr):
    """Softmax over the tokens of the columns s0 .. s0 + BLOCK_S of batch element b."""
    cols = s0 + tl.arange(0, BLOCK_S)
    rows = tl.arange(0, BLOCK_N)
    if SINGLE:  # the whole column in registers: one read
        logits, offs, ok = _dispatch_logits(raw_ptr, dscale_ptr, b, rows, cols, N, S, noise_std, seed, HAS_NOISE)
        e = tl.exp(logits - tl.max(logits, 0)[None, :])
        _store(out_ptr, offs, e / tl.sum(e, 0)[None, :], ok)
    else:  # online max and sum, then a second pass that writes
        m = tl.full([BLOCK_S], float('-inf'), tl.float32)
        den = tl.zeros([BLOCK_S], tl.float32)
        for n0 in range(0, N, BLOCK_N):
            logits, offs, ok = _dispatch_logits(raw_ptr, dscale_ptr, b, n0 + rows, cols, N, S, noise_std, seed,
                                                HAS_NOISE)
            m_new = tl.maximum(m, tl.max(logits, 0))
            den = den * tl.exp(m - m_new) + tl.sum(tl.exp(logits - m_new[None, :]), 0)
            m = m_new
        for n0 in range(0, N, BLOCK_N):
            logits, offs, ok = _dispatch_logits(raw_ptr, dscale_ptr, b, n0 + rows, cols, N, S, noise_std, seed,
                                                HAS_NOISE)
            out = tl.exp(logits - m[None, :]) / den[None, :]
            _store(out_ptr, offs, out, ok)


@_jit
def _entmax15_halved_rows(z, col_ok, S, inv_sqrt_s, NEWTON: tl.constexpr):
    """entmax15_halved over axis 1 of z (-inf outside the slots): the lower bound and Newton steps of
    ``entmax15_threshold_newton``, then the closed form of the support they reached."""
    mean = tl.sum(tl.where(col_ok[None, :], z, 0.), 1) / S
    tau = tl.maximum(tl.max(z, 1) - 1., mean - inv_sqrt_s)
    for _ in tl.static_range(NEWTON):
        r = tl.maximum(z - tau[:, None], 0.)
        s1 = tl.sum(r, 1)
        norm = tl.sqrt(tl.sum(r * r, 1))
        tau = tau + (norm * norm - norm) / tl.maximum(s1, 1e-30)
    r = tl.maximum(z - tau[:, None], 0.)
    s1 = tl.sum(r, 1)
    norm = tl.sqrt(tl.sum(r * r, 1))
    k = tl.maximum(tl.sum((r > 0.).to(tl.float32), 1), 1.)
    mean_r = s1 / k
    ss = norm * norm - s1 * mean_r
    tau = tau + mean_r - tl.sqrt(tl.maximum((1. - ss) / k, 0.))
    r = tl.maximum(z - tau[:, None], 0.)
    return r * r


@_jit
def _combine_rows(raw_ptr, cscale_ptr, out_ptr, r0, M, S, noise_std, seed, inv_sqrt_s, HAS_NOISE: tl.constexpr,
                  SPARSE: tl.constexpr, NEWTON: tl.constexpr, ROWS: tl.constexpr, BLOCK_S: tl.constexpr):
    """Entmax-1.5 (halved scores) or softmax over the slots of the flat rows r0 .. r0 + ROWS (M = B * N rows)."""
    rows = r0 + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_S)
    row_ok = rows < M
    col_ok = cols < S
    ok = row_ok[:, None] & col_ok[None, :]
    offs = rows.to(tl.int64)[:, None] * S + cols[None, :]
    x = tl.load(raw_ptr + offs, mask=ok, other=0.).to(tl.float32)
    scale = tl.load(cscale_ptr + rows, mask=row_ok, other=0.).to(tl.float32)
    z = x * scale[:, None]
    if HAS_NOISE:
        noise = noise_std * tl.randn(seed, offs)  # the dispatch program of this element draws the same value
        z += noise * 0.5 if SPARSE else noise
    z = tl.where(col_ok[None, :], z, float('-inf'))
    if SPARSE:
        out = _entmax15_halved_rows(z, col_ok, S, inv_sqrt_s, NEWTON)
    else:
        e = tl.exp(z - tl.max(z, 1)[:, None])
        out = e / tl.sum(e, 1)[:, None]
    _store(out_ptr, offs, out, ok)


@_jit(do_not_specialize=['seed'])
def _forward_kernel(raw_ptr, dscale_ptr, cscale_ptr, dispatch_ptr, combine_ptr, B, N, S, noise_std, seed, inv_sqrt_s,
                    HAS_NOISE: tl.constexpr, SPARSE: tl.constexpr, NEWTON: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_S: tl.constexpr, SINGLE: tl.constexpr, ROWS: tl.constexpr, ROW_BLOCK_S: tl.constexpr):
    """The column programs (dispatch) first, then the row programs (combine): one launch."""
    pid = tl.program_id(0)
    col_blocks = tl.cdiv(S, BLOCK_S)
    if pid < B * col_blocks:
        _dispatch_columns(raw_ptr, dscale_ptr, dispatch_ptr, pid // col_blocks, (pid % col_blocks) * BLOCK_S, N, S,
                          noise_std, seed, HAS_NOISE, BLOCK_N, BLOCK_S, SINGLE)
    else:
        _combine_rows(raw_ptr, cscale_ptr, combine_ptr, (pid - B * col_blocks) * ROWS, B * N, S, noise_std, seed,
                      inv_sqrt_s, HAS_NOISE, SPARSE, NEWTON, ROWS, ROW_BLOCK_S)


@_jit
def _dispatch_colsum_kernel(gd_ptr, gd_sb, gd_sn, gd_ss, dispatch_ptr, colsum_ptr, N, S, BLOCK_N: tl.constexpr,
                            BLOCK_S: tl.constexpr):
    """colsum[b, s] = sum_N(grad_dispatch * dispatch) for the columns of one program (grid: column blocks, B)."""
    b = tl.program_id(1)
    cols = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
    col_ok = cols < S
    acc = tl.zeros([BLOCK_S], tl.float32)
    for n0 in range(0, N, BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N)
        ok = (rows < N)[:, None] & col_ok[None, :]
        g = tl.load(gd_ptr + b.to(tl.int64) * gd_sb + rows[:, None] * gd_sn + cols[None, :] * gd_ss, mask=ok,
                    other=0.).to(tl.float32)
        d = tl.load(dispatch_ptr + (b * N + rows).to(tl.int64)[:, None] * S + cols[None, :], mask=ok,
                    other=0.).to(tl.float32)
        acc += tl.sum(g * d, 0)
    tl.store(colsum_ptr + b * S + cols, acc, mask=col_ok)


@_jit
def _combine_grad(gc_ptr, gc_sb, gc_sn, gc_ss, combine_ptr, b, n, offs, cols, ok, SPARSE: tl.constexpr):
    """The gradient of the combine logits: entmax-1.5 (halved) ``2 (q - r sum(q) / sum(r))`` with r = sqrt(combine)
    and q = grad * r, or softmax ``combine (grad - sum(grad combine))``."""
    g = tl.load(gc_ptr + b.to(tl.int64)[:, None] * gc_sb + n[:, None] * gc_sn + cols[None, :] * gc_ss, mask=ok,
                other=0.).to(tl.float32)
    c = tl.load(combine_ptr + offs, mask=ok, other=0.).to(tl.float32)
    if SPARSE:
        r = tl.sqrt(c)
        q = g * r
        return 2. * (q - r * (tl.sum(q, 1) / tl.maximum(tl.sum(r, 1), 1e-30))[:, None])
    else:
        return c * (g - tl.sum(g * c, 1)[:, None])


@_jit
def _backward_rows_kernel(raw_ptr, dscale_ptr, cscale_ptr, dispatch_ptr, combine_ptr, gd_ptr, gd_sb, gd_sn, gd_ss,
                          gc_ptr, gc_sb, gc_sn, gc_ss, colsum_ptr, g_raw_ptr, g_dscale_ptr, g_cscale_ptr, M, N, S,
                          HAS_GD: tl.constexpr, HAS_GC: tl.constexpr, SPARSE: tl.constexpr, ROWS: tl.constexpr,
                          BLOCK_S: tl.constexpr):
    """g_raw, g_dscale and g_cscale of the flat rows of one program, each written once."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_S)
    row_ok = rows < M
    ok = row_ok[:, None] & (cols < S)[None, :]
    offs = rows.to(tl.int64)[:, None] * S + cols[None, :]
    b = rows // N
    n = rows % N
    x = tl.load(raw_ptr + offs, mask=ok, other=0.).to(tl.float32)
    g_disp = tl.zeros([ROWS, BLOCK_S], tl.float32)
    g_comb = tl.zeros([ROWS, BLOCK_S], tl.float32)
    if HAS_GD:
        g = tl.load(gd_ptr + b.to(tl.int64)[:, None] * gd_sb + n[:, None] * gd_sn + cols[None, :] * gd_ss, mask=ok,
                    other=0.).to(tl.float32)
        d = tl.load(dispatch_ptr + offs, mask=ok, other=0.).to(tl.float32)
        total = tl.load(colsum_ptr + b[:, None] * S + cols[None, :], mask=ok, other=0.)
        g_disp = d * (g - total)
    if HAS_GC:
        g_comb = _combine_grad(gc_ptr, gc_sb, gc_sn, gc_ss, combine_ptr, b, n, offs, cols, ok, SPARSE)
    dscale = tl.load(dscale_ptr + rows, mask=row_ok, other=0.).to(tl.float32)
    cscale = tl.load(cscale_ptr + rows, mask=row_ok, other=0.).to(tl.float32)
    tl.store(g_raw_ptr + offs, g_disp * dscale[:, None] + g_comb * cscale[:, None], mask=ok)
    tl.store(g_dscale_ptr + rows, tl.sum(g_disp * x, 1), mask=row_ok)
    tl.store(g_cscale_ptr + rows, tl.sum(g_comb * x, 1), mask=row_ok)


# ---------------------------------------------------------------------------------------------------------------
# launches


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _num_warps(tile: int) -> int:
    return max(4, min(16, tile // 512))


def _check(raw: torch.Tensor, *scales: torch.Tensor) -> Tuple[int, int, int]:
    if raw.dim() != 3:
        raise InvalidArgument(f'routing scores must be [batch, tokens, slots], got shape {tuple(raw.shape)}')
    batch, tokens, slots = raw.shape
    if slots > MAX_SLOTS:
        raise InvalidArgument(f'the routing kernels handle up to {MAX_SLOTS} slots, got {slots}')
    for scale in scales:
        if scale.numel() != batch * tokens:
            raise InvalidArgument(f'a routing scale must hold one value per token ({batch} x {tokens}), got shape '
                                  f'{tuple(scale.shape)}')
    return batch, tokens, slots


def _dispatch_blocks(tokens: int, slots: int) -> Tuple[int, int, bool]:
    """(BLOCK_N, BLOCK_S, whole column in registers) of the dispatch programs."""
    single = _pow2(tokens) <= MAX_SINGLE_TOKENS
    block_n = _pow2(tokens) if single else 256
    return block_n, max(1, min(_pow2(slots), 64, TILE // block_n)), single


def _row_blocks(slots: int) -> Tuple[int, int]:
    """(ROWS, BLOCK_S) of the row programs: whole rows."""
    block_s = _pow2(slots)
    return max(1, min(64, TILE // block_s)), block_s


def _on(device: torch.device):
    """Triton launches on the current CUDA device: make it the tensors' one."""
    return torch.cuda.device(device) if device.type == 'cuda' else contextlib.nullcontext()


def _seed(seed: int) -> int:
    if not 0 <= seed < 2 ** 63:
        raise InvalidArgument(f'the routing noise seed must be in [0, 2**63), got {seed}')
    return int(seed)


def routing_forward(raw: torch.Tensor, dscale: torch.Tensor, cscale: torch.Tensor, noise_std: float, seed: int,
                    sparse: bool, out_dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """Dispatch (softmax over tokens) and combine (entmax-1.5 on halved scores, or softmax, over slots) weights.

    Args:
        raw: Routing scores [B, N, S] (float32).
        dscale: Dispatch scale [B, N, 1].
        cscale: Combine scale [B, N, 1] (the 1/2 of the halved entmax scores included).
        noise_std: Std of the logit noise (0: none).
        seed: Philox seed of the noise, in [0, 2**63).
        sparse: Entmax-1.5 combine (True) or softmax (False).
        out_dtype: dtype of both outputs (float32, bfloat16, float16).

    Returns:
        (dispatch, combine), each [B, N, S] in ``out_dtype``.
    """
    batch, tokens, slots = _check(raw, dscale, cscale)
    raw = raw.contiguous()
    dispatch = torch.empty(raw.shape, dtype=out_dtype, device=raw.device)
    combine = torch.empty(raw.shape, dtype=out_dtype, device=raw.device)
    block_n, block_s, single = _dispatch_blocks(tokens, slots)
    rows, row_block_s = _row_blocks(slots)
    if raw.numel() == 0:
        return dispatch, combine
    grid = (batch * triton.cdiv(slots, block_s) + triton.cdiv(batch * tokens, rows),)
    with _on(raw.device):
        _forward_kernel[grid](
            raw, dscale.contiguous(), cscale.contiguous(), dispatch, combine, batch, tokens, slots, float(noise_std),
            _seed(seed), slots ** -0.5, HAS_NOISE=noise_std > 0., SPARSE=bool(sparse), NEWTON=NEWTON_STEPS,
            BLOCK_N=block_n, BLOCK_S=block_s, SINGLE=single, ROWS=rows, ROW_BLOCK_S=row_block_s,
            num_warps=_num_warps(max(block_n * block_s, rows * row_block_s)))
    return dispatch, combine


def _grad_args(grad: Optional[torch.Tensor], like: torch.Tensor) -> Tuple[torch.Tensor, int, int, int]:
    """A gradient and its strides (any layout: an expanded zero gradient is read as it is); ``like`` if None."""
    if grad is None:
        return like, 0, 0, 0
    if grad.shape != like.shape:
        raise InvalidArgument(f'a routing gradient must have the shape {tuple(like.shape)}, got {tuple(grad.shape)}')
    return (grad, *grad.stride())


def routing_backward(grad_dispatch: Optional[torch.Tensor], grad_combine: Optional[torch.Tensor],
                     dispatch: torch.Tensor, combine: torch.Tensor, raw: torch.Tensor, dscale: torch.Tensor,
                     cscale: torch.Tensor, sparse: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`routing_forward` (none to the noise).

    Args:
        grad_dispatch: dL/d dispatch [B, N, S], or None (zero).
        grad_combine: dL/d combine [B, N, S], or None (zero).
        dispatch: The forward's dispatch.
        combine: The forward's combine.
        raw: The forward's routing scores.
        dscale: The forward's dispatch scale [B, N, 1].
        cscale: The forward's combine scale [B, N, 1].
        sparse: Whether the combine was entmax-1.5.

    Returns:
        (g_raw [B, N, S], g_dscale [B, N, 1], g_cscale [B, N, 1]), float32.
    """
    batch, tokens, slots = _check(raw, dscale, cscale)
    raw, dispatch, combine = raw.contiguous(), dispatch.contiguous(), combine.contiguous()
    g_raw = torch.empty(raw.shape, dtype=torch.float32, device=raw.device)
    g_dscale = torch.empty((batch, tokens, 1), dtype=torch.float32, device=raw.device)
    g_cscale = torch.empty((batch, tokens, 1), dtype=torch.float32, device=raw.device)
    if raw.numel() == 0:
        return g_raw, g_dscale, g_cscale
    gd = _grad_args(grad_dispatch, dispatch)
    gc = _grad_args(grad_combine, combine)
    with _on(raw.device):
        colsum = g_dscale  # not read when dispatch has no gradient
        if grad_dispatch is not None:
            colsum = torch.empty((batch, slots), dtype=torch.float32, device=raw.device)
            block_s = min(_pow2(slots), 128)
            block_n = max(1, min(_pow2(tokens), TILE // block_s))
            _dispatch_colsum_kernel[(triton.cdiv(slots, block_s), batch)](
                *gd, dispatch, colsum, tokens, slots, BLOCK_N=block_n, BLOCK_S=block_s,
                num_warps=_num_warps(block_n * block_s))
        rows, block_s = _row_blocks(slots)
        _backward_rows_kernel[(triton.cdiv(batch * tokens, rows),)](
            raw, dscale.contiguous(), cscale.contiguous(), dispatch, combine, *gd, *gc, colsum, g_raw, g_dscale,
            g_cscale, batch * tokens, tokens, slots, HAS_GD=grad_dispatch is not None,
            HAS_GC=grad_combine is not None, SPARSE=bool(sparse), ROWS=rows, BLOCK_S=block_s,
            num_warps=_num_warps(rows * block_s))
    return g_raw, g_dscale, g_cscale


# ---------------------------------------------------------------------------------------------------------------
# the noise the kernels draw, as tensor ops (Triton's Philox-4x32-10 and Box-Muller, ``tl.randn``)

_PHILOX_ROUND = (0xD2511F53, 0xCD9E8D57)
_PHILOX_KEY = (0x9E3779B9, 0xBB67AE85)
_U32 = 0xFFFFFFFF


def _mul_hi_lo(a: int, b: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """High and low 32 bits of a * b for a 32-bit constant a and 32-bit values b held in int64 (in 16-bit halves:
    the full product would overflow int64)."""
    lo_part = a * (b & 0xFFFF)
    mid = a * (b >> 16) + (lo_part >> 16)
    return mid >> 16, ((mid & 0xFFFF) << 16) | (lo_part & 0xFFFF)


def _uniform(x: torch.Tensor) -> torch.Tensor:
    """Triton's uint_to_uniform_float: the uint32 as int32, negatives complemented, times 2**-31 (a little less)."""
    x = torch.where(x >= 2 ** 31, x - 2 ** 32, x)
    x = torch.where(x < 0, -x - 1, x)
    return x.to(torch.float32) * torch.tensor(4.6566127342e-10, dtype=torch.float32, device=x.device)


def routing_noise(shape: Tuple[int, ...], seed: int, device: torch.device) -> torch.Tensor:
    """The standard normal values the kernels add (before ``noise_std``), with tensor ops on any device.

    Element i of the flat tensor is ``tl.randn(seed, i)``: the same Philox counters and Box-Muller transform, so
    the bits of the uniform pair are identical and the normal agrees to float32 rounding of log, sqrt and cos.

    Args:
        shape: Shape of the routing scores [B, N, S].
        seed: Philox seed, in [0, 2**63).
        device: Device of the result.

    Returns:
        float32 tensor of ``shape``.
    """
    seed = _seed(seed)
    offsets = torch.arange(math.prod(shape), dtype=torch.int64, device=device)
    c0, c1 = offsets & _U32, offsets >> 32
    c2 = c3 = torch.zeros_like(offsets)
    k0, k1 = seed & _U32, seed >> 32
    for _ in range(10):
        hi_b, lo_b = _mul_hi_lo(_PHILOX_ROUND[1], c2)
        hi_a, lo_a = _mul_hi_lo(_PHILOX_ROUND[0], c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _PHILOX_KEY[0]) & _U32, (k1 + _PHILOX_KEY[1]) & _U32
    u1 = _uniform(c0).clamp_(min=1e-7)
    theta = _uniform(c1) * torch.tensor(2 * math.pi, dtype=torch.float32, device=device)
    return (torch.sqrt(-2. * torch.log(u1)) * torch.cos(theta)).reshape(shape)


# ---------------------------------------------------------------------------------------------------------------
# cost, for a GPU cost model


def forward_bytes(batch: int, tokens: int, slots: int, out_dtype: torch.dtype) -> int:
    """DRAM bytes one :func:`routing_forward` call moves: raw read twice (column and row programs), both outputs
    written once, the per-token scales read (by each column block and by the rows)."""
    elems = batch * tokens * slots
    _, block_s, _ = _dispatch_blocks(tokens, slots)
    scale_reads = batch * tokens * 4 * (math.ceil(slots / block_s) + 1)
    return 2 * 4 * elems + 2 * out_dtype.itemsize * elems + scale_reads


def backward_bytes(batch: int, tokens: int, slots: int, out_dtype: torch.dtype, grad_dtype: torch.dtype,
                   grad_dispatch: bool = True, grad_combine: bool = True) -> int:
    """DRAM bytes one :func:`routing_backward` call moves: the column sums read grad_dispatch and dispatch; the
    rows read raw, both outputs and their gradients, and write g_raw (float32) and the two row reductions."""
    elems, rows = batch * tokens * slots, batch * tokens
    o, g = out_dtype.itemsize, grad_dtype.itemsize
    total = 4 * elems + 4 * elems + 2 * 4 * rows + 2 * 4 * rows  # raw, g_raw; scales; g_dscale, g_cscale
    if grad_dispatch:
        total += 2 * (g + o) * elems + 2 * 4 * batch * slots  # read by both launches; colsum written and read
    if grad_combine:
        total += (g + o) * elems
    return total


def forward_launches() -> int:
    """Kernel launches of one :func:`routing_forward` call."""
    return 1


def backward_launches(grad_dispatch: bool = True) -> int:
    """Kernel launches of one :func:`routing_backward` call (the column sums only when dispatch has a gradient)."""
    return 2 if grad_dispatch else 1
