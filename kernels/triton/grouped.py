"""Sorted grouped MoE-LoRA kernels: the path for large ``E·r`` (research/kernels.md §6.4).

Slots ``s = t·k + j`` are grouped by expert in a :class:`~moelora.kernels.grouped.RoutingPlan`:
each expert's run of slot ids is padded to a multiple of ``BM`` **in the index list only** (the
sentinel ``num_slots`` marks padding), so every ``BM``-block belongs to exactly one expert and
no row of ``x`` is ever copied. Weights stay in the rank-major bank (``A [R, d_in]``,
``Bt [R, d_out]``): expert ``e`` owns rows ``rank_offsets[e] : rank_offsets[e+1]``, read through a
``r_max``-wide tile masked to ``r_e`` (heterogeneous ranks, rank 0 = nothing to do).

    grouped_shrink  hs[s, :r_e] = X[tok(s)] W_eᵀ         h per slot, du per slot
                    (+ fused dw[s] = scale_e · <hs[s], h2[s]>, the gate gradient)
    grouped_expand  y[tok(s)] += w[s] scale_e · hs[s] W_e   y, dx
    grouped_xty     out_e = Σ_{s ∈ e} (w[s] scale_e hs[s])ᵀ X[tok(s)]   dA, dBt

Deterministic by default: with k > 1 two programs may add to the same output row, so each slot
writes its own row of an fp32 ``[T·k, N]`` buffer summed over k in a fixed order afterwards;
``atomic=True`` trades that buffer for fp32 ``atomic_add`` (run-to-run bits may differ).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import common
from .dense import _c, _mm


@triton.jit
def _block_rows(slot_ptr, bexp_ptr, roff_ptr, b, num_slots, KSLOTS: tl.constexpr, BM: tl.constexpr):
    """The block's expert, its row offset and rank in the bank, and the block's slots/tokens."""
    e = tl.load(bexp_ptr + b)
    e_safe = tl.maximum(e, 0)
    off = tl.load(roff_ptr + e_safe)
    r_e = tl.where(e >= 0, tl.load(roff_ptr + e_safe + 1) - off, 0)
    slots = tl.load(slot_ptr + b * BM + tl.arange(0, BM))
    ok = slots < num_slots  # the sentinel (num_slots) pads each expert's run: never a token
    tok = tl.where(ok, slots // KSLOTS, 0)
    return e_safe, off, r_e, slots, ok, tok


@triton.jit
def _grouped_shrink_kernel(x_ptr, w_ptr, out_ptr, slot_ptr, bexp_ptr, roff_ptr, h2_ptr, sce_ptr, dw_ptr,
                           num_slots, K, r_max, stride_x, stride_w, stride_o,
                           KSLOTS: tl.constexpr, BM: tl.constexpr, BR: tl.constexpr, BK: tl.constexpr,
                           FUSE_DOT: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    b = tl.program_id(0)
    e, off, r_e, slots, ok, tok = _block_rows(slot_ptr, bexp_ptr, roff_ptr, b, num_slots, KSLOTS, BM)
    if r_e > 0:
        rr = tl.arange(0, BR)
        r_ok = rr < r_e
        acc = tl.zeros((BM, BR), dtype=tl.float32)
        for k0 in range(0, K, BK):
            kk = k0 + tl.arange(0, BK)
            k_ok = kk < K
            a = tl.load(x_ptr + tok[:, None].to(tl.int64) * stride_x + kk[None, :],
                        mask=ok[:, None] & k_ok[None, :], other=0.0)
            wt = tl.load(w_ptr + (off + rr[None, :]).to(tl.int64) * stride_w + kk[:, None],
                         mask=k_ok[:, None] & r_ok[None, :], other=0.0)
            acc = _mm(a, wt, acc, UPCAST, IEEE)
        # Columns r_e..r_max are stored as exact zeros (their weights were masked to 0).
        o_offs = slots[:, None].to(tl.int64) * stride_o + rr[None, :]
        o_ok = ok[:, None] & (rr[None, :] < r_max)
        tl.store(out_ptr + o_offs, acc, mask=o_ok)
        if FUSE_DOT:
            # Gate gradient while du is in registers: dw[s] = scale_e · Σ_c du[s,c] · h[s,c].
            h2 = tl.load(h2_ptr + o_offs, mask=o_ok & r_ok[None, :], other=0.0)
            sc = tl.load(sce_ptr + e).to(tl.float32)
            tl.store(dw_ptr + slots, tl.sum(acc * h2, axis=1) * sc, mask=ok)


@triton.jit
def _grouped_expand_kernel(hs_ptr, w_ptr, out_ptr, slot_ptr, bexp_ptr, roff_ptr, gw_ptr, sce_ptr,
                           num_slots, N, stride_h, stride_w, stride_o,
                           KSLOTS: tl.constexpr, PER_SLOT: tl.constexpr, ATOMIC: tl.constexpr,
                           BM: tl.constexpr, BN: tl.constexpr, BR: tl.constexpr,
                           UPCAST: tl.constexpr, IEEE: tl.constexpr):
    b = tl.program_id(0)
    pid_n = tl.program_id(1)
    e, off, r_e, slots, ok, tok = _block_rows(slot_ptr, bexp_ptr, roff_ptr, b, num_slots, KSLOTS, BM)
    if r_e > 0:
        rr = tl.arange(0, BR)
        r_ok = rr < r_e
        rn = pid_n * BN + tl.arange(0, BN)
        n_ok = rn < N
        gate = tl.load(gw_ptr + slots, mask=ok, other=0.0).to(tl.float32) * tl.load(sce_ptr + e).to(tl.float32)
        hb = tl.load(hs_ptr + slots[:, None].to(tl.int64) * stride_h + rr[None, :],
                     mask=ok[:, None] & r_ok[None, :], other=0.0).to(tl.float32)
        wt = tl.load(w_ptr + (off + rr[:, None]).to(tl.int64) * stride_w + rn[None, :],
                     mask=r_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        acc = _mm(hb * gate[:, None], wt, acc, UPCAST, IEEE)
        if PER_SLOT:
            offs = slots[:, None].to(tl.int64) * stride_o + rn[None, :]
        else:
            offs = tok[:, None].to(tl.int64) * stride_o + rn[None, :]
        m = ok[:, None] & n_ok[None, :]
        if ATOMIC:
            tl.atomic_add(out_ptr + offs, acc, mask=m)
        else:
            tl.store(out_ptr + offs, acc, mask=m)


@triton.jit
def _grouped_xty_kernel(hs_ptr, x_ptr, out_ptr, slot_ptr, boff_ptr, roff_ptr, gw_ptr, sce_ptr,
                        num_slots, N, stride_h, stride_x, stride_o,
                        KSLOTS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BR: tl.constexpr,
                        UPCAST: tl.constexpr, IEEE: tl.constexpr):
    e = tl.program_id(0)
    pid_n = tl.program_id(1)
    off = tl.load(roff_ptr + e)
    r_e = tl.load(roff_ptr + e + 1) - off
    if r_e > 0:
        rr = tl.arange(0, BR)
        r_ok = rr < r_e
        rn = pid_n * BN + tl.arange(0, BN)
        n_ok = rn < N
        sc = tl.load(sce_ptr + e).to(tl.float32)
        acc = tl.zeros((BR, BN), dtype=tl.float32)
        # One program owns expert e's rows of the gradient and walks its blocks in order: a fixed
        # reduction order without atomics. An expert with no tokens writes zeros.
        for b in range(tl.load(boff_ptr + e), tl.load(boff_ptr + e + 1)):
            slots = tl.load(slot_ptr + b * BM + tl.arange(0, BM))
            ok = slots < num_slots
            tok = tl.where(ok, slots // KSLOTS, 0)
            gate = tl.load(gw_ptr + slots, mask=ok, other=0.0).to(tl.float32) * sc
            hb = tl.load(hs_ptr + slots[:, None].to(tl.int64) * stride_h + rr[None, :],
                         mask=ok[:, None] & r_ok[None, :], other=0.0).to(tl.float32)
            xb = tl.load(x_ptr + tok[:, None].to(tl.int64) * stride_x + rn[None, :],
                         mask=ok[:, None] & n_ok[None, :], other=0.0)
            acc = _mm(tl.trans(hb * gate[:, None]), xb, acc, UPCAST, IEEE)
        tl.store(out_ptr + (off + rr[:, None]).to(tl.int64) * stride_o + rn[None, :], acc,
                 mask=r_ok[:, None] & n_ok[None, :])


# ----------------------------------------------------------------------------- launchers


def grouped_shrink(x: torch.Tensor, w: torch.Tensor, rank_offsets: torch.Tensor, sorted_slot_ids: torch.Tensor,
                   block_expert: torch.Tensor, top_k: int, r_max: int, block_m: int,
                   h2: torch.Tensor | None = None, scale_e: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-slot ``hs [T·k, r_max] fp32``: ``hs[s, :r_e] = x[s // k] w_eᵀ`` (``w [R, K]`` rank-major).

    With ``h2 [T·k, r_max]`` and ``scale_e [E]`` also returns ``dw [T·k] = scale_e·Σ_c hs·h2``
    (else an empty tensor). Rows of empty (``-1``) slots hold zeros."""
    x, w = _c(x), _c(w)
    n = top_k * x.shape[0]
    # Rows of empty slots (and of rank-0 experts) are never written: zero them so the op's output
    # is fully defined (NaN under POISON_OUTPUTS, to prove no kernel reads them).
    hs = common.out_empty((n, r_max), torch.float32, x.device)
    if not common.POISON_OUTPUTS:
        hs.zero_()
    fuse = h2 is not None
    # -1 slots and rank-0 experts have no block that writes their dw: start from zeros.
    dw = torch.zeros(n if fuse else 0, dtype=torch.float32, device=x.device)
    if n == 0 or r_max == 0:
        return hs, dw
    BR = common.next_pow2(r_max)
    BK = 128 if common.interpreting() else 64
    _grouped_shrink_kernel[(block_expert.numel(),)](
        x, w, hs, sorted_slot_ids, block_expert, rank_offsets, _c(h2) if fuse else hs,
        scale_e if fuse else hs, dw, n, x.shape[1], r_max, x.stride(0), w.stride(0), hs.stride(0),
        KSLOTS=top_k, BM=block_m, BR=BR, BK=BK, FUSE_DOT=fuse, UPCAST=common.upcast(),
        IEEE=common.ieee(x.dtype, w.dtype))
    return hs, dw


