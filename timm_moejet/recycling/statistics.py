""" Activation statistics of a dense donor, and the data-free proxy used when there are none.

For every donor block ``i`` (blocks counted in forward order over the whole network, see ``timm_moejet.family``) two
points are measured, as in the released ``gen_ViT_MoE_weight.py``:

* ``blocks.i.hidden.*``: the MLP hidden units (output of the block's ``mlp.act``), used to pick expert hidden units;
* ``blocks.i.channel.*``: the MLP input channels (output of the norm feeding the MLP: ``norm2`` in a ViT), used to
  pick expert channels.

Each point stores, per unit and over every token of every image (class token included):
``l1`` = mean |x|, ``l2`` = sqrt(mean x^2) (the released default statistic), ``freq`` = fraction of x > 0, and
for hidden units ``coact`` = the fraction of tokens where both units are > 0 (diagonal zero), the co-activation
graph of the ``graph`` strategy. Sums are accumulated exactly, so the result does not depend on the batching
(the released code averaged per-batch norms instead; the ranking is the same up to batch-size effects).
"""
import hashlib
import json
import logging
import math
import os
import re
from typing import Any, Dict, Iterable, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
from safetensors import safe_open

from ..checkpoint_io import save_safetensors_atomic
from ..errors import DonorMismatch, InvalidArgument, InvalidCheckpoint, NotFound
from ..family import family_of_state_dict
from ..modes import eval_mode

__all__ = ['ActivationStats', 'collect_statistics', 'weights_hash', 'weight_proxy_statistics', 'METRICS']

_logger = logging.getLogger(__name__)

METRICS = ('l2', 'l1', 'freq')
FORMAT = 'timm_moejet.activation_stats.v1'
_KEY = re.compile(r'^blocks\.(\d+)\.(hidden|channel)\.(l1|l2|freq|coact)$')
# keys that do not change any block activation (heads, final norms) are left out of the donor hash
_HASH_SKIP = re.compile(r'^(head|fc_norm|norm|pre_logits|attn_pool)\.')


