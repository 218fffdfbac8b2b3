"""MoA against oracles written here: a naive per-token float64 re-implementation of a Llama decoder
block with every MoA expert (soft and sparse, prompt expert on, both router inputs), forward and
gradients; BERT's parallel adapter before the post-LayerNorm; and plain PEFT LoRA when every
weight is forced to 1."""

import copy
import math

import pytest
import torch
from torch.nn import functional as F

import moelora
from conftest import minilm_classifier, tiny_llama

peft = pytest.importorskip("peft")

B, S = 2, 5


def randomize(model, seed=0, scale=0.3, router_scale=1.0):
    """Give every adapter parameter a non-trivial value (B and the prompt gate start at 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad or ".moa.router.threshold" in name:
                s = scale * (router_scale if ".moa.router." in name else 1.0)
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) * s)


def lin(module, x):
    """The frozen base projection (a wrapped layer's base_layer), called without hooks."""
    base = getattr(module, "base_layer", module)
    return F.linear(x, base.weight, base.bias)


def rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def naive_block(layer, cfg, x, cos, sin):
    """Llama decoder block + MoA, one token at a time: ``x [B, S, d]`` → ``[B, S, d]``."""
    moa, attn, mlp = layer.moa, layer.self_attn, layer.mlp
    types = list(moa.type_names)
    H, dh = attn.config.num_attention_heads, attn.head_dim
    groups = attn.num_key_value_groups
    norm = type(layer.input_layernorm).forward  # called unbound: no MoA hook fires

    def lora(module, t, u, w):
        A, Bt, s = module.bank.A, module.bank.Bt, float(module.bank.scale[0])
        return w * s * (Bt.t() @ (A @ u))

    def gates(r):
        router = moa.router
        z = router.w2(F.silu(router.w1(r)) * router.w3(r)) if cfg.swiglu_factor else router.proj(r)
        w = torch.sigmoid(z)
        if cfg.variant == "soft":
            return w
        tau = torch.sigmoid(router.threshold(r)) * cfg.max_threshold
        return torch.stack([w[i] if w[i] >= tau[0] else w[i] * 0 for i in range(len(types))])

    xn = norm(layer.input_layernorm, x)
    W = {}
    q, k, v = (torch.zeros(B, S, m.out_features, dtype=x.dtype) for m in (attn.q_proj, attn.k_proj, attn.v_proj))
    for b in range(B):
        for s in range(S):
            W[b, s] = w = gates(x[b, s] if cfg.router_input == "residual" else xn[b, s])
            for t, m, out in (("q", attn.q_proj, q), ("k", attn.k_proj, k), ("v", attn.v_proj, v)):
                out[b, s] = lin(m, xn[b, s]) + (lora(m, t, xn[b, s], w[types.index(t)]) if t in types else 0)
    q = q.view(B, S, H, dh).transpose(1, 2)
    k = k.view(B, S, -1, dh).transpose(1, 2).repeat_interleave(groups, 1)
    v = v.view(B, S, -1, dh).transpose(1, 2).repeat_interleave(groups, 1)
    q = q * cos[:, None] + rotate_half(q) * sin[:, None]
    k = k * cos[:, None] + rotate_half(k) * sin[:, None]
    P = moa.prompt.prompt if moa.prompt is not None else None
    o_in = torch.zeros(B, S, H * dh, dtype=x.dtype)
    for b in range(B):
        for s in range(S):
            for h in range(H):
                a = torch.softmax(torch.stack([q[b, h, s] @ k[b, h, j] for j in range(s + 1)]) / math.sqrt(dh), 0)
                head = sum(a[j] * v[b, h, j] for j in range(s + 1))
                if P is not None:  # the prompt: frozen k/v, no RoPE, its own softmax, per-head gate
                    kv = h // groups
                    kp = lin(attn.k_proj, P).view(-1, H // groups, dh)[:, kv]
                    vp = lin(attn.v_proj, P).view(-1, H // groups, dh)[:, kv]
                    ap = torch.softmax(kp @ q[b, h, s] / math.sqrt(dh), 0)
                    head = head + W[b, s][types.index("prompt")] * moa.prompt.gate[h] * (ap @ vp)
                o_in[b, s, h * dh:(h + 1) * dh] = head
    out = torch.zeros_like(x)
    for b in range(B):
        for s in range(S):
            w = W[b, s]
            o = lin(attn.o_proj, o_in[b, s]) + (lora(attn.o_proj, "o", o_in[b, s], w[types.index("o")])
                                                  if "o" in types else 0)
            hres = x[b, s] + o
            hn = norm(layer.post_attention_layernorm, hres)
            parts = {}
            for t, m in (("gate", mlp.gate_proj), ("up", mlp.up_proj)):
                parts[t] = lin(m, hn) + (lora(m, t, hn, w[types.index(t)]) if t in types else 0)
            inter = F.silu(parts["gate"]) * parts["up"]
            ffn = lin(mlp.down_proj, inter) + (lora(mlp.down_proj, "down", inter, w[types.index("down")])
                                               if "down" in types else 0)
            if "adapter" in types:
                ffn = ffn + w[types.index("adapter")] * moa.adapter(hn)
            out[b, s] = hres + ffn
    return out


def causal_mask():
    return torch.full((S, S), float("-inf"), dtype=torch.float64).triu(1).expand(B, 1, S, S)


CASES = {
    "soft": dict(variant="soft"),
    "soft-linear-normed-all-types": dict(variant="soft", swiglu_factor=0, router_input="normed",
                                         lora_types=["q", "k", "v", "o", "up", "gate", "down"]),
    "sparse": dict(variant="sparse", max_threshold=1.0),
    "sparse-normed-qkv-ranks": dict(variant="sparse", max_threshold=1.0, router_input="normed",
                                    lora_types=["q", "v", "gate"], rank_per_type={"v": 3}, alpha_per_type={"q": 2.0}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_block_matches_naive_per_token_loop_float64(case):
    cfg = moelora.MoAConfig(prompt_expert=True, adapter_dtype="float64", backend="torch", seed=0, **CASES[case])
    model = moelora.inject(tiny_llama().double(), cfg)
    randomize(model, router_scale=6.0)  # wide router weights: Sparse MoA gets a mix of active/inactive
    layer = model.model.layers[1]
    x = torch.randn(B, S, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(3), requires_grad=True)
    cos, sin = model.model.rotary_emb(x, torch.arange(S).expand(B, S))
    got = layer(x, attention_mask=causal_mask(), position_embeddings=(cos, sin))
    got = got[0] if isinstance(got, tuple) else got
    if cfg.variant == "sparse":
        active = layer.moa.last_expert_ids >= 0
        assert 0.1 < active.double().mean() < 0.9, "the case must mix active and inactive types"
    x2 = x.detach().clone().requires_grad_(True)
    want = naive_block(layer, cfg, x2, cos, sin)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)
    # Gradients: one random cotangent through both; every adapter parameter and the input agree.
    r = torch.randn(B, S, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    params = [p for n, p in layer.named_parameters() if p.requires_grad]
    g_got = torch.autograd.grad((got * r).sum(), [x, *params], allow_unused=True)
    g_want = torch.autograd.grad((want * r).sum(), [x2, *params], allow_unused=True)
    names = ["x"] + [n for n, p in layer.named_parameters() if p.requires_grad]
    for name, a, b in zip(names, g_got, g_want):
        if a is None or b is None:  # unused on both paths (e.g. a type with no active token)
            assert (a is None or not a.any()) and (b is None or not b.any()), name
            continue
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-9, msg=name)


def test_bert_parallel_adapter_joins_the_residual_before_post_layernorm():
    model = moelora.inject(minilm_classifier().double(), moelora.MoAConfig(lora_types=[], adapter_dtype="float64"))
    randomize(model)
    layer = model.bert.encoder.layer[0]
    x = torch.randn(2, 4, 384, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    got = layer(x)
    got = got[0] if isinstance(got, tuple) else got
    with moelora.disable_adapters(model):
        attn = layer.attention(x)[0]
        inter = layer.intermediate(attn)
        out = layer.output
        router = layer.moa.router
        w = torch.sigmoid(router.w2(F.silu(router.w1(x)) * router.w3(x)))[..., -1:]  # the adapter's weight
        want = out.LayerNorm(out.dense(inter) + attn + w * layer.moa.adapter(attn))
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)


def force_weights_to_one(model):
    """Linear router with zero weights and bias 50: sigmoid(50) is exactly 1.0 in float32/64."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, moelora.MoARouter):
                m.proj.weight.zero_()
                m.proj.bias.fill_(50.0)
                assert torch.equal(torch.sigmoid(m.proj.bias), torch.ones_like(m.proj.bias))


@pytest.mark.parametrize("arch", ["llama", "minilm"])
def test_weights_forced_to_one_equal_plain_peft_lora(arch, token_ids):
    build, target, inputs = ((tiny_llama, "v_proj", {"input_ids": token_ids}) if arch == "llama" else
                             (minilm_classifier, "value", {"input_ids": token_ids + 1000}))
    base = build()
    cfg = moelora.MoAConfig(lora_types=["v"], parallel_adapter=False, swiglu_factor=0, rank=4, alpha=8, seed=1)
    moa_model = moelora.inject(copy.deepcopy(base), cfg)
    force_weights_to_one(moa_model)
    ref = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=[target]))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in moelora.wrapped_layers(moa_model):
            layer.bank.Bt.copy_(torch.randn(layer.bank.Bt.shape, generator=g))
            peft_layer = ref.get_submodule("base_model.model." + layer.name)
            peft_layer.lora_A["default"].weight.copy_(layer.bank.A)
            peft_layer.lora_B["default"].weight.copy_(layer.bank.Bt.t())
    with torch.no_grad():
        got, want = moa_model(**inputs).logits, ref(**inputs).logits
        base_out = base(**inputs).logits
    assert (want - base_out).abs().max() > 1e-3  # the LoRA does something
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_zero_up_projection_adapter_equals_base(token_ids):
    base = tiny_llama()
    model = moelora.inject(copy.deepcopy(base), moelora.MoAConfig(lora_types=[], seed=0))
    randomize(model)
    with torch.no_grad():
        assert (model(token_ids).logits - base(token_ids).logits).abs().max() > 1e-4  # it does something...
        for m in model.modules():
            if isinstance(m, moelora.ParallelAdapter):
                m.up.weight.zero_()
                m.up.bias.zero_()
        assert torch.equal(model(token_ids).logits, base(token_ids).logits)  # ...and nothing at up = 0
