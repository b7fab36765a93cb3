""" Sharded data parallelism for MoE Jetpack models with torch's FSDP2 (``torch.distributed.fsdp.fully_shard``).

A MoE model's parameters are almost all expert weights (``BatchedLinear``, [E, out, in]), and soft routing gives every
one of them a gradient in every step: DDP keeps the whole model, its gradients and its optimizer state on every rank.
:func:`shard_model` splits all of them over the ranks of a device mesh instead:

* one FSDP unit per expert group (the core and the universal experts of each SpheroMoE layer), one per SpheroMoE
  router (slot queries, slot norm, temperatures), one per block (ViT) or ConvNeXt block and stage, and the root; a unit
  is all-gathered just before its forward/backward and freed after, so at most a few units are ever whole at once;
* expert tensors are sharded evenly: on the expert axis (dim 0) when the world size divides the number of experts,
  otherwise on the first axis it divides (e.g. 98 experts on 8 ranks: the hidden or output axis), so no rank holds
  padding; when no axis of an expert weight divides, :func:`shard_model` refuses (``InvalidArgument``) before
  anything is sharded;
* mixed precision (``mixed_precision=True``): bf16 all-gathered parameters and compute, float32 gradient reductions
  and sharded float32 master weights; the routers stay float32 (their cosine logits feed the entmax threshold, see
  ``SpheroMoE``), run the forward under ``torch.autocast(dtype=torch.bfloat16)`` as timm's ``--amp`` does;
* ``torch.compile`` per block (``compile_backend``), before sharding, as torchtitan does: the FSDP2 hooks of a block
  (all-gather before, reshard after) stay outside its graphs, and the units inside it (experts, routers) split its
  graphs at their own hooks, so graphs and sharding units line up.
"""
import argparse
import dataclasses
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn as nn

from ..errors import InvalidArgument, InvalidArgumentType
from ..family import family_of_model
from ..layers.experts import BatchedExperts, BatchedLinear
from ..layers.sphero_moe import SpheroMoE

__all__ = ['ShardPlan', 'shard_model', 'plan_shards', 'expert_shard_dim', 'fsdp_units', 'local_numel',
           'init_device_mesh', 'compile_units', 'compile_blocks', 'check_compile_args']


def expert_shard_dim(shape: Sequence[int], world_size: int) -> Optional[int]:
    """The axis an expert tensor of ``shape`` is sharded on over ``world_size`` ranks: the expert axis (0) when
    ``world_size`` divides it, else the first axis it divides, else None (an even split is impossible)."""
    for dim, size in enumerate(shape):
        if size % world_size == 0:
            return dim
    return None


