"""Torch twins of the expert kernels: the oracle for every Triton kernel and the CPU fast path.

Dense-gated MoE-LoRA over a rank-major expert bank (design §3.5)::

    h = x Aᵀ                                        [T, R]
    G[t, c] = scale[e(c)] · Σ_j w[t, j] · [ids[t, j] == e(c)]      [T, R]
    y = (G ⊙ h) Bt                                  [T, d_out]

where ``e(c) = col_expert[c]`` is the expert that owns rank column ``c``. An id of ``-1`` never
matches a column, so a ``-1`` slot contributes nothing (and gets a zero weight gradient).

Every function here is plain differentiable-free torch: the autograd wiring lives in
:mod:`moelora.kernels.ops`.

bf16/fp16 rounding: the rank-wise twin keeps ``h = x Aᵀ`` in fp32 (:func:`wide`), as the kernel
does, because FlyLoRA's top-k picks ranks from it: scoring a bf16-rounded ``h`` picked other ranks
than the kernel for 1-2 of 130 tokens in 3 of 6 seeds (k = 8 of 32). The upcast costs 27 % on
CPU (bf16 forward+backward 3.8 vs 3.0 ms, T = 2048, d = 1024, r = 32, k = 8). The dense-gated and grouped
twins compute in the input dtype: keeping their ``h`` and ``du`` in fp32 too was tried and left
out. It did not bring the two backends' model-level bf16 gradients closer (they differ by 1-2.5 %,
as much as each differs from an fp32-adapter run), and upcasting ``x`` and ``dy`` made the bf16
op on CPU up to 2x slower (5.3 vs 2.7 ms, T = 2048, d = 1024, E = 4, k = 2, r = 8, 2 threads).
"""

from __future__ import annotations

import torch
from torch import Tensor


_HALF = (torch.bfloat16, torch.float16)


def wide(t: Tensor) -> Tensor:
    """``t`` as fp32 when it is bf16/fp16, unchanged otherwise (fp32, float64)."""
    return t.float() if t.dtype in _HALF else t


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


#: :func:`column_gate` compares slots with columns when ``T·k·R`` is at most this (it is faster
#: up to about 64 tokens at k·R = 64 on CPU), and scatters per expert above it.
COMPARE_GATE_MAX = 4096


def column_gate(expert_ids: Tensor, weights: Tensor, col_expert: Tensor, col_scale: Tensor,
                num_experts: int, dtype: torch.dtype | None = None) -> Tensor:
    """The rank-column gate ``G_s`` (scale folded in).

    Args:
        expert_ids: ``[T, k]`` int, ``-1`` = empty slot.
        weights: ``[T, k]`` float.
        col_expert: ``[R]`` int64, owning expert of each rank column.
        col_scale: ``[R]`` float, the owning expert's output scale (alpha / r).
        num_experts: E.
        dtype: the bank's dtype, or None. The gate is formed at the precision of ``weights`` and
            ``col_scale`` (at least fp32 from the ops) and rounded once, per element, to it.

    Returns:
        ``[T, R]``: ``G_s[t, c] = col_scale[c] · gate[t, col_expert[c]]``.
    """
    if expert_ids.numel() * col_expert.shape[0] <= COMPARE_GATE_MAX:
        # Few tokens (decoding): match every slot against every column, three ops fewer than the
        # scatter. ``where``, not a product: a NaN weight in an empty slot must not leak in.
        hits = expert_ids.unsqueeze(-1) == col_expert                      # [T, k, R]
        gate = torch.where(hits, weights.unsqueeze(-1), 0).sum(1) * col_scale
    else:
        gate = expert_gate(expert_ids, weights, num_experts)[:, col_expert] * col_scale
    return gate if dtype is None else gate.to(dtype)


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
        if num_experts == 1:  # same sum; inductor (torch 2.13, CPU) fails to generate a [T, 1] index_add
            per_expert = per_col.sum(1, keepdim=True)
        else:
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


# ----------------------------------------------------------------------------- rank-wise (FlyLoRA)

SCORES = ("abs", "signed")


