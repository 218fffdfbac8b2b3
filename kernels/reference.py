"""Torch twins of the expert kernels: the oracle for every Triton kernel and the CPU fast path.

Dense-gated MoE-LoRA over a rank-major expert bank (design §3.5)::

    h = x Aᵀ                                        [T, R]
    G[t, c] = scale[e(c)] · Σ_j w[t, j] · [ids[t, j] == e(c)]      [T, R]
    y = (G ⊙ h) Bt                                  [T, d_out]

where ``e(c) = col_expert[c]`` is the expert that owns rank column ``c``. An id of ``-1`` never
matches a column, so a ``-1`` slot contributes nothing (and gets a zero weight gradient).

Every function here is plain differentiable-free torch: the autograd wiring lives in
:mod:`moelora.kernels.ops`.
"""

from __future__ import annotations

import torch
from torch import Tensor


def expert_gate(expert_ids: Tensor, weights: Tensor, num_experts: int) -> Tensor:
    """Scatter the routing slots into a dense per-expert gate.

    Args:
        expert_ids: ``[T, k]`` int, expert per slot, ``-1`` = empty slot.
        weights: ``[T, k]`` float, the gate weight of each slot.
        num_experts: E.

    Returns:
        ``[T, E]`` in ``weights.dtype``: ``gate[t, e] = Σ_j w[t, j] · [ids[t, j] == e]``.
    """
    valid = expert_ids >= 0
    gate = weights.new_zeros(expert_ids.shape[0], num_experts)
    return gate.scatter_add(1, expert_ids.clamp(min=0).long(), torch.where(valid, weights, 0))


def column_gate(expert_ids: Tensor, weights: Tensor, col_expert: Tensor, col_scale: Tensor,
                num_experts: int) -> Tensor:
    """The rank-column gate ``G_s`` (scale folded in).

    Args:
        expert_ids: ``[T, k]`` int, ``-1`` = empty slot.
        weights: ``[T, k]`` float.
        col_expert: ``[R]`` int64, owning expert of each rank column.
        col_scale: ``[R]`` float, the owning expert's output scale (alpha / r).
        num_experts: E.

    Returns:
        ``[T, R]``: ``G_s[t, c] = col_scale[c] · gate[t, col_expert[c]]``.
    """
    return expert_gate(expert_ids, weights, num_experts)[:, col_expert] * col_scale


def gated_lora_forward(x: Tensor, A: Tensor, Bt: Tensor, gate: Tensor) -> tuple[Tensor, Tensor]:
    """Forward of the dense-gated primitive.

    Args:
        x: ``[T, d_in]``.
        A: ``[R, d_in]`` rank-major down projections of all experts.
        Bt: ``[R, d_out]`` rank-major up projections (PEFT's ``lora_B`` transposed).
        gate: ``[T, R]`` column gate ``G_s`` from :func:`column_gate`.

    Returns:
        ``(y, h)``: ``y [T, d_out] = (G_s ⊙ x Aᵀ) Bt`` and ``h [T, R] = x Aᵀ`` (saved for backward).
    """
    h = x @ A.t()
    return (gate * h) @ Bt, h


def gated_lora_backward(grad_y: Tensor, x: Tensor, A: Tensor, Bt: Tensor, h: Tensor, gate: Tensor,
                        expert_ids: Tensor, col_expert: Tensor, col_scale: Tensor, num_experts: int,
                        *, need_x: bool = True, need_A: bool = True, need_Bt: bool = True,
                        need_w: bool = True) -> tuple[Tensor | None, ...]:
    """Backward of the dense-gated primitive.

    Args:
        grad_y: ``[T, d_out]``; the other tensors as in :func:`gated_lora_forward`.

    Returns:
        ``(grad_x [T, d_in], grad_A [R, d_in], grad_Bt [R, d_out], grad_w [T, k])``; an entry is
        ``None`` when its ``need_*`` flag is off.
    """
    du = grad_y @ Bt.t()                                   # [T, R]
    gdu = gate * du
    grad_x = gdu @ A if need_x else None
    grad_A = gdu.t() @ x if need_A else None
    grad_Bt = (gate * h).t() @ grad_y if need_Bt else None
    grad_w = None
    if need_w:
        # dL/dw[t, j] = scale_e · Σ_{c owned by e = ids[t, j]} du[t, c] · h[t, c]
        per_col = du * h * col_scale
        per_expert = per_col.new_zeros(per_col.shape[0], num_experts).index_add(1, col_expert, per_col)
        grad_w = per_expert.gather(1, expert_ids.clamp(min=0).long())
        grad_w = torch.where(expert_ids >= 0, grad_w, 0)
    return grad_x, grad_A, grad_Bt, grad_w


def naive_moe_lora(x: Tensor, A: Tensor, Bt: Tensor, expert_ids: Tensor, weights: Tensor,
                   ranks: list[int] | tuple[int, ...], scales: list[float] | Tensor) -> Tensor:
    """Per-token, per-slot loop: the slowest and most obviously correct oracle (tests only).

    Returns ``[T, d_out]``: ``Σ_j w[t, j] · scale_e · B_e A_e x_t`` over non-empty slots.
    """
    offsets = [0]
    for r in ranks:
        offsets.append(offsets[-1] + r)
    out = x.new_zeros(x.shape[0], Bt.shape[1])
    for t in range(x.shape[0]):
        for j in range(expert_ids.shape[1]):
            e = int(expert_ids[t, j])
            if e < 0:
                continue
            a, b = A[offsets[e]:offsets[e + 1]], Bt[offsets[e]:offsets[e + 1]]
            out[t] += weights[t, j] * float(scales[e]) * ((x[t] @ a.t()) @ b)
    return out
