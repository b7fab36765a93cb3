""" CPU fast paths for eager training of the experts, behind one switch.

Two costs of an eager train step on the CPU that a GPU does not have, each removed here:

- **Recycled gradient memory.** timm's ``train.py`` sets gradients to None before every step, so each backward
  allocates the expert weight gradients afresh (174 MB per ViT-T MoE layer); glibc serves such blocks with ``mmap``
  and every page faults on first touch (27 ms per 58 MB on a 2-core EPYC). A :class:`GradRecycler` hands the memory
  back to the next backward. CUDA's caching allocator already does this.
- **Lane-mask dropout.** The CPU generator runs on one core; drawing the expert dropout masks as 16-bit lanes of
  64-bit random words (:func:`lane_dropout_scale`) makes about 6x fewer generator calls than ``torch.rand``.

They apply to CPU tensors only: never on other devices, torch.fx or TorchScript, where fresh gradient memory and
``F.dropout`` serve. Under ``torch.compile`` the recycled gradient memory serves too, through an operator opaque
to Inductor (:func:`recycled_weight_grad`); the dropout there is Inductor's. Set ``TIMM_MOEJET_CPU_FAST_PATH=0`` in the
environment, or call :func:`set_enabled`, to turn both off (the CPU then runs what every other device runs).
The figures that keep them are in docs/benchmarks.md ("CPU fast paths").
"""
import itertools
import os
import weakref
from typing import Any, Dict, Optional

import torch

from .expert_ops import fx_tracing

__all__ = ['enabled', 'set_enabled', 'applies', 'grad_recycler', 'dropout', 'lane_dropout_scale', 'GradRecycler',
           'recycled_weight_grad']

ENV_SWITCH = 'TIMM_MOEJET_CPU_FAST_PATH'
_enabled = os.environ.get(ENV_SWITCH, '1').strip() not in ('0', 'false', 'False', 'off')


def enabled() -> bool:
    """Whether the CPU fast paths are on (the default; ``TIMM_MOEJET_CPU_FAST_PATH=0`` turns them off)."""
    return _enabled


def set_enabled(flag: bool) -> bool:
    """Turn the CPU fast paths on or off for this process; returns the previous setting."""
    global _enabled
    previous, _enabled = _enabled, bool(flag)
    return previous


@torch.jit.unused
def applies(x: torch.Tensor) -> bool:
    """True where a fast path may run on ``x``: switched on, a CPU tensor, eager (not traced or compiled)."""
    return _enabled and not fx_tracing(x) and x.device.type == 'cpu' and not torch.compiler.is_compiling()