def grouped_expand(hs: torch.Tensor, w: torch.Tensor, rank_offsets: torch.Tensor, sorted_slot_ids: torch.Tensor,
                   block_expert: torch.Tensor, gw: torch.Tensor, scale_e: torch.Tensor, num_tokens: int,
                   top_k: int, block_m: int, out_dtype: torch.dtype, atomic: bool = False) -> torch.Tensor:
    """``y [T, N] = Σ_j gw[t,j]·scale_e·hs[t·k+j, :r_e] w_e`` over non-empty slots (``w [R, N]``).

    ``gw`` is ``[T, k]`` (flattened to slots). Tokens whose slots are all empty get 0."""
    hs, w, gw = _c(hs), _c(w), _c(gw).reshape(-1)
    T, N, r_max = num_tokens, w.shape[1], hs.shape[1]
    n = T * top_k
    if T == 0 or N == 0 or r_max == 0 or n == 0:
        return torch.zeros((T, N), dtype=out_dtype, device=w.device)
    per_slot = top_k > 1 and not atomic
    # Rows no block writes (empty slots, rank-0 experts) must read as 0: zero-filled, not poisoned.
    buf = torch.zeros((n if per_slot else T, N), dtype=torch.float32 if (atomic or per_slot) else out_dtype,
                      device=w.device)
    BN = common.col_block(N)
    grid = (block_expert.numel(), triton.cdiv(N, BN))
    _grouped_expand_kernel[grid](hs, w, buf, sorted_slot_ids, block_expert, rank_offsets, gw, scale_e,
                                 n, N, hs.stride(0), w.stride(0), buf.stride(0), KSLOTS=top_k,
                                 PER_SLOT=per_slot, ATOMIC=atomic, BM=block_m, BN=BN,
                                 BR=common.next_pow2(r_max), UPCAST=common.upcast(), IEEE=common.ieee(w.dtype))
    if per_slot:
        buf = buf.view(T, top_k, N).sum(1)  # fixed-order sum over k: deterministic
    return buf.to(out_dtype)


