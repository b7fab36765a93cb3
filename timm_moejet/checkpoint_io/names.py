""" How weights are named: where they come from (weight sources) and which timm names exist.

A weight source is named as timm names one (``timm.create_model`` and ``load_state_dict_from_hf``):

* ``hf-hub:ORG/REPO[@REVISION]``, or a bare ``ORG/REPO``: a Hugging Face Hub repository;
* ``local-dir:FOLDER``, or a folder: a model folder in timm's Hub layout (``config.json`` + weights);
* a weights file (``.safetensors``, ``.pth``, ``.pt``, ``.bin``, ``.pth.tar``);
* anything else: a timm model name, optionally with its pretrained tag (``vit_small_patch16_224.augreg_in21k``).

:func:`parse_source` reads a name into a :class:`WeightSource`, looking only at the name and whether a path exists;
every reader of such names (donors, models, the command line) goes through it.
"""
import dataclasses
import difflib
import os
from pathlib import Path
from typing import Optional, Tuple, Union

import timm
from timm.models import split_model_name_tag

from ..errors import InvalidArgument, NotFound

__all__ = ['HF_HUB', 'LOCAL_DIR', 'WEIGHT_SUFFIXES', 'FOLDER_WEIGHT_NAMES', 'PathLike', 'WeightSource', 'parse_source',
           'split_revision', 'is_repo_id', 'check_model_name']

HF_HUB = 'hf-hub:'
LOCAL_DIR = 'local-dir:'
# suffixes of a weights file (``.tar`` for train.py's ``.pth.tar``); safetensors first, as timm prefers it
WEIGHT_SUFFIXES = ('.safetensors', '.pth', '.pt', '.bin', '.tar')
# file names of a model folder's weights, in timm's order of preference
FOLDER_WEIGHT_NAMES = ('model.safetensors', 'pytorch_model.bin', 'pytorch_model.pth', 'model.pth')

PathLike = Union[str, os.PathLike]


def check_model_name(name: str) -> str:
    """Refuse a model name timm does not know, suggesting close ones; returns the architecture (no tag)."""
    arch = split_model_name_tag(name)[0]
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=3)
        hint = f'; did you mean {", ".join(close)}?' if close else '; see timm.list_models().'
        raise InvalidArgument(f'unknown model name {name!r}{hint}')
    return arch


@dataclasses.dataclass(frozen=True)
class WeightSource:
    """A weight source, read from its name.

    Attributes:
        kind: 'hub' (a Hub repository), 'folder' (a model folder), 'file' (a weights file) or 'timm' (a timm model
            name, optionally with its tag).
        location: The repository id (``ORG/REPO[@REVISION]``), the path, or the timm name.
        name: The name as given.
    """
    kind: str
    location: str
    name: str

    @property
    def path(self) -> Path:
        """The folder or file of a local source."""
        return Path(self.location)

    def timm_name(self) -> str:
        """The name ``timm.create_model`` takes for it: ``hf-hub:``/``local-dir:`` for a repository or folder."""
        if self.kind == 'hub':
            return HF_HUB + self.location
        if self.kind == 'folder':
            return LOCAL_DIR + self.location
        return self.location


def split_revision(repo: str) -> Tuple[str, Optional[str]]:
    """``ORG/REPO@REVISION`` -> (``ORG/REPO``, ``REVISION``); no ``@``: revision None."""
    repo_id, _, revision = repo.partition('@')
    return repo_id, revision or None


def is_repo_id(name: str, org_required: bool = True) -> bool:
    """``ORG/REPO`` (or a bare ``REPO`` when not ``org_required``), optionally ``@REVISION``, without blanks."""
    repo_id = split_revision(name)[0] if isinstance(name, str) else ''
    parts = repo_id.split('/')
    return (len(parts) == 2 or (len(parts) == 1 and not org_required)) and all(parts) and \
        not any(c.isspace() for c in repo_id)


def parse_source(spec: PathLike, role: str = 'weights') -> WeightSource:
    """Read a weight source's name (nothing is loaded; a local path must exist).

    Args:
        spec: The name (see the module docstring), or a path.
        role: What the weights are for, in messages ('trunk donor', ...).

    Raises:
        InvalidArgument: If ``spec`` is empty, not a name, an ``hf-hub:`` name that is no repository id, or a
            ``local-dir:`` name of a file.
        NotFound: If a ``local-dir:`` folder, or something that can only be a file, does not exist.
    """
    name = os.fspath(spec) if isinstance(spec, (str, os.PathLike)) else spec
    if not isinstance(name, str) or not name:
        raise InvalidArgument(f'{role} must be a name or a path, got {spec!r}.')
    if name.startswith(HF_HUB):
        repo = name[len(HF_HUB):]
        if not is_repo_id(repo):
            raise InvalidArgument(f'{role} {name!r} is not a Hub repository id (ORG/REPO).')
        return WeightSource('hub', repo, name)
    if name.startswith(LOCAL_DIR):
        folder = name[len(LOCAL_DIR):]
        if os.path.isfile(folder):
            raise InvalidArgument(f'{role} {name} names a file; local-dir: takes a Hub folder (config.json + weights). '
                                  f'Name the file without local-dir:.')
        if not os.path.isdir(folder):
            raise NotFound(f'{role} folder {folder} does not exist.')
        return WeightSource('folder', folder, name)
    if os.path.isdir(name):
        return WeightSource('folder', name, name)
    if os.path.isfile(name):
        return WeightSource('file', name, name)
    if name.endswith(WEIGHT_SUFFIXES) or name.startswith(('/', '.', '~')):
        raise NotFound(f'{role} file {name} does not exist.')
    if name.count('/') == 1:
        if not is_repo_id(name):
            raise InvalidArgument(f'{role} {name!r} is not a Hub repository id (ORG/REPO).')
        return WeightSource('hub', name, name)
    if '/' in name or os.sep in name:
        raise NotFound(f'{role} file {name} does not exist.')
    return WeightSource('timm', name, name)
