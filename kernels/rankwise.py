"""Rank-wise implicit MoE (FlyLoRA): ``r`` rank-1 experts, top-k chosen from ``h = A x`` itself.

The same dense-gated primitive as ``gated_lora`` with ``E = r`` experts of rank 1 and the gate
``G = scale · topk_mask(score(h + bias))`` built in the expand kernel's prologue, so the router
costs no extra pass over memory. ``A`` is normally frozen (FlyLoRA's sparse random projection).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import reference
from .ops import autocast_off, check_operands, differentiable_grads, resolve_backend, triton_ops, without_autocast


class _RankwiseLoRAFn(torch.autograd.Function):
    """Gradients: Bt always, x only when ``grad_x`` (PEFT's FlyLoRA runs the adapter input under
    no_grad), A when it requires grad. Never the bias: selection is piecewise constant."""

    @staticmethod
    def forward(ctx, x, A, Bt, bias, k, score, scale, grad_x, impl):
        if impl == "triton":
            h = triton_ops().shrink(x, A)              # [T, r] fp32
            y, idx = triton_ops().topk_expand(h, Bt, k, bias, score == "abs", float(scale), x.dtype)
        else:
            y, h, idx = reference.rankwise_lora_forward(x, A, Bt, k, bias=bias, score=score, scale=scale)
        ctx.mark_non_differentiable(idx)
        ctx.save_for_backward(x, A, Bt, h, idx)
        ctx.scale, ctx.grad_x, ctx.impl = float(scale), grad_x, impl
        return y, idx

    @staticmethod
    @without_autocast
    def backward(ctx, grad_y, _grad_idx):
        x, A, Bt, h, idx = ctx.saved_tensors
        need_x = ctx.needs_input_grad[0] and ctx.grad_x
        need_A, need_Bt = ctx.needs_input_grad[1:3]
        grad_y = grad_y.to(Bt.dtype)
        T, R = h.shape
        if torch.is_grad_enabled():
            def twin(x, A, Bt):  # the saved selection: it is piecewise constant in x and A
                hh = reference.wide(x) @ reference.wide(A).t()
                return (reference.rankwise_gate(idx, R, ctx.scale, hh.dtype) * hh).to(Bt.dtype) @ Bt

            return (*differentiable_grads(twin, (x, A, Bt), (need_x, need_A, need_Bt), grad_y),
                    None, None, None, None, None, None)
        gx = gA = gB = None
        if ctx.impl == "triton":
            ops = triton_ops()
            # The rank-wise gate is the routed gate with E = R experts of rank 1, ids = idx, w = 1.
            ones = torch.ones(idx.shape, dtype=torch.float32, device=h.device)
            ce = torch.arange(R, device=h.device)
            cs = torch.full((R,), ctx.scale, dtype=torch.float32, device=h.device)
            if need_Bt:
                gB = ops.xty(h, grad_y, idx, ones, ce, cs, Bt.dtype)
            if need_x or need_A:
                du = ops.shrink(grad_y, Bt)
                if need_x:
                    gx = ops.gate_expand(du, A, idx, ones, ce, cs, x.dtype)
                if need_A:
                    gA = ops.xty(du, x, idx, ones, ce, cs, A.dtype)
        else:
            gate = reference.rankwise_gate(idx, R, ctx.scale, h.dtype)
            if need_Bt:
                gB = (gate * h).t().to(grad_y.dtype) @ grad_y
            if need_x or need_A:
                gdu = gate * (grad_y @ Bt.t())                 # fp32: the gate is h's dtype
                gx = gdu.to(A.dtype) @ A if need_x else None
                gA = gdu.t().to(x.dtype) @ x if need_A else None
        return gx, gA, gB, None, None, None, None, None, None


def rankwise_lora(x: Tensor, A: Tensor, Bt: Tensor, k: int, *, bias: Tensor | None = None,
                  score: str = "abs", scale: float = 1.0, grad_x: bool = True,
                  backend: str = "auto") -> tuple[Tensor, Tensor]:
    """FlyLoRA forward: ``y = scale · (topk_mask(score(h + bias)) ⊙ h) Bt`` with ``h = x Aᵀ``.

    Args:
        x: ``[T, d_in]`` in the adapter dtype (fp32, bf16 or fp16).
        A: ``[r, d_in]`` down projection (frozen in FlyLoRA). Bt: ``[r, d_out]``.
        k: ranks kept per token, ``1 <= k <= r``.
        bias: ``[r]`` aux-free load-balancing bias added to ``h`` before scoring, or None.
        score: ``"abs"`` (``|h + bias|``, the paper's code) or ``"signed"`` (``h + bias``, the
            official PEFT layer).
        scale: output scale (alpha / r).
        grad_x: False stops the gradient into ``x`` through the adapter (PEFT semantics).
        backend: ``"auto" | "torch" | "triton"``.

    Returns:
        ``(y [T, d_out], topk_idx [T, k] int64)``: the chosen ranks in descending score order,
        ties broken to the lowest index in both backends (use ``bincount`` for the bias update).
    """
    if x.dim() != 2 or A.dim() != 2 or Bt.dim() != 2 or A.shape[1] != x.shape[1] or Bt.shape[0] != A.shape[0]:
        raise ValueError(f"rankwise_lora shape mismatch: x {tuple(x.shape)}, A {tuple(A.shape)}, Bt {tuple(Bt.shape)}")
    if not isinstance(k, int) or not 1 <= k <= A.shape[0]:
        raise ValueError(f"rankwise_lora: k={k!r} is invalid: expected an integer in [1, r={A.shape[0]}]")
    if score not in reference.SCORES:
        raise ValueError(f"rankwise_lora: score={score!r} is invalid: expected one of {reference.SCORES}")
    if bias is not None and bias.shape != (A.shape[0],):
        raise ValueError(f"rankwise_lora: bias must be [r] = [{A.shape[0]}], got {tuple(bias.shape)}")
    check_operands("rankwise_lora", x, A, Bt)
    impl = resolve_backend(backend, x.device, x.dtype)
    if bias is not None:
        bias = bias.detach()
    with autocast_off(x.device.type):  # fp32 h and rank scores also inside an autocast region
        return _RankwiseLoRAFn.apply(x, A, Bt, bias, k, score, float(scale), bool(grad_x), impl)
