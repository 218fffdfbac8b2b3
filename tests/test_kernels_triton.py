"""Triton backend: every op and every gradient against its torch twin and a float64 loop.

On CPU the real kernels run under ``TRITON_INTERPRET=1`` (set by conftest), so shapes are small;
on a GPU the same tests run natively. Every launcher output is pre-filled with NaN (autouse
fixture) so a tile a kernel never wrote fails the comparison.
"""

from __future__ import annotations

import pytest
import torch

from moelora import kernels as K
from moelora.kernels import reference
from test_kernels_cases import (DEVICE, TOL, make_bank, make_routing, naive_gated, naive_rankwise, needs_triton,
                                rel, run_with_grads)

pytestmark = needs_triton

DT = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@pytest.fixture(autouse=True)
def poison():
    from moelora.kernels.triton import common

    common.POISON_OUTPUTS = True
    yield
    common.POISON_OUTPUTS = False


def _dev(*ts, dtype=None):
    return [t.to(DEVICE) if dtype is None or not t.is_floating_point() else t.to(DEVICE, dtype) for t in ts]


def _gated_case(T, d, m, ranks, k, pattern, dtype, seed=0):
    A, Bt, col_expert, col_scale, scale = make_bank(ranks, d, m, seed=seed)
    ids, w = make_routing(T, len(ranks), k, pattern, seed=seed + T)
    g = torch.Generator().manual_seed(seed + 7)
    x, dy = torch.randn(T, d, generator=g), torch.randn(T, m, generator=g)
    x, A, Bt, w, dy = _dev(x, A, Bt, w, dy, dtype=dtype)
    col_scale = col_scale.to(DEVICE, dtype)
    # The oracle sees exactly the (rounded) values the kernels see.
    return x, A, Bt, ids.to(DEVICE), w, col_expert.to(DEVICE), col_scale, scale.to(DEVICE, dtype), dy


CASES = [  # T, d, m, ranks, k, pattern, dtype
    (0, 100, 72, [4, 0, 8, 5, 3], 2, "random", "fp32"),
    (1, 100, 72, [4, 0, 8, 5, 3], 2, "random", "fp32"),
    (7, 100, 160, [4, 0, 8, 5, 3], 1, "skewed", "fp32"),
    (37, 100, 72, [4, 0, 8, 5, 3], 2, "sparse", "fp32"),
    (37, 100, 72, [4, 0, 8, 5, 3], 5, "full", "fp32"),
    (37, 33, 72, [4, 0, 8, 5, 3], 2, "skewed", "fp32"),
    (130, 100, 72, [4, 0, 8, 5, 3], 2, "random", "fp32"),
    (37, 48, 40, [64, 48, 40], 2, "random", "fp32"),          # R = 152: several R chunks / tiles
    (37, 100, 72, [4, 0, 8, 5, 3], 2, "random", "bf16"),
    (130, 100, 72, [4, 0, 8, 5, 3], 1, "skewed", "bf16"),
    (37, 100, 72, [4, 0, 8, 5, 3], 2, "random", "fp16"),
]


@pytest.mark.parametrize("T,d,m,ranks,k,pattern,dt", CASES)
def test_gated_and_grouped_match_twin_and_float64_loop(T, d, m, ranks, k, pattern, dt):
    dtype = DT[dt]
    x, A, Bt, ids, w, col_expert, col_scale, scale, dy = _gated_case(T, d, m, ranks, k, pattern, dtype)
    E = len(ranks)
    want = naive_gated(x, A, Bt, ids, w, ranks, scale, dy)

    def dense(be):
        return run_with_grads(lambda x, A, Bt, w: K.gated_lora(x, A, Bt, ids, w, col_expert, col_scale,
                                                               num_experts=E, backend=be), (x, A, Bt, w), dy)

    def grouped(be, deterministic=True):
        return run_with_grads(lambda x, A, Bt, w: K.grouped_lora(x, A, Bt, ids, w, ranks, scale, backend=be,
                                                                 deterministic=deterministic), (x, A, Bt, w), dy)

    twin = dense("torch")
    for got in (dense("triton"), grouped("triton"), grouped("triton", deterministic=False)):
        for name, a, b, t in zip(("y", "dx", "dA", "dBt", "dw"), got, want, twin):
            assert a.dtype == t.dtype, name
            assert rel(a, b) < TOL[dtype], f"{name} vs float64 loop"
            assert rel(a, t) < TOL[dtype], f"{name} vs torch twin"


@pytest.mark.parametrize("T", [0, 1, 7, 37, 130])
@pytest.mark.parametrize("score,bias,k,grad_x", [("abs", False, 4, True), ("signed", True, 1, False),
                                                 ("abs", True, 16, True)])
