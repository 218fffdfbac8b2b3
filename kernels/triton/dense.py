"""Dense-gated MoE-LoRA kernels (design §3.5, research/kernels.md §6.4).

All experts form one LoRA of rank ``R = Σ_e r_e``; a per-token column gate selects and weights them::

    shrink       out[T, R]  = X Wᵀ                     h = x Aᵀ,  du = dy Btᵀ        (fp32 out)
    gate_expand  out[T, N]  = (G ⊙ H) W                y = (G⊙h) Bt,  dx = (G⊙du) A
    xty          out[R, N]  = (G ⊙ H)ᵀ X               dA = (G⊙du)ᵀ x,  dBt = (G⊙h)ᵀ dy
    gate_grad    dw[T, k]   = Σ_{c ∈ e(t,j)} s_c du[t,c] h[t,c]

``G`` never touches memory: the prologue of each kernel builds it from the routing slots
(``G[t,c] = col_scale[c] · Σ_j w[t,j]·[ids[t,j] == col_expert[c]]``) or, for rank-wise (FlyLoRA)
experts, from a top-k over the row of ``H`` itself (ties to the lowest index). Every reduction
runs in a fixed order in one program (no atomics), so results are bitwise reproducible.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import common


@triton.jit
def _mm(a, b, acc, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """acc += a @ b in fp32. UPCAST: the interpreter's bf16/fp16 dot is wrong, so widen first."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    else:
        # Low-precision operands feed the tensor cores; the accumulator stays fp32.
        a = a.to(b.dtype)
    if IEEE:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _routed_gate(ids_ptr, gw_ptr, rows, row_ok, ce, cs, KSLOTS: tl.constexpr):
    """G[rows, cols] (fp32) from routing slots; ``ce``/``cs`` are the columns' expert and scale.
    Padded columns carry expert -2 and an id of -1 never matches, so both contribute 0."""
    g = tl.zeros((rows.shape[0], ce.shape[0]), dtype=tl.float32)
    for j in tl.static_range(KSLOTS):
        e = tl.load(ids_ptr + rows.to(tl.int64) * KSLOTS + j, mask=row_ok, other=-1).to(tl.int32)
        w = tl.load(gw_ptr + rows.to(tl.int64) * KSLOTS + j, mask=row_ok, other=0.0).to(tl.float32)
        g += tl.where(e[:, None] == ce[None, :], w[:, None], 0.0)
    return g * cs[None, :]


