"""Shared builders and float64 oracles for the kernel tests (no tests in this file).

Every oracle here is independent of the code under test: ``naive_moe_lora`` / ``naive_rankwise_lora``
loop token by token in float64 and autograd differentiates the loop.
"""

from __future__ import annotations

import os

import pytest
import torch

from moelora.kernels import reference

# Triton runs natively on a GPU, in the interpreter on CPU (conftest sets TRITON_INTERPRET=1 there).
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TRITON_OK = DEVICE == "cuda" or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
needs_triton = pytest.mark.skipif(
    not TRITON_OK or __import__("importlib").util.find_spec("triton") is None,
    reason="needs triton and either CUDA or TRITON_INTERPRET=1")

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2, torch.float64: 1e-12}


def rel(a: torch.Tensor | None, b: torch.Tensor | None) -> float:
    """Relative Frobenius error of ``a`` against the oracle ``b`` (0 for two empty tensors)."""
    assert a is not None and b is not None, "a gradient is missing"
    assert a.shape == b.shape, f"shape {tuple(a.shape)} != oracle {tuple(b.shape)}"
    assert bool(torch.isfinite(a).all()), "non-finite values (an unwritten NaN-poisoned tile?)"
    a, b = a.double().cpu(), b.double().cpu()
    if b.numel() == 0:
        return 0.0
    den = b.norm().item()
    return (a - b).norm().item() / (den if den > 0 else 1.0)


def make_bank(ranks, d_in: int, d_out: int, *, seed: int = 0):
    """Random fp32 bank: ``A [R, d_in]``, ``Bt [R, d_out]``, ``col_expert``, ``col_scale``, ``scale [E]``."""
    g = torch.Generator().manual_seed(seed)
    R, E = sum(ranks), len(ranks)
    A = torch.randn(R, d_in, generator=g) / d_in ** 0.5
    Bt = torch.randn(R, d_out, generator=g)
    scale = 0.5 + torch.rand(E, generator=g)
    col_expert = torch.repeat_interleave(torch.arange(E), torch.tensor(list(ranks), dtype=torch.long))
    return A, Bt, col_expert, scale[col_expert].contiguous(), scale


def make_routing(T: int, E: int, k: int, pattern: str, *, seed: int = 0):
    """``(ids [T, k] int64, w [T, k] fp32)``; distinct experts per token.

    pattern: ``"random"`` (about 20 % of slots ``-1``), ``"skewed"`` (slot 0 of every token on
    expert E-1, the rest random or -1), ``"sparse"`` (only experts {0, 2} ever chosen, the others
    get no token), ``"full"`` (no -1).
    """
    g = torch.Generator().manual_seed(seed + 1)
    pool = [0, 2] if pattern == "sparse" else list(range(E))
    ids = torch.full((T, k), -1, dtype=torch.long)
    for t in range(T):
        order = [pool[i] for i in torch.randperm(len(pool), generator=g).tolist()]
        if pattern == "skewed":
            order = [E - 1] + [e for e in order if e != E - 1]
        row = order[:k]
        ids[t, :len(row)] = torch.tensor(row)
    if pattern in ("random", "skewed"):
        drop = torch.rand(T, k, generator=g) < 0.2
        if pattern == "skewed":
            drop[:, 0] = False
        ids[drop] = -1
    w = torch.rand(T, k, generator=g) + 0.1
    return ids, w


def _backward(y, dy, leaves):
    if y.requires_grad:
        y.backward(dy.double().cpu())
    else:  # T = 0: the loop never touched a leaf, every gradient is zero
        for t in leaves:
            t.grad = torch.zeros_like(t)


def naive_gated(x, A, Bt, ids, w, ranks, scale, dy):
    """float64 oracle: ``(y, dx, dA, dBt, dw)`` by autograd through the per-token loop."""
    leaves = [t.detach().double().cpu().requires_grad_() for t in (x, A, Bt, w)]
    y = reference.naive_moe_lora(leaves[0], leaves[1], leaves[2], ids.cpu(), leaves[3], list(ranks),
                                 scale.double().cpu())
    _backward(y, dy, leaves)
    return [y.detach()] + [t.grad for t in leaves]


def naive_rankwise(x, A, Bt, k, bias, score, scale, dy):
    """float64 oracle: ``(y, dx, dA, dBt, idx)`` by autograd through the per-token loop."""
    leaves = [t.detach().double().cpu().requires_grad_() for t in (x, A, Bt)]
    y, idx = reference.naive_rankwise_lora(leaves[0], leaves[1], leaves[2], k,
                                           bias=None if bias is None else bias.double().cpu(),
                                           score=score, scale=scale)
    _backward(y, dy, leaves)
    return y.detach(), leaves[0].grad, leaves[1].grad, leaves[2].grad, idx


def run_with_grads(fn, tensors, dy):
    """Call ``fn(*leaves)`` on fresh leaves (all requiring grad), backprop ``dy``; return
    ``[out, grad_0, grad_1, ...]``."""
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*leaves)
    y = out[0] if isinstance(out, tuple) else out
    y.backward(dy.to(y.dtype))
    return [out] + [t.grad for t in leaves]