def test_rankwise_matches_twin_and_float64_loop(T, score, bias, k, grad_x):
    g = torch.Generator().manual_seed(T + k)
    x, A, Bt, dy = torch.randn(T, 100, generator=g), torch.randn(16, 100, generator=g) / 10, \
        torch.randn(16, 72, generator=g), torch.randn(T, 72, generator=g)
    b = torch.randn(16, generator=g) if bias else None
    x, A, Bt, dy = _dev(x, A, Bt, dy)
    b = None if b is None else b.to(DEVICE)
    y64, dx64, dA64, dB64, idx64 = naive_rankwise(x, A, Bt, k, b, score, 0.5, dy)
    for be in ("triton", "torch"):
        (y, idx), gx, gA, gB = run_with_grads(
            lambda x, A, Bt: K.rankwise_lora(x, A, Bt, k, bias=b, score=score, scale=0.5, grad_x=grad_x, backend=be),
            (x, A, Bt), dy)
        assert torch.equal(idx.cpu(), idx64), be
        assert rel(y, y64) < 1e-5 and rel(gB, dB64) < 1e-5 and rel(gA, dA64) < 1e-5
        if grad_x:
            assert rel(gx, dx64) < 1e-5
        else:
            assert gx is None


@pytest.mark.parametrize("dt", ["bf16", "fp16"])
def test_rankwise_low_precision_selects_from_its_own_h(dt):
    """The selection is checked against the reference rule applied to the kernel's own fp32 h
    (exact), and values against float64."""
    from moelora.kernels.triton import dense

    dtype = DT[dt]
    g = torch.Generator().manual_seed(3)
    x, A, Bt, dy = _dev(torch.randn(37, 100, generator=g), torch.randn(32, 100, generator=g) / 10,
                        torch.randn(32, 72, generator=g), torch.randn(37, 72, generator=g), dtype=dtype)
    bias = torch.randn(32, generator=g).to(DEVICE)
    (y, idx), gx, gA, gB = run_with_grads(
        lambda x, A, Bt: K.rankwise_lora(x, A, Bt, 8, bias=bias, score="signed", scale=0.25, backend="triton"),
        (x, A, Bt), dy)
    h = dense.shrink(x, A)
    assert torch.equal(idx, reference.topk_lowest_index(reference.rankwise_score(h, bias, "signed"), 8))
    gate = reference.rankwise_gate(idx, 32, 0.25, torch.float64)
    h64, B64, dy64 = x.double() @ A.double().t(), Bt.double(), dy.double()
    assert rel(y, (gate * h64) @ B64) < 1e-2
    assert rel(gB, (gate * h64).t() @ dy64) < 1e-2
    assert rel(gx, (gate * (dy64 @ B64.t())) @ A.double()) < 1e-2


def test_rankwise_bf16_backends_select_the_same_ranks():
    """The torch twin scores the same fp32 h as the kernel. Seeds 1-3 each had a token whose
    chosen ranks differed when the twin scored a bf16-rounded h."""
    for seed in (1, 2, 3):
        g = torch.Generator().manual_seed(seed)
        x, A, Bt = _dev(torch.randn(130, 100, generator=g), torch.randn(32, 100, generator=g) / 10,
                        torch.randn(32, 72, generator=g), dtype=torch.bfloat16)
        bias = torch.randn(32, generator=g).to(DEVICE)
        picks = [K.rankwise_lora(x, A, Bt, 8, bias=bias, score="signed", scale=0.25, backend=be)[1].cpu()
                 for be in ("triton", "torch")]
        assert torch.equal(*picks), seed


def test_rankwise_ties_go_to_the_lowest_index():
    # Rows 1, 3, 6 of A are equal and row 5 is their negative: exact ties in h and in |h|. The
    # other rows are tiny, so these four ranks dominate every token's |h|.
    A = torch.randn(8, 20, generator=torch.Generator().manual_seed(0)) * 0.01
    v = torch.randn(20, generator=torch.Generator().manual_seed(2))
    A[1], A[3], A[6], A[5] = v, v, v, -v
    x = torch.randn(9, 20, generator=torch.Generator().manual_seed(1)) * 0.1 + v
    Bt = torch.randn(8, 4)
    x, A, Bt = _dev(x, A, Bt)
    for score, k in (("abs", 3), ("abs", 4), ("signed", 2)):
        (_, idx_t) = K.rankwise_lora(x, A, Bt, k, score=score, backend="triton")
        (_, idx_r) = K.rankwise_lora(x, A, Bt, k, score=score, backend="torch")
        _, idx_loop = reference.naive_rankwise_lora(x.cpu().double(), A.cpu().double(), Bt.cpu().double(), k,
                                                    score=score)
        assert torch.equal(idx_t.cpu(), idx_loop) and torch.equal(idx_r.cpu(), idx_loop), score
    # with "abs" the four tied ranks are taken in index order 1, 3, 5, (6)
    _, idx = K.rankwise_lora(x, A, Bt, 3, score="abs", backend="triton")
    assert idx.cpu().tolist() == [[1, 3, 5]] * 9


