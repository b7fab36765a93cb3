""" Batched experts: many same-shaped MLPs applied with one matmul per linear layer. """
from typing import Type

import torch
import torch.nn as nn
from timm.layers import trunc_normal_

__all__ = ['BatchedLinear', 'BatchedExperts']


class BatchedLinear(nn.Module):
    """``num_experts`` independent linear layers, weights stacked as [E, out, in] (nn.Linear's layout per expert).

    Input is expert-major, [E, M, in]; one ``baddbmm`` computes all experts. Per-expert weights keep
    ``nn.Linear``'s [out, in] layout so a dense ``fc`` weight slice copies straight in, and the transposed
    view is handed to BLAS without a copy.
    """

    def __init__(
            self,
            num_experts: int,
            in_features: int,
            out_features: int,
            bias: bool = True,
            device=None,
            dtype=None,
    ) -> None:
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.num_experts = num_experts
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(num_experts, out_features, in_features, **dd))
        self.bias = nn.Parameter(torch.empty(num_experts, out_features, **dd)) if bias else None
        self.init_weights()

    def init_weights(self) -> None:
        # per-expert fan-in (the official kaiming init on the 3-D tensor used fan_in = out * in, far too small)
        trunc_normal_(self.weight, std=.02)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.transpose(1, 2)
        if self.bias is None:
            return torch.bmm(x, w)
        return torch.baddbmm(self.bias.unsqueeze(1), x, w)

    def extra_repr(self) -> str:
        return f'num_experts={self.num_experts}, in_features={self.in_features}, ' \
               f'out_features={self.out_features}, bias={self.bias is not None}'


class BatchedExperts(nn.Module):
    """A group of same-sized expert MLPs: fc1 -> act -> dropout -> fc2 -> dropout, batched over experts."""

    def __init__(
            self,
            num_experts: int,
            dim: int,
            hidden_features: int,
            slots_per_expert: int = 1,
            act_layer: Type[nn.Module] = nn.GELU,
            drop: float = 0.,
            bias: bool = True,
            device=None,
            dtype=None,
    ) -> None:
        """
        Args:
            num_experts: Number of experts in the group.
            dim: Input and output channels.
            hidden_features: Hidden units per expert.
            slots_per_expert: Slots each expert processes.
            act_layer: Activation between the two linear layers.
            drop: Dropout after the activation and after fc2 (as the released code).
            bias: Use biases.
        """
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.num_experts = num_experts
        self.hidden_features = hidden_features
        self.slots_per_expert = slots_per_expert
        self.fc1 = BatchedLinear(num_experts, dim, hidden_features, bias=bias, **dd)
        self.act = act_layer()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = BatchedLinear(num_experts, hidden_features, dim, bias=bias, **dd)
        self.drop2 = nn.Dropout(drop)

    def forward_expert_major(self, x: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x: Expert-major slot inputs [E, M, dim].

        Returns:
            Expert outputs [E, M, dim].
        """
        x = self.drop1(self.act(self.fc1(x)))
        return self.drop2(self.fc2(x))

    def forward(self, slots: torch.Tensor) -> torch.Tensor:
        """
        Args:
            slots: Slot inputs [B, E * slots_per_expert, dim], expert-major within the slot axis.

        Returns:
            Slot outputs of the same shape.
        """
        b, es, d = slots.shape
        s = self.slots_per_expert
        e = es // s
        # [B, E*s, D] -> [E, B*s, D]: a strided view when s == 1, which bmm consumes without a copy
        h = slots.reshape(b, e, s, d).transpose(0, 1).reshape(e, b * s, d)
        h = self.forward_expert_major(h)
        return h.reshape(e, b, s, d).transpose(0, 1).reshape(b, es, d)

    def macs_per_row(self) -> int:
        """Multiply-accumulates for one slot row through one expert."""
        return 2 * self.fc1.in_features * self.hidden_features
