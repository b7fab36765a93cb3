""" A fake, offline Hugging Face Hub cache with random-weight donors, for tests.

The folder layout is the one ``huggingface_hub.hf_hub_download`` reads (plain files, no blobs or symlinks)::

    <cache>/models--<org>--<repo>/refs/main                       # the commit hash
    <cache>/models--<org>--<repo>/snapshots/<commit>/config.json
    <cache>/models--<org>--<repo>/snapshots/<commit>/model.safetensors

Typical use in a test::

    from hub_cache import DenseDonor, build_hub_cache, offline_hub   # offline_hub is a pytest fixture

    def test_x(offline_hub):
        build_hub_cache(offline_hub, {'timm/vit_tiny_patch16_224.augreg_in21k': DenseDonor('vit_tiny_patch16_224')})
        model = timm.create_model('moejet_vit_tiny', pretrained=True)

``build_pretrained_tag_cache(root, model_names)`` builds every donor the registered moejet pretrained tags need
(for a subprocess such as timm's own suite, then set ``HF_HUB_CACHE=<root>`` and ``HF_HUB_OFFLINE=1`` in its
environment).
"""
import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, Iterable, Mapping, Optional, Union

import pytest
import torch
import torch.nn as nn

from timm_moejet.moe_keys import MOE_KEYS

__all__ = ['DenseDonor', 'build_hub_cache', 'add_repo_files', 'add_model_repo', 'dense_vit_state_dict',
           'use_offline_hub', 'offline_hub', 'pretrained_tag_repos', 'build_pretrained_tag_cache', 'repo_snapshot',
           'official_state_dict', 'small_dense_vit']

PathLike = Union[str, os.PathLike]


@dataclasses.dataclass(frozen=True)
class DenseDonor:
    """A random-weight dense timm model (a ViT unless ``architecture`` names another) in the real key layout.

    Attributes:
        architecture: timm model name, e.g. 'vit_small_patch16_224'.
        depth: Override the depth (None: the architecture's).
        num_classes: Head size; small by default to keep files small (the recycling filter never reads the head).
        seed: Seed of the random weights.
        model_kwargs: Further timm model kwargs (e.g. ``embed_dim``, ``img_size``) for reduced-size donors.
        exact: Draw every value from an integer RNG as ``k / 2**22`` (exactly representable, the same bits on every
            CPU), for references that are compared bit for bit across machines.
        model_class: Build the weights with this timm model class (dotted path) instead of the ``architecture``'s
            entrypoint, for reduced sizes an entrypoint does not take (timm's Mixer entrypoints fix their depth and
            width); the config still names ``architecture``.
    """
    architecture: str = 'vit_tiny_patch16_224'
    depth: Optional[int] = None
    num_classes: int = 10
    seed: int = 0
    model_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    exact: bool = False
    model_class: Optional[str] = None

    def kwargs(self) -> Dict[str, Any]:
        kw = dict(self.model_kwargs, num_classes=self.num_classes)
        if self.depth is not None:
            kw['depth'] = self.depth
        return kw


def dense_vit_state_dict(donor: DenseDonor) -> Dict[str, torch.Tensor]:
    """Random weights with the donor's exact key names and shapes (built on the meta device, then filled).

    Weights are N(0, 0.02), biases N(0, 0.02), LayerNorm weights 1 + N(0, 0.1): distinct everywhere, so equality
    checks cannot pass by accident.
    """
    import timm

    if donor.model_class:
        import importlib

        module, name = donor.model_class.rsplit('.', 1)
        model = getattr(importlib.import_module(module), name)(device='meta', **donor.kwargs())
    else:
        model = timm.create_model(donor.architecture, pretrained=False, device='meta', **donor.kwargs())
    g = torch.Generator().manual_seed(donor.seed)
    out = {}
    for key, value in model.state_dict().items():
        if donor.exact:  # integers: no vectorised transcendental whose last bit depends on the CPU
            t = torch.randint(-2 ** 18, 2 ** 18 + 1, value.shape, generator=g).float() / 2 ** 22
        else:
            t = torch.randn(value.shape, generator=g) * 0.02
        if 'norm' in key and key.endswith('.weight'):
            t = 1 + 5 * t
        out[key] = t
    return out


