"""Inside a bf16 autocast region, routers and the expert ops keep the precision they choose (fp32
logits, fp32 h and rank scores, fp32 accumulation): their results on fp32 operands are the same
numbers as outside the region. Autocast used to recast their matmuls to bf16, flipping routings
(29 of 4096 tokens for a top-2 router) and FlyLoRA's rank choice (6 of 128)."""

import pytest
import torch

import moelora.kernels as K
from routers import MeteoRARouter, TopKRouter
from routers.moa import MoARouter

T, D, E = 512, 64, 8


def bf16_autocast():
    return torch.autocast("cpu", dtype=torch.bfloat16)


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(T, D, generator=g), g


@pytest.mark.parametrize("make", [
    lambda g: TopKRouter(in_features=D, num_experts=E, top_k=2, init_std=0.5, generator=g),
    lambda g: MeteoRARouter(in_features=D, num_experts=E, top_k=2, init_std=0.5, generator=g),
], ids=["topk", "meteora"])
def test_router_logits_and_routing_are_fp32_inside_autocast(make):
    x, g = inputs()
    router = make(g).train()
    want = router(x)
    with bf16_autocast():
        got = router(x)
    assert got.probs.dtype == torch.float32
    assert torch.equal(got.probs, want.probs) and torch.equal(got.expert_ids, want.expert_ids)


@pytest.mark.parametrize("threshold_grad", ["none", "adamole"])
def test_sparse_moa_router_is_unchanged_by_autocast(threshold_grad):
    x, g = inputs()
    router = MoARouter(in_features=D, num_types=4, sparse=True, threshold_grad=threshold_grad, generator=g)
    x.requires_grad_(True)
    want = router(x)
    (want.weights.square().sum()).backward()
    want_grads = [None if p.grad is None else p.grad.clone() for p in router.parameters()]
    router.zero_grad()
    with bf16_autocast():
        got = router(x)
    (got.weights.square().sum()).backward()  # outside, as torch.autocast asks for backward
    assert got.weights.dtype == torch.float32 and torch.equal(got.weights, want.weights)
    assert any(w is not None for w in want_grads)
    for p, w in zip(router.parameters(), want_grads):
        assert (p.grad is None) == (w is None)
        if w is not None:
            torch.testing.assert_close(p.grad, w, rtol=1e-6, atol=1e-9)


def test_rankwise_op_picks_the_same_ranks_inside_autocast():
    x, g = inputs(1)
    A = torch.randn(16, D, generator=g)
    Bt = torch.randn(16, 24, generator=g, requires_grad=True)
    y, idx = K.rankwise_lora(x, A, Bt, 4, score="signed", backend="torch")
    y.square().sum().backward()
    want = Bt.grad.clone()
    Bt.grad = None
    with bf16_autocast():  # forward and backward inside the region
        y2, idx2 = K.rankwise_lora(x, A, Bt, 4, score="signed", backend="torch")
        y2.square().sum().backward()
    assert y2.dtype == torch.float32 and torch.equal(idx2, idx) and torch.equal(y2, y)
    torch.testing.assert_close(Bt.grad, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("rank", [4, 32], ids=["dense-gated", "grouped"])  # E·r = 32 and 256
def test_gated_op_is_unchanged_by_autocast(rank):
    x, g = inputs(2)
    R = E * rank
    A = torch.randn(R, D, generator=g).requires_grad_(True)
    Bt = torch.randn(R, 24, generator=g).requires_grad_(True)
    ids = torch.randint(0, E, (T, 2), generator=g)
    w = torch.rand(T, 2, generator=g)
    col_expert = torch.arange(E).repeat_interleave(rank)
    col_scale = torch.full((R,), 2.0 / rank)

    def run():
        A.grad = Bt.grad = None
        y = K.gated_lora(x, A, Bt, ids, w, col_expert, col_scale, num_experts=E, backend="torch")
        y.square().sum().backward()
        return y.detach(), A.grad.clone(), Bt.grad.clone()

    want = run()
    with bf16_autocast():
        got = run()
    assert got[0].dtype == torch.float32
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("rank", [3, 16], ids=["dense-gated", "grouped"])  # E·r = 24 and 128
def test_bf16_bank_output_is_unbiased_by_its_scale(rank):
    # alpha/r = 8/3 is 2.671875 in bf16: the ops once rounded the scale to the bank's dtype, which
    # scaled every expert output by 1.0018 (a bias, not noise: it does not average out).
    g = torch.Generator().manual_seed(3)
    x = torch.randn(T, D, generator=g).bfloat16()
    A = torch.randn(E * rank, D, generator=g).bfloat16()
    Bt = torch.randn(E * rank, 24, generator=g).bfloat16()
    ids = torch.randint(0, E, (T, 2), generator=g)
    w = torch.rand(T, 2, generator=g)
    col_expert = torch.arange(E).repeat_interleave(rank)
    y = K.gated_lora(x, A, Bt, ids, w, col_expert, torch.full((E * rank,), 8 / 3), num_experts=E,
                     backend="torch").double()
    ref = torch.zeros(T, 24, dtype=torch.float64)
    for j in range(2):
        for e in range(E):
            rows = slice(e * rank, (e + 1) * rank)
            ref += ((ids[:, j] == e).double() * w[:, j].double() * 8 / 3)[:, None] * (
                (x.double() @ A[rows].double().t()) @ Bt[rows].double())
    ratio = float((y * ref).sum() / (ref * ref).sum())
    assert abs(ratio - 1) < 4e-4, ratio


def test_a_half_precision_cast_keeps_expert_scales_exact():
    import moelora
    from conftest import tiny_llama

    model = moelora.inject(tiny_llama(), moelora.MoELoRAConfig(target_modules=["q_proj"], num_experts=2, top_k=1,
                                                              rank=6, alpha=16))
    model.bfloat16()
    for layer in moelora.wrapped_layers(model):
        assert layer.bank.A.dtype == torch.bfloat16
        assert layer.bank.scale.dtype == torch.float32 and torch.equal(layer.bank.scale, torch.full((2,), 16 / 6))
    model.double()
    assert all(layer.bank.scale.dtype == torch.float64 for layer in moelora.wrapped_layers(model))
