"""Activation checkpointing that replays each forward's routing context on recomputation.

A wrapped layer reads more than its input from the adapter state: the token mask (padding),
whether adapters are enabled, MeteoRA's task ids and forced routing; a FlyLoRA layer also changes
its balancing bias after each training forward. Activation checkpointing
recomputes a block in backward, after later forwards may have changed them; when two forwards
share one backward (contrastive pairs, summed micro-batches), forward 1's recomputation would read
forward 2's mask, so padding would take SiRA's capacity and count in the aux loss, and a backward
after a ``select_experts`` block would recompute with the learned gate. Each checkpointed call
therefore carries the :class:`ForwardContext` of the forward that made it into its recomputation:

* transformers' own checkpointing (``model.gradient_checkpointing_enable()``) needs nothing:
  ``inject`` wraps each layer's ``_gradient_checkpointing_func`` in :class:`ReplayingCheckpoint`.
* anything you checkpoint yourself (a block inside the model's forward, or the whole model):
  call :func:`checkpoint` where you would call ``torch.utils.checkpoint.checkpoint``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch.utils.checkpoint
from torch import Tensor, nn

from . import expert_space as space
from .state import AdapterState, get_state


#: ``select_experts`` routing: ``(router, layer name, model-wide expert weights)`` per gate.
Forcing = tuple[tuple[nn.Module, str, Tensor], ...]


@dataclass(frozen=True)
class ForwardContext:
    """What a wrapped layer reads from the adapter state besides its input, as one forward saw it.

    Attributes:
        mask: the token mask (``state.token_mask``).
        enabled: ``False`` inside :func:`moelora.disable_adapters`.
        task_ids: the ids :func:`moelora.set_task_ids` gave this forward (MeteoRA gate supervision).
        forcing: the :func:`moelora.select_experts` routing (see :func:`set_forcing`), or ``None``.
        saved: what layers that change state in a forward left for its recomputation, keyed by
            layer name (FlyLoRA: the balancing bias it routed with, before its update).
    """

    mask: Tensor | None
    enabled: bool
    task_ids: Tensor | None
    forcing: Forcing | None
    saved: dict[str, Tensor] = field(default_factory=dict, compare=False)

    @classmethod
    def capture(cls, state: AdapterState) -> ForwardContext:
        """The context of the forward in progress. A checkpoint reached while an enclosing
        checkpoint recomputes (outside the model's forward) belongs to that forward: its context."""
        if not state.in_forward and state.replay is not None:
            return state.replay
        return cls(state.token_mask, state.enabled, state.task_ids, state.forcing)


def set_forcing(state: AdapterState, forcing: Forcing | None) -> None:
    """Make ``forcing`` the forced routing in effect: ``(router, layer name, model-wide expert
    weights)`` entries; each router gets the weights of the experts its layer still has (the
    layer's numbering is read now, so a WeightLoRA disconnection in between is followed). Routers
    forced now and not named in ``forcing`` are released (``forced = None``)."""
    named = {id(router) for router, _, _ in forcing or ()}
    for router, _, _ in state.forcing or ():
        if id(router) not in named:
            router.forced = None
    for router, layer_name, weights in forcing or ():
        router.forced = space.to_layer(weights, space.layer_origin(state.config, layer_name))
    state.forcing = forcing


def _enter(state: AdapterState, ctx: ForwardContext) -> tuple:
    previous = (state.replay, state.enabled, state.task_ids, state.forcing)
    state.replay, state.enabled, state.task_ids = ctx, ctx.enabled, ctx.task_ids
    if ctx.forcing is not state.forcing:
        set_forcing(state, ctx.forcing)
    return previous


def _leave(state: AdapterState, previous: tuple) -> None:
    state.replay, state.enabled, state.task_ids, forcing = previous
    if forcing is not state.forcing:
        set_forcing(state, forcing)


class ReplayingCheckpoint:
    """Wraps a checkpoint function (``inner(function, *args, **kwargs)``, e.g. a transformers
    layer's ``_gradient_checkpointing_func``): each call runs ``function`` inside the
    :class:`ForwardContext` of the forward in progress, both then and when backward recomputes it,
    so the recomputation routes as that forward did even after later forwards or after
    :func:`moelora.disable_adapters` / :func:`moelora.select_experts` blocks have ended. A
    recomputation that runs the whole model's forward again (the model checkpointed at once) reads
    the mask that forward sets (:meth:`~moelora.state.AdapterState.mask_for`). ``unwrap`` puts the
    original function back."""

    def __init__(self, inner: Callable[..., Any], state: AdapterState) -> None:
        self.inner, self.state = inner, state

    def __call__(self, function, *args, **kwargs):
        state = self.state
        ctx = ForwardContext.capture(state)

        def run(*a, **k):
            previous = _enter(state, ctx)
            try:
                return function(*a, **k)
            finally:
                _leave(state, previous)
        return self.inner(run, *args, **kwargs)


def checkpoint(model: nn.Module, function: Callable[..., Any], *args, use_reentrant: bool = False,
               **kwargs) -> Any:
    """``torch.utils.checkpoint.checkpoint(function, *args, **kwargs)`` for a block of an injected
    ``model``, whose recomputation in backward routes as the forward that ran it did (its
    :class:`ForwardContext`: token mask, task ids, ``disable_adapters`` / ``select_experts``).

    Use it for anything you checkpoint yourself: a block inside the model's forward, or the
    whole model at once (transformers' ``gradient_checkpointing_enable`` is handled already). A
    plain ``torch.utils.checkpoint`` recomputes with whatever the last forward left, which is wrong
    when two forwards share one backward and their padding or task ids differ, or when backward
    runs after a ``disable_adapters`` / ``select_experts`` block has ended.

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
