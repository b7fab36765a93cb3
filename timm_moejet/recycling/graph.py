""" Co-activation graph partitioning for the ``graph`` recycling strategy.

Vertices are a donor MLP's hidden units, edge weights their co-activation (how often both are active on the
same token). The graph is cut into ``num_parts`` parts with METIS (pymetis, the released method) or with
scikit-learn's spectral clustering; experts are then formed from whole parts sampled by intra-part weight.
"""
from typing import List, Tuple

import numpy as np
import torch

from ..errors import InvalidArgument
from ..extras import require

__all__ = ['GRAPH_METHODS', 'partition_graph', 'require_partitioner']

GRAPH_METHODS = ('metis', 'spectral')
# the package each method needs (both in the [graph] extra)
_PARTITIONER_MODULES = {'metis': 'pymetis', 'spectral': 'sklearn.cluster'}


def require_partitioner(method: str):
    """The module of a graph method, or ``MissingExtra`` naming the extra to install."""
    return require(_PARTITIONER_MODULES[method], 'graph', f'the graph strategy with graph_method {method}')
_EDGE_SCALE = 10000  # METIS takes integer edge weights


def _metis(weights: torch.Tensor, num_parts: int, seed: int) -> np.ndarray:
    pymetis = require_partitioner('metis')

    n = weights.shape[0]
    w = (weights / weights.max().clamp_min(1e-30) * _EDGE_SCALE).round().long()
    w = torch.maximum(w, w.t())  # METIS needs a symmetric graph
    w.fill_diagonal_(0)
    rows, cols = torch.nonzero(w, as_tuple=True)
    if rows.numel() == 0:  # no edges at all: contiguous blocks
        return (np.arange(n) * num_parts) // n
    starts = torch.zeros(n + 1, dtype=torch.long)
    starts[1:] = torch.bincount(rows, minlength=n).cumsum(0)
    options = pymetis.Options(seed=seed % (2 ** 31 - 1))
    kw = dict(eweights=w[rows, cols].numpy(), options=options)
    if hasattr(pymetis, 'CSRAdjacency'):
        _, parts = pymetis.part_graph(num_parts, pymetis.CSRAdjacency(starts.numpy(), cols.numpy()), **kw)
    else:  # pymetis < 2025.2
        _, parts = pymetis.part_graph(num_parts, xadj=starts.numpy(), adjncy=cols.numpy(), **kw)
    return np.asarray(parts)


def _spectral(weights: torch.Tensor, num_parts: int, seed: int) -> np.ndarray:
    SpectralClustering = require_partitioner('spectral').SpectralClustering

    a = weights.double()
    a = torch.maximum(a, a.t())
    a.fill_diagonal_(0)
    a = a / a.max().clamp_min(1e-30) + 1e-9  # keep the affinity graph connected
    a.fill_diagonal_(0)
    model = SpectralClustering(num_parts, affinity='precomputed', assign_labels='cluster_qr',
                               random_state=seed % (2 ** 32))
    return model.fit_predict(a.numpy())


def partition_graph(
        coact: torch.Tensor,
        num_parts: int,
        method: str = 'metis',
        seed: int = 0,
) -> Tuple[List[torch.Tensor], torch.Tensor]:
    """Partition a co-activation graph.

    Args:
        coact: Symmetric non-negative co-activation matrix [n, n] (diagonal ignored).
        num_parts: Number of parts (capped at n).
        method: 'metis' or 'spectral'.
        seed: Seed of the partitioner (METIS and spectral clustering are deterministic given it).

    Returns:
        The non-empty parts (sorted node indices each) and their intra-part weights (sum of edge weights
        inside the part).
    """
    if method not in GRAPH_METHODS:
        raise InvalidArgument(f'Unknown graph method {method!r}; valid methods are {", ".join(GRAPH_METHODS)}.')
    n = coact.shape[0]
    num_parts = min(num_parts, n)
    c = coact.detach().double().clamp_min(0).clone()
    c.fill_diagonal_(0)
    labels = _metis(c, num_parts, seed) if method == 'metis' else _spectral(c, num_parts, seed)
    labels = torch.as_tensor(labels, dtype=torch.long)
    _, labels = torch.unique(labels, return_inverse=True)  # drop empty parts
    order = torch.argsort(labels, stable=True)
    parts = list(torch.split(order, torch.bincount(labels).tolist()))
    onehot = torch.nn.functional.one_hot(labels).double()
    weights = ((onehot.t() @ c) * onehot.t()).sum(1) / 2  # sum of edge weights inside each part
    return parts, weights