def local_numel(shape: Sequence[int], world_size: int, dim: int = 0) -> int:
    """Elements of the largest shard of a tensor of ``shape`` split on ``dim`` (FSDP2 chunks as ``torch.chunk``
    does: ceil(size / world) rows per rank, the last ranks holding fewer or none, padded in its buffers)."""
    if not shape:
        return 1
    rows = -(-shape[dim] // world_size)
    numel = 1
    for i, size in enumerate(shape):
        numel *= rows if i == dim else size
    return numel


@dataclasses.dataclass(frozen=True)
class ShardPlan:
    """Where every parameter of a model goes: its FSDP unit (module name, '' for the root) and shard axis."""
    world_size: int
    units: List[str]  # module names in the order they are wrapped (innermost first, the root '' last)
    shard_dims: Dict[str, int]  # parameter name -> axis it is split on (0 unless an expert needs another)

    def local_numel(self, model: nn.Module) -> int:
        """Parameter elements one rank holds (the largest shard of each parameter)."""
        return sum(local_numel(p.shape, self.world_size, self.shard_dims.get(n, 0))
                   for n, p in model.named_parameters())

    def largest_unit_numel(self, model: nn.Module) -> int:
        """Elements of the largest unit, gathered whole while it runs (its own parameters, not its inner units')."""
        sizes: Dict[str, int] = {}
        for name, p in model.named_parameters():
            owner = max((u for u in self.units if not u or name.startswith(u + '.')), key=len)
            sizes[owner] = sizes.get(owner, 0) + p.numel()
        return max(sizes.values())


def fsdp_units(model: nn.Module) -> List[str]:
    """The module names that become FSDP units (innermost first; the root, '', is added last).

    Expert groups, then SpheroMoE routers, then the units the model's family names (every block; a ConvNeXt's
    stages too).
    """
    family = family_of_model(model)
    if family is None:
        raise InvalidArgumentType(f'{type(model).__name__} is not a MoE Jetpack model of a registered family '
                                  f'(ViT, ConvNeXt, MLP-Mixer); shard_model knows those only.')
    experts, routers = [], []
    for name, module in model.named_modules():
        if isinstance(module, BatchedExperts):
            experts.append(name)
        elif isinstance(module, SpheroMoE):
            routers.append(name)
    if not experts:
        raise InvalidArgument(f'{type(model).__name__} has no experts (no SpheroMoE layer) to shard.')
    return experts + routers + family.fsdp_units(model)


def plan_shards(model: nn.Module, world_size: int) -> ShardPlan:
    """The sharding of ``model`` over ``world_size`` ranks, checked before anything is changed.

    Raises:
        InvalidArgument: ``world_size`` is not a positive int, or it divides no axis of some expert weight (the
            message names the layer and the world sizes that would work). Expert biases ([E, out], a thousandth of
            the bytes) and the dense parameters are split on dim 0, padded by FSDP2 where it does not divide.
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise InvalidArgument(f'world_size must be a positive int, got {world_size!r}.')
    shard_dims: Dict[str, int] = {}
    for name, module in model.named_modules():
        if not isinstance(module, BatchedLinear):
            continue
        weight = module.weight
        dim = expert_shard_dim(weight.shape, world_size)
        if dim is None:
            ok = sorted({d for size in weight.shape for d in range(1, size + 1) if size % d == 0})
            raise InvalidArgument(
                f'{world_size} ranks cannot shard the experts of {name} evenly: {world_size} divides no axis of its '
                f'weight {tuple(weight.shape)} (experts, out, in). World sizes that do: '
                f'{", ".join(map(str, ok[-12:]))} (and their divisors).')
        shard_dims[f'{name}.weight'] = dim
        if module.bias is not None:  # [E, out]: a thousandth of the weight's bytes, padded if nothing divides
            shard_dims[f'{name}.bias'] = expert_shard_dim(module.bias.shape, world_size) or 0
    return ShardPlan(world_size, fsdp_units(model) + [''], shard_dims)


def compile_units(model: nn.Module) -> List[str]:
    """The modules compiled one by one: the family's FSDP units that hold no other one (the blocks)."""
    family = family_of_model(model)
    if family is None:
        raise InvalidArgumentType(f'{type(model).__name__} is not a MoE Jetpack model of a registered family.')
    units = family.fsdp_units(model)
    return [u for u in units if not any(v.startswith(u + '.') for v in units)]


# torch.compile's documented modes (its docstring)
COMPILE_MODES = ('default', 'reduce-overhead', 'max-autotune', 'max-autotune-no-cudagraphs')


def check_compile_args(args: argparse.Namespace) -> None:
    """Refuse a ``--torchcompile`` backend torch does not have, or a mode Inductor does not know, before anything
    runs."""
    if args.torchcompile is None:
        if args.torchcompile_mode is not None:
            raise InvalidArgument(f'--torchcompile-mode {args.torchcompile_mode} needs --torchcompile.')
        return
    if args.torchcompile_mode is not None and args.torchcompile_mode not in COMPILE_MODES:
        raise InvalidArgument(f'--torchcompile-mode {args.torchcompile_mode} is not one of {", ".join(COMPILE_MODES)}.')
    backends = torch.compiler.list_backends(exclude_tags=())
    if args.torchcompile not in backends:
        raise InvalidArgument(f'--torchcompile {args.torchcompile}: torch has no such backend; use one of '
                              f'{", ".join(sorted(backends))} (inductor when given without a value).')


def compile_blocks(model: nn.Module, backend: str = 'inductor', mode: Optional[str] = None) -> List[str]:
    """Compile the forward of every block in place (its module, its name and its state dict keys stay as they
    are); returns the names compiled."""
    modules = dict(model.named_modules())
    names = compile_units(model)
    for name in names:
        modules[name].forward = torch.compile(modules[name].forward, backend=backend, mode=mode)
    return names


def init_device_mesh(device_type: Optional[str] = None):
    """A 1-D mesh over every rank of the default process group (``device_type``: 'cuda' when available, else
    'cpu')."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh as _init

    if not dist.is_initialized():
        raise InvalidArgument('torch.distributed is not initialised: run under torchrun (or call '
                              'torch.distributed.init_process_group) before building a device mesh.')
    device_type = device_type or ('cuda' if torch.cuda.is_available() else 'cpu')
    return _init(device_type, (dist.get_world_size(),), mesh_dim_names=('dp',))


def _check_mesh(model: nn.Module, mesh) -> None:
    if mesh.ndim != 1:
        raise InvalidArgument(f'shard_model takes a 1-D device mesh (data parallel), got {mesh.ndim} dimensions; '
                              f'slice it, e.g. mesh["dp"].')
    devices = {p.device.type for p in model.parameters()}
    if devices != {mesh.device_type}:
        raise InvalidArgument(
            f'the model is on {", ".join(sorted(devices))} but the mesh is on {mesh.device_type}: move the model to '
            f'the mesh\'s device first (model.to(device)), or build the mesh for {", ".join(sorted(devices))}.')


def shard_model(
        model: nn.Module,
        mesh=None,
        mixed_precision: bool = False,
        reshard_after_forward: bool = True,
        cpu_offload: bool = False,
        grad_checkpointing: bool = False,
        compile_backend: Optional[str] = None,
        compile_mode: Optional[str] = None,
) -> nn.Module:
    """Shard a MoE Jetpack model (of any registered family) in place with FSDP2 over a 1-D device mesh.

    Args:
        model: A MoE Jetpack model of a registered family, on the mesh's device type.
        mesh: A 1-D ``DeviceMesh`` (default: every rank of the process group, see :func:`init_device_mesh`).
        mixed_precision: bf16 parameters and compute, float32 gradient reductions (routers stay float32).
        reshard_after_forward: Free each unit's gathered parameters after its forward (less memory; the backward
            gathers them again). False keeps them until the backward (less traffic, more memory).
        cpu_offload: Keep the sharded parameters, gradients and optimizer step on the CPU (``CPUOffloadPolicy``);
            needs an accelerator mesh.
        grad_checkpointing: Recompute block activations in the backward (timm's ``set_grad_checkpointing``).
        compile_backend: ``torch.compile`` every block with this backend (e.g. 'inductor'), before sharding.
        compile_mode: The ``torch.compile`` mode.

    Returns:
        The same model, now an ``FSDPModule`` whose parameters are ``DTensor`` shards. Build the optimizer after
        this call (it must see the sharded parameters).

    Raises:
        InvalidArgument: A mesh that is not 1-D or not on the model's device, a world size that cannot shard the
            experts evenly, CPU offload on a CPU mesh. Nothing is changed when it raises.
    """
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard
    from torch.distributed.tensor import Shard

    mesh = mesh if mesh is not None else init_device_mesh()
    _check_mesh(model, mesh)
    if cpu_offload and mesh.device_type == 'cpu':
        raise InvalidArgument('cpu_offload moves shards from an accelerator to the CPU; this mesh is already on the '
                              'CPU.')
    plan = plan_shards(model, mesh.size())
    if grad_checkpointing:
        model.set_grad_checkpointing(True)
    if compile_backend:
        compile_blocks(model, compile_backend, compile_mode)

    names = {id(p): n for n, p in model.named_parameters()}
    placement: Callable[[nn.Parameter], Shard] = lambda p: Shard(plan.shard_dims.get(names.get(id(p), ''), 0))
    dense = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mixed_precision \
        else MixedPrecisionPolicy()
    router = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)
    common = dict(mesh=mesh, reshard_after_forward=reshard_after_forward, shard_placement_fn=placement,
                  offload_policy=CPUOffloadPolicy() if cpu_offload else OffloadPolicy())
    modules = dict(model.named_modules())
    for name in plan.units:
        module = modules[name]
        policy = router if isinstance(module, SpheroMoE) else dense
        fully_shard(module, mp_policy=policy, **common)
    return model
