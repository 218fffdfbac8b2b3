"""Sparse MoA: inactive experts contribute exactly nothing and get no gradient, skipped tokens cost
no compute, the reported activation rate is the measured one (padding excluded), the three
threshold-gradient modes, and statistics under activation checkpointing."""

import copy

import pytest
import torch

import moelora
import moelora.methods.moa_experts as moa_experts
from conftest import minilm_classifier, tiny_llama
from moelora.routers.moa import MoARouter, apply_threshold

try:  # see test_flylora.py: torch.utils.checkpoint imports triton; do it while TRITON_INTERPRET=1
    import triton  # noqa: F401
except ImportError:
    pass


def sparse_llama(seed=0, **kw):
    kw.setdefault("variant", "sparse")
    kw.setdefault("seed", 0)
    model = moelora.inject(tiny_llama(seed), moelora.MoAConfig(**kw))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and ".moa.router." not in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)  # non-zero B, adapter, prompt gate
    return model


def set_type_bias(model, biases):
    """Linear routers with zero weights: every token gets weight sigmoid(bias_t) for type t."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, moelora.MoABlock):
                m.router.proj.weight.zero_()
                m.router.proj.bias.copy_(torch.tensor([biases[t] for t in m.type_names]))


def test_expert_below_threshold_contributes_exactly_nothing_and_gets_no_gradient(token_ids):
    kw = dict(swiglu_factor=0, const_threshold=True, max_threshold=0.5)
    model = sparse_llama(**kw)
    set_type_bias(model, {"q": 4.0, "k": 4.0, "v": -4.0, "o": 4.0, "down": -4.0, "adapter": 4.0})
    out = model(token_ids).logits
    # The same model with v and down removed entirely (their LoRA B zeroed) gives bit-identical outputs.
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for layer in moelora.wrapped_layers(ref):
            if layer.type_name in ("v", "down"):
                layer.bank.Bt.zero_()
    assert torch.equal(out, ref(token_ids).logits)
    out.square().mean().backward()
    for layer in moelora.wrapped_layers(model):
        if layer.type_name in ("v", "down"):  # never computed: no gradient at all
            assert layer.bank.A.grad is None and layer.bank.Bt.grad is None, layer.name
        else:
            assert layer.bank.Bt.grad is not None and layer.bank.Bt.grad.abs().sum() > 0, layer.name
    for m in model.modules():
        if isinstance(m, moelora.MoABlock):
            for t in ("v", "down"):
                assert m.router.proj.bias.grad[m.type_index(t)] == 0


def test_per_token_inactive_rows_get_exactly_zero_delta(token_ids):
    model = sparse_llama(swiglu_factor=0, max_threshold=1.0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, moelora.MoABlock):
                m.router.proj.weight.normal_(0, 3.0, generator=torch.Generator().manual_seed(2))
    v = model.model.layers[0].self_attn.v_proj
    seen = {}
    v.register_forward_hook(lambda mod, args, out: seen.update(x=args[0], out=out))
    model(token_ids)
    delta = (seen["out"] - v.base_layer(seen["x"])).reshape(-1, v.out_features)
    active = model.model.layers[0].moa.last_expert_ids[:, model.model.layers[0].moa.type_index("v")] >= 0
    assert 0 < active.sum() < active.numel()
    assert torch.equal(delta[~active], torch.zeros_like(delta[~active]))
    assert (delta[active].abs().sum(-1) > 0).all()


def counting(monkeypatch):
    """Count rows each MoA LoRA and parallel adapter actually computes."""
    rows = {}
    real = moa_experts.gated_lora

    def gated(x, A, *args, **kw):
        rows[id(A)] = rows.get(id(A), 0) + x.shape[0]
        return real(x, A, *args, **kw)

    monkeypatch.setattr(moa_experts, "gated_lora", gated)
    real_forward = moelora.ParallelAdapter.forward

    def adapter_forward(self, h):
        rows[id(self)] = rows.get(id(self), 0) + h.shape[0]
        return real_forward(self, h)

    monkeypatch.setattr(moelora.ParallelAdapter, "forward", adapter_forward)
    return rows


def test_skipped_tokens_cost_no_compute_and_reported_rate_is_measured(monkeypatch, token_ids):
    model = sparse_llama(max_threshold=1.0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, moelora.MoABlock):
                m.router.w2.weight.normal_(0, 2.0, generator=torch.Generator().manual_seed(5))
    rows = counting(monkeypatch)
    model(token_ids)
    model(token_ids.flip(1))
    stats, tracker = moelora.moa_stats(model), moelora.routing_stats(model)
    T = 2 * token_ids.numel()
    rates = []
    for m in model.modules():
        if not isinstance(m, moelora.MoABlock):
            continue
        experts = {layer.type_name: id(layer.bank.A) for layer in moelora.wrapped_layers(model)
                   if layer.name.startswith(m.name[: -len(".moa")] + ".")}
        experts["adapter"] = id(m.adapter)
        for i, t in enumerate(m.type_names):
            measured = rows.get(experts[t], 0)
            assert measured == tracker.layers[m.name].counts[i]  # computed rows == counted activations
            assert stats[m.name][t]["activation_rate"] == measured / T
            rates.append(measured / T)
    assert sum(0 < r < 1 for r in rates) >= 3, rates  # experts that skipped some tokens


def test_padding_is_excluded_from_statistics(minilm_tokenizer):
    model = moelora.inject(minilm_classifier(), moelora.MoAConfig(variant="sparse", max_threshold=1.0, seed=0))
    batch = minilm_tokenizer(["a much longer sentence than the other one", "short"], padding=True,
                             return_tensors="pt")
    inputs = {}
    for i, layer in enumerate(model.bert.encoder.layer):
        layer.register_forward_pre_hook(lambda mod, args, i=i: inputs.update({i: args[0]}))
    model(**batch)
    real = batch["attention_mask"].reshape(-1).bool()
    for i, layer in enumerate(model.bert.encoder.layer):
        m = layer.moa
        s = moelora.routing_stats(model).layers[m.name]
        assert s.tokens == int(real.sum()) < real.numel()
        ids = m.last_expert_ids[real]
        want = torch.stack([(ids[:, t] >= 0).sum() for t in range(len(m.type_names))]).double()
        assert torch.equal(s.counts, want)
        with torch.no_grad():  # mean weight over the real tokens only
            probs = m.router(inputs[i].reshape(-1, 384)).probs[real]
        torch.testing.assert_close(s.mean_probs, probs.double().mean(0))


def router(mode, **kw):
    kw.setdefault("const_threshold", False)
    return MoARouter(in_features=8, num_types=4, swiglu_factor=0, sparse=True, max_threshold=1.0, threshold_grad=mode,
                     generator=torch.Generator().manual_seed(0), **kw)


def test_threshold_none_is_frozen_and_gets_no_gradient():
    r = router("none")
    assert not any(p.requires_grad for p in r.threshold.parameters())
    g = r(torch.randn(16, 8, generator=torch.Generator().manual_seed(1)))
    g.weights.sum().backward()
    assert r.threshold.weight.grad is None and r.proj.weight.grad is not None
    torch.testing.assert_close(g.weights, g.probs * g.active)


def test_threshold_adamole_renormalises_margins_and_trains_tau():
    r = router("adamole")
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(1))
    g = r(x)
    margin = (g.probs - g.threshold) * g.active
    want = margin / margin.sum(-1, keepdim=True)
    some = g.active.any(-1)
    assert 0 < some.sum() < 64  # tokens with and without any active type
    torch.testing.assert_close(g.weights[some], want[some])
    assert torch.equal(g.weights[~some], torch.zeros_like(g.weights[~some]))
    (g.weights * torch.arange(4.0)).sum().backward()
    assert r.threshold.weight.grad.abs().sum() > 0


def test_threshold_ste_forward_equals_none_and_trains_tau():
    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(1))
    hard, ste = router("none"), router("ste")
    ste.load_state_dict(hard.state_dict())
    g_hard, g_ste = hard(x), ste(x)
    assert torch.equal(g_hard.weights, g_ste.weights)
    (g_ste.weights * torch.arange(4.0)).sum().backward()
    assert ste.threshold.weight.grad.abs().sum() > 0


def test_apply_threshold_unknown_mode_errors():
    w = torch.rand(3, 2)
    with pytest.raises(ValueError, match="threshold_grad"):
        apply_threshold(w, w[:, :1], w > 0.5, "soft")


@pytest.mark.parametrize("variant", ["soft", "sparse"])
def test_checkpointing_gives_same_grads_and_counts_once(variant, token_ids):
    plain = sparse_llama(variant=variant, max_threshold=1.0, prompt_expert=True).train()
    ckpt = copy.deepcopy(plain)
    ckpt.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    mask = torch.ones_like(token_ids)
    mask[1, -2:] = 0
    for m in (plain, ckpt):
        m(token_ids, attention_mask=mask, labels=token_ids).loss.backward()
    for (n, a), (_, b) in zip(plain.named_parameters(), ckpt.named_parameters()):
        if a.requires_grad and a.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, msg=n)
    a, b = moelora.routing_stats(plain).layers, moelora.routing_stats(ckpt).layers
    assert a.keys() == b.keys() and len(a) == 2
    for name in a:
        assert b[name].forwards == 1 and b[name].tokens == int(mask.sum())
        assert torch.equal(a[name].counts, b[name].counts)


def test_sparse_moa_trains_under_bf16_autocast(token_ids):
    model = moelora.inject(tiny_llama(), moelora.MoAConfig(variant="sparse", seed=0)).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(input_ids=token_ids, labels=token_ids)
    out.loss.backward()
    assert torch.isfinite(out.loss)
