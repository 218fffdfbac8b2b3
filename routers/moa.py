"""MoA's block router: one weight per adapter type, sigmoid by default, optional token threshold.

Per transformer block, on the block's hidden state ``x [T, d]`` (research/methods.md §1.3, §1.5)::

    z = W x + b                                   swiglu_factor = 0 (linear)
    z = W2 (SiLU(W1 x) ⊙ W3 x)                    swiglu_factor = f > 0, hidden n·f, zero biases
    w = σ(z)  ∈ (0, 1)^n                          (or softmax(z), an option the paper ablates)

Soft MoA applies ``w`` as is. Sparse MoA keeps type ``t`` for token ``x`` only where
``w_t ≥ τ(x)``, with ``τ(x) = σ(w_τ·x + b_τ) · max_threshold`` (or the constant ``max_threshold``);
how the applied weight is formed, and whether ``τ`` learns, is ``threshold_grad``:

    none      w_t · m_t                      m = 1[w ≥ τ] has no gradient: τ never learns (the official code)
    adamole   (w_t − τ)·m_t / Σ_s (w_s − τ)·m_s   AdaMoLE's rule: τ learns through (w − τ)
    ste       w_t · m_t, forward             backward treats ∂m/∂(w − τ) = 1 (straight-through), on the
                                             tokens the expert ran for
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from moelora.kernels.ops import autocast_off

ACTIVATIONS = ("sigmoid", "softmax")
THRESHOLD_GRADS = ("none", "adamole", "ste")


def _uniform_linear(d_in: int, d_out: int, *, zero_bias: bool, generator: torch.Generator | None,
                    dtype: torch.dtype) -> nn.Linear:
    """``nn.Linear`` with PyTorch's default init (U(±1/√d_in) for weight and bias), drawn from
    ``generator`` in float32 on CPU so a seed gives the same router on every device and dtype."""
    layer = nn.Linear(d_in, d_out, dtype=dtype)
    bound = 1.0 / math.sqrt(d_in)
    with torch.no_grad():
        layer.weight.copy_(torch.rand(d_out, d_in, generator=generator) * (2 * bound) - bound)
        bias = torch.zeros(d_out) if zero_bias else torch.rand(d_out, generator=generator) * (2 * bound) - bound
        layer.bias.copy_(bias)
    return layer


@dataclass
class MoAGates:
    """One forward's weights for the ``n`` types of a block.

    Attributes:
        probs: ``[T, n]`` router weights ``w`` (differentiable; the statistics' mean weight).
        weights: ``[T, n]`` the weights the experts are scaled by (soft: ``w``; sparse: see
            module docstring; exactly 0 where a type is inactive).
        active: ``[T, n]`` bool, where each type runs (sparse), or ``None`` (soft: everywhere).
        threshold: ``[T, 1]`` the threshold ``τ`` (sparse), or ``None``.
    """

    probs: Tensor
    weights: Tensor
    active: Tensor | None = None
    threshold: Tensor | None = None
    _index: dict[int, Tensor] = field(default_factory=dict, repr=False)

    @property
    def num_tokens(self) -> int:
        return self.probs.shape[0]

    def index(self, t: int) -> Tensor | None:
        """``[n_t]`` int64 tokens where type ``t`` runs (cached), or ``None`` = every token.

        ``None`` also while ``torch.compile`` traces Sparse MoA: a token count that depends on the
        data would break the graph at every expert, so the compiled model runs each type on every
        token and :meth:`weight` zeroes the inactive ones (the same output and gradients)."""
        if self.active is None or torch.compiler.is_compiling():
            return None
        if t not in self._index:
            self._index[t] = self.active[:, t].nonzero().squeeze(1)
        return self._index[t]

    def weight(self, t: int) -> Tensor:
        """``[T]`` applied weight of type ``t``: where it is inactive exactly 0 *and without a
        gradient*, as if its tokens were skipped (``"ste"`` weights carry one there otherwise)."""
        w = self.weights[:, t]
        return w if self.active is None else torch.where(self.active[:, t], w, 0)


class MoARouter(nn.Module):
    """Block router of MoA: ``[T, d]`` hidden states → :class:`MoAGates` over ``n`` types.

    Args:
        in_features: d.
        num_types: n, the experts (types) of the block.
        swiglu_factor: 0 = linear router; ``f > 0`` = SwiGLU with hidden size ``n · f``.
        activation: ``"sigmoid"`` (MoA) or ``"softmax"``.
        sparse: apply the threshold (Sparse MoA).
        max_threshold: scale of ``τ`` (or its constant value with ``const_threshold``).
        const_threshold: ``τ = max_threshold`` for every token (no threshold network).
        threshold_grad: ``"none"`` | ``"adamole"`` | ``"ste"``; with ``"none"`` the threshold
            network is frozen (it would never receive a gradient).
        generator / dtype: init RNG and parameter dtype.
    """

    def __init__(self, *, in_features: int, num_types: int, swiglu_factor: int = 4, activation: str = "sigmoid",
                 sparse: bool = False, max_threshold: float = 0.5, const_threshold: bool = False,
                 threshold_grad: str = "none", generator: torch.Generator | None = None,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation={activation!r} is invalid: expected one of {ACTIVATIONS}")
        if threshold_grad not in THRESHOLD_GRADS:
            raise ValueError(f"threshold_grad={threshold_grad!r} is invalid: expected one of {THRESHOLD_GRADS}")
        self.num_types, self.swiglu_factor, self.activation = num_types, swiglu_factor, activation
        self.sparse, self.max_threshold, self.threshold_grad = sparse, float(max_threshold), threshold_grad
        if swiglu_factor > 0:
            hidden = num_types * swiglu_factor
            self.w1 = _uniform_linear(in_features, hidden, zero_bias=True, generator=generator, dtype=dtype)
            self.w3 = _uniform_linear(in_features, hidden, zero_bias=True, generator=generator, dtype=dtype)
            self.w2 = _uniform_linear(hidden, num_types, zero_bias=True, generator=generator, dtype=dtype)
        else:
            self.proj = _uniform_linear(in_features, num_types, zero_bias=False, generator=generator, dtype=dtype)
        self.threshold: nn.Linear | None = None
        if sparse and not const_threshold:
            self.threshold = _uniform_linear(in_features, 1, zero_bias=False, generator=generator, dtype=dtype)
            # The official rule gives τ no gradient; a frozen module says so (and DDP does not wait for it).
            self.threshold.requires_grad_(threshold_grad != "none")

    def logits(self, x: Tensor) -> Tensor:
        """``[T, n]`` router logits for ``x [T, d]``."""
        if self.swiglu_factor > 0:
            return self.w2(F.silu(self.w1(x)) * self.w3(x))
        return self.proj(x)

    def tau(self, x: Tensor) -> Tensor:
        """``[T, 1]`` token threshold ``σ(w_τ·x + b_τ) · max_threshold`` (or the constant)."""
        if self.threshold is None:
            return x.new_full((x.shape[0], 1), self.max_threshold)
        if self.threshold_grad == "none":
            with torch.no_grad():  # no gradient reaches τ in the official rule: keep no graph for it
                return torch.sigmoid(self.threshold(x)) * self.max_threshold
        return torch.sigmoid(self.threshold(x)) * self.max_threshold

    def forward(self, x: Tensor) -> MoAGates:
        """Route ``x [T, d]`` (adapter dtype) to the block's ``n`` types, in that dtype also under
        autocast: the sparse threshold ``(w - τ)`` and its renormalisation lose most of their bits
        in bf16 when w ≈ τ (threshold gradients were 20-54 % off under bf16 autocast)."""
        with autocast_off(x.device.type):
            return self._route(x)

    def _route(self, x: Tensor) -> MoAGates:
        z = self.logits(x)
        w = torch.sigmoid(z) if self.activation == "sigmoid" else torch.softmax(z, dim=-1)
        if not self.sparse:
            return MoAGates(probs=w, weights=w)
        tau = self.tau(x)
        active = w >= tau  # torch.ge, as the official code: a weight equal to τ runs
        return MoAGates(probs=w, weights=apply_threshold(w, tau, active, self.threshold_grad),
                        active=active, threshold=tau)

    def extra_repr(self) -> str:
        kind = f"swiglu x{self.swiglu_factor}" if self.swiglu_factor > 0 else "linear"
        sparse = (f", sparse: threshold {'const ' if self.threshold is None else ''}{self.max_threshold}, "
                  f"grad {self.threshold_grad!r}") if self.sparse else ""
        return f"types={self.num_types}, {kind}, {self.activation}{sparse}"


def apply_threshold(w: Tensor, tau: Tensor, active: Tensor, mode: str) -> Tensor:
    """Applied weights ``[T, n]`` from router weights ``w [T, n]``, threshold ``tau [T, 1]`` and
    ``active = w ≥ τ`` (see the module docstring for the three modes); exactly 0 where inactive."""
    m = active.to(w.dtype)
    if mode == "none":
        return w * m
    if mode == "ste":
        margin = w - tau
        # Forward: m exactly (a - a.detach() is exactly 0); backward: d m / d(w - τ) = 1.
        return w * (m + (margin - margin.detach()))
    if mode == "adamole":
        kept = (w - tau) * m
        # Every type below threshold: no expert runs, the sum is 0 and so are the weights.
        return kept / kept.sum(-1, keepdim=True).clamp_min(torch.finfo(w.dtype).tiny)
    raise ValueError(f"threshold_grad={mode!r} is invalid: expected one of {THRESHOLD_GRADS}")
