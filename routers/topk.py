"""Plain top-k softmax router (MoLoRA / Switch-style)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moelora.balance import switch_loss, z_loss

from .base import Routing, router_logits, top_k


class TopKRouter(nn.Module):
    """``softmax(W_g x)`` → top-k → optional renormalisation, with Switch and z aux losses.

    Router weights live in float32 whatever the model dtype: routing decisions are brittle in
    low precision.

    Args:
        in_features: d_in.
        num_experts: E.
        top_k: k, 1 <= k <= E.
        renormalize: divide the kept probabilities by their sum.
        noise_std: Gaussian noise std on the logits in training (0 = off).
        aux_loss_coef: weight of :func:`~moelora.balance.switch_loss`.
        z_loss_coef: weight of :func:`~moelora.balance.z_loss`.
        init_std: router weights start N(0, init_std²).
    """

    def __init__(self, *, in_features: int, num_experts: int, top_k: int, renormalize: bool = True,
                 noise_std: float = 0.0, aux_loss_coef: float = 0.0, z_loss_coef: float = 0.0,
                 init_std: float = 0.02, generator: torch.Generator | None = None) -> None:
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k={top_k} must be in [1, num_experts={num_experts}]")
        self.num_experts, self.top_k = num_experts, top_k
        self.renormalize, self.noise_std = renormalize, noise_std
        self.aux_loss_coef, self.z_loss_coef = aux_loss_coef, z_loss_coef
        self.weight = nn.Parameter(torch.empty(num_experts, in_features, dtype=torch.float32))
        with torch.no_grad():
            self.weight.normal_(0.0, init_std, generator=generator) if init_std > 0 else self.weight.zero_()

    def logits(self, x: Tensor) -> Tensor:
        """``[T, d_in]`` → ``[T, E]`` logits, float32 (float64 after ``model.double()``)."""
        return router_logits(x, self.weight)

    def forward(self, x: Tensor, *, token_mask: Tensor | None = None) -> Routing:
        """Route ``x [T, d_in]``; ``token_mask [T]`` bool excludes padding from the aux losses."""
        logits = self.logits(x)
        if self.training and self.noise_std > 0:
            logits = logits + torch.randn_like(logits) * self.noise_std
        probs = logits.softmax(dim=-1)
        weights, expert_ids = top_k(probs, self.top_k)
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return Routing(expert_ids=expert_ids, weights=weights, probs=probs,
                       aux_loss=self._aux(logits, probs, expert_ids, token_mask))

    def _aux(self, logits: Tensor, probs: Tensor, expert_ids: Tensor, token_mask: Tensor | None) -> Tensor | None:
        if not self.training or (self.aux_loss_coef == 0 and self.z_loss_coef == 0):
            return None
        loss = logits.new_zeros(())
        if self.aux_loss_coef > 0:
            loss = loss + self.aux_loss_coef * switch_loss(probs, expert_ids, token_mask)
        if self.z_loss_coef > 0:
            loss = loss + self.z_loss_coef * z_loss(logits, token_mask)
        return loss

    def extra_repr(self) -> str:
        return f"in_features={self.weight.shape[1]}, num_experts={self.num_experts}, top_k={self.top_k}"
