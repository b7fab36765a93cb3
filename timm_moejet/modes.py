""" A model's train/eval mode, switched for a while and always restored. """
import contextlib
from typing import Iterator

import torch.nn as nn

__all__ = ['eval_mode']


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Within: ``model`` in eval mode; on leaving, by any path, back in the mode it was in."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)
