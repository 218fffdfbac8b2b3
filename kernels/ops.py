"""Public expert ops: one ``autograd.Function`` each, with backend dispatch.

``backend="auto"`` uses the torch twin (:mod:`moelora.kernels.reference`) today; the Triton
kernels plug in behind the same signature. Only ``h = x Aᵀ`` (``[T, R]``) is saved for
backward, never a ``[T·k, d_out]`` tensor.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import reference

BACKENDS = ("auto", "torch", "triton")


def resolve_backend(backend: str, device: torch.device) -> str:
    """Pick the implementation for ``backend`` on ``device``: ``"torch"`` or ``"triton"``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is invalid: expected one of {BACKENDS}.")
    if backend == "triton":
        raise NotImplementedError(
            "backend='triton' is not available in this build: the Triton kernels are not shipped yet. "
            "Use backend='auto' or 'torch'.")
    return "torch"


class _GatedLoRAFn(torch.autograd.Function):
    """Dense-gated MoE-LoRA; gradients for x, A, Bt and the gate weights."""

    @staticmethod
    def forward(ctx, x, A, Bt, weights, expert_ids, col_expert, col_scale, num_experts):
        gate = reference.column_gate(expert_ids, weights, col_expert, col_scale, num_experts)
        y, h = reference.gated_lora_forward(x, A, Bt, gate)
        ctx.save_for_backward(x, A, Bt, h, weights, expert_ids, col_expert, col_scale)
        ctx.num_experts = num_experts
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, A, Bt, h, weights, expert_ids, col_expert, col_scale = ctx.saved_tensors
        # The gate is rebuilt (T·k scatter) instead of saved: it is as large as h.
        gate = reference.column_gate(expert_ids, weights, col_expert, col_scale, ctx.num_experts)
        need_x, need_A, need_Bt, need_w = ctx.needs_input_grad[:4]
        grad_x, grad_A, grad_Bt, grad_w = reference.gated_lora_backward(
            grad_y.to(h.dtype), x, A, Bt, h, gate, expert_ids, col_expert, col_scale, ctx.num_experts,
            need_x=need_x, need_A=need_A, need_Bt=need_Bt, need_w=need_w)
        if grad_w is not None:
            grad_w = grad_w.to(weights.dtype)
        return grad_x, grad_A, grad_Bt, grad_w, None, None, None, None


def gated_lora(x: Tensor, A: Tensor, Bt: Tensor, expert_ids: Tensor, weights: Tensor,
               col_expert: Tensor, col_scale: Tensor, *, num_experts: int,
               backend: str = "auto") -> Tensor:
    """Mixture of LoRA experts with explicit token routing (dense-gated formulation).

    Args:
        x: ``[T, d_in]`` expert input, in the adapter dtype.
        A: ``[R, d_in]`` stacked down projections, ``R = Σ_e r_e`` (rank 0 experts own no rows).
        Bt: ``[R, d_out]`` stacked up projections (``lora_B`` transposed).
        expert_ids: ``[T, k]`` int64, chosen expert per slot, ``-1`` = empty slot.
        weights: ``[T, k]`` float gate weights (any float dtype; cast to the adapter dtype).
        col_expert: ``[R]`` int64 owning expert of each rank row.
        col_scale: ``[R]`` float output scale of each rank row's expert (alpha / r).
        num_experts: E.
        backend: ``"auto" | "torch" | "triton"``.

    Returns:
        ``[T, d_out]`` in the adapter dtype: ``Σ_j w[t,j] · scale_e · B_e A_e x_t``.
    """
    if x.dim() != 2 or A.dim() != 2 or Bt.dim() != 2:
        raise ValueError(f"gated_lora expects 2-D x, A, Bt; got {tuple(x.shape)}, {tuple(A.shape)}, {tuple(Bt.shape)}")
    if A.shape[0] != Bt.shape[0] or A.shape[1] != x.shape[1]:
        raise ValueError(f"gated_lora shape mismatch: x {tuple(x.shape)}, A {tuple(A.shape)}, Bt {tuple(Bt.shape)}")
    if expert_ids.shape != weights.shape or expert_ids.shape[0] != x.shape[0]:
        raise ValueError(f"gated_lora routing shape mismatch: x {tuple(x.shape)}, expert_ids "
                         f"{tuple(expert_ids.shape)}, weights {tuple(weights.shape)}")
    resolve_backend(backend, x.device)
    return _GatedLoRAFn.apply(x, A, Bt, weights.to(A.dtype), expert_ids, col_expert,
                              col_scale.to(A.dtype), num_experts)