class GradRecycler:
    """Keeps the memory of one weight's gradient between train steps, and hands it to the next backward.

    The storage is reused only while nothing else holds it (``p.grad`` was set to None and no other tensor views it),
    so a gradient a caller kept from an earlier step never changes. With ``p.grad`` present (gradient accumulation) a
    second storage receives the new gradient, which autograd then adds into ``p.grad``. The owner calls
    :meth:`clear` when it leaves training or moves.
    """

    def __init__(self) -> None:
        self._storages: Dict[bool, torch.UntypedStorage] = {}
        self.key = next(_KEYS)  # how a compiled graph names this recycler (recycled_weight_grad)
        _RECYCLERS[self.key] = self

    def clear(self) -> None:
        self._storages.clear()

    def buffer(self, weight: torch.Tensor) -> torch.Tensor:
        """A tensor of ``weight``'s shape for its next gradient: recycled memory where free, else fresh."""
        return self.take(weight.shape, weight.dtype, weight.device, accumulating=weight.grad is not None)

    def take(self, shape: torch.Size, dtype: torch.dtype, device: torch.device, accumulating: bool) -> torch.Tensor:
        """A contiguous tensor of ``shape`` for a gradient: recycled memory where free, else fresh."""
        storage = self._storages.get(accumulating)
        nbytes = shape.numel() * dtype.itemsize
        if (storage is not None and storage.nbytes() == nbytes and storage.device == device
                and torch._C._storage_Use_Count(storage._cdata) == 1):
            return torch.empty(0, dtype=dtype, device=device).set_(storage, 0, shape)
        out = torch.empty(shape, dtype=dtype, device=device)
        self._storages[accumulating] = out.untyped_storage()
        return out

    def weight_grad(self, grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """grad^T @ x per expert (the gradient of the weight [E, out, in]), written into recycled memory."""
        if torch.compiler.is_compiling():
            return recycled_weight_grad(grad, x, self.key)
        return torch.bmm(grad.transpose(1, 2), x, out=self.buffer(weight))

    def __deepcopy__(self, memo: Dict[int, Any]) -> 'GradRecycler':
        return GradRecycler()  # memory, not state: a copy starts empty

    def __getstate__(self) -> Dict[str, Any]:
        return {'_storages': {}}

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__init__()


# the use count of a storage is a private query: without it (another torch), gradients are fresh every step
_RECYCLING = hasattr(torch._C, '_storage_Use_Count')


_KEYS = itertools.count()
_RECYCLERS: 'weakref.WeakValueDictionary[int, GradRecycler]' = weakref.WeakValueDictionary()


@torch.library.custom_op('timm_moejet::recycled_weight_grad', mutates_args=())
def recycled_weight_grad(grad: torch.Tensor, x: torch.Tensor, key: int) -> torch.Tensor:
    """grad^T @ x per expert into the memory of recycler ``key``: the compiled graph's form of
    :meth:`GradRecycler.weight_grad`, one operator Inductor calls as it is (its own would allocate afresh)."""
    shape = torch.Size((grad.shape[0], grad.shape[2], x.shape[2]))
    recycler = _RECYCLERS.get(key)
    out = recycler.take(shape, grad.dtype, grad.device, False) if recycler is not None else None
    return torch.bmm(grad.transpose(1, 2), x, out=out)


@recycled_weight_grad.register_fake
def _(grad: torch.Tensor, x: torch.Tensor, key: int) -> torch.Tensor:
    return grad.new_empty((grad.shape[0], grad.shape[2], x.shape[2]))


@torch.jit.unused
def grad_recycler(x: torch.Tensor, weight: torch.Tensor, recycler: GradRecycler) -> Optional[GradRecycler]:
    """``recycler`` where it may serve the weight gradient of this call (switched on, a CPU tensor, not fx-traced,
    the weight a leaf; eager or compiled), else None. Under autocast or with experts in another dtype the gradient
    comes through a cast, and ``batched_linear_with_grad`` leaves the recycler out itself."""
    usable = _enabled and not fx_tracing(x) and x.device.type == 'cpu'
    return recycler if _RECYCLING and weight.is_leaf and usable else None


_LANE_VALUES = 1 << 16  # a keep decision per 16-bit lane: four per 64-bit random word


@torch.jit.unused
def dropout(x: torch.Tensor, p: float) -> Optional[torch.Tensor]:
    """Lane-mask dropout of ``x`` in training; None where ``F.dropout`` applies instead (where no fast path
    :func:`applies`, and for p beyond the lanes' resolution)."""
    if not applies(x) or not 0 < round(p * _LANE_VALUES) < _LANE_VALUES:
        return None
    return x * lane_dropout_scale(x, p)


@torch.jit.unused
def lane_dropout_scale(x: torch.Tensor, p: float) -> torch.Tensor:
    """Dropout's multiplier for ``x``: 0 with probability ``p``, else the inverse of the keep probability.

    Drawn as 16-bit lanes of 64-bit random words: each lane is uniform on 65536 values and drops below
    ``round(p * 65536)``, so the drop probability is ``p`` to within 2**-17, and kept values are scaled by the inverse
    of the exact keep probability (the expectation stays exact). The random stream differs from ``nn.Dropout``'s.
    The multiplier is built in float (a bool mask is ~5x slower to multiply by here).
    """
    n = x.numel()
    drop_below = round(p * _LANE_VALUES)
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device).random_(-2 ** 63, None)
    lanes = words.view(torch.int16)[:n].view(x.shape)
    # compared in float32, which holds every lane exactly (bfloat16 would round them)
    keep = lanes.float().ge_(drop_below - _LANE_VALUES // 2).mul_(_LANE_VALUES / (_LANE_VALUES - drop_below))
    return keep if x.dtype == torch.float32 else keep.to(x.dtype)
