"""KV-cached generation on decoder backbones: routing is per token, so a cached `generate` must pick
the same tokens as an uncached one, and one full forward over the result must reproduce every greedy
choice. Padding (left, as generate wants) is never routed; every decoded token is."""

import peft
import pytest
import torch

import moelora
from conftest import tiny_gpt2, tiny_llama

NEW = 6
METHODS = ("moelora", "sira", "flylora", "moa", "weightlora")


def configs(targets):
    return {
        "moelora": moelora.MoELoRAConfig(target_modules=targets, num_experts=4, top_k=2, seed=0),
        "sira": moelora.SiRAConfig(target_modules=targets, num_experts=4, top_k=2, expert_dropout=0.5, seed=0),
        "flylora": moelora.FlyLoRAConfig(target_modules=targets, rank=8, top_k=2, seed=0),
        "moa": moelora.MoAConfig(prompt_expert=True, variant="sparse", seed=0),
        "weightlora": moelora.WeightLoRAConfig(target_modules=targets, rank=2, keep=1, seed=0),
    }


def adapted(arch, method, tmp_path):
    build, targets = (tiny_gpt2, ["c_attn"]) if arch == "gpt2" else (tiny_llama, ["q_proj", "v_proj"])
    if method == "meteora":
        for i, name in enumerate(("a", "b")):
            base = build()  # seeds torch itself: the LoRA seed comes after it
            torch.manual_seed(10 + i)
            peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=targets, init_lora_weights=False,
                                                         fan_in_fan_out=arch == "gpt2")).save_pretrained(
                str(tmp_path / name))
        model = moelora.from_lora_adapters(build(), {n: str(tmp_path / n) for n in ("a", "b")})
        bank = moelora.wrapped_layers(model)[0].bank
        assert not torch.equal(bank.lora_pair(0)[0], bank.lora_pair(1)[0]), "two distinct LoRAs, or routing is moot"
    else:
        model = moelora.inject(build(), configs(targets)[method])
    g = torch.Generator().manual_seed(1)  # LoRA B starts at zero: move every trainable weight
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    model.eval().generation_config.pad_token_id = 0
    return model


@pytest.mark.parametrize("arch,method", [("llama", m) for m in (*METHODS, "meteora")]
                         + [("gpt2", m) for m in ("moelora", "flylora", "meteora")])
def test_cached_generation_matches_uncached_and_a_full_forward(arch, method, tmp_path):
    model = adapted(arch, method, tmp_path)
    ids = torch.randint(3, 90, (3, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    mask[2, :1] = 0
    tracker = moelora.routing_stats(model)
    tracker.reset()
    with torch.no_grad():
        cached = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False)
        counted = {name: s.tokens for name, s in tracker.layers.items()}
        uncached = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False,
                                  use_cache=False)
        full_mask = torch.cat([mask, torch.ones(3, NEW, dtype=mask.dtype)], 1)
        positions = (full_mask.cumsum(-1) - 1).clamp(min=0)  # generate's positions for left padding
        logits = model(input_ids=cached, attention_mask=full_mask, position_ids=positions).logits
    assert cached.shape == (3, 7 + NEW) and torch.equal(cached, uncached)
    assert torch.equal(logits[:, 6:-1].argmax(-1), cached[:, 7:])
    # the prompt's real tokens once, then each decoded token but the last (never fed back)
    want = int(mask.sum()) + 3 * (NEW - 1)
    assert counted and all(n == want for n in counted.values()), counted


def test_static_cache_generation_reads_padding_from_its_4d_mask(tmp_path):
    # generate(cache_implementation="static") hands the model a 4-D [B, 1, Q, K] mask, not the 2-D
    # one: padding must still be left out, or it takes SiRA's capacity (and the outputs move).
    model = moelora.inject(tiny_llama(), moelora.SiRAConfig(target_modules=["q_proj", "v_proj"], num_experts=4,
                                                            top_k=2, eval_capacity_factor=1.0, min_capacity=0, seed=0))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    model.eval().generation_config.pad_token_id = 0
    ids = torch.randint(3, 90, (3, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    mask[2, :1] = 0
    tracker, runs = moelora.routing_stats(model), {}
    for cache in ("dynamic", "static"):
        tracker.reset()
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=1, do_sample=False,
                                 cache_implementation=None if cache == "dynamic" else "static",
                                 output_logits=True, return_dict_in_generate=True)
        runs[cache] = out.logits[0], {n: s.tokens for n, s in tracker.layers.items()}
    assert all(n == int(mask.sum()) for n in runs["static"][1].values()), runs["static"][1]
    torch.testing.assert_close(runs["static"][0], runs["dynamic"][0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("form", ["bool", "additive"])
def test_a_4d_attention_mask_excludes_padding_as_the_2d_mask_does(side, form):
    model = moelora.inject(tiny_llama(), moelora.MoELoRAConfig(target_modules=["q_proj", "v_proj"], num_experts=4,
                                                               top_k=2, aux_loss_coef=0.01, seed=0)).train()
    ids = torch.randint(3, 90, (2, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    if side == "right":
        mask = mask.flip(1)
    causal = torch.tril(torch.ones(6, 6, dtype=torch.bool))
    allowed = (causal & mask.bool()[:, None, :])[:, None]          # [B, 1, Q, K]: key padding masked
    four_d = allowed if form == "bool" else torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    seen = []
    for attention_mask in (mask, four_d):
        tracker = moelora.routing_stats(model)
        tracker.reset()
        logits = model(input_ids=ids, attention_mask=attention_mask, position_ids=positions).logits
        seen.append((logits[mask.bool()], moelora.aux_loss(model), {n: s.counts for n, s in tracker.layers.items()},
                     {n: s.tokens for n, s in tracker.layers.items()}))
    (l2, a2, c2, t2), (l4, a4, c4, t4) = seen
    assert all(n == int(mask.sum()) for n in t4.values()) and t2 == t4
    torch.testing.assert_close(l4, l2)
    torch.testing.assert_close(a4, a2)
    assert all(torch.equal(c2[n], c4[n]) for n in c2)
