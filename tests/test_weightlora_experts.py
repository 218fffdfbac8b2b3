"""WeightLoRA over the experts of each bank: "keep only necessary experts" of a MoE-LoRA, SiRA or MeteoRA.

Oracles: the ungated method itself (ω = 1); the unpruned model with the dropped experts' gates
zeroed (after thresholding: ω = 0 and out of the routing) for the pruned model; a fresh load.
"""

import copy
import json

import pytest
import torch
from conftest import eval_logits, optimizer_numel, tiny_llama

import moelora
from moelora import weightlora
from moelora.lora_export import export_saved_adapter
from moelora.methods import meteora
from moelora.state import get_state

TARGETS = ["q_proj", "v_proj"]


def moe(**kw):
    return moelora.MoELoRAConfig(target_modules=TARGETS, num_experts=4, top_k=2, rank=2, seed=3, **kw)


@torch.no_grad()
def randomize(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for layer in moelora.wrapped_layers(model):
        layer.bank.Bt.copy_(torch.randn(layer.bank.Bt.shape, generator=g) * 0.3)
        for p in layer.router.inner.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
        layer.router.omega.copy_(torch.rand(layer.router.omega.shape, generator=g) + 0.5)


def test_omega_one_equals_the_base_method(token_ids):
    plain = moelora.inject(tiny_llama(), moe())
    gated = moelora.inject(tiny_llama(), moelora.WeightLoRAConfig(over="experts", keep=2, base_method=moe().to_dict()))
    with torch.no_grad():
        for a, b in zip(moelora.wrapped_layers(plain), moelora.wrapped_layers(gated)):
            b.bank.Bt.normal_()
            a.bank.Bt.copy_(b.bank.Bt)
    torch.testing.assert_close(eval_logits(gated, token_ids), eval_logits(plain, token_ids), atol=0, rtol=0)
    assert all(layer.router.omega.shape == (4,) for layer in moelora.wrapped_layers(gated))
    # own fields (no base_method) build the same top-k MoE-LoRA
    own = moelora.WeightLoRAConfig(over="experts", keep=2, target_modules=TARGETS, num_experts=4, top_k=2, rank=2,
                                   seed=3)
    same = moelora.inject(tiny_llama(), own)
    for a, b in zip(moelora.wrapped_layers(plain), moelora.wrapped_layers(same)):
        assert torch.equal(a.bank.A, b.bank.A) and torch.equal(a.router.weight, b.router.inner.weight)


def test_threshold_keeps_k_per_bank_with_position_ties_and_routes_only_kept(token_ids):
    model = moelora.inject(tiny_llama(), moelora.WeightLoRAConfig(over="experts", keep=2, base_method=moe().to_dict()))
    randomize(model)
    layers = moelora.wrapped_layers(model)
    with torch.no_grad():
        layers[0].router.omega.copy_(torch.tensor([0.7, 0.9, 0.7, 0.7]))  # tie at 0.7: expert 0 wins
    kept = weightlora.hard_threshold(model)
    assert kept[layers[0].name].tolist() == [True, True, False, False]
    for layer in layers:
        assert int((layer.router.omega != 0).sum()) == 2
        assert torch.equal(layer.router.active, kept[layer.name])
    eval_logits(model, token_ids)
    for layer in layers:  # zeroed experts are out of the routing: no token goes there
        chosen = set(layer.last_expert_ids.flatten().tolist())
        assert chosen <= set(kept[layer.name].nonzero().flatten().tolist())
        assert layer.last_expert_ids.shape[1] == 2


@pytest.mark.parametrize("plus", [False, True])
def test_pruned_experts_equal_the_unpruned_model_with_their_gates_at_zero(token_ids, tmp_path, plus):
    model = moelora.inject(tiny_llama(), moelora.WeightLoRAConfig(over="experts", keep=2, plus=plus,
                                                                 base_method=moe().to_dict()))
    randomize(model)
    opt = torch.optim.AdamW(weightlora.param_groups(model), lr=0.01)
    model.train()
    (model(input_ids=token_ids, labels=token_ids).loss + moelora.aux_loss(model)).backward()
    opt.step()
    opt.zero_grad()
    weightlora.hard_threshold(model)
    reference = copy.deepcopy(model)
    before = optimizer_numel(opt)
    kept = {layer.name: layer.router.active.nonzero().flatten().tolist() for layer in moelora.wrapped_layers(model)}

    dropped = weightlora.disconnect(model, opt)
    assert len(dropped) == 2 * len(kept)
    for layer in moelora.wrapped_layers(model):
        assert layer.bank.num_experts == 2 and layer.bank.A.shape[0] == 4
        assert layer.router.inner.weight.shape[0] == 2 and layer.router.omega.shape == (2,)
        assert layer.router.top_k == 2
    # bank rows (2 experts x rank 2 x (32 + d_out)), router rows and ω entries of 2 experts per layer left
    freed = sum(2 * 2 * (32 + layer.bank.out_features) + 2 * 32 + 2 for layer in moelora.wrapped_layers(model))
    assert optimizer_numel(opt) == before - freed == moelora.trainable_parameters(model)[0]
    # Same routing, same experts: the pruned bank sums 4 rank columns where the unpruned one summed 8
    # (4 of them gated to exactly 0), so float32 rounding may differ slightly.
    torch.testing.assert_close(eval_logits(model, token_ids), eval_logits(reference, token_ids), atol=1e-6, rtol=0)
    cfg = weightlora.weightlora_config(model)
    assert cfg.kept_experts == kept and cfg.stage == "disconnected" and cfg.num_experts == 4
    stats = moelora.routing_stats(model).layers
    counts_before = {n: s.counts.clone() for n, s in stats.items()}
    eval_logits(model, token_ids)  # still recorded in the original numbering; dropped experts get nothing
    for name, s in moelora.routing_stats(model).layers.items():
        new = s.counts - counts_before[name]
        assert s.num_experts == 4 and new.sum() > 0
        assert all(new[e] == 0 for e in range(4) if e not in kept[name])

    if plus:
        before = eval_logits(model, token_ids)
        ranks = weightlora.expand_ranks(model, opt)
        assert all(r == [4, 4] for r in ranks.values())  # 4 experts' rank budget on 2 kept experts
        torch.testing.assert_close(eval_logits(model, token_ids), before, atol=1e-6, rtol=0)
    model.train()
    (model(input_ids=token_ids, labels=token_ids).loss + moelora.aux_loss(model)).backward()
    opt.step()
    want = eval_logits(model, token_ids)
    moelora.save_adapter(model, tmp_path)
    loaded = moelora.load_adapter(tiny_llama(), tmp_path)
    torch.testing.assert_close(eval_logits(loaded, token_ids), want, atol=0, rtol=0)
    assert weightlora.weightlora_config(loaded) == weightlora.weightlora_config(model)
    assert moelora.routing_stats(loaded).expert_maps == moelora.routing_stats(model).expert_maps
    fresh = moelora.inject(tiny_llama(), weightlora.weightlora_config(model))  # the live config: same layout
    assert {k: v.shape for k, v in fresh.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}


def test_keep_experts_of_a_sira_adapter_with_capacity(token_ids):
    sira = moelora.SiRAConfig(target_modules=TARGETS, num_experts=4, top_k=2, rank=2, seed=1, capacity_factor=1.0,
                              eval_capacity_factor=1.0, min_capacity=1, expert_dropout=0.0)
    model = moelora.inject(tiny_llama(), moelora.WeightLoRAConfig(over="experts", keep=3, base_method=sira.to_dict()))
    randomize(model, seed=2)
    weightlora.hard_threshold(model)
    reference = copy.deepcopy(model)
    weightlora.disconnect(model)
    assert all(layer.router.inner.num_experts == 3 for layer in moelora.wrapped_layers(model))
    torch.testing.assert_close(eval_logits(model, token_ids), eval_logits(reference, token_ids), atol=1e-6, rtol=0)


def test_add_gates_to_an_existing_adapter_then_keep_experts(token_ids, tmp_path):
    trained = moelora.inject(tiny_llama(), moe())
    with torch.no_grad():
        for layer in moelora.wrapped_layers(trained):
            layer.bank.Bt.normal_()
    moelora.save_adapter(trained, tmp_path / "moe")
    model = moelora.load_adapter(tiny_llama(), tmp_path / "moe")
    stats = moelora.routing_stats(model)  # a handle taken before the gates: it must stay live
    want = eval_logits(model, token_ids)
    moelora.add_gates(model, over="experts", keep=1, warmup_steps=2, threshold_start=1)
    torch.testing.assert_close(eval_logits(model, token_ids), want, atol=0, rtol=0)
    assert stats is moelora.routing_stats(model) and all(s.forwards == 2 for s in stats.layers.values())
    stats.enabled = False
    eval_logits(model, token_ids)
    assert all(s.forwards == 2 for s in moelora.routing_stats(model).layers.values())
    stats.enabled = True
    cfg = weightlora.weightlora_config(model)
    assert cfg.base_method == moe().to_dict() and cfg.top_k == 2
    with pytest.raises(ValueError, match="already has WeightLoRA gates"):
        moelora.add_gates(model, over="experts", keep=1)
    ctl = moelora.WeightLoRAController(model)
    assert [ctl.step(), ctl.step()] == ["threshold", "disconnect"]
    for layer in moelora.wrapped_layers(model):
        assert layer.bank.num_experts == 1 and layer.router.top_k == 1  # top_k falls to the experts left
    moelora.save_adapter(model, tmp_path / "kept")
    loaded = moelora.load_adapter(tiny_llama(), tmp_path / "kept")
    torch.testing.assert_close(eval_logits(loaded, token_ids), eval_logits(model, token_ids), atol=0, rtol=0)


def test_bad_keep_for_experts_names_the_field_and_leaves_the_model_unchanged():
    model = moelora.inject(tiny_llama(), moe())
    state = dict(model.state_dict())
    with pytest.raises(ValueError, match=r"`keep` = 5 .*\[1, 4\]"):
        moelora.add_gates(model, over="experts", keep=5)
    assert get_state(model).config == moe()
    assert all(not hasattr(layer.router, "omega") for layer in moelora.wrapped_layers(model))
    assert model.state_dict().keys() == state.keys()
    with pytest.raises(ValueError, match="`keep`"):
        moelora.WeightLoRAConfig(over="experts", keep=5, base_method=moe().to_dict())


def test_rank_wise_and_block_methods_cannot_be_gated():
    fly = moelora.FlyLoRAConfig(target_modules=["q_proj"], rank=4, top_k=2)
    with pytest.raises(ValueError, match="`base_method`"):
        moelora.WeightLoRAConfig(keep=1, base_method=fly.to_dict())
    model = moelora.inject(tiny_llama(), fly)
    with pytest.raises(ValueError, match="cannot gate a FlyLoRAConfig"):
        moelora.add_gates(model, keep=1)


# ------------------------------------------------------------------------------------ MeteoRA fusion
peft = pytest.importorskip("peft")


def make_adapter(base, path, targets, *, r, alpha, seed):
    cfg = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights=False)
    torch.manual_seed(seed)
    peft.get_peft_model(copy.deepcopy(base), cfg).save_pretrained(str(path))
    return str(path)


