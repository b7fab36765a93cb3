""" The experts cast each weight at most once per forward, never when it already is in the compute dtype, and move
their activations between dtypes once per expert group; their backward materialises no transposed copy.

Counted at the dispatcher (``TorchDispatchMode``): every ``aten._to_copy`` / ``aten.copy_`` / ``aten.clone`` whose
input is an expert parameter (by storage), and every such op in an expert group's forward. Autocast sits above the
Python dispatch key, so the casts it inserts are counted too. Counts are exact (no tolerance).
"""
from collections import Counter
from typing import Dict, List, Tuple

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from timm_moejet.layers import BatchedExperts, SpheroMoE, cast_experts

COPY_OPS = ('aten._to_copy', 'aten.copy_', 'aten.clone', 'aten.contiguous')


class _CopyCounter(TorchDispatchMode):
    """Counts copy-like ops: per expert parameter they read, and in all (op name, input dtype, output dtype)."""

    def __init__(self, params: List[Tuple[str, torch.Tensor]]) -> None:
        super().__init__()
        self.storages: Dict[int, str] = {p.untyped_storage().data_ptr(): n for n, p in params}
        self.of_params: Counter = Counter()
        self.all: List[Tuple[str, torch.dtype, torch.dtype]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = str(func.overloadpacket)
        src = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if src is not None and name in COPY_OPS:
            self.all.append((name, src.dtype, out.dtype if isinstance(out, torch.Tensor) else None))
            param = self.storages.get(src.untyped_storage().data_ptr())
            if param is not None:
                self.of_params[param] += 1
        return out


def _expert_params(module: torch.nn.Module) -> List[Tuple[str, torch.Tensor]]:
    return [(n, p) for n, p in module.named_parameters() if n.startswith(('core.', 'univ.', 'fc1.', 'fc2.'))]


@pytest.mark.parametrize('mode', ['eval', 'train'])
def test_each_expert_weight_is_cast_once_per_forward_under_autocast(mode):
    torch.manual_seed(0)
    layer = SpheroMoE(32, num_core_experts=3, num_univ_experts=5).train(mode == 'train')
    params = _expert_params(layer)
    assert len(params) == 8  # two groups, two linear layers each, weight and bias
    x = torch.randn(2, 9, 32)
    counter = _CopyCounter(params)
    with counter:
        with torch.autocast('cpu', dtype=torch.bfloat16), torch.set_grad_enabled(mode == 'train'):
            out = layer(x)
        if mode == 'train':
            out.float().sum().backward()  # the backward reads the cast weights it saved, never the parameters
    assert counter.of_params == Counter({n: 1 for n, _ in params})


@pytest.mark.parametrize('amp', [False, True])
def test_cast_experts_weights_are_never_cast(amp):
    torch.manual_seed(0)
    layer = SpheroMoE(32, num_core_experts=3, num_univ_experts=5).train()
    cast_experts(layer, torch.bfloat16)
    counter = _CopyCounter(_expert_params(layer))
    with counter:
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=amp):
            out = layer(torch.randn(2, 9, 32))
        out.float().sum().backward()
    assert not counter.of_params
    assert all(p.grad is not None and p.grad.dtype == torch.bfloat16 for _, p in _expert_params(layer))


def _expert_group_copies(experts: BatchedExperts, x: torch.Tensor, amp: bool) -> _CopyCounter:
    counter = _CopyCounter(_expert_params(experts))
    with counter, torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16, enabled=amp):
        experts(x)
    return counter


def test_activations_change_dtype_once_per_expert_group():
    torch.manual_seed(0)
    experts = BatchedExperts(4, 16, 24).eval()
    # autocast with float32 weights: the four parameters cast once each, the bf16 slots and hidden never
    counter = _expert_group_copies(experts, torch.randn(3, 4, 16, dtype=torch.bfloat16), amp=True)
    assert sorted(counter.all) == [('aten._to_copy', torch.float32, torch.bfloat16)] * 4
    assert sum(counter.of_params.values()) == 4
    # cast_experts without autocast: the float32 slots go to bf16 once and the outputs come back once
    cast_experts(experts, torch.bfloat16)
    counter = _expert_group_copies(experts, torch.randn(3, 4, 16), amp=False)
    assert sorted(counter.all, key=str) == [('aten._to_copy', torch.bfloat16, torch.float32),
                                            ('aten._to_copy', torch.float32, torch.bfloat16)]


def test_cast_experts_keeps_the_hidden_in_the_experts_dtype_with_the_same_values():
    """The hidden activations stay in bfloat16 between fc1 and fc2: in eval the result equals the per-linear cast
    (fc1's bf16 output rounded up to float32, GELU, rounded down again for fc2) exactly, tolerance 0."""
    torch.manual_seed(0)
    experts = BatchedExperts(4, 16, 24).eval()
    cast_experts(experts, torch.bfloat16)
    x = torch.randn(3, 4, 16)
    w1, b1, w2, b2 = experts.fc1.weight, experts.fc1.bias, experts.fc2.weight, experts.fc2.bias
    xe = experts.to_expert_major(x).bfloat16()
    h = torch.nn.functional.gelu(torch.baddbmm(b1.unsqueeze(1), xe, w1.transpose(1, 2)).float())
    ref = torch.baddbmm(b2.unsqueeze(1), h.bfloat16(), w2.transpose(1, 2)).float()
    with torch.no_grad():
        out = experts(x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, experts.from_expert_major(ref, 3), rtol=0, atol=0)


@pytest.mark.parametrize('compiled', [False, True])
def test_weight_gradient_comes_in_the_parameters_layout(compiled):
    """Eager and under torch.compile the weight gradient reaches autograd in the parameter's [E, out, in] layout,
    so the parameter keeps it as it is: no transposed copy into its strides. aot_eager keeps the check quick."""
    torch.manual_seed(0)
    experts = BatchedExperts(4, 16, 24).train()
    runner = torch.compile(experts, fullgraph=True, backend='aot_eager') if compiled else experts
    strides = {}
    for name, p in _expert_params(experts):
        p.register_hook(lambda g, name=name: strides.__setitem__(name, g.stride()))
    runner(torch.randn(3, 4, 16)).sum().backward()
    assert strides == {n: p.stride() for n, p in _expert_params(experts)}