def repo_snapshot(cache: PathLike, repo_id: str) -> Path:
    """The snapshot folder of ``repo_id`` in ``cache`` (its commit is derived from the repo id)."""
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    return Path(cache) / ('models--' + repo_id.replace('/', '--')) / 'snapshots' / commit


def add_repo_files(cache: PathLike, repo_id: str, files: Mapping[str, Union[bytes, PathLike]]) -> Path:
    """Put files (bytes, or paths to copy) into ``repo_id``'s snapshot and point ``refs/main`` at it.

    Returns:
        The snapshot folder.
    """
    if repo_id.count('/') != 1:
        raise ValueError(f'repo_id must be "org/name", got {repo_id!r}.')
    snap = repo_snapshot(cache, repo_id)
    snap.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        if isinstance(content, bytes):
            (snap / name).write_bytes(content)
        else:
            shutil.copyfile(content, snap / name)
    refs = snap.parent.parent / 'refs'
    refs.mkdir(exist_ok=True)
    (refs / 'main').write_text(snap.name)
    return snap


def _add_dense_donor(cache: PathLike, repo_id: str, donor: DenseDonor) -> Path:
    from safetensors.torch import save_file

    sd = dense_vit_state_dict(donor)
    config = {
        'architecture': donor.architecture,
        'num_classes': donor.num_classes,
        'model_args': {k: v for k, v in donor.kwargs().items() if k != 'num_classes'},
        'pretrained_cfg': {'tag': repo_id.split('.')[-1] if '.' in repo_id else '', 'num_classes': donor.num_classes,
                           'custom_load': False, 'fixed_input_size': True, 'mean': [0.5] * 3, 'std': [0.5] * 3},
    }
    with tempfile.TemporaryDirectory() as tmp:
        save_file(sd, os.path.join(tmp, 'model.safetensors'))
        return add_repo_files(cache, repo_id, {
            'model.safetensors': os.path.join(tmp, 'model.safetensors'),
            'config.json': json.dumps(config).encode(),
        })


def add_model_repo(cache: PathLike, repo_id: str, model: nn.Module) -> Path:
    """Export a built model with timm's ``save_for_hf`` (safetensors + config.json) as ``repo_id``."""
    from timm.models import save_for_hf

    with tempfile.TemporaryDirectory() as tmp:
        save_for_hf(model, tmp, safe_serialization=True)
        return add_repo_files(cache, repo_id, {name: os.path.join(tmp, name) for name in os.listdir(tmp)})