def three_adapters(base, tmp_path):
    """PEFT adapters a (q, v; r 4), b (v only; r 2) and c (q, v; r 8) of ``base``."""
    return {"a": make_adapter(base, tmp_path / "a", ["q_proj", "v_proj"], r=4, alpha=8, seed=1),
            "b": make_adapter(base, tmp_path / "b", ["v_proj"], r=2, alpha=4, seed=2),
            "c": make_adapter(base, tmp_path / "c", ["q_proj", "v_proj"], r=8, alpha=8, seed=3)}


def gated_fusion(adapters, **meteora):
    """WeightLoRA(over="experts", keep=2) over a MeteoRA top-2 fusion of ``adapters``."""
    base_method = moelora.MeteoRAConfig(top_k=2, adapters=adapters, **meteora).to_dict()
    return moelora.inject(tiny_llama(), moelora.WeightLoRAConfig(over="experts", keep=2, base_method=base_method))


def set_omega(model, values):
    with torch.no_grad():
        for layer in moelora.wrapped_layers(model):
            layer.router.omega.copy_(torch.tensor(values))


def test_keep_only_necessary_adapters_of_a_meteora_fusion(tmp_path, token_ids):
    adapters = three_adapters(tiny_llama(), tmp_path)
    fused = moelora.from_lora_adapters(tiny_llama(), adapters, config=moelora.MeteoRAConfig(top_k=2)).eval()
    want = eval_logits(fused, token_ids)
    model = gated_fusion(adapters)
    with torch.no_grad():
        for a, b in zip(moelora.wrapped_layers(fused), moelora.wrapped_layers(model)):
            b.router.inner.gate.weight.copy_(a.router.gate.weight)
    torch.testing.assert_close(eval_logits(model, token_ids), want, atol=0, rtol=0)  # ω = 1: the fusion itself
    assert moelora.wrapped_layers(model)[0].router.expert_names == ["a", "b", "c"]
    set_omega(model, [0.2, 1.5, 1.0])
    weightlora.hard_threshold(model)
    reference = copy.deepcopy(model)
    weightlora.disconnect(model)
    q = model.get_submodule("model.layers.0.self_attn.q_proj")
    # "b" does not touch q_proj (rank 0 there), so it ranks last: q keeps a and c; v keeps b and c
    assert q.bank.ranks == (4, 8) and q.router.expert_names == ["a", "c"]
    assert model.get_submodule("model.layers.0.self_attn.v_proj").bank.ranks == (2, 8)
    torch.testing.assert_close(eval_logits(model, token_ids), eval_logits(reference, token_ids), atol=1e-6, rtol=0)
    moelora.save_adapter(model, tmp_path / "kept")
    loaded = moelora.load_adapter(tiny_llama(), tmp_path / "kept")
    torch.testing.assert_close(eval_logits(loaded, token_ids), eval_logits(model, token_ids), atol=0, rtol=0)


