"""SiRA: capacity, token dropping, expert dropout and aux losses against independent oracles."""

import math
from fractions import Fraction
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import moelora
from conftest import tiny_llama
from moelora.routers import SiRARouter, TopKRouter
from moelora.routers.sira import capacity_keep, expert_capacity
from moelora.state import get_state

D = 8
FACTORS = [None, 0.25, 0.5, 1.0, 1.1, 1.25, 2.0, 3.3]


def router(E, k, seed=0, **kw):
    kw.setdefault("expert_dropout", 0.0)
    return SiRARouter(in_features=D, num_experts=E, top_k=k, init_std=1.0,
                      generator=torch.Generator().manual_seed(seed), **kw)


def ref_capacity(S, k, cf, E, min_capacity):
    """Exact rational capacity: the decimal factor as written (Fraction('1.1') == 11/10)."""
    return max(min_capacity, math.ceil(Fraction(str(cf)) * k * S / E))


def ref_keep(ids, probs, real, group_size, cf, E, min_capacity, policy, fill_order):
    """Naive Python loop: walk the slots in priority order, keep while the expert has room."""
    T, k = len(ids), len(ids[0]) if ids else 0
    group = [0 if group_size is None else t // group_size for t in range(T)]
    S = {}
    for t in range(T):
        S[group[t]] = S.get(group[t], 0) + int(real[t])
    entries = []
    for t in range(T):
        for j in range(k):
            if ids[t][j] >= 0 and real[t]:
                order = j * T + t if fill_order == "slot_major" else t * k + j
                entries.append((t, j, ids[t][j], probs[t][ids[t][j]], order))
    if policy == "probability":
        entries.sort(key=lambda e: (-e[3], e[4]))
    else:
        entries.sort(key=lambda e: e[4])
    used, keep, dropped = {}, [[False] * k for _ in range(T)], [0] * E
    for t, j, e, _, _ in entries:
        key = (group[t], e)
        if used.get(key, 0) < ref_capacity(S[group[t]], k, cf, E, min_capacity):
            used[key] = used.get(key, 0) + 1
            keep[t][j] = True
        else:
            dropped[e] += 1
    return keep, dropped


@st.composite
def routing_cases(draw):
    T, E = draw(st.integers(1, 24)), draw(st.integers(1, 6))
    return dict(T=T, E=E, k=draw(st.integers(1, E)), cf=draw(st.sampled_from(FACTORS)),
                min_capacity=draw(st.integers(0, 3)), group_size=draw(st.none() | st.integers(1, 9)),
                policy=draw(st.sampled_from(["position", "probability"])),
                fill_order=draw(st.sampled_from(["slot_major", "token_major"])),
                real=draw(st.none() | st.lists(st.booleans(), min_size=T, max_size=T)),
                after_drop=draw(st.booleans()), seed=draw(st.integers(0, 10_000)))


@settings(max_examples=150, deadline=None)
@given(case=routing_cases())
def test_capacity_dropping_matches_naive_loop(case):
    T, E, k, cf = case["T"], case["E"], case["k"], case["cf"]
    kw = dict(min_capacity=case["min_capacity"], group_size=case["group_size"], drop_policy=case["policy"],
              fill_order=case["fill_order"], renormalize_after_drop=case["after_drop"])
    limited = router(E, k, case["seed"], capacity_factor=cf, eval_capacity_factor=cf, **kw).eval()
    unlimited = router(E, k, case["seed"], capacity_factor=None, eval_capacity_factor=None, **kw).eval()
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(case["seed"]))
    mask = None if case["real"] is None else torch.tensor(case["real"])
    real = [True] * T if mask is None else case["real"]
    with torch.no_grad():
        r, pre = limited(x, token_mask=mask), unlimited(x, token_mask=mask)

    # padding never gets an expert; without capacity nothing is dropped
    assert torch.all(pre.expert_ids[~torch.tensor(real)] == -1)
    assert torch.all((pre.expert_ids >= 0) == torch.tensor(real).view(-1, 1))
    assert pre.dropped.sum() == 0
    if cf is None:
        assert torch.equal(r.expert_ids, pre.expert_ids)
        return

    keep, dropped = ref_keep(pre.expert_ids.tolist(), r.probs.tolist(), real, case["group_size"], cf, E,
                             case["min_capacity"], case["policy"], case["fill_order"])
    keep = torch.tensor(keep, dtype=torch.bool).view(T, k)
    assert torch.equal(r.expert_ids, torch.where(keep, pre.expert_ids, -1))
    assert r.dropped.tolist() == dropped

    # capacity is never exceeded, checked per (group, expert) on the router's own output
    gs = case["group_size"] or T
    for g0 in range(0, T, gs):
        S = sum(real[g0:g0 + gs])
        for e in range(E):
            assert int((r.expert_ids[g0:g0 + gs] == e).sum()) <= ref_capacity(S, k, cf, E, case["min_capacity"])

    # weights: 0 on empty slots; kept ones renormalised over the kept (or pre-drop) slots
    assert torch.all(r.weights[r.expert_ids == -1] == 0)
    has_kept = (r.expert_ids >= 0).any(-1)
    if case["after_drop"]:
        torch.testing.assert_close(r.weights.sum(-1)[has_kept], torch.ones(int(has_kept.sum())))
    else:
        torch.testing.assert_close(r.weights, torch.where(keep, pre.weights, 0.0))


