""" Optional dependencies, each behind a ``pip install`` extra: a missing one is named in one line. """
import importlib
from types import ModuleType

from .errors import MissingExtra

__all__ = ['require']


def require(module: str, extra: str, feature: str) -> ModuleType:
    """Import ``module`` for ``feature``, or raise ``MissingExtra`` saying which extra brings it.

    Args:
        module: The module to import (``pymetis``, ``sklearn.cluster``, ``matplotlib.figure`` ...).
        extra: The extra of timm-moejet that installs it (see pyproject.toml).
        feature: What needs it, for the message.
    """
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingExtra(f'{feature} needs {module.split(".")[0]}, which is not installed: '
                           f'pip install "timm-moejet[{extra}]"') from e