def topk_lowest_index(score: Tensor, k: int) -> Tensor:
    """Top-k column indices per row, ties broken to the **lowest** index (``torch.topk``'s tie
    order is unspecified; the Triton kernel uses k rounds of max + smallest arg-max).

    Args:
        score: ``[T, R]`` float.
        k: ``0 <= k <= R``.

    Returns:
        ``[T, k]`` int64, in descending score order.
    """
    # A stable descending sort keeps equal scores in index order, so the first k are the rule.
    return torch.sort(score, dim=1, descending=True, stable=True).indices[:, :k]


def rankwise_score(h: Tensor, bias: Tensor | None, score: str) -> Tensor:
    """FlyLoRA routing score of every rank: ``|h + bias|`` (``"abs"``, the paper's ``flylora.py``)
    or ``h + bias`` (``"signed"``, the official PEFT layer). ``h [T, r]``, ``bias [r]`` or None."""
    if score not in SCORES:
        raise ValueError(f"score={score!r} is invalid: expected one of {SCORES}")
    s = wide(h) if bias is None else wide(h) + bias.to(wide(h).dtype)
    return s.abs() if score == "abs" else s


def rankwise_gate(topk_idx: Tensor, num_ranks: int, scale: float, dtype: torch.dtype) -> Tensor:
    """``[T, R]`` gate: ``scale`` on the chosen ranks of each token, 0 elsewhere."""
    gate = torch.zeros(topk_idx.shape[0], num_ranks, dtype=dtype, device=topk_idx.device)
    return gate.scatter(1, topk_idx, float(scale))