def _pruned_fusion(tmp_path):
    """A MeteoRA fusion of a, b, c under WeightLoRA(over="experts", keep=2), disconnected: q_proj
    keeps a and c, v_proj keeps b and c (as in the test above). Returns the model, its state
    just before disconnection (every expert, ω folded in the same way) and the base for PEFT."""
    base = tiny_llama()
    model = gated_fusion(three_adapters(base, tmp_path), gate_loss_coef=1.0)
    set_omega(model, [0.2, 1.5, 1.0])
    weightlora.hard_threshold(model)
    reference = copy.deepcopy(model)
    weightlora.disconnect(model)
    return model, reference, base


def test_pruned_fusion_keeps_the_model_wide_adapter_numbering(tmp_path, token_ids):
    model, reference, base = _pruned_fusion(tmp_path)
    assert meteora.expert_names(model) == ["a", "b", "c"]
    # select_experts names adapters model-wide; a layer that dropped one routes to nothing there,
    # which is what the unpruned model does with that adapter's ω = 0 (or rank 0).
    for choice in ("a", "b", "c", {"a": 0.5, "c": 1.0}):
        with moelora.select_experts(model, choice), moelora.select_experts(reference, choice):
            torch.testing.assert_close(eval_logits(model, token_ids), eval_logits(reference, token_ids), atol=1e-6, rtol=0)
    # Exported adapters follow the same numbering: "b" only lives in v_proj, "a" only in q_proj.
    exported = moelora.export_lora_adapters(model, tmp_path / "peft")
    from peft import PeftModel

    for name, path in exported.items():
        peft_model = PeftModel.from_pretrained(copy.deepcopy(base), str(path)).eval()
        with moelora.select_experts(model, name):
            torch.testing.assert_close(eval_logits(peft_model, token_ids), eval_logits(model, token_ids), atol=1e-5, rtol=0)
    config = json.loads((exported["b"] / "adapter_config.json").read_text())
    assert all(m.endswith("v_proj") for m in config["target_modules"])
    saved = tmp_path / "saved"
    moelora.save_adapter(model, saved)
    again = export_saved_adapter(saved, tmp_path / "from_saved")
    for name in exported:
        assert (again[name] / "adapter_model.safetensors").read_bytes() == \
            (exported[name] / "adapter_model.safetensors").read_bytes()