def weights_hash(state_dict: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over the donor tensors that shape the block activations (heads and final norms excluded).

    Tensors are hashed as float32 in key order, so a checkpoint and the model it was loaded into give the
    same hash whatever the file dtype.
    """
    h = hashlib.sha256()
    for key in sorted(state_dict):
        value = state_dict[key]
        if _HASH_SKIP.match(key) or not isinstance(value, torch.Tensor):
            continue
        h.update(f'{key}:{tuple(value.shape)};'.encode())
        h.update(value.detach().to('cpu', torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


class ActivationStats:
    """Per-block activation statistics of one dense donor, with that donor's identity.

    Attributes:
        tensors: ``blocks.{i}.{hidden|channel}.{l1|l2|freq|coact}`` -> tensor.
        architecture: Donor architecture (timm model name).
        hub_id: Donor hub id ('' if unknown).
        weights_hash: :func:`weights_hash` of the donor.
        num_tokens: Tokens the statistics were averaged over (0 for the data-free proxy).
        source: 'data' (measured) or 'weights-proxy' (data-free estimate).
    """

    def __init__(
            self,
            tensors: Mapping[str, torch.Tensor],
            architecture: str = '',
            hub_id: str = '',
            weights_hash: str = '',
            num_tokens: int = 0,
            source: str = 'data',
    ) -> None:
        bad = [k for k in tensors if not _KEY.match(k)]
        if bad:
            raise InvalidCheckpoint(f'ActivationStats: unexpected tensor names {bad[:5]}; expected '
                                    f'blocks.<i>.<hidden|channel>.<l1|l2|freq|coact>.')
        # own copies: callers may pass one tensor under several names, which safetensors cannot save
        self.tensors = {k: v.detach().to('cpu', torch.float32).clone() for k, v in tensors.items()}
        self.architecture = architecture
        self.hub_id = hub_id
        self.weights_hash = weights_hash
        self.num_tokens = int(num_tokens)
        self.source = source

    @property
    def blocks(self) -> Sequence[int]:
        """Donor block indices present."""
        return sorted({int(_KEY.match(k).group(1)) for k in self.tensors})

    def identity(self) -> Dict[str, Any]:
        """The donor identity and provenance (JSON-serialisable)."""
        return dict(architecture=self.architecture, hub_id=self.hub_id, weights_hash=self.weights_hash,
                    num_tokens=self.num_tokens, source=self.source)

    def describe(self) -> str:
        """One line naming the donor, for messages."""
        name = self.hub_id or self.architecture or 'unknown donor'
        return f'{name} (weights sha256 {self.weights_hash[:12] or "?"})'

    def get(self, block: int, point: str, metric: str) -> torch.Tensor:
        """One statistic, e.g. ``get(6, 'hidden', 'l2')``.

        Raises:
            InvalidCheckpoint: If it is missing (naming what is present).
        """
        key = f'blocks.{block}.{point}.{metric}'
        if key not in self.tensors:
            raise InvalidCheckpoint(f'activation statistics of {self.describe()} have no {key!r}; blocks '
                                    f'present: {list(self.blocks)}, metrics: '
                                    f'{sorted({k.split(".")[-1] for k in self.tensors})}.')
        return self.tensors[key]

    def validate(self, sizes: Mapping[int, Tuple[int, int]], need_coact: bool = False, metric: str = 'l2') -> None:
        """Check the statistics cover the donor blocks with their sizes and hold only finite, non-negative values.

        Args:
            sizes: Donor block -> (hidden units, channels) of its MLP.
            need_coact: The co-activation matrices must be there too.
            metric: The importance statistic that will be read.

        Raises:
            DonorMismatch: Naming a statistic whose shape is not the donor's.
            InvalidCheckpoint: Naming a statistic that is missing or holds NaN, inf or negative values.
        """
        for i, (hidden, channels) in sizes.items():
            wanted = [('hidden', metric, (hidden,)), ('channel', metric, (channels,))]
            if need_coact:
                wanted.append(('hidden', 'coact', (hidden, hidden)))
            for point, m, shape in wanted:
                t = self.get(i, point, m)
                if tuple(t.shape) != shape:
                    raise DonorMismatch(f'activation statistic blocks.{i}.{point}.{m} has shape {tuple(t.shape)}, '
                                        f'the donor needs {shape}: the statistics were made for another donor size.')
                if not bool(torch.isfinite(t).all()):
                    raise InvalidCheckpoint(f'activation statistic blocks.{i}.{point}.{m} holds NaN or inf values.')
                if bool((t < 0).any()):
                    raise InvalidCheckpoint(f'activation statistic blocks.{i}.{point}.{m} holds negative values.')

    def check_donor(self, donor: Union[nn.Module, Mapping[str, torch.Tensor]], donor_name: str = '') -> None:
        """Refuse statistics made for another donor.

        Args:
            donor: The donor model or its state dict.
            donor_name: How to name the donor in the message.

        Raises:
            DonorMismatch: If the donor's weights hash differs, naming both donors.
        """
        sd = donor.state_dict() if isinstance(donor, nn.Module) else donor
        digest = weights_hash(sd)
        if self.weights_hash and digest != self.weights_hash:
            if not donor_name and isinstance(donor, nn.Module):
                cfg = getattr(donor, 'pretrained_cfg', None) or {}
                donor_name = cfg.get('hf_hub_id') or cfg.get('architecture') or type(donor).__name__
            raise DonorMismatch(
                f'These activation statistics were made for donor {self.describe()}, not for '
                f'{donor_name or "the given donor"} (weights sha256 {digest[:12]}); collect statistics on this '
                f'donor or pass the matching file.')

    def save(self, path: Union[str, os.PathLike]) -> str:
        """Write the statistics and the donor identity to a safetensors file (atomically).

        The metadata is one entry holding sorted JSON: safetensors writes a metadata dict in hash order, so several
        entries would make identical statistics differ byte for byte between processes.
        """
        meta = {FORMAT: json.dumps(dict(identity=self.identity()), sort_keys=True)}
        save_safetensors_atomic(self.tensors, path, metadata=meta)
        return str(path)

    @classmethod
    def load(cls, path: Union[str, os.PathLike], donor_model: Optional[nn.Module] = None) -> 'ActivationStats':
        """Read statistics written by :meth:`save`.

        Args:
            path: The safetensors file.
            donor_model: If given, refuse statistics made for another donor.

        Raises:
            NotFound: If the file does not exist.
            InvalidCheckpoint: If it is not a statistics file; ``DonorMismatch`` if it was made for another donor.
        """
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise NotFound(f'activation statistics file not found: {path}')
        try:
            with safe_open(path, framework='pt') as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # safetensors raises several types on a bad header
            raise InvalidCheckpoint(f'{path} is not a readable safetensors statistics file ({e}).') from e
        if FORMAT not in meta:
            raise InvalidCheckpoint(f'{path} is not an activation statistics file (no {FORMAT!r} metadata; '
                                    f'found {sorted(meta)[:4]}).')
        try:
            ident = json.loads(meta[FORMAT])['identity']
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise InvalidCheckpoint(f'{path}: unreadable donor identity in the metadata ({e}).') from e
        if not isinstance(ident, dict):
            raise InvalidCheckpoint(f'{path}: the donor identity in the metadata is not a JSON object.')
        for key, kind in (('architecture', str), ('hub_id', str), ('weights_hash', str), ('source', str),
                          ('num_tokens', int)):
            value = ident.get(key)
            if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
                raise InvalidCheckpoint(f'{path}: the metadata entry {key!r} is a {type(value).__name__}, not a '
                                        f'{kind.__name__}; the file was altered.')
        digest = ident.get('weights_hash') or ''
        if digest and not re.fullmatch(r'[0-9a-f]{64}', digest):
            raise InvalidCheckpoint(f'{path}: the metadata entry \'weights_hash\' is not a sha256 digest; the file '
                                    f'was altered.')
        if isinstance(ident.get('num_tokens'), int) and ident['num_tokens'] < 0:
            raise InvalidCheckpoint(f'{path}: the metadata entry \'num_tokens\' is negative; the file was altered.')
        stats = cls(tensors, **{k: ident[k] for k in ('architecture', 'hub_id', 'weights_hash', 'num_tokens',
                                                        'source') if k in ident})
        if donor_model is not None:
            stats.check_donor(donor_model)
        return stats

    def __repr__(self) -> str:
        return f'ActivationStats(donor={self.describe()}, blocks={list(self.blocks)}, source={self.source!r})'


class _Accumulator:
    """Exact sums of |x|, x^2, [x > 0] (and co-activation) over tokens for one hook point."""

    def __init__(self, coact: bool) -> None:
        self.coact = coact
        self.n = 0
        self.sums: Dict[str, torch.Tensor] = {}

    def __call__(self, module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        x = output.detach().reshape(-1, output.shape[-1]).float()
        pos = (x > 0).float()
        parts = {'l1': x.abs().sum(0), 'l2': x.square().sum(0), 'freq': pos.sum(0)}
        if self.coact:
            # counts per batch are exact in float32 below 2**24 tokens; summed across batches in float64
            parts['coact'] = pos.t() @ pos
        for k, v in parts.items():
            v = v.double()
            self.sums[k] = self.sums[k] + v if k in self.sums else v
        self.n += x.shape[0]

    def result(self) -> Dict[str, torch.Tensor]:
        n = max(self.n, 1)
        out = {'l1': self.sums['l1'] / n, 'l2': (self.sums['l2'] / n).sqrt(), 'freq': self.sums['freq'] / n}
        if self.coact:
            c = self.sums['coact'] / n
            c.fill_diagonal_(0)
            out['coact'] = c
        return {k: v.float().cpu() for k, v in out.items()}


def _donor_blocks(donor_model: nn.Module) -> Sequence[Tuple[nn.Module, nn.Module]]:
    """The (MLP activation, MLP input norm) of every block of a dense donor model, of any registered family."""
    try:
        family = family_of_state_dict(donor_model.state_dict(), 'donor_model', type(donor_model).__name__)
    except DonorMismatch as e:
        raise InvalidArgument(f'donor_model must be a dense model of a supported family ({e}).') from None
    blocks = family.block_modules(donor_model)
    return [(getattr(b, family.mlp).act, getattr(b, family.mlp_input_norm)) for b in blocks]


def _hooked(donor_blocks: Sequence[Tuple[nn.Module, nn.Module]], blocks: Optional[Sequence[int]],
            coactivation: bool) -> Dict[str, '_Accumulator']:
    """An accumulator per measured point (``blocks.i.hidden``, ``blocks.i.channel``), not yet hooked in."""
    block_ids = list(range(len(donor_blocks))) if blocks is None else list(blocks)
    bad = [i for i in block_ids if not isinstance(i, int) or not 0 <= i < len(donor_blocks)]
    if bad:
        raise InvalidArgument(f'blocks {bad} are outside the donor depth; allowed 0..{len(donor_blocks) - 1}.')
    accs = {}
    for i in block_ids:
        act, norm = donor_blocks[i]
        accs[f'blocks.{i}.hidden'] = (act, _Accumulator(coactivation))
        accs[f'blocks.{i}.channel'] = (norm, _Accumulator(False))
    return accs


def _run_over(donor_model: nn.Module, loader: Iterable, max_batches: Optional[int], device: Union[str, torch.device],
              progress: bool) -> int:
    """Forward the loader's images through the donor (eval mode, no gradient) on ``device``, then put the donor
    back where it was; returns the batches run."""
    from tqdm import tqdm

    first = next(donor_model.parameters(), None)
    home = first.device if first is not None else torch.device('cpu')
    total = max_batches if max_batches is not None or not hasattr(loader, '__len__') else len(loader)
    num_batches = 0
    try:
        with eval_mode(donor_model.to(device)), torch.no_grad():
            for batch in tqdm(loader, total=total, disable=not progress, desc='activation statistics'):
                donor_model((batch[0] if isinstance(batch, (tuple, list)) else batch).to(device))
                num_batches += 1
                if max_batches is not None and num_batches >= max_batches:
                    break
    finally:
        donor_model.to(home)
    return num_batches


def collect_statistics(
        donor_model: nn.Module,
        loader: Iterable,
        *,
        max_batches: Optional[int] = None,
        device: Union[str, torch.device] = 'cpu',
        progress: bool = True,
        donor_id: Optional[str] = None,
        blocks: Optional[Sequence[int]] = None,
        coactivation: bool = True,
) -> ActivationStats:
    """Run a dense donor over a DataLoader and measure its per-block activation statistics.

    Args:
        donor_model: A dense timm model of a supported family (the donor whose MLPs will be recycled).
        loader: Yields ``(images, targets)`` or ``images`` batches, preprocessed for the donor.
        max_batches: Stop after this many batches (None: the whole loader).
        device: Where to run the donor.
        progress: Show a tqdm progress bar.
        donor_id: Hub id (or any name) of the donor, recorded with the statistics.
        blocks: Donor blocks to measure (default all).
        coactivation: Also measure the hidden-unit co-activation matrix (needed by the ``graph`` strategy).

    Returns:
        The statistics, carrying the donor's architecture, hub id and weights hash.

    Raises:
        InvalidArgument: If the donor is not a dense model of a supported family, ``max_batches`` or ``blocks`` is
            invalid, or the loader yields nothing.
    """
    donor_blocks = _donor_blocks(donor_model)
    if max_batches is not None and (isinstance(max_batches, bool) or not isinstance(max_batches, int)
                                    or max_batches < 1):
        raise InvalidArgument(f'max_batches must be a positive int or None, got {max_batches!r}.')
    accs = _hooked(donor_blocks, blocks, coactivation)
    handles = [module.register_forward_hook(acc) for module, acc in accs.values()]
    try:
        num_batches = _run_over(donor_model, loader, max_batches, device, progress)
    finally:
        for h in handles:
            h.remove()
    if num_batches == 0:
        raise InvalidArgument('the loader yielded no batches; activation statistics need at least one.')
    tensors = {f'{name}.{metric}': value for name, (_, acc) in accs.items() for metric, value in acc.result().items()}
    cfg = getattr(donor_model, 'pretrained_cfg', None) or {}
    return ActivationStats(
        tensors,
        architecture=str(cfg.get('architecture') or type(donor_model).__name__),
        hub_id=str(donor_id or cfg.get('hf_hub_id') or ''),
        weights_hash=weights_hash(donor_model.state_dict()),
        num_tokens=next(iter(accs.values()))[1].n if accs else 0,
        source='data',
    )


# Gauss-Hermite nodes for E[f(mu + sigma * z)], z ~ N(0, 1)
_GH_NODES, _GH_WEIGHTS = (torch.from_numpy(a) for a in np.polynomial.hermite_e.hermegauss(48))
_GH_WEIGHTS = _GH_WEIGHTS / math.sqrt(2 * math.pi)


def weight_proxy_statistics(
        state_dict: Mapping[str, torch.Tensor],
        blocks: Sequence[int],
        coactivation: bool = False,
        hub_id: str = '',
        architecture: str = '',
        weights_hash_value: Optional[str] = None,
) -> ActivationStats:
    """Data-free statistics estimated from the donor's weights alone (a Gaussian model of the MLP input).

    The norm output feeding block ``i``'s MLP is modelled as ``x_c = gamma_c * z_c + beta_c`` with
    independent ``z_c ~ N(0, 1)``. Then a channel's RMS (``l2``) is ``sqrt(gamma_c^2 + beta_c^2)``; a hidden
    unit's pre-activation is Gaussian with mean ``fc1.b + fc1.W @ beta`` and variance ``(fc1.W^2) @ gamma^2``,
    and its post-GELU ``l1``/``l2``/``freq`` are computed by Gauss-Hermite quadrature. The co-activation proxy is
    the positive part of the correlation between pre-activations, ``cos(W_h * gamma, W_h' * gamma)``.

    Args:
        state_dict: Dense state dict of a supported family (the MLP input norm and ``mlp.fc1`` of each block are
            read).
        blocks: Donor blocks to estimate.
        coactivation: Also build the co-activation proxy.
        hub_id: Donor hub id, recorded.
        architecture: Donor architecture, recorded.
        weights_hash_value: The donor's :func:`weights_hash` if already known.
    """
    family = family_of_state_dict(state_dict, 'donor', hub_id)
    prefixes = family.block_prefixes(list(state_dict))
    tensors = {}
    for i in blocks:
        norm = f'{prefixes[i]}{family.mlp_input_norm}'
        gamma = state_dict[f'{norm}.weight'].double()
        beta = state_dict[f'{norm}.bias'].double()
        w1 = state_dict[f'{prefixes[i]}{family.mlp_keys[0]}'].double()
        b1 = state_dict[f'{prefixes[i]}{family.mlp_keys[1]}'].double()
        tensors[f'blocks.{i}.channel.l2'] = (gamma.square() + beta.square()).sqrt()
        tensors[f'blocks.{i}.channel.l1'] = gamma.abs() * math.sqrt(2 / math.pi) + beta.abs()  # rough, |E| bound
        tensors[f'blocks.{i}.channel.freq'] = torch.special.ndtr(beta / gamma.abs().clamp_min(1e-12))
        mu = b1 + w1 @ beta
        scaled = w1 * gamma
        sigma = scaled.square().sum(1).sqrt().clamp_min(1e-12)
        a = mu[:, None] + sigma[:, None] * _GH_NODES[None, :]
        g = torch.nn.functional.gelu(a)
        tensors[f'blocks.{i}.hidden.l2'] = (g.square() @ _GH_WEIGHTS).clamp_min(0).sqrt()
        tensors[f'blocks.{i}.hidden.l1'] = g.abs() @ _GH_WEIGHTS
        tensors[f'blocks.{i}.hidden.freq'] = torch.special.ndtr(mu / sigma)
        if coactivation:
            unit = scaled / sigma[:, None]
            c = (unit @ unit.t()).clamp_min(0)
            c.fill_diagonal_(0)
            tensors[f'blocks.{i}.hidden.coact'] = c
    digest = weights_hash_value or weights_hash(state_dict)
    return ActivationStats(tensors, architecture=architecture, hub_id=hub_id, weights_hash=digest, num_tokens=0,
                           source='weights-proxy')
