""" Sizes checked before allocating: a model whose tensors cannot fit the memory of its device is refused.

A size setting that is a typo (``core_hidden=1000000000``, ``img_size=10**9``, ``num_classes=10**12``) would make
torch try to allocate terabytes, and fail deep inside after a long wait or take the machine down. Every MoE family
builds through :func:`check_fits_device` first: the model is built on the meta device (no memory, a fraction of a
second), its parameter and buffer bytes are added up and compared with the memory the target device has. Builds on
the meta device are not checked. The number of blocks is bounded separately (:data:`MAX_BLOCKS`), because blocks are
built one by one in Python: a depth of 10**9 would take hours before any size could be compared.
"""
import os
from typing import Callable, Optional

import torch
import torch.nn as nn

from ..errors import InvalidArgument
from ..settings import integer

__all__ = ['MAX_BLOCKS', 'check_block_count', 'check_fits_device', 'device_memory', 'target_device']

# deeper than any ViT, ConvNeXt or MLP-Mixer (timm's deepest have 48 blocks); about 6 s to build on the meta device
MAX_BLOCKS = 1024

# the memory limit of this process's cgroup (a container), v2 then v1; 'max' or a huge number means none
_CGROUP_LIMITS = ('/sys/fs/cgroup/memory.max', '/sys/fs/cgroup/memory/memory.limit_in_bytes')


def check_block_count(name: str, value: object) -> int:
    """A number of blocks: an int in [1, MAX_BLOCKS] (checked before the meta build, which builds them one by one).

    Raises:
        InvalidArgumentType: If ``value`` is not an int.
        InvalidArgument: If it is out of range, saying why there is a bound.
    """
    count = integer(1)(name, value)
    if count > MAX_BLOCKS:
        raise InvalidArgument(f'{name} {count} is more blocks than any model of this kind has; at most {MAX_BLOCKS} '
                              f'are built (blocks are built one by one, so this many would take hours).')
    return count


def _host_memory() -> Optional[int]:
    """Physical memory, or the container's limit when lower; None where the system does not say."""
    try:
        total = os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows) or no such name
        return None
    for limit in _CGROUP_LIMITS:
        try:
            with open(limit) as f:
                text = f.read().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, int(text))
    return total


def device_memory(device: torch.device) -> Optional[int]:
    """Bytes of memory ``device`` has (the host's for the CPU, the card's for CUDA); None when unknown."""
    if device.type == 'cpu':
        return _host_memory()
    if device.type == 'cuda':
        try:
            index = device.index if device.index is not None else torch.cuda.current_device()
            return int(torch.cuda.get_device_properties(index).total_memory)
        except (RuntimeError, AssertionError, ValueError):  # no CUDA here: the build itself says so
            return None
    return None


def target_device(device: object) -> Optional[torch.device]:
    """The device a ``create_model(..., device=...)`` call builds on (torch's default device when not given); None
    when ``device`` is not one (the build reports it)."""
    if device is None:
        return torch.get_default_device()
    try:
        return torch.device(device)
    except (RuntimeError, TypeError):
        return None


def _gib(n: int) -> str:
    return f'{n / 2 ** 30:,.1f} GiB'


def check_fits_device(variant: str, build_on_meta: Callable[[], nn.Module], device: Optional[torch.device]) -> None:
    """Refuse a model whose parameters and buffers need more bytes than ``device`` has, before allocating them.

    Args:
        variant: The model name, for the message.
        build_on_meta: Builds the same model on the meta device.
        device: Where the model is to be built (None or meta: not checked).

    Raises:
        InvalidArgument: Naming the bytes needed, the memory there is and the largest tensor; or, for sizes no
            tensor can have, what torch said.
    """
    if device is None or device.type == 'meta':
        return
    try:
        model = build_on_meta()
    except (TypeError, RuntimeError, OverflowError) as e:  # sizes beyond int64: torch's and Python's "overflow"
        if 'overflow' not in str(e).lower():
            raise
        raise InvalidArgument(f'{variant}: the sizes given make a tensor too large to describe '
                              f'({str(e).strip().splitlines()[0]}); check the size settings.') from e
    memory = device_memory(device)
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    needed = sum(t.numel() * t.element_size() for t in tensors.values())
    if memory is not None and needed > memory:
        name, largest = max(tensors.items(), key=lambda item: item[1].numel())
        raise InvalidArgument(
            f'{variant}: its parameters need {_gib(needed)}, more than the {_gib(memory)} of memory of this machine\'s '
            f'{device.type} (the largest tensor: {name} {tuple(largest.shape)}); check the size settings, or build '
            f'it on the meta device (device="meta") to inspect it.')
