""" The one donor loader: dense weights however they are named, and what is known of their architecture.

A donor is named by a timm name with its tag (``vit_small_patch16_224.augreg_in21k``, through the Hub cache),
``ORG/REPO`` or ``hf-hub:ORG/REPO``, ``local-dir:FOLDER`` or a folder in timm's Hub layout, or a weights file
(``.safetensors``, or ``.pth``/``.pt``/``.bin`` read with ``weights_only=True``). Recycling on load, the command
line and the Python API all load donors through :func:`load_donor`.
"""
import dataclasses
import os
from typing import Any, Dict, Optional

import timm
import torch
import torch.nn as nn
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import EntryNotFoundError
from timm.models import PretrainedCfg, resolve_pretrained_cfg, split_model_name_tag

from ..errors import InvalidArgument, InvalidCheckpoint, NotFound
from .hub import hub_errors_named, read_folder_config, read_hub_config
from .names import FOLDER_WEIGHT_NAMES, HF_HUB, PathLike, WeightSource, check_model_name, parse_source, split_revision
from .read import check_weights_file, folder_weights, read_state_dict

__all__ = ['Donor', 'load_donor', 'locate_donor']



@dataclasses.dataclass
class Donor:
    """Dense weights and what is known of their architecture.

    Attributes:
        name: How the donor was named (kept verbatim in records and messages).
        state_dict: The weights, training wrappers removed (as every read leaves them).
        architecture: timm model name, when the source says it (a timm name, a folder's config.json).
        model_args: Constructor kwargs from the source's config.json.
        pretrained_cfg: The source's pretrained cfg (input size, mean, std, ...) from its config.json.
    """
    name: str
    state_dict: Dict[str, torch.Tensor]
    architecture: Optional[str] = None
    model_args: Dict[str, Any] = dataclasses.field(default_factory=dict)
    pretrained_cfg: Dict[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_config(cls, name: str, state_dict: Dict[str, torch.Tensor], config: Dict[str, Any]) -> 'Donor':
        """A donor whose architecture, kwargs and data cfg come from a timm ``config.json``."""
        return cls(name, state_dict, config.get('architecture'),
                   dict(config.get('model_args') or {}), dict(config.get('pretrained_cfg') or {}))

    def build_model(self, architecture: Optional[str] = None) -> nn.Module:
        """A runnable, headless, eval-mode model holding these weights (loaded through the architecture's own
        pretrained filter, as timm would).

        Raises:
            InvalidArgument: If no architecture is known.
            InvalidCheckpoint: If the weights do not fit the architecture.
        """
        arch = architecture or self.architecture
        if not arch:
            raise InvalidArgument(f'donor {self.name} is a weights file: name its timm architecture (--donor-arch, '
                                  f'e.g. vit_tiny_patch16_224).')
        check_model_name(arch)
        kwargs = {k: v for k, v in self.model_args.items() if k not in ('num_classes', 'pretrained_cfg')}
        fields = {f.name for f in dataclasses.fields(PretrainedCfg)}
        overlay = {k: v for k, v in self.pretrained_cfg.items() if k in fields and k not in ('architecture', 'tag')}
        overlay['state_dict'] = self.state_dict
        try:
            model = timm.create_model(arch, pretrained=True, num_classes=0, **kwargs, pretrained_cfg_overlay=overlay)
        except RuntimeError as e:  # torch's load_state_dict: missing/unexpected keys, size mismatches
            first = str(e).strip().splitlines()
            raise InvalidCheckpoint(f'donor {self.name} does not fit {arch}: '
                                    f'{" ".join(line.strip() for line in first[:4])}') from e
        return model.eval()


@dataclasses.dataclass(frozen=True)
class _Located:
    """A donor's weight source, a timm name resolved to its Hub repository (and file, architecture)."""
    source: WeightSource
    filename: Optional[str] = None
    architecture: Optional[str] = None
    what: str = ''


def _resolve(spec: PathLike, role: str) -> _Located:
    """Read a donor name without loading anything (a timm name becomes its pretrained cfg's Hub repo)."""
    source = parse_source(spec, role)
    if source.kind == 'hub':
        return _Located(source, what=f'{role} {source.location!r}')
    if source.kind != 'timm':
        return _Located(source, what=f'{role} {source.name!r}')
    name = source.name
    arch = check_model_name(name)
    tag = split_model_name_tag(name)[1]
    try:
        cfg = resolve_pretrained_cfg(arch, pretrained_cfg=tag or None)
    except RuntimeError as e:  # timm: 'Invalid pretrained tag (...) for ...'
        raise InvalidArgument(f'{name}: {e}') from e
    if cfg is None or not cfg.hf_hub_id:
        raise NotFound(f'{name} has no pretrained weights on the Hub (timm knows no hf_hub_id for it); name a '
                       f'tagged checkpoint such as vit_tiny_patch16_224.augreg_in21k, a Hub repo or a file.')
    return _Located(WeightSource('hub', cfg.hf_hub_id, name), cfg.hf_hub_filename, arch,
                    f'{name} (Hub repository {cfg.hf_hub_id!r})')


def locate_donor(spec: PathLike, *, cache_dir: Optional[PathLike] = None, role: str = 'donor') -> str:
    """Make sure a donor can be loaded, cheaply: a path must exist, a Hub donor's weights file is fetched into the
    cache (offline: must already be there), and the weights file must be readable as its format
    (:func:`~timm_moejet.checkpoint_io.read.check_weights_file`: truncated, empty, a folder in its place). Lets a
    model entrypoint name a missing or damaged donor before it builds anything.

    Returns:
        The local path of the donor's weights (or folder).

    Raises:
        NotFound: Naming the donor, and whether the Hub was reachable.
        InvalidCheckpoint: Naming a damaged weights file.
    """
    located = _resolve(spec, role)
    source = located.source
    if source.kind != 'hub':
        check_weights_file(folder_weights(source.path) if source.kind == 'folder' else source.path)
        return source.location
    repo_id, revision = split_revision(source.location)
    names = [located.filename] if located.filename else list(FOLDER_WEIGHT_NAMES[:2])  # timm's order
    with hub_errors_named(located.what):
        for filename in names[:-1]:
            try:
                return os.fspath(check_weights_file(hf_hub_download(repo_id, filename, revision=revision,
                                                                     cache_dir=cache_dir)))
            except EntryNotFoundError:  # (offline: not cached) try the next name
                pass
        return os.fspath(check_weights_file(hf_hub_download(repo_id, names[-1], revision=revision,
                                                             cache_dir=cache_dir)))


def load_donor(spec: PathLike, *, cache_dir: Optional[PathLike] = None, role: str = 'donor') -> Donor:
    """Load dense donor weights, however they are named.

    Args:
        spec: A weights file (``.safetensors``, or ``.pth``/``.pt``/``.bin`` read with ``weights_only=True``), a
            folder in timm's Hub layout or ``local-dir:FOLDER``, ``hf-hub:ORG/REPO[@rev]`` or ``ORG/REPO``, or a
            timm name with its tag (``vit_small_patch16_224.augreg_in21k``; the Hub cache is used, offline too).
        cache_dir: Hugging Face cache folder (default: ``HF_HUB_CACHE``).
        role: What the donor is for, in messages ('trunk donor', 'expert donor', ...).

    Raises:
        NotFound: If the file, folder, repository or cached download does not exist (naming it).
        InvalidCheckpoint: If the weights cannot be read.
        InvalidArgument: If the name is none of the forms above.
    """
    name = os.fspath(spec) if isinstance(spec, os.PathLike) else spec
    located = _resolve(spec, role)
    source = located.source
    if source.kind == 'folder':
        return Donor.from_config(name, read_state_dict(source.path), read_folder_config(source.path))
    if source.kind == 'file':
        return Donor(name, read_state_dict(source.location))
    # a timm name's architecture is known from the name; a Hub repo's from its config.json, when it has one
    config = (read_hub_config(source.location, cache_dir) or {}) if located.architecture is None else {}
    with hub_errors_named(located.what):
        state_dict = read_state_dict(HF_HUB + source.location, filename=located.filename, cache_dir=cache_dir)
    if located.architecture is not None:
        return Donor(name, state_dict, located.architecture)
    return Donor.from_config(name, state_dict, config)
