""" The recipe's inputs, resolved once before a model is built: the expert donor and the activation statistics.

A :class:`~timm_moejet.recycling.recipe.RecyclingRecipe` names its inputs (a donor, a file); :func:`resolve_inputs`
locates, loads and checks them, so that a missing donor, a missing file or a missing optional package is named
before anything is built, and the pretrained filter works on what is in memory only.
"""
import dataclasses
import os
from typing import Dict, Optional, Union

import torch

from ..checkpoint_io.donors import load_donor
from .recipe import RecyclingRecipe
from .statistics import ActivationStats

__all__ = ['RecyclingInputs', 'resolve_inputs', 'load_statistics']


@dataclasses.dataclass(frozen=True)
class RecyclingInputs:
    """What a recipe names, loaded.

    Attributes:
        experts: The expert donor's state dict (None: the trunk donor gives the experts too).
        expert_id: How the expert donor was named (for messages and the record).
        stats: The activation statistics of the expert donor (None: none given).
    """
    experts: Optional[Dict[str, torch.Tensor]] = None
    expert_id: Optional[str] = None
    stats: Optional[ActivationStats] = None


def resolve_inputs(recipe: RecyclingRecipe, cache_dir: Optional[Union[str, os.PathLike]] = None) -> RecyclingInputs:
    """Locate, load and check what ``recipe`` names, once.

    Args:
        recipe: The recipe.
        cache_dir: Hugging Face cache folder of a Hub expert donor.

    Raises:
        MissingExtra: If the strategy needs an optional package that is not installed.
        NotFound: If the expert donor or the statistics file cannot be found.
        InvalidCheckpoint: If either cannot be read.
    """
    recipe.strategy_obj.check_available(recipe)
    stats = load_statistics(recipe)
    if recipe.experts is None:
        return RecyclingInputs(stats=stats)
    donor = load_donor(recipe.experts, cache_dir=cache_dir, role='expert donor')
    return RecyclingInputs(donor.state_dict, recipe.experts, stats)


def load_statistics(recipe: RecyclingRecipe) -> Optional[ActivationStats]:
    """The statistics file the recipe names, loaded (None: it names none).

    Raises:
        NotFound: If the file does not exist.
        InvalidCheckpoint: If it is not a statistics file.
    """
    return ActivationStats.load(recipe.stats) if recipe.stats is not None else None