def test_rankwise_nan_and_inf_scores_pick_the_same_distinct_ranks():
    # NaN ranks first, then by value, ties (-inf too) to the lowest index: a stable descending
    # torch.sort. The old kernel marked taken ranks with -inf, so a row of -inf scores picked one
    # rank k times, and a NaN row returned rank r (out of range).
    nan, inf = float("nan"), float("inf")
    g = torch.Generator().manual_seed(0)
    A, Bt, x = torch.randn(8, 6, generator=g), torch.randn(8, 5, generator=g), torch.randn(4, 6, generator=g)
    x[2, 0] = nan                                    # every score of token 2 is NaN
    biases = [torch.tensor([0, nan, -inf, 0, -inf, nan, 0, -inf]), torch.full((8,), -inf)]
    x, A, Bt = _dev(x, A, Bt)
    for bias in biases:
        for score, k in (("abs", 3), ("signed", 5), ("signed", 8)):
            _, idx_t = K.rankwise_lora(x, A, Bt, k, bias=bias.to(DEVICE), score=score, backend="triton")
            _, idx_r = K.rankwise_lora(x, A, Bt, k, bias=bias.to(DEVICE), score=score, backend="torch")
            assert torch.equal(idx_t.cpu(), idx_r.cpu()), (score, k, idx_t, idx_r)
            assert all(len(set(row)) == k and min(row) >= 0 and max(row) < 8 for row in idx_t.tolist())


def test_reruns_are_bitwise_equal():
    x, A, Bt, ids, w, col_expert, col_scale, scale, dy = _gated_case(130, 100, 72, [4, 0, 8, 5, 3], 2, "random",
                                                                     torch.float32)
    ops = {
        "dense": lambda x, A, Bt, w: K.gated_lora(x, A, Bt, ids, w, col_expert, col_scale, num_experts=5,
                                                  backend="triton"),
        "grouped": lambda x, A, Bt, w: K.grouped_lora(x, A, Bt, ids, w, [4, 0, 8, 5, 3], scale, backend="triton"),
        "rankwise": lambda x, A, Bt, w: K.rankwise_lora(x, A, Bt, 5, backend="triton")[0] * w[:, :1],
    }
    for name, fn in ops.items():
        first, second = run_with_grads(fn, (x, A, Bt, w), dy), run_with_grads(fn, (x, A, Bt, w), dy)
        for a, b in zip(first, second):
            assert torch.equal(a, b), name


@pytest.mark.parametrize("dt", ["fp32", "bf16"])
def test_raw_kernels_against_reference(dt):
    """Each launcher alone, at shapes with several tiles in every dimension and a split-T xty."""
    from moelora.kernels.triton import dense, grouped

    dtype = DT[dt]
    ranks = [40, 0, 50, 1, 39]   # R = 130: 2 R-chunks of 128 in gate_expand / xty / shrink
    x, A, Bt, ids, w, col_expert, col_scale, scale, dy = _gated_case(70, 150, 140, ranks, 2, "random", dtype)
    x64, A64, B64, dy64 = x.double(), A.double(), Bt.double(), dy.double()
    gate = reference.column_gate(ids, w.double(), col_expert, col_scale.double(), 5)
    tol = TOL[dtype]
    h = dense.shrink(x, A)
    assert h.dtype == torch.float32 and rel(h, x64 @ A64.t()) < tol
    assert rel(dense.gate_expand(h, Bt, ids, w, col_expert, col_scale, dtype), (gate * h.double()) @ B64) < tol
    du = dense.shrink(dy, Bt)
    for split in (1, 3):
        assert rel(dense.xty(du, x, ids, w, col_expert, col_scale, dtype, split=split),
                   (gate * du.double()).t() @ x64) < tol
    dw = dense.gate_grad(du, h, ids, col_expert, col_scale)
    _, _, _, dw64 = reference.gated_lora_backward(dy64, x64, A64, B64, h.double(), gate, ids, col_expert,
                                                  col_scale.double(), 5, need_x=False, need_A=False, need_Bt=False)
    assert rel(dw, dw64) < tol
    # grouped launchers against the sorted-segment twin
    plan = K.build_routing_plan(ids, 5, block_m=16)
    offs = [0, 40, 40, 90, 91, 130]
    roff = torch.tensor(offs, dtype=torch.int32, device=DEVICE)
    y64, hs64 = reference.grouped_lora_forward(x64, A64, B64, ids, w.double(), tuple(offs), scale.double())
    hs, _ = grouped.grouped_shrink(x, A, roff, plan.sorted_slot_ids, plan.block_expert, 2, 50, 16)
    valid = (ids.reshape(-1) >= 0) & (ids.reshape(-1) != 1)     # rows of -1 slots and rank-0 experts are never written
    assert rel(hs[valid], hs64[valid]) < tol
    assert rel(grouped.grouped_expand(hs, Bt, roff, plan.sorted_slot_ids, plan.block_expert, w, scale, 70, 2, 16,
                                      dtype), y64) < tol


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dt", ["fp32", "bf16"])
def test_gpu_large_shapes(dt):
    dtype = DT[dt]
    ranks = [16] * 8
    x, A, Bt, ids, w, col_expert, col_scale, scale, dy = _gated_case(4096, 1024, 1024, ranks, 2, "random", dtype)
    want = run_with_grads(lambda x, A, Bt, w: K.gated_lora(x.double(), A.double(), Bt.double(), ids, w.double(),
                                                           col_expert, col_scale.double(), num_experts=8,
                                                           backend="torch"), (x, A, Bt, w), dy.double())
    for fn in (lambda x, A, Bt, w: K.gated_lora(x, A, Bt, ids, w, col_expert, col_scale, num_experts=8,
                                                backend="triton"),
               lambda x, A, Bt, w: K.grouped_lora(x, A, Bt, ids, w, ranks, scale, backend="triton")):
        got = run_with_grads(fn, (x, A, Bt, w), dy)
        for a, b in zip(got, want):
            assert rel(a, b) < TOL[dtype]


