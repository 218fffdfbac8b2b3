"""The router contract (design §3.3): a router maps tokens to experts and never touches expert weights."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from torch import Tensor


@dataclass
class Routing:
    """Where one forward's tokens go.

    Attributes:
        expert_ids: ``[T, k]`` int64, chosen expert per slot; ``-1`` = no expert for this slot
            (dropped over capacity, below a threshold, padding).
        weights: ``[T, k]`` float, the gate weights actually applied (grad flows to the router).
        probs: ``[T, E]`` router probabilities (for aux losses and statistics), or ``None``.
        aux_loss: scalar tensor in the autograd graph (coefficients already applied), or ``None``.
        dropped: ``[E]`` int64 slots routed to each expert but dropped (capacity), or ``None``.
    """

    expert_ids: Tensor
    weights: Tensor
    probs: Tensor | None = None
    aux_loss: Tensor | None = None
    dropped: Tensor | None = None


class Router(Protocol):
    """What a layer needs from a router: an ``nn.Module`` with this forward."""

    num_experts: int
    top_k: int

    def __call__(self, x: Tensor, *, token_mask: Tensor | None = None) -> Routing:
        """Route ``x [T, d_in]``; ``token_mask [T] bool`` marks real (non-padding) tokens."""
        ...