@triton.jit
def _shrink_kernel(x_ptr, w_ptr, out_ptr, T, K, R, stride_x, stride_w, stride_o,
                   BM: tl.constexpr, BR: tl.constexpr, BK: tl.constexpr,
                   UPCAST: tl.constexpr, IEEE: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rr = pid_r * BR + tl.arange(0, BR)
    rk = tl.arange(0, BK)
    m_ok = rm < T
    r_ok = rr < R
    acc = tl.zeros((BM, BR), dtype=tl.float32)
    for k0 in range(0, K, BK):
        kk = k0 + rk
        k_ok = kk < K
        a = tl.load(x_ptr + rm[:, None].to(tl.int64) * stride_x + kk[None, :],
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        # W is [R, K] row-major; read its transpose tile [BK, BR] so the dot needs no tl.trans.
        b = tl.load(w_ptr + rr[None, :].to(tl.int64) * stride_w + kk[:, None],
                    mask=k_ok[:, None] & r_ok[None, :], other=0.0)
        acc = _mm(a, b, acc, UPCAST, IEEE)
    tl.store(out_ptr + rm[:, None].to(tl.int64) * stride_o + rr[None, :], acc,
             mask=m_ok[:, None] & r_ok[None, :])


@triton.jit
def _gate_expand_kernel(h_ptr, w_ptr, out_ptr, ids_ptr, gw_ptr, ce_ptr, cs_ptr, bias_ptr, idx_ptr,
                        T, R, N, stride_h, stride_w, stride_o, scale,
                        KSLOTS: tl.constexpr, TOPK: tl.constexpr, SCORE_ABS: tl.constexpr,
                        HAS_BIAS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BR: tl.constexpr,
                        UPCAST: tl.constexpr, IEEE: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    m_ok = rm < T
    n_ok = rn < N
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    if TOPK:
        # Rank-wise experts: the whole row of h is the router, so BR covers all of R (one chunk).
        rr = tl.arange(0, BR)
        r_ok = rr < R
        hb = tl.load(h_ptr + rm[:, None].to(tl.int64) * stride_h + rr[None, :],
                     mask=m_ok[:, None] & r_ok[None, :], other=0.0).to(tl.float32)
        s = hb
        if HAS_BIAS:
            s = s + tl.load(bias_ptr + rr, mask=r_ok, other=0.0).to(tl.float32)[None, :]
        if SCORE_ABS:
            s = tl.abs(s)
        # The order of a stable descending torch.sort (reference.topk_lowest_index): NaN above
        # every number, then by value, ties (-inf included) to the lowest index. Taken ranks are
        # tracked apart from the scores so a row of -inf or NaN still yields k distinct ranks.
        isnan = s != s
        free = r_ok[None, :] & (rr[None, :] >= 0)
        sel = tl.zeros((BM, BR), dtype=tl.float32)
        for j in tl.static_range(KSLOTS):
            # k rounds of max + lowest index among the maxima: an explicit tie rule (tl.topk's
            # order among equal values is not specified).
            nan_left = tl.max(tl.where(free & isnan, 1, 0), axis=1) > 0
            best = tl.max(tl.where(free & ~isnan, s, float("-inf")), axis=1)
            cand = tl.where(nan_left[:, None], free & isnan, free & ~isnan & (s == best[:, None]))
            idx = tl.min(tl.where(cand, rr[None, :], BR), axis=1)
            hit = rr[None, :] == idx[:, None]
            sel = tl.where(hit, 1.0, sel)
            free = free & ~hit
            # Every N-tile computes the same selection; only the first one reports it.
            tl.store(idx_ptr + rm.to(tl.int64) * KSLOTS + j, idx.to(tl.int64), mask=m_ok & (rm * 0 + pid_n == 0))
        p = hb * sel * scale
        wt = tl.load(w_ptr + rr[:, None].to(tl.int64) * stride_w + rn[None, :],
                     mask=r_ok[:, None] & n_ok[None, :], other=0.0)
        acc = _mm(p, wt, acc, UPCAST, IEEE)
    else:
        for r0 in range(0, R, BR):
            rr = r0 + tl.arange(0, BR)
            r_ok = rr < R
            ce = tl.load(ce_ptr + rr, mask=r_ok, other=-2).to(tl.int32)
            cs = tl.load(cs_ptr + rr, mask=r_ok, other=0.0).to(tl.float32)
            g = _routed_gate(ids_ptr, gw_ptr, rm, m_ok, ce, cs, KSLOTS)
            hb = tl.load(h_ptr + rm[:, None].to(tl.int64) * stride_h + rr[None, :],
                         mask=m_ok[:, None] & r_ok[None, :], other=0.0).to(tl.float32)
            wt = tl.load(w_ptr + rr[:, None].to(tl.int64) * stride_w + rn[None, :],
                         mask=r_ok[:, None] & n_ok[None, :], other=0.0)
            acc = _mm(g * hb, wt, acc, UPCAST, IEEE)
    tl.store(out_ptr + rm[:, None].to(tl.int64) * stride_o + rn[None, :], acc,
             mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _xty_kernel(h_ptr, x_ptr, out_ptr, ids_ptr, gw_ptr, ce_ptr, cs_ptr,
                T, R, N, t_per_split, stride_h, stride_x, stride_os, stride_o,
                KSLOTS: tl.constexpr, BT: tl.constexpr, BR: tl.constexpr, BN: tl.constexpr,
                UPCAST: tl.constexpr, IEEE: tl.constexpr):
    pid_r = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_s = tl.program_id(2)
    rr = pid_r * BR + tl.arange(0, BR)
    rn = pid_n * BN + tl.arange(0, BN)
    r_ok = rr < R
    n_ok = rn < N
    ce = tl.load(ce_ptr + rr, mask=r_ok, other=-2).to(tl.int32)
    cs = tl.load(cs_ptr + rr, mask=r_ok, other=0.0).to(tl.float32)
    t_lo = pid_s * t_per_split
    t_hi = tl.minimum(T, t_lo + t_per_split)
    acc = tl.zeros((BR, BN), dtype=tl.float32)
    for t0 in range(t_lo, t_hi, BT):
        rt = t0 + tl.arange(0, BT)
        t_ok = rt < t_hi
        g = _routed_gate(ids_ptr, gw_ptr, rt, t_ok, ce, cs, KSLOTS)
        hb = tl.load(h_ptr + rt[:, None].to(tl.int64) * stride_h + rr[None, :],
                     mask=t_ok[:, None] & r_ok[None, :], other=0.0).to(tl.float32)
        xb = tl.load(x_ptr + rt[:, None].to(tl.int64) * stride_x + rn[None, :],
                     mask=t_ok[:, None] & n_ok[None, :], other=0.0)
        acc = _mm(tl.trans(g * hb), xb, acc, UPCAST, IEEE)
    tl.store(out_ptr + pid_s.to(tl.int64) * stride_os + rr[:, None].to(tl.int64) * stride_o + rn[None, :],
             acc, mask=r_ok[:, None] & n_ok[None, :])


@triton.jit
def _gate_grad_kernel(du_ptr, h_ptr, ids_ptr, ce_ptr, cs_ptr, dw_ptr, T, R, stride,
                      KSLOTS: tl.constexpr, BM: tl.constexpr, BR: tl.constexpr):
    pid = tl.program_id(0)
    rm = pid * BM + tl.arange(0, BM)
    m_ok = rm < T
    for j in tl.static_range(KSLOTS):
        e = tl.load(ids_ptr + rm.to(tl.int64) * KSLOTS + j, mask=m_ok, other=-1).to(tl.int32)
        acc = tl.zeros((BM,), dtype=tl.float32)
        for r0 in range(0, R, BR):
            rr = r0 + tl.arange(0, BR)
            r_ok = rr < R
            ce = tl.load(ce_ptr + rr, mask=r_ok, other=-2).to(tl.int32)
            cs = tl.load(cs_ptr + rr, mask=r_ok, other=0.0).to(tl.float32)
            offs = rm[:, None].to(tl.int64) * stride + rr[None, :]
            ok = m_ok[:, None] & r_ok[None, :]
            prod = tl.load(du_ptr + offs, mask=ok, other=0.0).to(tl.float32) \
                * tl.load(h_ptr + offs, mask=ok, other=0.0).to(tl.float32) * cs[None, :]
            # The r_e-wide segmented dot of research/kernels.md §2: only h is needed, never a
            # [T·k, d_out] expert output.
            acc += tl.sum(tl.where(ce[None, :] == e[:, None], prod, 0.0), axis=1)
        tl.store(dw_ptr + rm.to(tl.int64) * KSLOTS + j, acc, mask=m_ok)


# ----------------------------------------------------------------------------- launchers


def _c(t: torch.Tensor) -> torch.Tensor:
    return t if t.is_contiguous() else t.contiguous()


def _r_chunk(R: int) -> int:
    # Whole R in one chunk up to 128 columns (one tl.dot per tile); larger R loops.
    return min(common.next_pow2(R), 128)


def shrink(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``out [T, R] fp32 = x [T, K] @ w [R, K]ᵀ`` (fp32 accumulation whatever the input dtype)."""
    x, w = _c(x), _c(w)
    T, K = x.shape
    R = w.shape[0]
    out = common.out_empty((T, R), torch.float32, x.device)
    if T == 0 or R == 0:
        return out
    if K == 0:
        return out.zero_()
    BM, BR = common.row_block(T), _r_chunk(R)
    BK = 128 if common.interpreting() else 64
    grid = (triton.cdiv(T, BM), triton.cdiv(R, BR))
    _shrink_kernel[grid](x, w, out, T, K, R, x.stride(0), w.stride(0), out.stride(0),
                         BM=BM, BR=BR, BK=BK, UPCAST=common.upcast(), IEEE=common.ieee(x.dtype, w.dtype))
    return out


def _expand_grid(T: int, N: int):
    BM = common.row_block(T)
    BN = common.col_block(N)
    return BM, BN, (triton.cdiv(T, BM), triton.cdiv(N, BN))


def gate_expand(h: torch.Tensor, w: torch.Tensor, ids: torch.Tensor, gw: torch.Tensor,
                col_expert: torch.Tensor, col_scale: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """``out [T, N] = (G ⊙ h) w`` with ``h [T, R]``, ``w [R, N]`` and the routed gate
    ``G [T, R]`` built from ``ids [T, k]``, ``gw [T, k]``, ``col_expert [R]``, ``col_scale [R]``."""
    h, w, ids, gw = _c(h), _c(w), _c(ids), _c(gw)
    T, R = h.shape
    N = w.shape[1]
    out = common.out_empty((T, N), out_dtype, h.device)
    if T == 0 or N == 0:
        return out
    if R == 0:
        return out.zero_()
    BM, BN, grid = _expand_grid(T, N)
    _gate_expand_kernel[grid](h, w, out, ids, gw, _c(col_expert), _c(col_scale), h, h,
                              T, R, N, h.stride(0), w.stride(0), out.stride(0), 1.0,
                              KSLOTS=ids.shape[1], TOPK=False, SCORE_ABS=False, HAS_BIAS=False,
                              BM=BM, BN=BN, BR=_r_chunk(R), UPCAST=common.upcast(),
                              IEEE=common.ieee(w.dtype))
    return out


def topk_expand(h: torch.Tensor, w: torch.Tensor, k: int, bias: torch.Tensor | None, score_abs: bool,
                scale: float, out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-wise experts: ``idx = topk(score(h + bias), k)`` per row (ties → lowest index) and
    ``out [T, N] = scale · (mask(idx) ⊙ h) w``. Returns ``(out, idx [T, k] int64)``."""
    h, w = _c(h), _c(w)
    T, R = h.shape
    N = w.shape[1]
    out = common.out_empty((T, N), out_dtype, h.device)
    idx = common.out_empty((T, k), torch.int64, h.device) if not common.POISON_OUTPUTS \
        else torch.full((T, k), -7, dtype=torch.int64, device=h.device)
    if T == 0:
        return out, idx
    BM, BN, grid = _expand_grid(T, N)
    # The top-k needs the whole row, and idx is written by the N-tile 0: launch at least one.
    grid = (grid[0], max(grid[1], 1))
    b = _c(bias) if bias is not None else h
    _gate_expand_kernel[grid](h, w, out, h, h, h, h, b, idx, T, R, N, h.stride(0), w.stride(0),
                              out.stride(0), float(scale), KSLOTS=k, TOPK=True, SCORE_ABS=bool(score_abs),
                              HAS_BIAS=bias is not None, BM=BM, BN=BN, BR=common.next_pow2(R),
                              UPCAST=common.upcast(), IEEE=common.ieee(w.dtype))
    return out, idx


def xty(h: torch.Tensor, x: torch.Tensor, ids: torch.Tensor, gw: torch.Tensor, col_expert: torch.Tensor,
        col_scale: torch.Tensor, out_dtype: torch.dtype, split: int | None = None) -> torch.Tensor:
    """``out [R, N] = (G ⊙ h)ᵀ x`` with ``h [T, R]``, ``x [T, N]`` (weight gradients).

    ``split`` cuts T into that many ranges reduced in fp32 partials and summed in a fixed order
    (deterministic, unlike split-K atomics); default: enough programs to fill a GPU."""
    h, x, ids, gw = _c(h), _c(x), _c(ids), _c(gw)
    T, R = h.shape
    N = x.shape[1]
    if R == 0 or N == 0:
        return torch.empty((R, N), dtype=out_dtype, device=h.device)
    if T == 0:
        return torch.zeros((R, N), dtype=out_dtype, device=h.device)
    BR = _r_chunk(R)
    BN = common.col_block(N)
    BT = common.reduce_block(T)
    tiles = triton.cdiv(R, BR) * triton.cdiv(N, BN)
    if split is None:
        split = 1 if common.interpreting() else max(1, min(triton.cdiv(264, tiles), triton.cdiv(T, 4 * BT)))
    t_per = triton.cdiv(triton.cdiv(T, split), BT) * BT
    split = triton.cdiv(T, t_per)
    direct = split == 1 and out_dtype == torch.float32
    ws = common.out_empty((R, N) if direct else (split, R, N), torch.float32, h.device)
    grid = (triton.cdiv(R, BR), triton.cdiv(N, BN), split)
    _xty_kernel[grid](h, x, ws, ids, gw, _c(col_expert), _c(col_scale), T, R, N, t_per,
                      h.stride(0), x.stride(0), 0 if direct else ws.stride(0), ws.stride(-2),
                      KSLOTS=ids.shape[1], BT=BT, BR=BR, BN=BN, UPCAST=common.upcast(),
                      IEEE=common.ieee(x.dtype))
    if direct:
        return ws
    return (ws[0] if split == 1 else ws.sum(0)).to(out_dtype)


def gate_grad(du: torch.Tensor, h: torch.Tensor, ids: torch.Tensor, col_expert: torch.Tensor,
              col_scale: torch.Tensor) -> torch.Tensor:
    """``dw [T, k] fp32``: ``dw[t,j] = Σ_{c: col_expert[c] = ids[t,j]} col_scale[c]·du[t,c]·h[t,c]``
    (0 for ``-1`` slots); ``du``, ``h`` are ``[T, R]``."""
    du, h, ids = _c(du), _c(h), _c(ids)
    T, R = h.shape
    k = ids.shape[1]
    dw = common.out_empty((T, k), torch.float32, h.device)
    if T == 0 or k == 0:
        return dw
    if R == 0:
        return dw.zero_()
    BM = common.row_block(T)
    _gate_grad_kernel[(triton.cdiv(T, BM),)](du, h, ids, _c(col_expert), _c(col_scale), dw, T, R,
                                             h.stride(0), KSLOTS=k, BM=BM, BR=_r_chunk(R))
    return dw