def test_gated_lora_takes_the_triton_grouped_path_above_threshold(monkeypatch):
    from moelora.kernels import grouped as grouped_mod
    from moelora.kernels import ops as ops_mod

    ranks = [4, 0, 8, 5, 3]
    x, A, Bt, ids, w, col_expert, col_scale, scale, dy = _gated_case(37, 100, 72, ranks, 2, "random", torch.float32)
    fn = (lambda x, A, Bt, w: K.gated_lora(x, A, Bt, ids, w, col_expert, col_scale, num_experts=5, backend="triton"))
    dense = run_with_grads(fn, (x, A, Bt, w), dy)
    calls = []
    real = grouped_mod.grouped_lora
    monkeypatch.setattr(grouped_mod, "grouped_lora", lambda *a, **kw: calls.append(kw["backend"]) or real(*a, **kw))
    monkeypatch.setitem(ops_mod.DENSE_MAX_RANK, "triton", 16)   # R_pad = 32 > 16
    grouped = run_with_grads(fn, (x, A, Bt, w), dy)
    assert calls == ["triton"]
    for name, a, b in zip(("y", "dx", "dA", "dBt", "dw"), grouped, dense):
        assert rel(a, b) < 1e-5, name


def test_second_order_gradients_equal_the_torch_backend():
    # create_graph=True re-runs the torch twin's forward on the saved inputs for every backend.
    g = torch.Generator().manual_seed(0)
    T, d, E, k, r = 7, 12, 3, 2, 2
    x, A, Bt = torch.randn(T, d, generator=g), torch.randn(E * r, d, generator=g), torch.randn(E * r, 5, generator=g)
    ids, w = torch.randint(0, E, (T, k), generator=g), torch.rand(T, k, generator=g)
    ce, cs = torch.arange(E).repeat_interleave(r), torch.ones(E * r)
    x, A, Bt, w, ids, ce, cs = _dev(x, A, Bt, w, ids, ce, cs)
    out = {}
    for be in ("torch", "triton"):
        leaves = [t.detach().requires_grad_() for t in (x, A, Bt, w)]
        ops = {"gated": lambda x, A, Bt, w: K.gated_lora(x, A, Bt, ids, w, ce, cs, num_experts=E, backend=be),
               "grouped": lambda x, A, Bt, w: K.grouped_lora(x, A, Bt, ids, w, [r] * E, cs[:E], backend=be),
               "rankwise": lambda x, A, Bt, w: K.rankwise_lora(x, A, Bt, 3, backend=be)[0] + 0 * w.sum()}
        for name, op in ops.items():
            first = torch.autograd.grad(op(*leaves).square().sum(), leaves, create_graph=True)
            out[be, name] = torch.autograd.grad(sum(t.sum() for t in first), leaves)
    for name in ("gated", "grouped", "rankwise"):
        for got, want in zip(out["triton", name], out["torch", name]):
            assert rel(got, want) < 1e-5, name