@settings(max_examples=30, deadline=None)
@given(T=st.integers(2, 16), E=st.integers(1, 5), data=st.data(), seed=st.integers(0, 999))
def test_unlimited_capacity_equals_topk_and_is_permutation_equivariant(T, E, data, seed):
    k = data.draw(st.integers(1, E))
    sira = router(E, k, seed, capacity_factor=None, eval_capacity_factor=None, aux_loss_coef=0.1, z_loss_coef=0.01)
    topk = TopKRouter(in_features=D, num_experts=E, top_k=k, init_std=1.0, aux_loss_coef=0.1, z_loss_coef=0.01,
                      generator=torch.Generator().manual_seed(seed))
    assert torch.equal(sira.weight, topk.weight)
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(seed + 1))
    a, b = sira(x), topk(x)  # training mode: aux losses on
    assert torch.equal(a.expert_ids, b.expert_ids)
    torch.testing.assert_close(a.weights, b.weights, atol=1e-7, rtol=0)
    torch.testing.assert_close(a.aux_loss, b.aux_loss)
    perm = torch.randperm(T, generator=torch.Generator().manual_seed(seed))
    c = sira(x[perm])
    assert torch.equal(c.expert_ids, a.expert_ids[perm])
    torch.testing.assert_close(c.weights, a.weights[perm])


def linear_model(cfg, d_out=6, seed=0):
    """A one-linear model with SiRA injected and non-zero B (so every expert changes the output)."""
    torch.manual_seed(seed)
    model = moelora.inject(nn.Sequential(nn.Linear(D, d_out)), cfg)
    layer = moelora.wrapped_layers(model)[0]
    with torch.no_grad():
        layer.bank.Bt.normal_()
    return model, layer


def expert_delta(layer, x, e):
    """``[T, d_out]`` = scale_e · B_e A_e x, from the bank's own rows (homogeneous ranks)."""
    r = layer.bank.A.shape[0] // layer.bank.num_experts
    A, Bt = layer.bank.A[e * r:(e + 1) * r], layer.bank.Bt[e * r:(e + 1) * r]
    return float(layer.bank.col_scale()[e * r]) * (x @ A.t()) @ Bt


