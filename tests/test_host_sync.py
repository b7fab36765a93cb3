""" The MoE forward and backward never turn a tensor into a Python value (a host synchronisation on a GPU).

Checked on the CPU with a ``TorchDispatchMode`` that fails on every aten op that hands a value to the host
(``_local_scalar_dense``: ``.item()``, ``bool()``, ``int()``, ``float()``; ``is_nonzero``; data-dependent
``nonzero``, ``unique``, ``masked_select``) and a patched ``Tensor.tolist``: what ``torch.cuda.set_sync_debug_mode``
reports on a GPU, device-independent.
"""
import contextlib
from typing import Iterator, List

import pytest
import timm
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import timm_moejet  # noqa: F401  (registers the models)
from timm_moejet.layers import SpheroMoE

_HOST_VALUE_OPS = {
    torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default, torch.ops.aten.item.default,
    torch.ops.aten.nonzero.default, torch.ops.aten.nonzero_static.default, torch.ops.aten.masked_select.default,
    torch.ops.aten._unique2.default, torch.ops.aten.unique_dim.default, torch.ops.aten.unique_consecutive.default,
}


class HostValueError(AssertionError):
    pass


class _FailOnHostValues(TorchDispatchMode):

    def __init__(self) -> None:
        super().__init__()
        self.ops: List[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in _HOST_VALUE_OPS:
            raise HostValueError(f'{func} converts a tensor to a host value')
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def no_host_values(monkeypatch) -> Iterator[_FailOnHostValues]:
    def tolist(self):
        raise HostValueError('Tensor.tolist converts a tensor to host values')

    monkeypatch.setattr(torch.Tensor, 'tolist', tolist)
    with _FailOnHostValues() as mode:
        yield mode
    monkeypatch.undo()


def test_the_check_catches_a_host_value(monkeypatch):
    x = torch.randn(3)
    for convert in (lambda: x.sum().item(), lambda: bool(x.sum() > 0), lambda: torch.nonzero(x > 0),
                    lambda: x.tolist()):
        with pytest.raises(HostValueError):
            with no_host_values(monkeypatch):
                convert()


@pytest.mark.parametrize('amp', [False, True], ids=['fp32', 'bf16'])
@pytest.mark.parametrize('combine', ['entmax15', 'softmax'])
def test_layer_forward_backward_has_no_host_value(combine, amp, monkeypatch):
    # train mode with routing noise and expert dropout on, slots_per_expert 2: every branch of the layer
    torch.manual_seed(0)
    layer = SpheroMoE(48, num_core_experts=4, num_univ_experts=8, slots_per_expert=2, moe_combine=combine, drop=0.1,
                      drop_path=0.1)
    x = torch.randn(3, 17, 48, requires_grad=True)
    for train in (True, False):
        layer.train(train)
        with no_host_values(monkeypatch) as mode:
            with torch.autocast('cpu', dtype=torch.bfloat16, enabled=amp):
                out = layer(x)
            out.float().square().sum().backward()
        assert len(mode.ops) > 20  # the mode saw the layer's ops


@pytest.mark.parametrize('name', ['moejet_vit_test', 'moejet_convnext_test', 'moejet_mixer_test'])
def test_model_train_step_has_no_host_value(name, monkeypatch):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10).train()
    x = torch.randn(2, 3, 64, 64)
    with no_host_values(monkeypatch):
        model(x).logsumexp(-1).sum().backward()
