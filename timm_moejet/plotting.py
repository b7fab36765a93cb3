""" The package's figures: a headless matplotlib figure, written as a PNG atomically. """
import io
import os
from typing import Any, Optional, Tuple, Union

from .extras import require

__all__ = ['new_figure', 'save_png']


def new_figure(feature: str, figsize: Tuple[float, float]) -> Any:
    """A standalone ``Figure`` on matplotlib's Agg canvas (headless; pyplot's global state and backend untouched).

    Args:
        feature: What draws it, named when matplotlib (the ``plot`` extra) is missing.
        figsize: Width and height in inches.
    """
    canvas = require('matplotlib.backends.backend_agg', 'plot', feature).FigureCanvasAgg
    fig = require('matplotlib.figure', 'plot', feature).Figure(figsize=figsize, layout='constrained')
    canvas(fig)
    return fig


def save_png(fig: Any, path: Optional[Union[str, os.PathLike]], dpi: int) -> bytes:
    """The figure's PNG bytes, also written to ``path`` atomically when given."""
    buf = io.BytesIO()
    fig.savefig(buf, format='png', dpi=dpi)
    data = buf.getvalue()
    if path is not None:
        from .checkpoint_io import atomic_write_bytes
        atomic_write_bytes(data, path, overwrite=True)
    return data
