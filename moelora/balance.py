"""Load balancing: the auxiliary losses (in the autograd graph) and the checkpoint-recompute probe.

The routing-statistics tracker is :mod:`moelora.tracker`.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _masked_mean(values: Tensor, token_mask: Tensor | None) -> Tensor:
    """Mean over the token dim (dim 0) of ``values [T, ...]`` restricted to ``token_mask [T]``."""
    if token_mask is None:
        # Not values.mean(0): a forward with no tokens would make the loss NaN, not 0.
        return values.sum(0) / max(values.shape[0], 1)
    m = token_mask.to(values.dtype).view(-1, *([1] * (values.dim() - 1)))
    return (values * m).sum(0) / m.sum().clamp(min=1)


def switch_loss(probs: Tensor, expert_ids: Tensor, token_mask: Tensor | None = None) -> Tensor:
    """Switch / GShard load-balancing loss, top-k form: ``E · Σ_e f_e · P_e``.

    Args:
        probs: ``[T, E]`` router probabilities (differentiable).
        expert_ids: ``[T, k]`` chosen experts before any capacity drop (``-1`` ignored).
        token_mask: ``[T]`` bool, real tokens; padding is excluded from both f and P.

    Returns:
        Scalar; exactly 1 when routing and probabilities are uniform, larger when unbalanced.
    """
    num_experts = probs.shape[1]
    valid = expert_ids >= 0
    if token_mask is not None:
        valid = valid & token_mask.view(-1, 1)
    counts = torch.zeros(num_experts, device=probs.device, dtype=probs.dtype)  # masked, not indexed: no sync
    counts = counts.scatter_add(0, expert_ids.clamp(min=0).reshape(-1).long(), valid.reshape(-1).to(probs.dtype))
    f = counts / counts.sum().clamp(min=1)
    p = _masked_mean(probs, token_mask)
    return num_experts * (f.detach() * p).sum()


def z_loss(logits: Tensor, token_mask: Tensor | None = None) -> Tensor:
    """Router z-loss (ST-MoE): ``mean_t logsumexp(logits_t)²``; ``logits [T, E]``, in at least
    float32 (float64 logits stay float64)."""
    wide = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return _masked_mean(torch.logsumexp(wide, dim=-1) ** 2, token_mask)


def recomputing() -> bool:
    """True while autograd runs a backward pass (where checkpointed forwards are recomputed).

    Always False while ``torch.compile`` traces: a checkpoint inside a compiled region is
    recomputed from AOT autograd's saved graph, not by running this Python again, and the
    graph-task id cannot be traced (asking for it broke the graph at every wrapped layer)."""
    if torch.compiler.is_compiling():
        return False
    return torch._C._current_graph_task_id() != -1


def __getattr__(name: str):
    # LayerStats and LoadTracker lived here before moelora.tracker; old imports keep working.
    if name in ("LayerStats", "LoadTracker"):
        from . import tracker
        return getattr(tracker, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
