"""The dense-gated torch primitive against a per-token loop, and its hand-written backward
against autograd's numerical gradient (float64 gradcheck)."""

import pytest
import torch

from moelora.experts import ExpertBank
from moelora.kernels import gated_lora, reference


def make_case(ranks, k, *, T=6, d_in=5, d_out=7, empty_slots=False, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    E, R = len(ranks), sum(ranks)
    x = torch.randn(T, d_in, generator=g, dtype=dtype)
    A = torch.randn(R, d_in, generator=g, dtype=dtype)
    Bt = torch.randn(R, d_out, generator=g, dtype=dtype)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    if empty_slots:
        ids[::2, -1] = -1
        ids[1, :] = -1  # a token with no expert at all
    w = torch.rand(T, k, generator=g, dtype=dtype) + 0.1
    scales = torch.linspace(0.5, 2.0, E, dtype=dtype)
    col_expert = torch.repeat_interleave(torch.arange(E), torch.tensor(ranks))
    return x, A, Bt, ids, w, scales, col_expert


CASES = [
    ([2, 3, 1, 4], 1, False),
    ([2, 3, 1, 4], 2, True),
    ([2, 3, 1, 4], 4, True),   # k = E
    ([3, 0, 2], 2, False),     # a rank-0 expert
    ([4], 1, False),           # single expert
]


@pytest.mark.parametrize("ranks,k,empty", CASES)
def test_matches_per_token_loop(ranks, k, empty):
    x, A, Bt, ids, w, scales, col_expert = make_case(ranks, k, empty_slots=empty)
    got = gated_lora(x, A, Bt, ids, w, col_expert, scales[col_expert], num_experts=len(ranks))
    want = reference.naive_moe_lora(x, A, Bt, ids, w, ranks, scales)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("ranks,k,empty", CASES)
def test_gradcheck_float64(ranks, k, empty):
    x, A, Bt, ids, w, scales, col_expert = make_case(ranks, k, empty_slots=empty, T=5, d_in=4, d_out=3)
    inputs = [t.clone().requires_grad_(True) for t in (x, A, Bt, w)]

    def fn(x, A, Bt, w):
        return gated_lora(x, A, Bt, ids, w, col_expert, scales[col_expert], num_experts=len(ranks))

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-8)


def test_gradients_match_autograd_of_naive_loop():
    ranks, k = [2, 1, 3], 2
    x, A, Bt, ids, w, scales, col_expert = make_case(ranks, k, empty_slots=True)
    leaves_a = [t.clone().requires_grad_(True) for t in (x, A, Bt, w)]
    leaves_b = [t.clone().requires_grad_(True) for t in (x, A, Bt, w)]
    grad_out = torch.randn(x.shape[0], Bt.shape[1], dtype=x.dtype)
    gated_lora(*leaves_a[:3], ids, leaves_a[3], col_expert, scales[col_expert], num_experts=3).backward(grad_out)
    reference.naive_moe_lora(*leaves_b[:3], ids, leaves_b[3], ranks, scales).backward(grad_out)
    for a, b in zip(leaves_a, leaves_b):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-10)


def test_empty_slots_contribute_nothing_and_get_zero_grad():
    x, A, Bt, ids, w, scales, col_expert = make_case([2, 2, 2], 2, empty_slots=True)
    w = w.clone().requires_grad_(True)
    y = gated_lora(x, A, Bt, ids, w, col_expert, scales[col_expert], num_experts=3)
    assert torch.equal(y[1], torch.zeros_like(y[1]))  # token 1 has only -1 slots
    y.sum().backward()
    assert torch.all(w.grad[ids < 0] == 0)
    assert torch.all(w.grad[ids >= 0] != 0)


def test_only_needed_gradients_are_computed():
    # A frozen A (FlyLoRA-style) must not receive a gradient.
    x, A, Bt, ids, w, scales, col_expert = make_case([2, 2], 1)
    Bt = Bt.clone().requires_grad_(True)
    gated_lora(x, A, Bt, ids, w, col_expert, scales[col_expert], num_experts=2).sum().backward()
    assert A.grad is None and Bt.grad is not None


def test_bank_layout_matches_peft_pairs():
    bank = ExpertBank(in_features=5, out_features=3, ranks=[2, 0, 3], scales=[1.0, 1.0, 0.5], dtype=torch.float64)
    a, b = torch.randn(3, 5, dtype=torch.float64), torch.randn(3, 3, dtype=torch.float64)
    bank.set_lora_pair(2, a, b)
    got_a, got_b = bank.lora_pair(2)
    assert torch.equal(got_a, a) and torch.equal(got_b, b)
    assert bank.lora_pair(1)[0].shape == (0, 5)
    assert bank.col_expert.tolist() == [0, 0, 2, 2, 2]
    with pytest.raises(ValueError, match="expected lora_A"):
        bank.set_lora_pair(0, a, b)


def test_bank_init_is_peft_like():
    bank = ExpertBank(in_features=64, out_features=8, ranks=[4, 4], scales=[2.0, 2.0],
                      generator=torch.Generator().manual_seed(0))
    assert torch.all(bank.Bt == 0)
    bound = 1 / 64 ** 0.5
    assert bank.A.abs().max() <= bound and bank.A.abs().max() > 0.9 * bound


def test_shape_errors_name_the_tensors():
    x, A, Bt, ids, w, scales, col_expert = make_case([2, 2], 1)
    with pytest.raises(ValueError, match="shape mismatch"):
        gated_lora(x[:, :3], A, Bt, ids, w, col_expert, scales[col_expert], num_experts=2)
    with pytest.raises(ValueError, match="backend"):
        gated_lora(x, A, Bt, ids, w, col_expert, scales[col_expert], num_experts=2, backend="cuda")
