"""The Triton kernels as ``torch.library`` custom ops (namespace ``moelora``), each with a fake impl.

``torch.compile`` treats a custom op as one opaque node whose output shapes come from the fake
impl, so a model using the Triton backend traces without graph breaks and Dynamo never looks
inside a Triton launcher. The autograd wiring lives in ``moelora.kernels.ops`` /
``moelora.kernels.grouped`` (``autograd.Function`` calling these ops forward and backward).

Importing this module imports triton and registers the ops; ``moelora.kernels`` does it only
when the Triton backend is first resolved.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.library import custom_op

from . import dense, grouped


@custom_op("moelora::shrink", mutates_args=())
def shrink(x: Tensor, w: Tensor) -> Tensor:
    """``[T, R] fp32 = x [T, K] @ w [R, K]ᵀ``."""
    return dense.shrink(x, w)


@shrink.register_fake
def _(x, w):
    return x.new_empty((x.shape[0], w.shape[0]), dtype=torch.float32)


@custom_op("moelora::gate_expand", mutates_args=())
def gate_expand(h: Tensor, w: Tensor, ids: Tensor, gw: Tensor, col_expert: Tensor, col_scale: Tensor,
                out_dtype: torch.dtype) -> Tensor:
    """``[T, N] = (G ⊙ h) w``, G from routing slots (see ``dense.gate_expand``)."""
    return dense.gate_expand(h, w, ids, gw, col_expert, col_scale, out_dtype)


@gate_expand.register_fake
def _(h, w, ids, gw, col_expert, col_scale, out_dtype):
    return h.new_empty((h.shape[0], w.shape[1]), dtype=out_dtype)


@custom_op("moelora::topk_expand", mutates_args=())
def topk_expand(h: Tensor, w: Tensor, k: int, bias: Tensor | None, score_abs: bool, scale: float,
                out_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Rank-wise top-k gate built from ``h`` in the prologue; returns ``(y [T, N], idx [T, k])``."""
    return dense.topk_expand(h, w, k, bias, score_abs, scale, out_dtype)


@topk_expand.register_fake
def _(h, w, k, bias, score_abs, scale, out_dtype):
    return (h.new_empty((h.shape[0], w.shape[1]), dtype=out_dtype),
            h.new_empty((h.shape[0], k), dtype=torch.int64))


@custom_op("moelora::xty", mutates_args=())
def xty(h: Tensor, x: Tensor, ids: Tensor, gw: Tensor, col_expert: Tensor, col_scale: Tensor,
        out_dtype: torch.dtype) -> Tensor:
    """``[R, N] = (G ⊙ h)ᵀ x`` (weight gradients), deterministic split over T."""
    return dense.xty(h, x, ids, gw, col_expert, col_scale, out_dtype)


@xty.register_fake
def _(h, x, ids, gw, col_expert, col_scale, out_dtype):
    return h.new_empty((h.shape[1], x.shape[1]), dtype=out_dtype)


@custom_op("moelora::gate_grad", mutates_args=())
def gate_grad(du: Tensor, h: Tensor, ids: Tensor, col_expert: Tensor, col_scale: Tensor) -> Tensor:
    """``dw [T, k] fp32``, the r_e-wide segmented dot of ``du`` and ``h``."""
    return dense.gate_grad(du, h, ids, col_expert, col_scale)


@gate_grad.register_fake
def _(du, h, ids, col_expert, col_scale):
    return h.new_empty(ids.shape, dtype=torch.float32)


@custom_op("moelora::grouped_shrink", mutates_args=())
def grouped_shrink(x: Tensor, w: Tensor, rank_offsets: Tensor, sorted_slot_ids: Tensor, block_expert: Tensor,
                   top_k: int, r_max: int, block_m: int, h2: Tensor | None,
                   scale_e: Tensor | None) -> tuple[Tensor, Tensor]:
    """Per-slot ``[T·k, r_max] fp32`` (+ fused gate gradient ``[T·k]`` when ``h2`` is given)."""
    return grouped.grouped_shrink(x, w, rank_offsets, sorted_slot_ids, block_expert, top_k, r_max, block_m,
                                  h2, scale_e)


@grouped_shrink.register_fake
def _(x, w, rank_offsets, sorted_slot_ids, block_expert, top_k, r_max, block_m, h2, scale_e):
    n = x.shape[0] * top_k
    return (x.new_empty((n, r_max), dtype=torch.float32),
            x.new_empty((n if h2 is not None else 0,), dtype=torch.float32))


@custom_op("moelora::grouped_expand", mutates_args=())
def grouped_expand(hs: Tensor, w: Tensor, rank_offsets: Tensor, sorted_slot_ids: Tensor, block_expert: Tensor,
                   gw: Tensor, scale_e: Tensor, num_tokens: int, top_k: int, block_m: int,
                   out_dtype: torch.dtype, atomic: bool) -> Tensor:
    """``[T, N] = Σ_j gw·scale_e·hs[slot] w_e`` over the plan's blocks."""
    return grouped.grouped_expand(hs, w, rank_offsets, sorted_slot_ids, block_expert, gw, scale_e, num_tokens,
                                  top_k, block_m, out_dtype, atomic)


@grouped_expand.register_fake
def _(hs, w, rank_offsets, sorted_slot_ids, block_expert, gw, scale_e, num_tokens, top_k, block_m,
      out_dtype, atomic):
    return w.new_empty((num_tokens, w.shape[1]), dtype=out_dtype)


@custom_op("moelora::grouped_xty", mutates_args=())
def grouped_xty(hs: Tensor, x: Tensor, rank_offsets: Tensor, sorted_slot_ids: Tensor, block_offsets: Tensor,
                gw: Tensor, scale_e: Tensor, total_rank: int, top_k: int, block_m: int,
                out_dtype: torch.dtype) -> Tensor:
    """``[R, N]`` per-expert weight gradients from the plan's blocks."""
    return grouped.grouped_xty(hs, x, rank_offsets, sorted_slot_ids, block_offsets, gw, scale_e, total_rank,
                               top_k, block_m, out_dtype)


@grouped_xty.register_fake
def _(hs, x, rank_offsets, sorted_slot_ids, block_offsets, gw, scale_e, total_rank, top_k, block_m, out_dtype):
    return x.new_empty((total_rank, x.shape[1]), dtype=out_dtype)
