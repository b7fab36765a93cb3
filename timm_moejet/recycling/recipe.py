""" The recycling recipe: one object saying how dense donors become MoE weights, validated once.

Each field is a setting (default, check, doc); its ``create_model`` kwarg is ``recycle_<field>``. A pretrained tag of
a MoE model is a recipe (the tag's ``hf_hub_id`` is the trunk donor); ``create_model(..., recycle_seed=0)`` and the
command line override fields of it.
"""
import dataclasses
import os
from typing import Any, Callable, Dict, Iterable, List, Optional

from ..errors import InvalidArgument, InvalidArgumentType
from ..settings import SEED, Check, check_fields, choice, integer, kwarg_names, optional, path, setting
from .graph import GRAPH_METHODS
from .selection import BLOCK_MAPS
from .statistics import METRICS
from .strategies import STRATEGIES, Strategy, get_strategy, strategy_names

__all__ = ['RecyclingRecipe', 'DEFAULT_SEED', 'RECYCLE_KWARGS', 'check_strategy_reads']

DEFAULT_SEED = 3407  # the released gen_ViT_MoE_weight.py seed
TRUNK_FITS = ('copy', 'select')


def _donor_spec() -> Check:
    def fn(label: str, value: Any) -> Optional[str]:
        if value is None or value is False:  # False: what create_model passes on (timm drops None kwargs)
            return None
        if isinstance(value, os.PathLike):
            value = os.fspath(value)
        if not isinstance(value, str) or not value:
            raise InvalidArgumentType(f'{label} must be a Hub id, hf-hub:ORG/REPO, local-dir:FOLDER, a timm name '
                                      f'with its tag, a checkpoint file, or None/False (the trunk donor), got '
                                      f'{value!r}.')
        return value
    return Check('a timm name.tag, ORG/REPO, hf-hub:ORG/REPO, local-dir:FOLDER or a weights file; None (False in '
                 'create_model, which drops None kwargs): the trunk donor', fn)


@dataclasses.dataclass(frozen=True)
class RecyclingRecipe:
    """How dense donors become MoE weights. The trunk donor is not part of the recipe: it is the checkpoint being
    loaded (a tag's ``hf_hub_id``, an overlay file, or the state dict passed to ``recycle_state_dict``)."""
    experts: Optional[str] = setting(
        None, _donor_spec(), 'Expert donor whose MLPs are cut into experts (None: the trunk donor itself).',
        'recycle_experts')
    strategy: str = setting('importance', choice(strategy_names),
                            'How experts pick donor hidden units and channels (see STRATEGIES).', 'recycle_strategy')
    stats: Optional[str] = setting(
        None, optional(path()), 'Activation statistics file of the expert donor (weights-tools calibrate); None: '
        'the data-free proxy for strategies that need statistics.', 'recycle_stats')
    seed: int = setting(DEFAULT_SEED, SEED, 'Seed of the selection; the same seed gives '
                        'bit-identical weights.', 'recycle_seed')
    metric: str = setting('l2', choice(lambda: METRICS), 'Importance statistic: l2 (released), l1 or freq.',
                          'recycle_metric')
    graph_method: str = setting('metis', choice(lambda: GRAPH_METHODS),
                                'Partitioner of the graph strategy: metis (pymetis) or spectral (scikit-learn).',
                                'recycle_graph_method')
    graph_parts: int = setting(32, integer(2), 'Parts of the co-activation graph (graph strategy).',
                               'recycle_graph_parts')
    trunk_fit: str = setting('copy', choice(lambda: TRUNK_FITS),
                         'How the trunk donor gives the dense tensors: copy (same shapes, the released ViT recipe) '
                         'or select (Weight Selection: evenly spaced elements of a wider donor, the C-JetMoE-F '
                         'trunk).', 'recycle_trunk_fit')
    block_map: str = setting('even', choice(lambda: BLOCK_MAPS),
                             'Which block of a deeper expert donor gives the experts of each block: even (evenly '
                             'spaced over its depth) or first (its first blocks).', 'recycle_block_map')

    def __post_init__(self) -> None:
        check_fields(self)  # values only: files, donors and optional packages are checked when they are resolved
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        check_strategy_reads(self.strategy, [name for name in _readers() if getattr(self, name) != defaults[name]])

    @property
    def strategy_obj(self) -> Strategy:
        """The strategy object of the table."""
        return get_strategy(self.strategy)

    def describe(self) -> str:
        """One line for the pretrained cfg's description."""
        experts = self.experts or 'the trunk donor'
        return f'MoE Jetpack checkpoint recycling: experts from {experts}, strategy {self.strategy}, seed {self.seed}'

    def record_fields(self) -> Dict[str, Any]:
        """The settings that shaped the result: strategy, seed, the ones the strategy reads, a selected trunk."""
        fields = dict(strategy=self.strategy, seed=self.seed,
                      **{name: getattr(self, name) for name in self.strategy_obj.recipe_fields})
        if self.trunk_fit != 'copy':
            fields['trunk_fit'] = self.trunk_fit
        return fields


def _reads(strategy: Strategy) -> List[str]:
    """The recipe fields a strategy reads besides the seed (the statistics file when it reads statistics)."""
    return list(strategy.recipe_fields) + (['stats'] if strategy.needs_stats else [])


def _readers() -> Dict[str, List[str]]:
    """Recipe fields that some registered strategies read and others ignore -> the strategies that read each."""
    readers: Dict[str, List[str]] = {}
    for strategy in STRATEGIES.values():
        for name in _reads(strategy):
            readers.setdefault(name, []).append(strategy.name)
    return {name: found for name, found in readers.items() if len(found) < len(STRATEGIES)}


def check_strategy_reads(strategy: str, given: Iterable[str], label: Optional[Callable[[str], str]] = None) -> None:
    """Refuse settings given for a recipe whose strategy ignores them (``--graph-parts`` with ``uniform``): the
    result would not be what was asked for, and the record, which lists what the strategy read, would not show them.

    Args:
        strategy: The recipe's strategy.
        given: Names of the fields the caller set.
        label: How the caller named a field (default: its ``create_model`` kwarg, ``recycle_<field>``).

    Raises:
        InvalidArgument: Naming each ignored setting and the strategies that read it.
    """
    label = label or (lambda name: _KWARG_OF[name])
    readers = _readers()
    ignored = [name for name in given if name in readers and strategy not in readers[name]]
    if ignored:
        what = ' and '.join(f'{label(name)} (read only by {", ".join(readers[name])})' for name in ignored)
        them = 'them' if len(ignored) > 1 else 'it'
        raise InvalidArgument(f'strategy {strategy!r} ignores {what}; leave {them} out, or choose a strategy '
                              f'that reads {them}.')


# create_model kwarg -> recipe field
RECYCLE_KWARGS: Dict[str, str] = kwarg_names(RecyclingRecipe)
_KWARG_OF = {field: kwarg for kwarg, field in RECYCLE_KWARGS.items()}
# fields that name other files or repos: only a caller may set them, never a checkpoint's own config
NAMES_OTHER_SOURCES = ('experts', 'stats')
