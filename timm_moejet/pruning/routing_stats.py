""" Routing statistics as a file: the contribution of every expert of every MoE layer, measured over images.

A :class:`RoutingStatistics` records which model it measured (its name, its MoE configuration and a hash of its
router weights, :func:`router_hash`) and, per MoE layer, the contribution of every expert as
:func:`timm_moejet.diagnostics.router_diagnostics` defines it (the expert's share of the layer's output mass times
the number of experts; 1: an even share). It is written as JSON (:meth:`RoutingStatistics.save`, atomically) and
read back (:func:`load_routing`); pruning reads it to choose the experts to keep and refuses statistics of another
model (:meth:`RoutingStatistics.check_model`).
"""
import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Union

import torch
import torch.nn as nn

from ..checkpoint_io import write_json
from ..checkpoint_io.read import read_json
from ..diagnostics import LayerDiagnostics, moe_layers, router_diagnostics
from ..errors import InvalidArgument, InvalidCheckpoint, NotFound
from ..moe_keys import MOE_KEYS
from ..settings import integer, real

__all__ = ['RoutingStatistics', 'LayerRouting', 'measure_routing', 'routing_from_diagnostics', 'router_hash',
           'moe_config', 'load_routing', 'ROUTING_FORMAT']

ROUTING_FORMAT = 'timm-moejet routing statistics v1'


def _router_keys() -> tuple:
    """The router tensors of a layer, below its prefix (named by ``MOE_KEYS`` only)."""
    return MOE_KEYS.slot_queries, f'{MOE_KEYS.slot_norm}.', MOE_KEYS.temperature


def router_hash(model: nn.Module) -> str:
    """SHA-256 over the router tensors (slot queries, slot norm, temperatures) of every MoE layer:
    which trained router the statistics describe. Tensors are hashed as float32 with their names and shapes, so a
    copy on another device or in another dtype of the same values hashes the same."""
    from ..recycling.statistics import weights_hash

    return weights_hash({f'{block}:{name}': tensor for block, layer in moe_layers(model).items()
                         for name, tensor in layer.state_dict().items() if name.startswith(_router_keys())})


def moe_config(model: nn.Module) -> List[Dict[str, int]]:
    """Block, core and universal experts and slots per expert of every MoE layer, in block order."""
    return [dict(block=int(block), num_core=layer.num_core, num_univ=layer.num_univ,
                 slots_per_expert=layer.slots_per_expert) for block, layer in sorted(moe_layers(model).items())]


@dataclasses.dataclass(frozen=True)
class LayerRouting:
    """The measured contribution of every expert of one MoE layer (core experts first)."""
    block: int
    num_core: int
    num_univ: int
    slots_per_expert: int
    contribution: List[float]

    @property
    def core(self) -> List[float]:
        return self.contribution[:self.num_core]

    @property
    def univ(self) -> List[float]:
        return self.contribution[self.num_core:]

    @classmethod
    def from_diagnostics(cls, d: LayerDiagnostics, slots_per_expert: int) -> 'LayerRouting':
        return cls(d.block, d.num_core, d.num_univ, slots_per_expert, [float(c) for c in d.contribution])


@dataclasses.dataclass(frozen=True)
class RoutingStatistics:
    """Routing statistics of one model over some images.

    Attributes:
        model: The model's name as it was given (a timm name, a folder).
        architecture: The timm architecture it was built as.
        config: :func:`moe_config` of the model.
        router_hash: :func:`router_hash` of the model.
        images: What the images were, in words.
        num_images: How many images were measured (None: not counted).
        seed: The seed of the image subset.
        layers: One :class:`LayerRouting` per MoE layer, in block order.
    """
    model: str
    architecture: str
    config: List[Dict[str, int]]
    router_hash: str
    images: str
    num_images: Optional[int]
    seed: Optional[int]
    layers: List[LayerRouting]

    @property
    def digest(self) -> str:
        """SHA-256 of the statistics' JSON: names the statistics a pruned model was cut by."""
        return hashlib.sha256(json.dumps(self.as_dict(), sort_keys=True).encode()).hexdigest()

    def as_dict(self) -> Dict[str, Any]:
        out = dataclasses.asdict(self)
        return dict(format=ROUTING_FORMAT, **out)

    def save(self, path: Union[str, os.PathLike], overwrite: bool = True) -> Path:
        """Write the statistics as JSON, atomically."""
        return write_json(self.as_dict(), path, overwrite=overwrite)

    def check_model(self, model: nn.Module, name: str = 'the model') -> None:
        """Refuse a model these statistics were not measured on (another MoE configuration or router weights).

        Raises:
            InvalidArgument: If ``model`` has no MoE layer.
            InvalidCheckpoint: If its configuration or router hash differs from the recorded one.
        """
        if not moe_layers(model):
            raise InvalidArgument(f'{name} ({type(model).__name__}) has no SpheroMoE layer: only a MoE model has '
                                  f'experts to prune.')
        config = moe_config(model)
        if config != self.config:
            raise InvalidCheckpoint(f'the routing statistics were measured on {self.model} (MoE layers {self.config}), '
                                    f'not on {name} (MoE layers {config}); measure them on this model.')
        if router_hash(model) != self.router_hash:
            raise InvalidCheckpoint(f'the routing statistics were measured on {self.model}, whose router weights '
                                    f'differ from those of {name} (router hash {self.router_hash[:12]} vs '
                                    f'{router_hash(model)[:12]}); measure them on this model.')


