"""torch.compile of whole injected models: one graph per forward, no recompiles while training, and
the same outputs, gradients and routing statistics as the eager model.

Before, every wrapped layer broke the graph twice (the checkpoint-recompute probe and the inference
mode check of the tracker) and the tracker's Python counters were guarded constants, so dynamo
recompiled the model at every forward until it hit its recompile limit and ran it eagerly.
"""

from __future__ import annotations

import peft
import pytest
import torch
from torch._dynamo.utils import counters

import moelora
from conftest import tiny_llama

TARGETS = ["q_proj", "v_proj"]
STEPS = 4


def _configs():
    return {
        "moelora": moelora.MoELoRAConfig(target_modules=TARGETS, num_experts=4, top_k=2, seed=0),
        "sira": moelora.SiRAConfig(target_modules=TARGETS, num_experts=4, top_k=2, capacity_factor=1.0,
                                   expert_dropout=0.0, seed=0),
        "flylora": moelora.FlyLoRAConfig(target_modules=TARGETS, rank=8, top_k=2, seed=0),
        # sparse with a learnt threshold: the compiled model runs every token (no data-dependent
        # shapes), so this checks that the skipped tokens get no straight-through gradient there
        "moa": moelora.MoAConfig(prompt_expert=True, variant="sparse", threshold_grad="ste", seed=0),
        "moa_soft": moelora.MoAConfig(prompt_expert=True, seed=0),
        "weightlora": moelora.WeightLoRAConfig(target_modules=TARGETS, rank=2, keep=1, seed=0),
    }


def _model(method: str, tmp_path):
    if method == "meteora":
        for i, name in enumerate(("a", "b")):
            base = tiny_llama()  # seeds torch itself: the LoRA seed comes after it
            torch.manual_seed(10 + i)
            peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=TARGETS, init_lora_weights=False)
                                ).save_pretrained(str(tmp_path / name))
        model = moelora.from_lora_adapters(tiny_llama(), {n: str(tmp_path / n) for n in ("a", "b")})
        bank = moelora.wrapped_layers(model)[0].bank
        assert not torch.equal(bank.lora_pair(0)[0], bank.lora_pair(1)[0]), "two distinct LoRAs, or routing is moot"
    else:
        model = moelora.inject(tiny_llama(), _configs()[method])
    g = torch.Generator().manual_seed(1)  # LoRA B starts at zero: move every trainable weight
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model.train()


def _batch(step: int):
    ids = torch.randint(3, 90, (2, 7), generator=torch.Generator().manual_seed(step))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0  # padding is not routed: the token mask must reach the compiled layers
    return ids, mask


def _step(model, run, step: int) -> torch.Tensor:
    ids, mask = _batch(step)
    logits = run(input_ids=ids, attention_mask=mask).logits
    aux = moelora.aux_loss(model)
    (logits.float().square().mean() + (0 if aux is None else aux)).backward()
    return logits.detach()


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def _assert_same_stats(a, b):
    sa, sb = moelora.routing_stats(a).layers, moelora.routing_stats(b).layers
    assert sa.keys() == sb.keys() and sa
    for name in sa:
        x, y = sa[name], sb[name]
        assert (x.forwards, x.tokens) == (y.forwards, y.tokens), name
        assert torch.equal(x.counts, y.counts) and torch.equal(x.coactivation, y.coactivation), name
        assert torch.allclose(x.prob_sum, y.prob_sum, rtol=1e-5), name


@pytest.mark.parametrize("method", ["moelora", "moa",
                                    *(pytest.param(m, marks=pytest.mark.slow)
                                      for m in ("sira", "flylora", "moa_soft", "weightlora", "meteora"))])
def test_compiled_model_trains_like_eager_without_graph_breaks_or_recompiles(method, tmp_path):
    eager, compiled = _model(method, tmp_path / "e"), _model(method, tmp_path / "c")
    run = torch.compile(compiled, backend="aot_eager")
    counters.clear()
    graphs = []
    for step in range(STEPS):
        want, got = _step(eager, eager, step), _step(compiled, run, step)
        assert _rel(got, want) < 1e-5, step
        grads = [(n, p.grad, q.grad) for (n, p), q in zip(eager.named_parameters(), compiled.parameters())
                 if p.grad is not None]
        scale = max(float(g.abs().max()) for _, g, _ in grads)
        for n, want_g, got_g in grads:  # the summation order differs: within 1e-5 of the largest gradient
            torch.testing.assert_close(got_g, want_g, rtol=1e-4, atol=1e-5 * scale, msg=f"step {step}: {n}")
        graphs.append((counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())))
    # The first forward queues its routing (no accumulators yet); the second records it eagerly
    # in the model's pre-hook (torch.compiler.disable), its only graph break. From then on: one
    # cached graph, reused, no compile and no break.
    assert graphs[-1] == graphs[1], graphs
    assert all("disable" in reason for reason in counters["graph_break"]), list(counters["graph_break"])
    _assert_same_stats(eager, compiled)
    assert all(s.forwards == STEPS for s in moelora.routing_stats(compiled).layers.values())


def test_fullgraph_compile_after_one_eager_forward(tmp_path):
    model = _model("moelora", tmp_path)
    _step(model, model, 0)  # makes the tracker's accumulators: nothing is left to do outside the graph
    run = torch.compile(model, backend="aot_eager", fullgraph=True)  # a graph break is an error
    for step in range(1, 4):
        _step(model, run, step)
    stats = moelora.routing_stats(model).layers
    _, mask = _batch(1)  # every batch has the same padding
    assert all(s.forwards == 4 for s in stats.values())
    assert all(s.counts.sum() == 2 * 4 * mask.sum() for s in stats.values())  # top-2 of the real tokens


def test_compiled_model_validated_under_inference_mode_before_training(tmp_path):
    # Lightning's sanity check runs validation under inference_mode before the first training
    # step: accumulators first made inside that graph would be inference tensors, which the
    # training step could not add into. They are made eagerly, so both steps count.
    eager, compiled = _model("moelora", tmp_path / "e"), _model("moelora", tmp_path / "c")
    run = torch.compile(compiled, backend="aot_eager")
    ids, mask = _batch(0)
    for model, fn in ((eager, eager), (compiled, run)):
        with torch.inference_mode():
            fn(input_ids=ids, attention_mask=mask)
            fn(input_ids=ids, attention_mask=mask)
        for step in range(2):
            _step(model, fn, step)
        moelora.routing_stats(model).layers  # settle (zeroes the accumulators in place)
        _step(model, fn, 2)
    _assert_same_stats(eager, compiled)
    assert all(s.forwards == 5 for s in moelora.routing_stats(compiled).layers.values())


def test_tracker_queue_is_recorded_when_statistics_are_read(tmp_path):
    # A compiled submodule called without the model's pre-hook: the queue is flushed on reading.
    model = _model("moelora", tmp_path)
    layer = moelora.wrapped_layers(model)[0]
    run = torch.compile(layer, backend="aot_eager")
    x = torch.randn(5, layer.in_features)
    run(x)
    run(x)
    tracker = moelora.routing_stats(model)
    assert tracker.layers[layer.name].forwards == 2 and tracker.layers[layer.name].tokens == 10