@settings(max_examples=10, deadline=None)
@given(E=st.integers(1, 5), seed=st.integers(0, 999))
def test_k_equals_E_without_capacity_is_dense_and_permutes(E, seed):
    cfg = moelora.SiRAConfig(target_modules=["0"], num_experts=E, top_k=E, rank=2, capacity_factor=None,
                             eval_capacity_factor=None, router_init_std=1.0, seed=seed)
    model, layer = linear_model(cfg, seed=seed)
    model.eval()
    x = torch.randn(11, D, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        probs = (x @ layer.router.weight.t()).softmax(-1)
        dense = layer.base_layer(x) + sum(probs[:, e:e + 1] * expert_delta(layer, x, e) for e in range(E))
        torch.testing.assert_close(model(x), dense, atol=1e-5, rtol=1e-5)
        perm = torch.randperm(11, generator=torch.Generator().manual_seed(seed))
        torch.testing.assert_close(model(x[perm]), model(x)[perm], atol=1e-5, rtol=1e-5)


def test_capacity_formula_and_hand_worked_fill_orders():
    S = torch.tensor([50, 0, 3])
    # 1.1 · 50 is 55.00000000000001 in binary: the factor counts as the decimal it was written as
    assert expert_capacity(S, top_k=1, capacity_factor=1.1, num_experts=1, min_capacity=0).tolist() == [55, 0, 4]
    assert expert_capacity(S, top_k=2, capacity_factor=1.25, num_experts=4, min_capacity=2).tolist() == [32, 2, 2]
    # tokens 0, 1 choose (e0, e1); token 2 chooses (e1, e0); capacity 2 per expert
    ids = torch.tensor([[0, 1], [0, 1], [1, 0]])
    scores, group, cap = torch.zeros(3, 2), torch.zeros(3, dtype=torch.long), torch.tensor([2])
    slot = capacity_keep(ids, scores, group, cap, num_experts=2, fill_order="slot_major")
    token = capacity_keep(ids, scores, group, cap, num_experts=2, fill_order="token_major")
    # GShard: first choices (t0→e0, t1→e0, t2→e1) fill first, then t0→e1; t1→e1 and t2→e0 drop
    assert slot.tolist() == [[True, True], [True, False], [True, False]]
    # token order: t0 and t1 fill both experts, token 2 is dropped entirely
    assert token.tolist() == [[True, True], [True, True], [False, False]]


def test_position_keeps_earliest_and_probability_keeps_most_confident():
    x = torch.rand(10, D, generator=torch.Generator().manual_seed(0)) + 0.1
    for policy in ("position", "probability"):
        r = router(4, 1, capacity_factor=1.0, min_capacity=0, drop_policy=policy).train()
        with torch.no_grad():
            r.weight.zero_()
            r.weight[0] = torch.linspace(1.0, 3.0, D)  # every token's top-1 is expert 0
        out = r(x)  # C = ceil(1 · 1.0 · 10 / 4) = 3
        kept = (out.expert_ids[:, 0] == 0).nonzero().flatten().tolist()
        if policy == "position":
            assert kept == [0, 1, 2]
        else:
            assert kept == sorted(out.probs[:, 0].argsort(descending=True)[:3].tolist())
        assert out.dropped.tolist() == [7, 0, 0, 0]


def test_router_runs_in_fp32_under_autocast():
    r = router(4, 2).eval()
    x = torch.randn(16, D, generator=torch.Generator().manual_seed(0))
    want = r(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = r(x.bfloat16())
    assert got.probs.dtype == torch.float32 and got.weights.dtype == torch.float32
    torch.testing.assert_close(got.probs, (x.bfloat16().float() @ r.weight.t()).softmax(-1))
    assert want.weights.dtype == torch.float32


def test_train_and_eval_capacity_factors_are_separate():
    x = torch.randn(32, D, generator=torch.Generator().manual_seed(0))
    r = router(4, 2, capacity_factor=0.25, eval_capacity_factor=None, min_capacity=0)
    assert r.train()(x).dropped.sum() > 0
    assert r.eval()(x).dropped.sum() == 0
    r.eval_capacity_factor = 0.25
    assert r(x).dropped.sum() > 0


def test_fully_dropped_tokens_get_exactly_the_base_output():
    """Real tiny Llama: every wrapped layer's dropped tokens equal the base layer's output, and a
    sequence dropped in every layer gives the base model's logits bit for bit."""
    cfg = moelora.SiRAConfig(target_modules=["q_proj", "v_proj", "down_proj"], num_experts=4, top_k=2,
                             capacity_factor=0.01, eval_capacity_factor=0.01, min_capacity=0,
                             fill_order="token_major", router_init_std=1.0, seed=0)
    model = moelora.inject(tiny_llama(), cfg)
    seen = {}
    for layer in moelora.wrapped_layers(model):
        torch.nn.init.normal_(layer.bank.Bt)
        layer.register_forward_hook(lambda m, args, out: seen.__setitem__(m.name, (args[0], out)))
    ids = torch.randint(0, 97, (3, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(ids).logits
        n_dropped = n_kept = 0
        for layer in moelora.wrapped_layers(model):
            inp, out = seen[layer.name]
            base = layer.base_layer(inp).reshape(-1, out.shape[-1])
            gone = (layer.last_expert_ids == -1).all(-1)
            assert torch.equal(out.reshape(-1, out.shape[-1])[gone], base[gone])
            assert not torch.allclose(out.reshape(-1, out.shape[-1])[~gone], base[~gone])
            assert gone[24:].all()  # C = 1: the first sequences' 48 slots fill every expert
            n_dropped, n_kept = n_dropped + int(gone.sum()), n_kept + int((~gone).sum())
        assert n_dropped > 0 and n_kept > 0
        with moelora.disable_adapters(model):
            base_logits = model(ids).logits
    assert torch.equal(logits[2], base_logits[2])
    assert not torch.allclose(logits[0], base_logits[0])


def test_gradients_reach_router_and_kept_experts_only():
    cfg = moelora.SiRAConfig(target_modules=["0"], num_experts=4, top_k=2, rank=2, capacity_factor=0.25,
                             min_capacity=0, expert_dropout=0.0, router_init_std=1.0, seed=0)
    model, layer = linear_model(cfg)
    model.train()
    with torch.no_grad():
        layer.router.weight[3] = -10.0  # x > 0: expert 3 is never in anyone's top 2
    x = (torch.rand(16, D, generator=torch.Generator().manual_seed(1)) + 0.1).requires_grad_()
    g = torch.randn(16, 6, generator=torch.Generator().manual_seed(2))
    routed = []
    layer.router.register_forward_hook(lambda m, a, out: routed.append(out))
    y = model(x)
    r = routed[0]
    ids, w = r.expert_ids, r.weights
    # oracle: base + a loop over the kept slots only, sharing the router's graph
    oracle = layer.base_layer(x) + sum(
        torch.where((ids[:, j] == e).view(-1, 1), w[:, j:j + 1] * expert_delta(layer, x, e), 0.0)
        for j in range(2) for e in range(4))
    params = [layer.router.weight, layer.bank.A, layer.bank.Bt, x]
    got = torch.autograd.grad((y * g).sum(), params, retain_graph=True)
    want = torch.autograd.grad((oracle * g).sum(), params)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert got[0].abs().sum() > 0 and torch.isfinite(got[0]).all()
    for e in range(4):
        rows = slice(2 * e, 2 * e + 2)
        used = bool((ids == e).any())
        assert (got[1][rows].abs().sum() > 0) == used and (got[2][rows].abs().sum() > 0) == used
    assert not (ids == 3).any() and r.dropped.sum() > 0
    gone = (ids == -1).all(-1)
    assert gone.any()
    # a fully dropped token's input gradient is the base path's alone (nothing via router/experts)
    torch.testing.assert_close(got[3][gone], (g @ layer.base_layer.weight)[gone], atol=1e-6, rtol=0)


def test_aux_loss_is_switch_on_pre_drop_assignment_without_padding_plus_z_loss():
    E, k, T = 4, 2, 20
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(0))
    mask = torch.arange(T) < 15
    r = router(E, k, capacity_factor=0.25, min_capacity=0, aux_loss_coef=0.1, z_loss_coef=0.01).train()
    out = r(x, token_mask=mask)
    assert out.aux_loss.requires_grad and out.dropped.sum() > 0
    with torch.no_grad():
        logits = x[mask] @ r.weight.t()
        probs = logits.softmax(-1)
        top = probs.topk(k, dim=-1).indices  # pre-drop choices of the real tokens
        f = torch.bincount(top.flatten(), minlength=E).float() / top.numel()
        want = 0.1 * E * (f * probs.mean(0)).sum() + 0.01 * (torch.logsumexp(logits, -1) ** 2).mean()
    torch.testing.assert_close(out.aux_loss.detach(), want)
    out.aux_loss.backward()
    assert r.weight.grad.abs().sum() > 0
    assert r.eval()(x, token_mask=mask).aux_loss is None


def dropout_router(placement, renormalize, E=4, k=2, p=0.5):
    return router(E, k, capacity_factor=None, expert_dropout=p, expert_dropout_placement=placement,
                  renormalize=renormalize).train()


@pytest.mark.parametrize("placement", ["probs", "logits", "inverted"])
@pytest.mark.parametrize("renormalize", [False, True])
def test_expert_dropout_placements_with_a_known_mask(placement, renormalize):
    p, T, E, k = 0.5, 6, 4, 2
    r = dropout_router(placement, renormalize, E, k, p)
    alive = torch.tensor([[1, 1, 1, 1], [0, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0], [0, 1, 1, 1], [1, 0, 1, 0]],
                         dtype=torch.bool)
    r.sample_expert_mask = lambda probs: alive
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(3))
    out = r(x)
    logits = (x @ r.weight.t()).detach()
    probs = logits.softmax(-1)
    for t in range(T):
        living = [e for e in range(E) if alive[t, e]]
        chosen = sorted(living, key=lambda e: -float(probs[t, e]))[:k]
        assert out.expert_ids[t].tolist() == chosen + [-1] * (k - len(chosen))
        if placement == "probs":
            w = [float(probs[t, e]) for e in chosen]
        elif placement == "inverted":
            w = [float(probs[t, e]) / (1 - p) for e in chosen]
        else:  # softmax over the surviving experts only
            w = [float(logits[t, e].exp() / logits[t, living].exp().sum()) for e in chosen]
        if renormalize and chosen:
            w = [v / sum(w) for v in w]
        assert out.weights[t].tolist() == pytest.approx(w + [0.0] * (k - len(chosen)), rel=1e-5, abs=1e-7)
    assert torch.all(out.weights[3] == 0)  # every expert dropped: base output only
    (out.weights * torch.randn(T, k)).sum().backward()
    assert torch.isfinite(r.weight.grad).all()
    torch.testing.assert_close(out.probs, probs)  # reported probabilities are the clean gate


def test_expert_dropout_is_off_in_eval_and_has_the_configured_rate_in_training():
    x = torch.randn(4000, D, generator=torch.Generator().manual_seed(0))
    noisy = dropout_router("probs", True, E=4, k=4, p=0.3)
    clean = router(4, 4, capacity_factor=None)
    noisy.eval(), clean.eval()
    a, b, c = noisy(x), noisy(x), clean(x)
    assert torch.equal(a.expert_ids, b.expert_ids) and torch.equal(a.expert_ids, c.expert_ids)
    assert torch.equal(a.weights, c.weights) and (a.expert_ids >= 0).all()
    torch.manual_seed(0)
    out = noisy.train()(x)  # k = E: a slot is empty exactly when its expert was dropped
    assert abs((out.expert_ids == -1).float().mean().item() - 0.3) < 0.02
    has = (out.expert_ids >= 0).any(-1)
    torch.testing.assert_close(out.weights.sum(-1)[has], torch.ones(int(has.sum())))


def test_dropped_counts_reach_routing_stats():
    cfg = moelora.SiRAConfig(target_modules=["q_proj", "v_proj"], num_experts=4, top_k=2, capacity_factor=0.5,
                             eval_capacity_factor=0.5, min_capacity=0, router_init_std=1.0, seed=0)
    model = moelora.inject(tiny_llama(), cfg)
    dropped = {}
    for layer in moelora.wrapped_layers(model):
        layer.router.register_forward_hook(
            lambda m, a, out, name=layer.name: dropped.__setitem__(name, out.dropped.clone()))
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(0))
    attn = torch.ones(2, 9, dtype=torch.long)
    attn[1, 5:] = 0
    with torch.no_grad():
        model(input_ids=ids, attention_mask=attn)
    stats = moelora.routing_stats(model)
    assert set(stats.layers) == set(dropped)
    for name, s in stats.layers.items():
        assert s.dropped.tolist() == dropped[name].double().tolist() and s.dropped.sum() > 0
        assert s.counts.sum() + s.dropped.sum() == 2 * 14  # padding neither kept nor dropped
        assert 0 < s.drop_rate < 1


@pytest.mark.parametrize("field,value", [
    ("capacity_factor", 0), ("capacity_factor", -1.0), ("capacity_factor", float("nan")),
    ("capacity_factor", "1.25"), ("eval_capacity_factor", 0.0), ("min_capacity", -1), ("min_capacity", 1.5),
    ("group_size", 0), ("drop_policy", "random"), ("fill_order", "random"), ("expert_dropout", 1.0),
    ("expert_dropout", -0.1), ("expert_dropout_placement", "gate"), ("renormalize_after_drop", "yes"),
    ("top_k", 5), ("aux_loss_coef", -1.0),
])
def test_bad_config_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"`{field}` = .*expected"):
        moelora.SiRAConfig(target_modules=["q_proj"], num_experts=4, **{field: value})


