"""Activation checkpointing that replays each forward's token mask on recomputation.

A wrapped layer reads the token mask (padding) of the current forward from the adapter state.
Activation checkpointing recomputes a block in backward, after later forwards may have set
another mask; when two forwards share one backward (contrastive pairs, summed micro-batches),
forward 1's recomputation would read forward 2's mask, so padding would take SiRA's capacity and
count in the aux loss. Each checkpointed call therefore carries the mask of the forward that made
it into its recomputation:

* transformers' own checkpointing (``model.gradient_checkpointing_enable()``) needs nothing:
  ``inject`` wraps each layer's ``_gradient_checkpointing_func`` in :class:`ReplayingCheckpoint`.
* a block you checkpoint yourself inside the model's forward: call :func:`checkpoint` where you
  would call ``torch.utils.checkpoint.checkpoint``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch.utils.checkpoint
from torch import nn

from .state import AdapterState, get_state


class ReplayingCheckpoint:
    """Wraps a checkpoint function (``inner(function, *args, **kwargs)``, e.g. a transformers
    layer's ``_gradient_checkpointing_func``): each call runs ``function`` with ``state.replay``
    set to the token mask of the forward in progress (``None`` outside one), both then and when
    backward recomputes it. A recomputation that runs the whole model's forward again (the model
    checkpointed at once) reads the mask that forward sets instead
    (:meth:`~moelora.state.AdapterState.mask_for`). ``unwrap`` puts the original function back."""

    def __init__(self, inner: Callable[..., Any], state: AdapterState) -> None:
        self.inner, self.state = inner, state

    def __call__(self, function, *args, **kwargs):
        state = self.state
        replay = (state.token_mask,)

        def run(*a, **k):
            previous, state.replay = state.replay, replay
            try:
                return function(*a, **k)
            finally:
                state.replay = previous
        return self.inner(run, *args, **kwargs)


def checkpoint(model: nn.Module, function: Callable[..., Any], *args, use_reentrant: bool = False,
               **kwargs) -> Any:
    """``torch.utils.checkpoint.checkpoint(function, *args, **kwargs)`` for a block of an injected
    ``model``, whose recomputation in backward uses the token mask of the forward that ran it.

    Use it for blocks you checkpoint yourself inside the model's forward (transformers'
    ``gradient_checkpointing_enable`` is handled already). A plain ``torch.utils.checkpoint``
    recomputes with whatever mask the last forward left, which is wrong when two forwards share
    one backward and their padding differs.

    Args:
        model: the injected model (the one ``moelora.inject`` returned) that ``function`` is part of.
        function: the block to checkpoint; ``args`` / ``kwargs`` as for ``torch.utils.checkpoint``.
        use_reentrant: passed on; non-reentrant (the default here) keeps the aux loss in the
            autograd graph (see the README's "Activation checkpointing").

    Returns:
        ``function(*args, **kwargs)``, with its activations recomputed in backward.
    """
    wrapped = ReplayingCheckpoint(torch.utils.checkpoint.checkpoint, get_state(model))
    return wrapped(function, *args, use_reentrant=use_reentrant, **kwargs)