def rankwise_lora_forward(x: Tensor, A: Tensor, Bt: Tensor, k: int, *, bias: Tensor | None = None,
                          score: str = "abs", scale: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
    """Rank-wise implicit MoE (FlyLoRA): ``r`` rank-1 experts, top-k chosen from ``h`` itself.

    Args:
        x: ``[T, d_in]``; A: ``[r, d_in]`` (frozen, sparse random in FlyLoRA); Bt: ``[r, d_out]``.
        k: ranks kept per token; bias: ``[r]`` load-balancing bias added to the score, or None.

    Returns:
        ``(y [T, d_out], h [T, r], topk_idx [T, k] int64)`` with
        ``y = scale · (mask(topk_idx) ⊙ h) Bt``.
    """
    h = wide(x) @ wide(A).t()
    idx = topk_lowest_index(rankwise_score(h, bias, score), k)
    return (rankwise_gate(idx, h.shape[1], scale, h.dtype) * h).to(Bt.dtype) @ Bt, h, idx


def naive_rankwise_lora(x: Tensor, A: Tensor, Bt: Tensor, k: int, *, bias: Tensor | None = None,
                        score: str = "abs", scale: float = 1.0) -> tuple[Tensor, Tensor]:
    """Per-token loop oracle of :func:`rankwise_lora_forward` (tests only): Python sorts each
    token's ranks by ``(-score, index)``. Returns ``(y [T, d_out], topk_idx [T, k])``."""
    out = x.new_zeros(x.shape[0], Bt.shape[1])
    chosen = []
    for t in range(x.shape[0]):
        h = A @ x[t]
        s = [float(v) + (float(bias[c]) if bias is not None else 0.0) for c, v in enumerate(h.detach())]
        s = [abs(v) for v in s] if score == "abs" else s
        sel = sorted(range(len(s)), key=lambda c: (-s[c], c))[:k]
        chosen.append(sel)
        for c in sel:
            out[t] += scale * h[c] * Bt[c]
    return out, torch.tensor(chosen, dtype=torch.long).reshape(x.shape[0], k)


# ----------------------------------------------------------------------------- sorted grouped path
#
# Written for CPU speed, since this twin is the CPU path for large E·r: one stable sort, then per
# expert a gather of its rows with index_select (aten::index, i.e. x[idx], is 3-4x slower on CPU),
# the GEMMs and an in-place index_add_. Everything that is per slot rather than per expert (gate
# times scale, the gate gradient, the gated du and h) is one vectorised op over all slots, and
# GEMMs write straight into their slice of a per-slot buffer (``out=``): fewer ops cut
# forward+backward by 2-20 % against doing all of it per expert (T in {256, 2048, 8192}, d in
# {1024, 4096}, E/k/r in {8/2/16, 16/4/16, 64/2/8}, 1 and 2 threads, interleaved medians; within
# run-to-run noise with ragged ranks at T = 512). Per-expert gather buffers, not
# one [T·k, d] gather: buffers of a few MB are returned to the OS by glibc after each call and
# page-faulted back in on the next, which measured ~2x slower here; one buffer of the largest
# expert's size is reused by every expert. Nothing [T·k, d] is saved for the backward: x is
# gathered again there. Measured and not adopted (benchmarks/cpu_formulations.py): one [E, C, d]
# buffer padded to the largest expert with bmm (at best within run-to-run noise of this path,
# with 2 threads only; up to 2.7x slower at T = 2048) and the routed gate as a CSR matrix with MKL
# SpMM / SDDMM (slower in every cell).


class _Segments:
    """Routed slots (``t·k + j``) sorted by expert (stable; ``-1`` slots left out), with per-slot
    views split by expert.

    Attributes:
        slots: ``[n]`` int64 sorted slot ids; n = routed slots.
        counts: host ints ``[E]``, slots per expert.
        tokens: per-expert ``[c_e]`` token ids (views of one ``[n]`` tensor).
        scale: ``[n]`` output scale of each sorted slot's expert.
        gate: ``[n]`` gate weight × scale of each sorted slot.
    """

    def __init__(self, expert_ids: Tensor, weights: Tensor, scale_e: Tensor, dtype: torch.dtype):
        E, k = scale_e.numel(), expert_ids.shape[1]
        flat = expert_ids.reshape(-1)
        key = torch.where(flat >= 0, flat, E)
        counts = torch.bincount(key, minlength=E + 1)[:E]
        self.counts = counts.tolist()
        n = sum(self.counts)
        self.slots = torch.argsort(key, stable=True)[:n]
        self.tokens = torch.div(self.slots, k, rounding_mode="floor").split(self.counts)
        self.scale = scale_e.repeat_interleave(counts, output_size=n)
        # formed at the weights' and scales' precision, rounded once to the bank's dtype
        self.gate = (weights.reshape(-1).index_select(0, self.slots) * self.scale).to(dtype)

    def experts(self, rank_offsets: tuple[int, ...]):
        """``(e, c, lo, hi)`` per expert with slots and a nonzero rank (rows ``lo:hi``)."""
        for e, c in enumerate(self.counts):
            lo, hi = rank_offsets[e], rank_offsets[e + 1]
            if c and hi > lo:
                yield e, c, lo, hi


def _per_slot(like: Tensor, n: int, width: int, ragged: bool) -> Tensor:
    """``[n, width]`` per-slot buffer; zeroed only when some expert leaves columns unwritten."""
    return like.new_zeros(n, width) if ragged else like.new_empty(n, width)


def _workspace(like: Tensor, counts: list[int], width: int) -> Tensor:
    """One ``[max count, width]`` buffer that every expert's rows reuse. A fresh buffer per expert
    measured up to 10x slower on CPU for the largest expert: glibc raises its mmap threshold to
    the largest block freed, so the largest per-expert buffer is mmapped and page-faulted again
    on every call."""
    return like.new_empty(max(counts, default=0), width)


def _ranks(rank_offsets: tuple[int, ...]) -> tuple[int, bool]:
    """``(r_max, ragged)``: the widest expert and whether any expert is narrower."""
    ranks = [hi - lo for lo, hi in zip(rank_offsets[:-1], rank_offsets[1:])]
    r_max = max(ranks, default=0)
    return r_max, any(r != r_max for r in ranks)


def grouped_lora_forward(x: Tensor, A: Tensor, Bt: Tensor, expert_ids: Tensor, weights: Tensor,
                         rank_offsets: tuple[int, ...], scale_e: Tensor) -> tuple[Tensor, Tensor]:
    """Sorted-segment MoE-LoRA: one contiguous slot segment per expert (the grouped twin).

    Args:
        x: ``[T, d_in]``; A: ``[R, d_in]``; Bt: ``[R, d_out]`` (rank-major bank).
        expert_ids, weights: ``[T, k]`` routing (``-1`` = empty slot).
        rank_offsets: host ints ``[E+1]``: expert e owns rows ``rank_offsets[e]:rank_offsets[e+1]``.
        scale_e: ``[E]`` per-expert output scale.

    Returns:
        ``(y [T, d_out], hs [T·k, r_max])`` where ``hs[s, :r_e] = x[s // k] A_eᵀ`` for a routed
        slot ``s`` (0 elsewhere).
    """
    T, k = expert_ids.shape
    r_max, ragged = _ranks(rank_offsets)
    seg = _Segments(expert_ids, weights, scale_e, x.dtype)
    hs = _per_slot(x, seg.slots.numel(), r_max, ragged)          # [n, r_max], sorted like the slots
    hs_e, x_buf = hs.split(seg.counts), _workspace(x, seg.counts, x.shape[1])
    for e, c, lo, hi in seg.experts(rank_offsets):
        torch.mm(torch.index_select(x, 0, seg.tokens[e], out=x_buf[:c]), A[lo:hi].t(), out=hs_e[e][:, :hi - lo])
    hg = (hs * seg.gate.unsqueeze(1)).split(seg.counts)
    y = x.new_zeros(T, Bt.shape[1])
    y_buf = _workspace(x, seg.counts, Bt.shape[1])
    for e, c, lo, hi in seg.experts(rank_offsets):
        y.index_add_(0, seg.tokens[e], torch.mm(hg[e][:, :hi - lo], Bt[lo:hi], out=y_buf[:c]))
    return y, x.new_zeros(T * k, r_max).index_copy_(0, seg.slots, hs)


def grouped_lora_backward(grad_y: Tensor, x: Tensor, A: Tensor, Bt: Tensor, hs: Tensor, expert_ids: Tensor,
                          weights: Tensor, rank_offsets: tuple[int, ...], scale_e: Tensor, *,
                          need_x: bool = True, need_A: bool = True, need_Bt: bool = True,
                          need_w: bool = True) -> tuple[Tensor | None, ...]:
    """Backward of :func:`grouped_lora_forward`. ``hs`` is its per-slot ``[T·k, r_max]`` output.

    Returns ``(grad_x [T, d_in], grad_A [R, d_in], grad_Bt [R, d_out], grad_w [T, k])`` (None where
    not needed). The gate gradient is the ``r_e``-wide dot ``scale_e · <du_slot, h_slot>``."""
    T, k = expert_ids.shape
    r_max, ragged = _ranks(rank_offsets)
    seg = _Segments(expert_ids, weights, scale_e, hs.dtype)
    hss = hs.index_select(0, seg.slots)                          # [n, r_max], sorted like the slots
    du = _per_slot(hs, seg.slots.numel(), r_max, ragged)
    du_e = du.split(seg.counts)
    gA = torch.zeros_like(A) if need_A else None
    gB = torch.zeros_like(Bt) if need_Bt else None
    hg = (hss * seg.gate.unsqueeze(1)).split(seg.counts) if need_Bt else None
    need_du = need_x or need_A or need_w
    dy_buf = _workspace(grad_y, seg.counts, grad_y.shape[1])
    for e, c, lo, hi in seg.experts(rank_offsets):               # du and dBt share the gathered dy
        dy = torch.index_select(grad_y, 0, seg.tokens[e], out=dy_buf[:c])
        if need_du:
            torch.mm(dy, Bt[lo:hi].t(), out=du_e[e][:, :hi - lo])
        if need_Bt:
            torch.mm(hg[e][:, :hi - lo].t(), dy, out=gB[lo:hi])
    gw = None
    if need_w:
        gws = (du * hss).sum(1).mul_(seg.scale)
        gw = hs.new_zeros(T * k).index_copy_(0, seg.slots, gws).view(T, k)
    gx = torch.zeros_like(x) if need_x else None
    if need_x or need_A:
        gdu = (du * seg.gate.unsqueeze(1)).split(seg.counts)
        x_buf = _workspace(x, seg.counts, x.shape[1])
        for e, c, lo, hi in seg.experts(rank_offsets):
            g = gdu[e][:, :hi - lo]
            if need_x:
                gx.index_add_(0, seg.tokens[e], torch.mm(g, A[lo:hi], out=x_buf[:c]))
            if need_A:
                torch.mm(g.t(), torch.index_select(x, 0, seg.tokens[e], out=x_buf[:c]), out=gA[lo:hi])
    return gx, gA, gB, gw