def grouped_xty(hs: torch.Tensor, x: torch.Tensor, rank_offsets: torch.Tensor, sorted_slot_ids: torch.Tensor,
                block_offsets: torch.Tensor, gw: torch.Tensor, scale_e: torch.Tensor, total_rank: int,
                top_k: int, block_m: int, out_dtype: torch.dtype) -> torch.Tensor:
    """``out [R, N]``: rows of expert e = ``Σ_{s ∈ e} (gw[s]·scale_e·hs[s, :r_e])ᵀ x[s // k]``."""
    hs, x, gw = _c(hs), _c(x), _c(gw).reshape(-1)
    N, r_max = x.shape[1], hs.shape[1]
    E = rank_offsets.numel() - 1
    out = common.out_empty((total_rank, N), out_dtype, x.device)
    if total_rank == 0 or N == 0:
        return out
    if hs.shape[0] == 0:
        return out.zero_()
    BN = common.col_block(N)
    _grouped_xty_kernel[(E, triton.cdiv(N, BN))](
        hs, x, out, sorted_slot_ids, block_offsets, rank_offsets, gw, scale_e, hs.shape[0], N,
        hs.stride(0), x.stride(0), out.stride(0), KSLOTS=top_k, BM=block_m, BN=BN,
        BR=common.next_pow2(r_max), UPCAST=common.upcast(), IEEE=common.ieee(x.dtype))
    return out