def build_hub_cache(root: PathLike, repos: Mapping[str, Union[DenseDonor, nn.Module, Mapping[str, bytes]]]) -> Path:
    """Create (or extend) a fake Hub cache.

    Args:
        root: Cache folder (created if missing); use it as ``HF_HUB_CACHE``.
        repos: ``repo_id`` -> a :class:`DenseDonor` (random dense ViT), a model (exported with ``save_for_hf``), or
            ``{filename: bytes}``.

    Returns:
        The cache folder.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for repo_id, spec in repos.items():
        if isinstance(spec, DenseDonor):
            _add_dense_donor(root, repo_id, spec)
        elif isinstance(spec, nn.Module):
            add_model_repo(root, repo_id, spec)
        elif isinstance(spec, Mapping):
            add_repo_files(root, repo_id, spec)
        else:
            raise TypeError(f'repos[{repo_id!r}] must be a DenseDonor, a model or a files mapping, '
                            f'got {type(spec).__name__}.')
    return root


def use_offline_hub(monkeypatch: pytest.MonkeyPatch, cache: PathLike) -> Path:
    """Point huggingface_hub at ``cache`` and switch it offline for this test (both are read at call time)."""
    import huggingface_hub.constants as constants

    cache = Path(cache)
    cache.mkdir(parents=True, exist_ok=True)
    monkeypatch.setattr(constants, 'HF_HUB_CACHE', str(cache))
    monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', True)
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    monkeypatch.setenv('HF_HUB_CACHE', str(cache))
    return cache


@pytest.fixture
def offline_hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """An empty offline Hub cache folder in effect for the test; fill it with :func:`build_hub_cache`."""
    return use_offline_hub(monkeypatch, tmp_path / 'hf_cache')


# repo -> (architecture, seed offset of its random weights; fixed, so adding a repo changes no other donor)
_ARCH_OF_REPO = {
    'timm/vit_base_patch16_224.augreg_in21k': ('vit_base_patch16_224', 0),
    'timm/vit_small_patch16_224.augreg_in21k': ('vit_small_patch16_224', 1),
    'timm/vit_tiny_patch16_224.augreg_in21k': ('vit_tiny_patch16_224', 2),
    'timm/vit_large_patch16_224.augreg_in21k': ('vit_large_patch16_224', 3),
    'timm/convnext_tiny.fb_in22k': ('convnext_tiny', 4),
    'timm/mixer_b16_224.goog_in21k': ('mixer_b16_224', 5),
    'timm/mixer_l16_224.goog_in21k': ('mixer_l16_224', 6),
}


def pretrained_tag_repos(model_names: Optional[Iterable[str]] = None, seed: int = 0) -> Dict[str, DenseDonor]:
    """The dense donor repos the moejet pretrained tags need, as :class:`DenseDonor` specs.

    Args:
        model_names: ``name.tag`` (or ``name`` for its default tag); default every pretrained moejet tag.
        seed: Base seed of the random weights (each repo gets its own).

    Returns:
        ``repo_id`` -> DenseDonor at the full depth and width (recycling needs the model's depth).
    """
    import timm

    import timm_moejet  # noqa: F401  (registers the models and their recipes)
    from timm_moejet.family import FAMILIES

    names = list(model_names) if model_names is not None else timm.list_pretrained('moejet*')
    repos: Dict[str, DenseDonor] = {}
    for name in names:
        cfg = timm.models.get_pretrained_cfg(name)
        if cfg is None or not cfg.hf_hub_id:
            continue
        key = f'{cfg.architecture}.{cfg.tag}'
        wanted = [cfg.hf_hub_id]
        recipe = next((f.recipes[key] for f in FAMILIES.values() if key in f.recipes), None)
        if recipe is not None and recipe.experts:
            wanted.append(recipe.experts)
        for repo in wanted:
            if repo not in _ARCH_OF_REPO:
                raise ValueError(f'no fake donor recipe for {repo!r} (needed by {name}).')
            architecture, offset = _ARCH_OF_REPO[repo]
            repos[repo] = DenseDonor(architecture, seed=seed + offset)
    return repos


def build_pretrained_tag_cache(root: PathLike, model_names: Optional[Iterable[str]] = None) -> Path:
    """Build a cache with every donor the given (default: all) moejet pretrained tags need.

    Sizes at full depth with a 10-class head: vit_tiny 22 MB, vit_small 87 MB, vit_base 345 MB.
    """
    return build_hub_cache(root, pretrained_tag_repos(model_names))


def official_state_dict(state_dict: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """A MoE ViT's state dict under the official MoE Jetpack key names (the inverse of the import's renaming)."""
    official = {}
    for key, value in state_dict.items():
        for group in ('core', 'univ'):
            key = key.replace(f'.mlp.{group}.fc', f'.mlp.{group}_experts.vit_fc')
        key = key.replace(f'.mlp.{MOE_KEYS.slot_norm}.', '.mlp.slot_norm.')
        if key.endswith(f'.{MOE_KEYS.slot_queries}'):
            official[key.replace(MOE_KEYS.slot_queries, 'phi')] = value[None]
        elif key.endswith(f'.{MOE_KEYS.temperature}'):
            official[key.replace(MOE_KEYS.temperature, 'scales.0')] = value[0].exp()
            official[key.replace(MOE_KEYS.temperature, 'scales.1')] = value[1].exp()
        else:
            official[key] = value
    return official


def small_dense_vit(seed: int = 0, **kwargs: Any) -> nn.Module:
    """A small dense timm ViT (width 64, 4 blocks, 64 px, 3 classes) with seeded random weights, in eval mode."""
    import timm

    torch.manual_seed(seed)
    return timm.create_model('vit_tiny_patch16_224', embed_dim=64, depth=4, num_heads=2, img_size=64,
                             num_classes=3, **kwargs).eval()
