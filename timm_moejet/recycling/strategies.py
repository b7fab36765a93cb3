""" Recycling strategies: how each expert picks its hidden units and channels from a donor MLP.

A strategy is an object in one table, :data:`STRATEGIES`. It says what it needs (activation statistics, the
co-activation graph, whether it copies the donor MLP whole) and how it picks indices; the recycling pipeline and
the command line read only these attributes, never the strategy's name. Adding a strategy is one
:func:`register_strategy` call::

    class FirstUnits(Strategy):
        name, doc = 'first', 'the first k units of the donor'
        def hidden(self, ctx, num, population, k):
            return torch.arange(k).expand(num, k)
    register_strategy(FirstUnits())
    timm.create_model('moejet_vit_tiny', pretrained=True, recycle_strategy='first')
"""
from typing import Dict, List, Optional, Tuple

import torch

from ..errors import InvalidArgument
from .graph import partition_graph, require_partitioner
from .selection import select_from_parts, select_importance, select_random, select_uniform
from .statistics import ActivationStats

__all__ = ['Strategy', 'SelectionContext', 'STRATEGIES', 'register_strategy', 'get_strategy']


class SelectionContext:
    """What a strategy may read while it selects for one MoE layer.

    Attributes:
        block: The donor block whose MLP is cut (statistics are looked up under this index).
        generator: The only source of randomness (seeded by the recipe), shared by the layers in order.
        stats: Activation statistics of the expert donor (None for strategies that need none).
        recipe: The whole :class:`~timm_moejet.recycling.recipe.RecyclingRecipe` (metric, graph options, seed).
        cache: Per-layer scratch space (the graph strategy keeps its partition here).
    """

    def __init__(self, block: int, generator: torch.Generator, stats: Optional[ActivationStats], recipe) -> None:
        self.block = block
        self.generator = generator
        self.stats = stats
        self.recipe = recipe
        self.cache: Dict[str, object] = {}

    def importance(self, point: str) -> torch.Tensor:
        """The recipe's importance metric of the donor's ``'hidden'`` units or input ``'channel'``s."""
        return self.stats.get(self.block, point, self.recipe.metric)


class Strategy:
    """Base class of recycling strategies.

    Attributes:
        name: The ``recycle_strategy`` / ``--strategy`` value.
        doc: One line for help texts and the docs.
        needs_stats: Reads per-unit importance (measured statistics, else the data-free proxy).
        needs_coactivation: Also reads the hidden-unit co-activation graph.
        copies_donor: Experts are whole copies of the donor MLP (so the donor must have the model's width and the
            core experts' hidden size).
        recipe_fields: Recipe settings the strategy reads besides the seed (recorded with the recipe).
    """
    name: str = ''
    doc: str = ''
    needs_stats: bool = False
    needs_coactivation: bool = False
    copies_donor: bool = False
    recipe_fields: Tuple[str, ...] = ()

    def hidden(self, ctx: SelectionContext, num: int, population: int, k: int) -> torch.Tensor:
        """Hidden units of ``num`` experts: a sorted LongTensor [num, k] of unique indices < population per row."""
        raise NotImplementedError

    def check_available(self, recipe) -> None:
        """Raise ``MissingExtra`` now if the strategy needs an optional package that is not installed."""

    def channels(self, ctx: SelectionContext, num: int, population: int, k: int) -> torch.Tensor:
        """Input/output channels of ``num`` experts when the donor is wider (population > k); same contract.
        By default the same rule as :meth:`hidden`."""
        return self.hidden(ctx, num, population, k)

    def __repr__(self) -> str:
        return f'{type(self).__name__}({self.name!r})'


class Upcycle(Strategy):
    name = 'upcycle'
    doc = 'every expert is a copy of the donor MLP (sparse upcycling); universal experts keep evenly spaced units'
    copies_donor = True

    def hidden(self, ctx: SelectionContext, num: int, population: int, k: int) -> torch.Tensor:
        if k != population:
            raise InvalidArgument(f'upcycle copies the donor MLP, so the expert needs all {population} donor units, '
                                  f'but it has {k}; use a donor of the expert size or another strategy.')
        return torch.arange(population).expand(num, population).clone()


class Uniform(Strategy):
    name = 'uniform'
    doc = 'the same evenly spaced units for every expert (all experts start identical, as released)'

    def hidden(self, ctx: SelectionContext, num: int, population: int, k: int) -> torch.Tensor:
        return select_uniform(num, population, k)


class Random(Strategy):
    name = 'random'
    doc = 'an independent uniformly random subset per expert'

    def hidden(self, ctx: SelectionContext, num: int, population: int, k: int) -> torch.Tensor:
        return select_random(num, population, k, ctx.generator)


class Importance(Strategy):
    name = 'importance'
    doc = 'per expert, units sampled without replacement in proportion to their activation (released default)'
    needs_stats = True
    recipe_fields = ('metric',)

    def hidden(self, ctx: SelectionContext, num: int, population: int, k: int) -> torch.Tensor:
        return select_importance(num, ctx.importance('hidden'), k, ctx.generator)

    def channels(self, ctx: SelectionContext, num: int, population: int, k: int) -> torch.Tensor:
        return select_importance(num, ctx.importance('channel'), k, ctx.generator)


class Graph(Importance):
    name = 'graph'
    doc = 'whole parts of the co-activation graph (METIS or spectral) per expert; channels by importance'
    needs_coactivation = True
    recipe_fields = ('metric', 'graph_method', 'graph_parts')

    def check_available(self, recipe) -> None:
        require_partitioner(recipe.graph_method)

    def hidden(self, ctx: SelectionContext, num: int, population: int, k: int) -> torch.Tensor:
        if 'parts' not in ctx.cache:  # one partition per layer, shared by its expert groups
            coact = ctx.stats.get(ctx.block, 'hidden', 'coact')
            ctx.cache['parts'] = partition_graph(coact, ctx.recipe.graph_parts, method=ctx.recipe.graph_method,
                                                 seed=ctx.recipe.seed)
        parts, weights = ctx.cache['parts']
        return select_from_parts(num, parts, weights, k, ctx.generator, node_scores=ctx.importance('hidden'))


STRATEGIES: Dict[str, Strategy] = {}


def register_strategy(strategy: Strategy) -> Strategy:
    """Add ``strategy`` to the table under ``strategy.name`` (replacing one of the same name)."""
    if not isinstance(strategy, Strategy) or not strategy.name:
        raise InvalidArgument(f'register_strategy needs a named Strategy instance, got {strategy!r}.')
    STRATEGIES[strategy.name] = strategy
    return strategy


def get_strategy(name: str) -> Strategy:
    """The strategy called ``name``; an ``InvalidArgument`` listing the valid names otherwise."""
    if not isinstance(name, str) or name not in STRATEGIES:
        raise InvalidArgument(f'Unknown recycling strategy {name!r}; valid strategies are {", ".join(STRATEGIES)}.')
    return STRATEGIES[name]


def strategy_names() -> List[str]:
    """The registered strategy names, in registration order."""
    return list(STRATEGIES)


for _strategy in (Upcycle(), Uniform(), Random(), Importance(), Graph()):
    register_strategy(_strategy)