def test_pruned_fusion_supervises_each_gate_in_its_own_numbering(tmp_path, token_ids):
    model, _, _ = _pruned_fusion(tmp_path)
    q = model.get_submodule("model.layers.0.self_attn.q_proj").router.inner
    v = model.get_submodule("model.layers.0.self_attn.v_proj").router.inner
    tasks = torch.tensor([[0] * 7, [2] * 7])  # sequence 0 is adapter "a", sequence 1 is "c"
    moelora.set_task_ids(model, tasks)
    assert q.task_lookup == (0, -1, 1) and v.task_lookup == (-1, 0, 1)
    captured = {}
    hooks = [g.register_forward_hook(lambda m, a, o, key=key: captured.__setitem__(key, a[0].detach()))
             for key, g in (("q", q), ("v", v))]
    model.train()
    model(input_ids=token_ids)
    for h in hooks:
        h.remove()
    gates = len(get_state(model).wrapped)
    for key, gate, local in (("q", q, torch.tensor([0] * 7 + [1] * 7)),   # a → 0, c → 1
                             ("v", v, torch.tensor([-1] * 7 + [1] * 7))):  # a was dropped here: unsupervised
        logits = gate.logits(captured[key])
        keep = local >= 0
        want = torch.nn.functional.cross_entropy(logits[keep], local[keep]) / gates
        moelora.set_task_ids(model, tasks)
        torch.testing.assert_close(gate._gate_loss(logits, None), want)


