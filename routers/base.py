"""The router contract (design §3.3): a router maps tokens to experts and never touches expert weights."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from moelora.kernels.ops import autocast_off


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


def router_logits(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``x [T, d_in] @ weight[E, d_in]ᵀ (+ bias)`` → ``[T, E]`` in at least float32.

    Routing is brittle in low precision, so the product runs in ``promote(weight.dtype, fp32)``:
    fp32 for the fp32 router weights that injection creates, and also after the user casts the
    whole model (``model.half()`` turns the router weight half; it is upcast here, not the logits
    downcast), float64 after ``model.double()``. Autocast is off here: it would run the product in
    bf16/fp16 despite the upcast operands."""
    dtype = torch.promote_types(weight.dtype, torch.float32)
    with autocast_off(x.device.type):
        return F.linear(x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype))


def top_k(values: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """``values.topk(k, dim=-1)`` for ``values [T, E]`` → ``(top [T, k], ids [T, k] int64)``, ties
    to the lowest index. ``torch.topk`` leaves the order of equal values unspecified (on CPU a
    zero-initialised router sent every token to experts 3 and 5 of 6), so routing would depend on
    the device and the build; this picks experts ``0..k-1`` there, as FlyLoRA's ranks do."""
    top, ids = torch.sort(values, dim=-1, descending=True, stable=True)  # equal values keep index order
    return top[:, :k], ids[:, :k]
