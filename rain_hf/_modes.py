"""Module-mode helpers shared by the passes that read a model (calibration features, evaluation)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def eval_mode(*models: torch.nn.Module) -> Iterator[None]:
    """Put models in eval mode (no dropout) for the block, then restore each module's own training flag.

    Example:
        >>> layer = torch.nn.Dropout(0.5)
        >>> with eval_mode(layer):
        ...     layer.training
        False
        >>> layer.training
        True
    """
    flags = [{m: m.training for m in model.modules()} for model in models]
    try:
        for model in models:
            model.eval()
        yield
    finally:
        for saved in flags:
            for module, flag in saved.items():
                module.training = flag
