"""Sorted grouped MoE-LoRA for large ``E·r``: routing plan + ``grouped_lora`` op.

The dense-gated op multiplies every token by all ``R = Σ r_e`` rank columns; once ``R`` is large
that is ``R / (k·r̄)`` times the needed FLOPs and the op turns compute-bound. The grouped path
does only the routed work: slots are sorted by expert (a :class:`RoutingPlan`, built once per
router and shareable by every linear that router feeds), and each block of ``block_m`` slots
runs one expert's low-rank product. The index list is padded per expert to ``block_m`` with a
sentinel (never the data), so no row of ``x`` is copied.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from . import reference
from .ops import (autocast_off, check_expert_ids, check_operands, device_constant, differentiable_grads, gate_dtype,
                  resolve_backend, triton_ops, without_autocast)


@dataclass(frozen=True)
class RoutingPlan:
    """Slots ``s = t·k + j`` grouped by expert, padded per expert to ``block_m`` (index list only).

    Attributes:
        sorted_slot_ids: ``[num_blocks · block_m]`` int32; expert e's slots (in token order) fill
            blocks ``block_offsets[e] : block_offsets[e+1]``; padding holds the sentinel ``num_slots``.
        block_expert: ``[num_blocks]`` int32, the expert of each block, ``-1`` for unused blocks.
        block_offsets: ``[E+1]`` int32, first block of each expert.
        expert_offsets: ``[E+1]`` int32, unpadded: expert e's slots are sorted positions
            ``expert_offsets[e] : expert_offsets[e+1]``.
        num_slots: ``T·k``; top_k: k; block_m: rows per block.

    ``num_blocks = ceil(T·k / block_m) + E`` is a static upper bound (no device sync, fixed grid
    shapes for CUDA graphs / torch.compile); blocks past the used ones have expert ``-1``.
    """

    sorted_slot_ids: Tensor
    block_expert: Tensor
    block_offsets: Tensor
    expert_offsets: Tensor
    num_slots: int
    top_k: int
    block_m: int

    @property
    def num_experts(self) -> int:
        return self.block_offsets.numel() - 1


def default_block_m(num_slots: int, num_experts: int) -> int:
    """Rows per grouped block: the mean slots per expert rounded up to a power of two, within
    [16, 64]. Each expert's run is padded to a whole block, so a block far larger than an expert's
    share wastes rows; 16 is the ``tl.dot`` minimum and 64 the tile research/kernels.md suggests
    (not tuned on a GPU here). Only host-known sizes are used: no device sync."""
    mean = -(-num_slots // max(num_experts, 1))
    return min(64, max(16, 1 << max(mean - 1, 0).bit_length()))


def build_routing_plan(expert_ids: Tensor, num_experts: int, block_m: int | None = None) -> RoutingPlan:
    """Group routing slots by expert (torch only: stable argsort + bincount + cumsum).

    Args:
        expert_ids: ``[T, k]`` int, ``-1`` = empty slot (left out of every block).
        num_experts: E.
        block_m: block size (>= 16, a power of two); default :func:`default_block_m`.

    Returns:
        A :class:`RoutingPlan` on ``expert_ids.device``.
    """
    if expert_ids.dim() != 2:
        raise ValueError(f"expert_ids must be [T, k], got shape {tuple(expert_ids.shape)}")
    check_expert_ids("build_routing_plan", expert_ids, num_experts)
    block_m = default_block_m(expert_ids.numel(), num_experts) if block_m is None else int(block_m)
    if block_m < 16 or block_m & (block_m - 1):
        raise ValueError(f"block_m={block_m} is invalid: expected a power of two >= 16 (tl.dot needs 16).")
    dev, E = expert_ids.device, num_experts
    T, k = expert_ids.shape
    n = T * k
    num_blocks = -(-n // block_m) + E
    flat = expert_ids.reshape(-1).long()
    key = torch.where(flat >= 0, flat, E)  # empty slots sort last and get no block
    order = torch.argsort(key, stable=True)
    # scatter_add rather than bincount: CUDA's bincount reads the maximum back (a device sync).
    counts = torch.zeros(E + 1, dtype=torch.long, device=dev).scatter_add_(0, key, torch.ones_like(key))[:E]
    zero = torch.zeros(1, dtype=torch.long, device=dev)
    expert_offsets = torch.cat([zero, counts.cumsum(0)])
    padded = (counts + block_m - 1) // block_m * block_m
    pad_offsets = torch.cat([zero, padded.cumsum(0)])
    skey = key[order]
    e_safe = skey.clamp(max=E - 1)
    rank_in_expert = torch.arange(n, device=dev) - expert_offsets[e_safe]
    # Empty slots go to a dump position one past the end, cut off below.
    dest = torch.where(skey < E, pad_offsets[e_safe] + rank_in_expert, num_blocks * block_m)
    sorted_ids = torch.full((num_blocks * block_m + 1,), n, dtype=torch.int32, device=dev)
    sorted_ids[dest] = order.to(torch.int32)
    starts = torch.arange(num_blocks, device=dev) * block_m
    block_expert = torch.searchsorted(pad_offsets[1:].contiguous(), starts, right=True)
    block_expert = torch.where(block_expert < E, block_expert, -1).to(torch.int32)
    return RoutingPlan(sorted_slot_ids=sorted_ids[:-1], block_expert=block_expert,
                       block_offsets=(pad_offsets // block_m).to(torch.int32),
                       expert_offsets=expert_offsets.to(torch.int32), num_slots=n, top_k=k, block_m=block_m)


# The torch twin loops over experts with host-side segment sizes (data-dependent control flow), so
# it is wrapped as custom ops too: torch.compile then sees one opaque node with a fake impl
# instead of failing on the loop.
@torch.library.custom_op("moelora::grouped_reference_forward", mutates_args=())
def _ref_forward(x: Tensor, A: Tensor, Bt: Tensor, expert_ids: Tensor, weights: Tensor, offsets: list[int],
                 scale_e: Tensor) -> tuple[Tensor, Tensor]:
    return reference.grouped_lora_forward(x, A, Bt, expert_ids, weights, tuple(offsets), scale_e)


@_ref_forward.register_fake
def _(x, A, Bt, expert_ids, weights, offsets, scale_e):
    r_max = max([offsets[i + 1] - offsets[i] for i in range(len(offsets) - 1)], default=0)
    return x.new_empty((x.shape[0], Bt.shape[1])), x.new_empty((expert_ids.numel(), r_max))


@torch.library.custom_op("moelora::grouped_reference_backward", mutates_args=())
def _ref_backward(grad_y: Tensor, x: Tensor, A: Tensor, Bt: Tensor, hs: Tensor, expert_ids: Tensor,
                  weights: Tensor, offsets: list[int], scale_e: Tensor, need_x: bool, need_A: bool,
                  need_Bt: bool, need_w: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    grads = reference.grouped_lora_backward(grad_y, x, A, Bt, hs, expert_ids, weights, tuple(offsets), scale_e,
                                            need_x=need_x, need_A=need_A, need_Bt=need_Bt, need_w=need_w)
    # Custom ops cannot return None: an unneeded gradient comes back as an empty tensor.
    return tuple(g if g is not None else x.new_empty(0) for g in grads)


@_ref_backward.register_fake
def _(grad_y, x, A, Bt, hs, expert_ids, weights, offsets, scale_e, need_x, need_A, need_Bt, need_w):
    shapes = (x.shape, A.shape, Bt.shape, weights.shape)
    return tuple(x.new_empty(s if n else (0,)) for s, n in zip(shapes, (need_x, need_A, need_Bt, need_w)))


class _GroupedLoRAFn(torch.autograd.Function):
    """Sorted grouped MoE-LoRA; gradients for x, A, Bt and the gate weights. Saves the per-slot
    ``hs [T·k, r_max]`` (k·r_max wide, not R wide) for the gate gradient and dBt."""

    @staticmethod
    def forward(ctx, x, A, Bt, weights, expert_ids, scale_e, roff_t, ssi, bexp, boff,
                offsets, block_m, impl, atomic):
        T, k = expert_ids.shape
        r_max = max([offsets[i + 1] - offsets[i] for i in range(len(offsets) - 1)], default=0)
        if impl == "triton":
            ops = triton_ops()
            hs, _ = ops.grouped_shrink(x, A, roff_t, ssi, bexp, k, r_max, block_m, None, None)
            y = ops.grouped_expand(hs, Bt, roff_t, ssi, bexp, weights, scale_e, T, k, block_m, x.dtype, atomic)
        else:
            y, hs = _ref_forward(x, A, Bt, expert_ids, weights, list(offsets), scale_e)
        ctx.save_for_backward(x, A, Bt, hs, weights, expert_ids, scale_e, roff_t, ssi, bexp, boff)
        ctx.offsets, ctx.block_m, ctx.impl, ctx.atomic, ctx.r_max = offsets, block_m, impl, atomic, r_max
        return y

    @staticmethod
    @without_autocast
    def backward(ctx, grad_y):
        x, A, Bt, hs, weights, expert_ids, scale_e, roff_t, ssi, bexp, boff = ctx.saved_tensors
        need_x, need_A, need_Bt, need_w = ctx.needs_input_grad[:4]
        grad_y = grad_y.to(A.dtype)
        T, k = expert_ids.shape
        if torch.is_grad_enabled():
            E = len(ctx.offsets) - 1
            ranks = torch.tensor([ctx.offsets[e + 1] - ctx.offsets[e] for e in range(E)], device=x.device)
            col_expert = torch.repeat_interleave(torch.arange(E, device=x.device), ranks)

            def twin(x, A, Bt, w):  # the dense-gated twin computes the same sum
                gate = reference.column_gate(expert_ids, w, col_expert, scale_e[col_expert], E, A.dtype)
                return reference.gated_lora_forward(x, A, Bt, gate)[0]

            return (*differentiable_grads(twin, (x, A, Bt, weights), ctx.needs_input_grad[:4], grad_y),
                    ) + (None,) * 10
        if ctx.impl == "triton":
            ops, bm = triton_ops(), ctx.block_m
            gx = gA = gB = gw = None
            if need_x or need_A or need_w:
                du, dw = ops.grouped_shrink(grad_y, Bt, roff_t, ssi, bexp, k, ctx.r_max, bm,
                                            hs if need_w else None, scale_e if need_w else None)
                gw = dw.view(T, k) if need_w else None
                if need_x:
                    gx = ops.grouped_expand(du, A, roff_t, ssi, bexp, weights, scale_e, T, k, bm, x.dtype, ctx.atomic)
                if need_A:
                    gA = ops.grouped_xty(du, x, roff_t, ssi, boff, weights, scale_e, A.shape[0], k, bm, A.dtype)
            if need_Bt:
                gB = ops.grouped_xty(hs, grad_y, roff_t, ssi, boff, weights, scale_e, Bt.shape[0], k, bm, Bt.dtype)
        else:
            need = [need_x, need_A, need_Bt, need_w]
            grads = _ref_backward(grad_y, x, A, Bt, hs, expert_ids, weights, list(ctx.offsets), scale_e, *need)
            gx, gA, gB, gw = (g if n else None for g, n in zip(grads, need))
        if gw is not None:
            gw = gw.to(weights.dtype)
        return (gx, gA, gB, gw) + (None,) * 10


def grouped_lora(x: Tensor, A: Tensor, Bt: Tensor, expert_ids: Tensor, weights: Tensor,
                 ranks: Sequence[int], scale: Tensor, *, plan: RoutingPlan | None = None,
                 deterministic: bool = True, backend: str = "auto") -> Tensor:
    """Mixture of LoRA experts on the sorted grouped path (same result as ``gated_lora``).

    Args:
        x: ``[T, d_in]`` in the adapter dtype; A: ``[R, d_in]``; Bt: ``[R, d_out]`` (rank-major bank).
        expert_ids: ``[T, k]`` int, ``-1`` = empty slot; weights: ``[T, k]`` float.
        ranks: host ints ``r_e`` per expert (rank 0 allowed), ``Σ r_e = R``.
        scale: ``[E]`` per-expert output scale (alpha / r_e).
        plan: a :class:`RoutingPlan` of ``expert_ids`` (built here when None; pass one to share it
            between the linears a router feeds). Only the Triton path reads it, and on a GPU it
            is trusted (comparing it with ``expert_ids`` would be a sync): build it from these ids.
        deterministic: False lets the Triton expand add the k slots of a token with fp32 atomics
            instead of a ``[T·k, d_out]`` fp32 buffer (faster, run-to-run bits may differ).
        backend: ``"auto" | "torch" | "triton"``.

    Returns:
        ``[T, d_out]`` in the adapter dtype; gradients flow to x, A, Bt and weights.
    """
    ranks = [int(r) for r in ranks]
    if min(ranks, default=0) < 0:
        raise ValueError(f"grouped_lora: ranks={ranks} has a negative rank; ranks are rows per expert, >= 0.")
    offsets = [0]
    for r in ranks:
        offsets.append(offsets[-1] + r)
    E = len(ranks)
    if x.dim() != 2 or A.shape != (offsets[-1], x.shape[1]) or Bt.dim() != 2 or Bt.shape[0] != A.shape[0]:
        raise ValueError(f"grouped_lora shape mismatch: x {tuple(x.shape)}, A {tuple(A.shape)}, "
                         f"Bt {tuple(Bt.shape)}, ranks sum to {offsets[-1]}")
    if expert_ids.dim() != 2 or expert_ids.shape != weights.shape or expert_ids.shape[0] != x.shape[0]:
        raise ValueError(f"grouped_lora routing shape mismatch: x {tuple(x.shape)}, expert_ids "
                         f"{tuple(expert_ids.shape)}, weights {tuple(weights.shape)}")
    if scale.shape != (E,):
        raise ValueError(f"grouped_lora: scale must be [E] = [{E}], got {tuple(scale.shape)}")
    check_operands("grouped_lora", x, A, Bt, expert_ids, E, weights=weights, scale=scale)
    impl = resolve_backend(backend, x.device, x.dtype)
    if plan is None:
        if impl == "torch":
            # The torch twin sorts by itself; an empty plan saves the argsort it would not read.
            # (Distinct tensors: Dynamo cannot trace one tensor passed twice to Function.apply.)
            empty = [torch.empty(0, dtype=torch.int32, device=x.device) for _ in range(4)]
            plan = RoutingPlan(*empty, num_slots=expert_ids.numel(), top_k=expert_ids.shape[1], block_m=16)
        else:
            plan = build_routing_plan(expert_ids, E)
    elif plan.num_slots != expert_ids.numel() or plan.num_experts != E or plan.top_k != expert_ids.shape[1]:
        raise ValueError(f"grouped_lora: plan was built for {plan.num_slots} slots, k={plan.top_k}, "
                         f"E={plan.num_experts}; the routing has {expert_ids.numel()} slots, "
                         f"k={expert_ids.shape[1]}, E={E}. Rebuild it with build_routing_plan.")
    elif impl == "triton" and x.device.type == "cpu" and not torch.compiler.is_compiling():
        # Only the Triton path reads a plan, and it trusts it: a plan of another routing of the
        # same shape would compute that routing. Compared on CPU (the interpreter) only; on a GPU
        # that would be a sync per linear, so there the plan must come from these expert_ids.
        own = build_routing_plan(expert_ids, E, plan.block_m)
        if not (torch.equal(own.sorted_slot_ids, plan.sorted_slot_ids) and torch.equal(own.block_expert, plan.block_expert)):
            raise ValueError("grouped_lora: plan was built from other expert_ids than this call's (same shape, "
                             "other routing); build it with build_routing_plan(expert_ids, num_experts).")
    roff_t = device_constant(offsets, x.device, torch.int32)
    precise = gate_dtype(A)
    with autocast_off(x.device.type):
        return _GroupedLoRAFn.apply(x, A, Bt, weights.to(precise), expert_ids, scale.to(precise), roff_t,
                                    plan.sorted_slot_ids, plan.block_expert, plan.block_offsets,
                                    tuple(offsets), plan.block_m, impl, not deterministic)