def measure_routing(
        model: nn.Module,
        images: Union[torch.Tensor, Iterable],
        name: str = '',
        images_described: str = '',
        seed: Optional[int] = None,
        device: Optional[Union[str, torch.device]] = None,
) -> RoutingStatistics:
    """Measure the contribution of every expert of ``model`` over ``images`` (``router_diagnostics``, eval mode).

    Args:
        model: A MoE model.
        images: A batch, or an iterable of batches or ``(images, targets)`` pairs.
        name: How the model was named (recorded).
        images_described: What the images are, in words (recorded).
        seed: The seed of the image subset (recorded).
        device: Where to run (default: the model's device).
    """
    counted = [0]

    def counting(batches: Iterable) -> Iterable:  # streamed: the batches are never all in memory at once
        for batch in batches:
            counted[0] += int((batch[0] if isinstance(batch, (tuple, list)) else batch).shape[0])
            yield batch

    diagnostics = router_diagnostics(model, counting([images] if isinstance(images, torch.Tensor) else images),
                                     device=device)
    count = counted[0]
    return routing_from_diagnostics(model, diagnostics, name, images_described or f'{count} images', count, seed)


def routing_from_diagnostics(
        model: nn.Module,
        diagnostics: List[LayerDiagnostics],
        name: str = '',
        images_described: str = '',
        num_images: Optional[int] = None,
        seed: Optional[int] = None,
) -> RoutingStatistics:
    """The routing statistics of ``model`` from its ``router_diagnostics`` (no second pass over the images)."""
    layers = moe_layers(model)
    architecture = (getattr(model, 'pretrained_cfg', None) or {}).get('architecture') or type(model).__name__
    return RoutingStatistics(
        model=name or architecture, architecture=architecture, config=moe_config(model),
        router_hash=router_hash(model), images=images_described, num_images=num_images, seed=seed,
        layers=[LayerRouting.from_diagnostics(d, layers[d.block].slots_per_expert) for d in diagnostics])


def _check_layer(layer: LayerRouting) -> None:
    """Every entry of a layer as :func:`measure_routing` writes it (raises the settings' ``InvalidArgument``)."""
    integer(0)('block', layer.block)
    integer(0)('num_core', layer.num_core)
    integer(0)('num_univ', layer.num_univ)
    integer(1)('slots_per_expert', layer.slots_per_expert)
    if not isinstance(layer.contribution, list):
        raise InvalidArgument(f'contribution must be a list of numbers, got {type(layer.contribution).__name__}.')
    if len(layer.contribution) != layer.num_core + layer.num_univ:
        raise InvalidArgument(f'{len(layer.contribution)} contributions for {layer.num_core} + {layer.num_univ} '
                              f'experts.')
    for i, value in enumerate(layer.contribution):
        real(0.)(f'contribution[{i}]', value)


def _from_dict(data: Mapping[str, Any], path: str) -> RoutingStatistics:
    if not isinstance(data, dict) or data.get('format') != ROUTING_FORMAT:
        raise InvalidCheckpoint(f'{path} is not a routing statistics file of this version (format '
                                f'{data.get("format") if isinstance(data, dict) else None!r}, expected '
                                f'{ROUTING_FORMAT!r}); write it with weights-tools inspect --save-routing.')
    try:
        layers = [LayerRouting(**layer) for layer in data['layers']]
        fields = {f.name: data[f.name] for f in dataclasses.fields(RoutingStatistics) if f.name != 'layers'}
        stats = RoutingStatistics(layers=layers, **fields)
    except (KeyError, TypeError) as e:
        raise InvalidCheckpoint(f'{path}: routing statistics without the expected entries ({e}).') from e
    if not stats.layers or not isinstance(stats.router_hash, str):
        raise InvalidCheckpoint(f'{path}: routing statistics without layers or router hash; write them again with '
                                f'weights-tools inspect --save-routing.')
    for layer in stats.layers:
        try:
            _check_layer(layer)
        except InvalidArgument as e:
            raise InvalidCheckpoint(f'{path}: block {layer.block!r} of the routing statistics is damaged: {e} Write '
                                    f'them again with weights-tools inspect --save-routing.') from None
    described = [dict(block=layer.block, num_core=layer.num_core, num_univ=layer.num_univ,
                      slots_per_expert=layer.slots_per_expert) for layer in stats.layers]
    if described != stats.config:
        raise InvalidCheckpoint(f'{path}: the layers of the routing statistics ({described}) do not match their '
                                f'recorded MoE configuration ({stats.config}); write them again with weights-tools '
                                f'inspect --save-routing.')
    return stats


def load_routing(path: Union[str, os.PathLike]) -> RoutingStatistics:
    """Read routing statistics written by :meth:`RoutingStatistics.save`.

    Raises:
        NotFound: If there is no such file.
        InvalidArgument: If ``path`` is a folder.
        InvalidCheckpoint: If it is not valid routing statistics (entries missing or of the wrong type, a
            contribution that is not a finite number >= 0, layers that do not match the recorded configuration).
    """
    path = Path(path)
    if path.is_dir():
        raise InvalidArgument(f'routing statistics {path} is a folder; name the JSON file written by weights-tools '
                              f'inspect --save-routing.')
    if not path.is_file():
        raise NotFound(f'routing statistics {path} do not exist (write them with weights-tools inspect MODEL '
                       f'--images DIR --save-routing FILE).')
    return _from_dict(read_json(path), os.fspath(path))