def test_thresholded_fusion_supervises_its_gates_like_the_disconnected_one(tmp_path, token_ids):
    # Between hard thresholding and disconnection the gates route over the kept experts only; their
    # supervision used task ids in the full numbering there (IndexError: target out of bounds).
    model = gated_fusion(three_adapters(tiny_llama(), tmp_path), gate_loss_coef=1.0).train()
    set_omega(model, [0.2, 1.5, 1.0])
    weightlora.hard_threshold(model)
    tasks = torch.tensor([[0, 1, 2, 0, -1, 2, 1], [2, 2, 0, 1, 1, 0, -1]])[:, :token_ids.shape[1]]
    moelora.set_task_ids(model, tasks)
    thresholded = model(input_ids=token_ids).logits, moelora.aux_loss(model)
    weightlora.disconnect(model)                       # the same experts, physically removed
    moelora.set_task_ids(model, tasks)
    disconnected = model(input_ids=token_ids).logits, moelora.aux_loss(model)
    assert thresholded[1] > 0
    torch.testing.assert_close(thresholded, disconnected, atol=1e-6, rtol=0)


def test_disconnecting_inside_select_experts_keeps_the_forced_routing_consistent(tmp_path, token_ids):
    # The forced routings select_experts keeps for replay (and for an outer block) are read in each
    # layer's numbering when applied, so a disconnection inside the block is followed.
    adapters = three_adapters(tiny_llama(), tmp_path)
    mix = {"a": 1.0, "b": 0.5, "c": 0.7}

    def fresh():
        model = gated_fusion(adapters, train_loras=True)
        set_omega(model, [1.5, 1.0, 0.2])
        return model.train()

    grads = []
    for checkpointing in (False, True):
        model = fresh()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        with moelora.select_experts(model, mix):
            weightlora.disconnect(model)
            loss = model(input_ids=token_ids, labels=token_ids).loss
        loss.backward()   # recomputed after the block: replays the mix in the pruned numbering
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-6, msg=name)
    model, reference = fresh().eval(), fresh().eval()
    weightlora.disconnect(reference)
    with moelora.select_experts(model, mix):
        with moelora.select_experts(model, "a"):
            weightlora.disconnect(model)
        with moelora.select_experts(reference, mix):   # back in the outer block, in the pruned numbering
            torch.testing.assert_close(eval_logits(model, token_ids), eval_logits(reference, token_ids))