def test_config_json_and_yaml_round_trip():
    cfg = moelora.SiRAConfig(target_modules=["q_proj"], capacity_factor=None, group_size=64,
                             drop_policy="probability", expert_dropout_placement="logits")
    assert moelora.config_from_dict(cfg.to_dict()) == cfg
    data = yaml.safe_load((Path(__file__).parent.parent / "configs" / "sira.yaml").read_text())
    assert data["model"]["method"]["class_path"] == "moelora.SiRAConfig"
    assert isinstance(moelora.SiRAConfig(**data["model"]["method"]["init_args"]), moelora.SiRAConfig)


def test_save_load_round_trip_reproduces_outputs(tmp_path, token_ids):
    cfg = moelora.SiRAConfig(target_modules=["q_proj", "v_proj"], capacity_factor=0.5, eval_capacity_factor=0.5,
                             min_capacity=1, router_init_std=1.0, seed=3)
    model = moelora.inject(tiny_llama(), cfg)
    for layer in moelora.wrapped_layers(model):
        torch.nn.init.normal_(layer.bank.Bt)
        torch.nn.init.normal_(layer.router.weight)
    model.eval()
    with torch.no_grad():
        before = model(token_ids).logits
    moelora.save_adapter(model, tmp_path)
    loaded = moelora.load_adapter(tiny_llama(), tmp_path).eval()
    assert moelora.wrapped_layers(loaded)[0].router.__class__ is SiRARouter
    with torch.no_grad():
        torch.testing.assert_close(loaded(token_ids).logits, before, atol=0, rtol=0)
        with moelora.disable_adapters(loaded):
            assert not torch.allclose(loaded(token_ids).logits, before)
    assert get_state(loaded).config == cfg
