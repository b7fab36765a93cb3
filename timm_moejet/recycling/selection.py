""" Index selection: which donor hidden units and channels each recycled expert keeps.

Every function returns a sorted ``LongTensor`` of shape [num_experts, k] with unique indices per row, and draws
its randomness only from the ``torch.Generator`` it is given, so a fixed seed gives bit-identical experts.
"""
from typing import List, Optional, Sequence

import torch

from ..errors import InvalidArgument

__all__ = ['uniform_indices', 'select_uniform', 'select_random', 'select_importance', 'select_from_parts',
           'subselect_uniform', 'map_blocks', 'BLOCK_MAPS']

BLOCK_MAPS = ('even', 'first')


def _check_k(population: int, k: int) -> None:
    if not 0 < k <= population:
        raise InvalidArgument(f'cannot select {k} of {population} donor units; need 0 < k <= {population}.')


def uniform_indices(population: int, k: int) -> torch.Tensor:
    """``round(linspace(0, population - 1, k))``: the released code's uniform selection (unique when k <= n)."""
    _check_k(population, k)
    return torch.linspace(0, population - 1, k, dtype=torch.float64).round().long()


def select_uniform(num_experts: int, population: int, k: int) -> torch.Tensor:
    """The same evenly spaced indices for every expert (so all experts start identical, as released)."""
    return uniform_indices(population, k).expand(num_experts, k).clone()


def select_random(num_experts: int, population: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """An independent uniformly random subset per expert."""
    _check_k(population, k)
    # argsort of iid uniforms is a random permutation per row, all experts in one call
    perm = torch.rand(num_experts, population, generator=generator, dtype=torch.float64).argsort(dim=1)
    return perm[:, :k].sort(dim=1).values


def select_importance(
        num_experts: int,
        importance: torch.Tensor,
        k: int,
        generator: torch.Generator,
) -> torch.Tensor:
    """Per expert, ``multinomial(importance / sum, k, replacement=False)``, sorted (the released sampler).

    Args:
        num_experts: Rows to draw.
        importance: Non-negative importance per donor unit [population].
        k: Units per expert.
        generator: Source of randomness.
    """
    population = importance.numel()
    _check_k(population, k)
    p = importance.detach().to(torch.float64).clamp_min(0)
    # units with zero importance can still be needed to fill k slots; give them a tiny floor
    positive = p[p > 0]
    floor = positive.min() * 1e-6 if positive.numel() else torch.tensor(1., dtype=torch.float64)
    p = torch.where(p > 0, p, floor)
    p = (p / p.sum()).expand(num_experts, population)
    idx = torch.multinomial(p, k, replacement=False, generator=generator)
    return idx.sort(dim=1).values


def select_from_parts(
        num_experts: int,
        parts: Sequence[torch.Tensor],
        part_weights: torch.Tensor,
        k: int,
        generator: torch.Generator,
        node_scores: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Per expert, sample whole parts (without replacement, probability proportional to ``part_weights``) until
    ``k`` units are covered; the last part drawn is cut to its highest-scoring nodes so the size is exactly k.

    Args:
        num_experts: Rows to draw.
        parts: Node indices of each part (a partition of 0..population-1).
        part_weights: Sampling weight per part (intra-part edge weight).
        k: Units per expert.
        generator: Source of randomness.
        node_scores: Score per node used to cut the last part (default: keep its lowest indices).
    """
    population = sum(int(p.numel()) for p in parts)
    _check_k(population, k)
    w = part_weights.detach().to(torch.float64).clamp_min(0)
    positive = w[w > 0]
    w = torch.where(w > 0, w, positive.min() * 1e-6 if positive.numel() else torch.tensor(1., dtype=torch.float64))
    if node_scores is not None:
        parts = [p[node_scores[p].argsort(descending=True, stable=True)] for p in parts]
    order = torch.multinomial(w.expand(num_experts, len(parts)), len(parts), replacement=False, generator=generator)
    out = torch.empty(num_experts, k, dtype=torch.long)
    for e in range(num_experts):
        chosen, size = [], 0
        for j in order[e].tolist():
            take = parts[j][:k - size]
            chosen.append(take)
            size += take.numel()
            if size == k:
                break
        out[e] = torch.cat(chosen).sort().values
    return out


def map_blocks(depth: int, donor_depth: int, how: str = 'even') -> List[int]:
    """Which of ``donor_depth`` donor blocks stands for each of ``depth`` model blocks.

    Args:
        depth: Blocks of the model.
        donor_depth: Blocks of the donor (>= depth).
        how: 'even': evenly spaced over the donor, ``round(linspace(0, donor_depth - 1, depth))`` (the identity at
            equal depth); 'first': the first ``depth`` blocks.
    """
    if donor_depth < depth:
        raise InvalidArgument(f'a donor of {donor_depth} blocks cannot give {depth} blocks.')
    if how == 'first':
        return list(range(depth))
    if how != 'even':
        raise InvalidArgument(f'block mapping must be one of {", ".join(BLOCK_MAPS)}, got {how!r}.')
    return uniform_indices(donor_depth, depth).tolist()


def subselect_uniform(indices: torch.Tensor, k: int) -> torch.Tensor:
    """Keep ``k`` evenly spaced columns of each (sorted) row: the released universal-expert shrink."""
    return indices[:, uniform_indices(indices.shape[1], k)]
