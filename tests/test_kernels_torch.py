"""Torch backend of the kernel ops: gradcheck in float64, the naive loops, tie rule, routing plan,
backend resolution and the dense/grouped dispatch. Fast: no Triton here."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from moelora import kernels as K
from moelora.kernels import grouped as grouped_mod
from moelora.kernels import ops as ops_mod
from moelora.kernels import reference
from test_kernels_cases import make_bank, make_routing, naive_gated, naive_rankwise, rel, run_with_grads

RANKS = {"homog": [4, 4, 4], "hetero": [4, 8, 5], "rank1": [1] * 6, "rank0": [3, 0, 2, 1]}


@pytest.mark.parametrize("ranks", list(RANKS), ids=list(RANKS))
@pytest.mark.parametrize("k", [1, 2, "E"])
def test_gated_and_grouped_gradcheck_float64(ranks, k):
    ranks = RANKS[ranks]
    E = len(ranks)
    k = E if k == "E" else k
    A, Bt, col_expert, col_scale, scale = make_bank(ranks, 5, 4, seed=k)
    ids, w = make_routing(6, E, k, "random", seed=3)
    x = torch.randn(6, 5, generator=torch.Generator().manual_seed(2))
    inputs = [t.double().requires_grad_() for t in (x, A, Bt, w)]

    def dense(x, A, Bt, w):
        return K.gated_lora(x, A, Bt, ids, w, col_expert, col_scale.double(), num_experts=E, backend="torch")

    def grouped(x, A, Bt, w):
        return K.grouped_lora(x, A, Bt, ids, w, ranks, scale.double(), backend="torch")

    assert torch.autograd.gradcheck(dense, inputs)
    assert torch.autograd.gradcheck(grouped, inputs)
    # Second order (create_graph=True, e.g. a gradient penalty): the fast backwards read a saved
    # h without history, so only the twin re-run keeps these terms.
    assert torch.autograd.gradgradcheck(dense, inputs)
    assert torch.autograd.gradgradcheck(grouped, inputs)


@pytest.mark.parametrize("score", ["abs", "signed"])
@pytest.mark.parametrize("k", [1, 3, 6])
def test_rankwise_gradcheck_float64(score, k):
    g = torch.Generator().manual_seed(k)
    x, A, Bt, bias = torch.randn(7, 5, generator=g), torch.randn(6, 5, generator=g), \
        torch.randn(6, 4, generator=g), torch.randn(6, generator=g)
    inputs = [t.double().requires_grad_() for t in (x, A, Bt)]

    def fn(x, A, Bt):
        return K.rankwise_lora(x, A, Bt, k, bias=bias.double(), score=score, scale=0.8, backend="torch")[0]

    # A random x keeps every score away from a tie, so the selection is locally constant.
    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)


@pytest.mark.parametrize("T,pattern,k", [(0, "random", 2), (1, "random", 2), (7, "skewed", 1), (37, "sparse", 2),
                                         (37, "full", 4), (130, "random", 2)])
def test_torch_ops_match_float64_loop(T, pattern, k):
    ranks = [4, 0, 8, 5]
    A, Bt, col_expert, col_scale, scale = make_bank(ranks, 100, 72, seed=T)
    ids, w = make_routing(T, len(ranks), k, pattern, seed=T)
    x, dy = torch.randn(T, 100), torch.randn(T, 72)
    want = naive_gated(x, A, Bt, ids, w, ranks, scale, dy)
    dense = run_with_grads(lambda x, A, Bt, w: K.gated_lora(x, A, Bt, ids, w, col_expert, col_scale,
                                                            num_experts=4, backend="torch"), (x, A, Bt, w), dy)
    grouped = run_with_grads(lambda x, A, Bt, w: K.grouped_lora(x, A, Bt, ids, w, ranks, scale, backend="torch"),
                             (x, A, Bt, w), dy)
    for got in (dense, grouped):
        for name, a, b in zip(("y", "dx", "dA", "dBt", "dw"), got, want):
            assert rel(a, b) < 1e-5, name


@pytest.mark.parametrize("path", ["compare", "scatter"])
def test_column_gate_both_formulations_equal_a_loop(monkeypatch, path):
    # Small T·k·R compares slots with columns, larger scatters per expert: one loop oracle for both.
    monkeypatch.setattr(reference, "COMPARE_GATE_MAX", 10**9 if path == "compare" else 0)
    ranks = [2, 0, 3, 1]
    col_expert = torch.repeat_interleave(torch.arange(4), torch.tensor(ranks))
    col_scale = torch.tensor([0.5, 2.0, 3.0])[torch.tensor([0, 0, 1, 1, 1, 2])].double()
    ids = torch.tensor([[0, 2], [3, -1], [-1, -1], [2, 2], [1, 3]])
    w = torch.rand(5, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    w[1, 1] = w[2, 0] = float("nan")  # an empty slot's weight may hold anything
    scale_of = {0: 0.5, 2: 2.0, 3: 3.0}
    want = torch.zeros(5, 6, dtype=torch.float64)
    for t in range(5):
        for j in range(2):
            e = int(ids[t, j])
            for c in range(6):
                if e >= 0 and int(col_expert[c]) == e:
                    want[t, c] += w[t, j] * scale_of[e]
    got = reference.column_gate(ids, w, col_expert, col_scale, 4)
    torch.testing.assert_close(got, want, rtol=1e-15, atol=0)  # a repeated expert: (w0 + w1)·s vs w0·s + w1·s
    assert reference.column_gate(ids, w, col_expert, col_scale, 4, torch.bfloat16).dtype == torch.bfloat16


def test_minus_one_slots_contribute_nothing_and_get_zero_grad():
    A, Bt, col_expert, col_scale, scale = make_bank([3, 2], 6, 5)
    ids = torch.tensor([[0, -1], [-1, -1], [1, 0]])
    w = torch.rand(3, 2, requires_grad=True)
    x = torch.randn(3, 6)
    y = K.gated_lora(x, A, Bt, ids, w, col_expert, col_scale, num_experts=2, backend="torch")
    assert torch.equal(y[1], torch.zeros(5))
    y.sum().backward()
    assert w.grad[0, 1] == 0 and w.grad[1].abs().sum() == 0 and w.grad[2].abs().min() > 0


@pytest.mark.parametrize("score", ["abs", "signed"])
@pytest.mark.parametrize("bias", [False, True])
def test_rankwise_torch_matches_loop_and_grad_x_switch(score, bias):
    g = torch.Generator().manual_seed(5)
    x, A, Bt, dy = torch.randn(37, 100, generator=g), torch.randn(16, 100, generator=g), \
        torch.randn(16, 72, generator=g), torch.randn(37, 72, generator=g)
    b = torch.randn(16, generator=g) if bias else None
    y64, dx64, dA64, dB64, idx64 = naive_rankwise(x, A, Bt, 4, b, score, 0.5, dy)
    out, gx, gA, gB = run_with_grads(
        lambda x, A, Bt: K.rankwise_lora(x, A, Bt, 4, bias=b, score=score, scale=0.5, backend="torch"),
        (x, A, Bt), dy)
    assert torch.equal(out[1], idx64)
    assert rel(out[0], y64) < 1e-5 and rel(gx, dx64) < 1e-5 and rel(gA, dA64) < 1e-5 and rel(gB, dB64) < 1e-5
    _, gx_off, _, gB_off = run_with_grads(
        lambda x, A, Bt: K.rankwise_lora(x, A, Bt, 4, bias=b, score=score, scale=0.5, grad_x=False,
                                         backend="torch"), (x, A, Bt), dy)
    assert gx_off is None and torch.equal(gB_off, gB)  # PEFT semantics: no gradient into x


def test_rankwise_float64_scores_are_not_rounded_to_float32():
    # Ranks 0 and 1 differ by 1e-12 in h: a float32 score ties them and picks rank 0.
    x = torch.ones(1, 1, dtype=torch.float64)
    A = torch.tensor([[1.0], [1.0 + 1e-12]], dtype=torch.float64)
    Bt = torch.tensor([[1.0], [2.0]], dtype=torch.float64)
    assert K.rankwise_lora(x, A, Bt, 1, score="signed", backend="torch")[1].tolist() == [[1]]


def test_topk_lowest_index_rule():
    score = torch.tensor([[1.0, 3.0, 3.0, 0.0, 3.0], [2.0, 2.0, 2.0, 2.0, 2.0], [0.0, -1.0, 5.0, 5.0, -1.0]])
    got = reference.topk_lowest_index(score, 3)
    assert got.tolist() == [[1, 2, 4], [0, 1, 2], [2, 3, 0]]
    # signed vs abs: -3 ties +3 under "abs" and loses under "signed"
    h = torch.tensor([[3.0, -3.0, 1.0]])
    assert reference.topk_lowest_index(reference.rankwise_score(h, None, "abs"), 2).tolist() == [[0, 1]]
    assert reference.topk_lowest_index(reference.rankwise_score(h, None, "signed"), 2).tolist() == [[0, 2]]


def _plan_oracle(ids: np.ndarray, E: int, bm: int):
    """Numpy loop: each expert's slots in increasing order, padded with the sentinel to bm."""
    n = ids.size
    flat = ids.reshape(-1)
    runs, block_expert, block_offsets = [], [], [0]
    for e in range(E):
        slots = [s for s in range(n) if flat[s] == e]
        nb = -(-len(slots) // bm)
        runs += slots + [n] * (nb * bm - len(slots))
        block_expert += [e] * nb
        block_offsets.append(block_offsets[-1] + nb)
    return runs, block_expert, block_offsets


@pytest.mark.parametrize("T,k,E,bm,pattern", [(0, 2, 3, 16, "random"), (1, 1, 4, 16, "random"),
                                               (37, 2, 5, 16, "random"), (130, 2, 4, 32, "skewed"),
                                               (50, 3, 6, 16, "sparse"), (20, 4, 4, 64, "full")])
def test_routing_plan_matches_oracle(T, k, E, bm, pattern):
    ids, _ = make_routing(T, E, k, pattern, seed=T)
    plan = K.build_routing_plan(ids, E, block_m=bm)
    runs, bexp, boff = _plan_oracle(ids.numpy(), E, bm)
    nb = -(-(T * k) // bm) + E
    assert plan.sorted_slot_ids.shape == (nb * bm,) and plan.block_expert.shape == (nb,)
    assert plan.sorted_slot_ids[:len(runs)].tolist() == runs
    assert (plan.sorted_slot_ids[len(runs):] == T * k).all()            # unused tail = sentinel
    assert plan.block_expert.tolist() == bexp + [-1] * (nb - len(bexp))
    assert plan.block_offsets.tolist() == boff
    counts = np.bincount(ids.numpy().reshape(-1)[ids.numpy().reshape(-1) >= 0], minlength=E)
    assert plan.expert_offsets.tolist() == [0] + np.cumsum(counts).tolist()
    assert (plan.num_slots, plan.top_k, plan.block_m, plan.num_experts) == (T * k, k, bm, E)


def test_routing_plan_rejects_bad_block():
    with pytest.raises(ValueError, match="block_m"):
        K.build_routing_plan(torch.zeros(3, 1, dtype=torch.long), 2, block_m=24)


def test_resolve_backend_rules(monkeypatch):
    cpu = torch.device("cpu")
    with pytest.raises(ValueError, match="backend='cuda' is invalid"):
        K.resolve_backend("cuda", cpu)
    assert K.resolve_backend("torch", cpu) == "torch"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert K.resolve_backend("auto", cpu) == "torch"
    if K.triton_available():
        with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
            K.resolve_backend("triton", cpu)
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        assert K.resolve_backend("auto", cpu) == "triton"
        assert K.resolve_backend("triton", cpu) == "triton"


def test_import_and_auto_without_triton():
    """A machine without triton (macOS): import works, auto falls back, triton says what to do."""
    code = (
        "import sys, importlib.abc\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name == 'triton' or name.startswith('triton.'):\n"
        "            raise ImportError('blocked')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import importlib.util; importlib.util.find_spec = (lambda f: lambda n, *a: None if n == 'triton' else f(n, *a))(importlib.util.find_spec)\n"
        "import torch, moelora\n"
        "from moelora import kernels as K\n"
        "A, Bt = torch.randn(4, 3), torch.randn(4, 2)\n"
        "y = K.gated_lora(torch.randn(5, 3), A, Bt, torch.zeros(5, 1, dtype=torch.long), torch.ones(5, 1),\n"
        "                 torch.zeros(4, dtype=torch.long), torch.ones(4), num_experts=1, backend='auto')\n"
        "assert y.shape == (5, 2) and 'triton' not in sys.modules\n"
        "try:\n"
        "    K.gated_lora(torch.randn(5, 3), A, Bt, torch.zeros(5, 1, dtype=torch.long), torch.ones(5, 1),\n"
        "                 torch.zeros(4, dtype=torch.long), torch.ones(4), num_experts=1, backend='triton')\n"
        "except RuntimeError as e:\n"
        "    assert 'not installed' in str(e), e\n"
        "else:\n"
        "    raise SystemExit('no error')\n"
        "print('ok')\n")
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_gated_lora_switches_to_grouped_above_threshold(monkeypatch):
    ranks = [4, 0, 8, 5]
    A, Bt, col_expert, col_scale, scale = make_bank(ranks, 10, 6)
    ids, w = make_routing(9, 4, 1, "random")                   # E = 4 > 2·k: grouped above the threshold
    x = torch.randn(9, 10)
    dense = K.gated_lora(x, A, Bt, ids, w, col_expert, col_scale, num_experts=4, backend="torch")
    calls = []
    real = grouped_mod.grouped_lora

    def spy(*args, **kwargs):
        calls.append(args[5])
        return real(*args, **kwargs)

    monkeypatch.setattr(grouped_mod, "grouped_lora", spy)
    monkeypatch.setitem(ops_mod.DENSE_MAX_RANK, "torch", 16)   # R = 17 > 16
    for given in (None, ranks):
        y = K.gated_lora(x, A, Bt, ids, w, col_expert, col_scale, num_experts=4, backend="torch", ranks=given)
        assert rel(y, dense) < 1e-6
    assert calls == [ranks, ranks]
    monkeypatch.setitem(ops_mod.DENSE_MAX_RANK, "torch", 17)
    K.gated_lora(x, A, Bt, ids, w, col_expert, col_scale, num_experts=4, backend="torch")
    assert len(calls) == 2
    # E ≤ 2·k: the dense path does at most twice the routed FLOPs and stays, whatever R is.
    monkeypatch.setitem(ops_mod.DENSE_MAX_RANK, "torch", 16)
    ids2, w2 = make_routing(9, 4, 2, "random")
    K.gated_lora(x, A, Bt, ids2, w2, col_expert, col_scale, num_experts=4, backend="torch")
    assert len(calls) == 2


def test_bad_inputs_name_the_problem():
    A, Bt, col_expert, col_scale, scale = make_bank([2, 2], 4, 3)
    ids, w = make_routing(5, 2, 1, "random")
    x = torch.randn(5, 4)
    with pytest.raises(ValueError, match="routing shape"):
        K.gated_lora(x, A, Bt, ids[:4], w[:4], col_expert, col_scale, num_experts=2)
    with pytest.raises(ValueError, match="col_expert"):
        K.gated_lora(x, A, Bt, ids, w, col_expert[:3], col_scale, num_experts=2)
    with pytest.raises(ValueError, match="k=5"):
        K.rankwise_lora(x, A, Bt, 5)
    with pytest.raises(ValueError, match="score"):
        K.rankwise_lora(x, A, Bt, 2, score="relu")
    with pytest.raises(ValueError, match="ranks sum"):
        K.grouped_lora(x, A, Bt, ids, w, [2, 3], scale)
    plan = K.build_routing_plan(ids[:4], 2)
    with pytest.raises(ValueError, match="Rebuild"):
        K.grouped_lora(x, A, Bt, ids, w, [2, 2], scale, plan=plan)
    with pytest.raises(ValueError, match=r"x is torch.bfloat16.*x.to\(A.dtype\)"):
        K.gated_lora(x.bfloat16(), A, Bt, ids, w, col_expert, col_scale, num_experts=2)
    with pytest.raises(ValueError, match="x is torch.float64"):
        K.rankwise_lora(x.double(), A, Bt, 2)
    for bad in (ids.clone().fill_(2), ids.clone().fill_(-2)):
        with pytest.raises(ValueError, match=r"outside \[-1, 2\) for num_experts=2"):
            K.gated_lora(x, A, Bt, bad, w, col_expert, col_scale, num_experts=2)
        with pytest.raises(ValueError, match=r"outside \[-1, 2\)"):
            K.grouped_lora(x, A, Bt, bad, w, [2, 2], scale)
    with pytest.raises(ValueError, match="integer tensor"):
        K.grouped_lora(x, A, Bt, ids.float(), w, [2, 2], scale)


def test_bank_layout_plan_and_devices_are_checked():
    # Each of these once passed silently: the dense path read col_expert, the grouped path
    # (above DENSE_MAX_RANK) the ranks, and the Triton path a plan of any routing of the right
    # shape, so a wrong layout gave another result per path or backend.
    A, Bt, col_expert, col_scale, scale = make_bank([2, 3], 4, 3)
    ids, w = make_routing(5, 2, 1, "random")
    x = torch.randn(5, 4)

    def gated(col=col_expert, ranks=None, **kw):
        return K.gated_lora(x, A, Bt, ids, w, col, col_scale, num_experts=2, ranks=ranks, backend="torch", **kw)

    gated(ranks=[2, 3])  # the bank's own layout
    for bad, match in ((col_expert.flip(0), "not sorted"), (col_expert - 1, r"ids in \[-1, 0\]"),
                       (col_expert + 1, r"in \[0, 2\)"), (col_expert.float(), "col_expert must be an integer")):
        with pytest.raises(ValueError, match=match):
            gated(bad)
    for ranks, match in (([3, 2], r"disagree with col_expert, which holds \[2, 3\]"),
                         ([2, 4], "summing to R=5"), ([6, -1], "integers >= 0"), ([5], "num_experts=2")):
        with pytest.raises(ValueError, match=match):
            gated(ranks=ranks)
    with pytest.raises(ValueError, match="negative rank"):
        K.grouped_lora(x, torch.randn(5, 4), torch.randn(5, 3), ids, w, [6, -1], scale)
    with pytest.raises(ValueError, match=r"build_routing_plan: expert_ids holds ids in \[.*outside \[-1, 2\)"):
        K.build_routing_plan(ids + 5, 2)
    with pytest.raises(ValueError, match="integer tensor"):
        K.build_routing_plan(ids.float(), 2)
    with pytest.raises(ValueError, match=r"on cpu but \{'weights': 'meta'\}"):
        K.gated_lora(x, A, Bt, ids, w.to("meta"), col_expert, col_scale, num_experts=2, backend="torch")
    with pytest.raises(ValueError, match=r"'scale': 'meta'"):
        K.grouped_lora(x, A, Bt, ids, w, [2, 3], scale.to("meta"))


@pytest.mark.triton
def test_a_plan_of_another_routing_is_refused_on_the_triton_path():
    A, Bt, col_expert, col_scale, scale = make_bank([2, 3], 4, 3)
    ids, w = make_routing(5, 2, 1, "random")
    x = torch.randn(5, 4)
    other = torch.where(ids >= 0, 1 - ids, ids)  # same shape and experts, another routing
    K.grouped_lora(x, A, Bt, ids, w, [2, 3], scale, plan=K.build_routing_plan(ids, 2), backend="triton")
    with pytest.raises(ValueError, match="plan was built from other expert_ids"):
        K.grouped_lora(x, A, Bt, ids, w, [2, 3], scale, plan=K.build_routing_plan(other, 2), backend="triton")


def test_top_level_kernels_import_is_an_inert_shell():
    """With the repo root on sys.path, transformers imports ``kernels`` while probing for Hugging
    Face's package of that name. That copy must not register the moelora custom ops a second time
    (which left the first registrations dangling and crashed later calls)."""
    code = ("import sys; sys.path.insert(0, '.')\n"
            "import moelora.kernels, torch\n"
            "import kernels\n"
            "assert kernels.__all__ == [] and 'kernels.grouped' not in sys.modules, sorted(sys.modules)\n"
            "from moelora.kernels import grouped_lora\n"
            "for _ in range(20):\n"
            "    x = torch.randn(5, 3, requires_grad=True)\n"
            "    grouped_lora(x, torch.randn(4, 3), torch.randn(4, 2), torch.zeros(5, 1, dtype=torch.long),\n"
            "                 torch.ones(5, 1), [4], torch.ones(1), backend='torch').sum().backward()\n"
            "print('ok')\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_inference_fast_path_equals_the_autograd_path():
    # Under no_grad (or with nothing requiring grad) gated_lora skips the autograd.Function;
    # the numbers must be the very same.
    ranks = [3, 0, 5, 2]
    A, Bt, col_expert, col_scale, _ = make_bank(ranks, 10, 6)
    ids, w = make_routing(11, 4, 2, "random")
    x = torch.randn(11, 10, requires_grad=True)
    run = lambda x: K.gated_lora(x, A, Bt, ids, w, col_expert, col_scale, num_experts=4, backend="torch")  # noqa: E731
    with_grad = run(x)
    assert with_grad.grad_fn is not None
    with torch.no_grad():
        fast = run(x)
    assert fast.grad_fn is None and torch.equal(fast, with_grad.detach())
    assert torch.equal(run(x.detach()), fast)


def test_device_constants_are_built_once_per_value_device_and_dtype():
    a = ops_mod.device_constant([0, 40, 90], "cpu", torch.int32)
    assert a.dtype == torch.int32 and a.tolist() == [0, 40, 90]
    assert ops_mod.device_constant((0, 40, 90), torch.device("cpu"), torch.int32) is a  # no new copy
    assert ops_mod.device_constant([0, 40, 90], "cpu") is not a                         # int64 differs
    assert ops_mod.device_constant([0, 40, 91], "cpu", torch.int32).tolist() == [0, 40, 91]
