"""WeightLoRA over heads (arXiv 2506.02724): ω per wrapped module, IHT, disconnection, WeightLoRA+.

Oracles: real PEFT LoRA (ω = 1, no pruning); the same model with the dropped heads' ω at zero
(disconnection); the model just before expansion (WeightLoRA+); a fresh load of the saved adapter.
"""

import contextlib
import copy
import gc
import weakref

import pytest
import torch
from conftest import eval_logits, optimizer_numel, minilm_path, tiny_llama
from moelora.routers.weightlora import OmegaRouter
from safetensors import safe_open
from torch import nn

import moelora
from moelora import weightlora
from moelora.state import get_state

TARGETS = ["q_proj", "v_proj", "down_proj"]  # 6 heads in the 2-layer tiny Llama


def gated(keep=2, targets=TARGETS, **kw):
    cfg = moelora.WeightLoRAConfig(target_modules=targets, rank=4, alpha=8, keep=keep, seed=0, **kw)
    return moelora.inject(tiny_llama(), cfg)


@torch.no_grad()
def randomize(model, seed=0):
    """Non-zero B (a fresh LoRA has B = 0, so heads would not matter) and distinct ω."""
    g = torch.Generator().manual_seed(seed)
    for layer in weightlora.gated_layers(model):
        layer.bank.Bt.copy_(torch.randn(layer.bank.Bt.shape, generator=g) * 0.2)
        layer.router.omega.copy_(torch.rand(layer.router.omega.shape, generator=g) + 0.5)


def train_step(model, opt, ids):
    model.train()
    loss = model(input_ids=ids, labels=ids).loss + moelora.aux_loss(model)
    loss.backward()
    opt.step()
    opt.zero_grad()
    return loss.item()


# ------------------------------------------------------------------------------------ config
@pytest.mark.parametrize("kwargs,field", [
    (dict(keep=0), "keep"), (dict(keep=None), "keep"), (dict(keep=2.0), "keep"),
    (dict(over="layers"), "over"), (dict(omega_init=0.0), "omega_init"), (dict(warmup_steps=0), "warmup_steps"),
    (dict(warmup_steps=4, threshold_start=5), "threshold_start"), (dict(plus_init="random"), "plus_init"),
    (dict(plus_rank=0), "plus_rank"), (dict(over="experts"), "over"),
    (dict(over="experts", num_experts=3, top_k=1, keep=4), "keep"),
    (dict(base_method={"method": "flylora", "target_modules": ["q_proj"]}), "base_method"),
    (dict(base_method={"method": "nope"}), "base_method"), (dict(base_method={"rank": 2}), "base_method"),
    (dict(base_method={"method": "moelora", "target_modules": ["q"], "top_k": 9}), "base_method"),
    (dict(stage="done"), "stage"),
])
def test_bad_config_values_name_the_field(kwargs, field):
    args = dict(target_modules=["q_proj"], keep=1) | kwargs
    with pytest.raises(ValueError, match=f"`{field}`"):
        moelora.WeightLoRAConfig(**args)


def test_config_round_trips_through_json_and_defaults():
    cfg = moelora.WeightLoRAConfig(target_modules=["query"], keep=3, warmup_steps=10, plus=True)
    assert moelora.config_from_dict(cfg.to_dict()) == cfg
    assert cfg.first_threshold_step == 5 and cfg.num_experts == 1 and cfg.omega_init == 1.0
    assert moelora.WeightLoRAConfig(target_modules=["q"], keep=1, warmup_steps=1).first_threshold_step == 1


def snapshot(model):
    return [(n, type(m)) for n, m in model.named_modules()], {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("via_base", [False, True])
def test_keep_above_the_number_of_heads_errors_and_leaves_the_model_unchanged(via_base):
    model = tiny_llama()
    before = snapshot(model)
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    if via_base:
        cfg = moelora.WeightLoRAConfig(keep=5, base_method=moelora.MoELoRAConfig(
            target_modules=["q_proj", "v_proj"], num_experts=2, top_k=1).to_dict())
    else:
        cfg = moelora.WeightLoRAConfig(target_modules=["q_proj", "v_proj"], keep=5)
    with pytest.raises(ValueError, match=r"`keep` = 5 .*\[1, 4\]"):
        moelora.inject(model, cfg)
    after = snapshot(model)
    assert after[0] == before[0] and all(torch.equal(after[1][k], before[1][k]) for k in before[1])
    assert not hasattr(model, "_moelora_state")
    assert grads == {n: p.requires_grad for n, p in model.named_parameters()}


# ------------------------------------------------------------------------------------ ω = 1 is LoRA
def test_omega_one_without_pruning_equals_peft_lora(minilm_tokenizer):
    peft = pytest.importorskip("peft")
    from transformers import AutoModel

    base = AutoModel.from_pretrained(minilm_path()).eval()
    targets = ["query", "value", "dense"]
    torch.manual_seed(123)  # init_lora_weights=False draws a random, non-zero B
    reference = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)).eval()
    ours = moelora.inject(copy.deepcopy(base), moelora.WeightLoRAConfig(target_modules=targets, rank=4, alpha=8,
                                                                       keep=1)).eval()
    layers = weightlora.gated_layers(ours)
    assert len(layers) == 31 and all(torch.equal(layer.router.omega, torch.ones(1)) for layer in layers)
    for layer in layers:
        src = reference.base_model.model.get_submodule(layer.name)
        layer.bank.set_lora_pair(0, src.lora_A["default"].weight, src.lora_B["default"].weight)
    batch = dict(minilm_tokenizer(["routing experts is fun", "a second, longer sentence with padding"],
                                  padding=True, return_tensors="pt"))
    with torch.no_grad():
        want, got, plain = (m(**batch).last_hidden_state for m in (reference, ours, base))
    assert (want - plain).abs().max() > 1e-3
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    # no parameters beside LoRA's A, B and one ω per head
    assert moelora.trainable_parameters(ours)[0] == sum(p.numel() for p in reference.parameters()
                                                        if p.requires_grad) + len(layers)


# ------------------------------------------------------------------------------------ thresholding
def test_hard_threshold_keeps_exactly_k_and_breaks_ties_by_position():
    model = gated(keep=3)
    values = [0.5, -2.0, 0.5, 1.0, 0.5, 0.1]  # ties at 0.5: the earliest (head 0) wins
    with torch.no_grad():
        for layer, v in zip(weightlora.gated_layers(model), values):
            layer.router.omega.fill_(v)
    kept = weightlora.hard_threshold(model)
    omega = torch.cat(list(weightlora.omega_values(model).values()))
    assert omega.tolist() == [0.5, -2.0, 0.0, 1.0, 0.0, 0.0]
    assert int((omega != 0).sum()) == 3 and [bool(m) for m in kept.values()] == [True, True, False, True, False, False]
    weightlora.hard_threshold(model)  # idempotent
    assert torch.equal(torch.cat(list(weightlora.omega_values(model).values())), omega)
    with pytest.raises(ValueError, match="keep=7"):
        weightlora.hard_threshold(model, keep=7)


def test_controller_runs_iht_then_disconnects_at_warmup_steps(token_ids):
    model = gated(keep=2, warmup_steps=4, threshold_start=2)
    opt = torch.optim.AdamW(weightlora.param_groups(model, omega_lr=0.05), lr=0.01)
    ctl = weightlora.WeightLoRAController(model)
    events, nonzero = [], []
    for _ in range(6):
        train_step(model, opt, token_ids)
        events.append(ctl.step(opt))
        nonzero.append(int(sum((w != 0).sum() for w in weightlora.omega_values(model).values())))
    assert events == [None, "threshold", "threshold", "disconnect", None, None]
    assert nonzero == [6, 2, 2, 2, 2, 2]
    assert len(weightlora.gated_layers(model)) == 2 and weightlora.weightlora_config(model).stage == "disconnected"


def test_param_groups_give_omega_its_own_lr_and_no_decay():
    model = gated(keep=2, modules_to_save=["lm_head"])
    groups = {g["name"]: g for g in weightlora.param_groups(model, omega_lr=0.1, weight_decay=0.01)}
    assert set(groups) == {"experts", "omega"}
    assert groups["omega"]["lr"] == 0.1 and groups["omega"]["weight_decay"] == 0.0
    assert len(groups["omega"]["params"]) == 6 and groups["experts"]["weight_decay"] == 0.01
    assert sum(p.numel() for g in groups.values() for p in g["params"]) == moelora.trainable_parameters(model)[0]
    frozen = {g["name"]: g for g in weightlora.param_groups(model, omega_lr=0.0)}
    assert frozen["omega"]["lr"] == 0.0, "lr 0 freezes ω; it is not 'no lr given'"


def test_controller_warns_when_it_disconnects_without_the_optimizer(token_ids):
    model = gated(keep=2, warmup_steps=2, threshold_start=1)
    opt = torch.optim.AdamW(weightlora.param_groups(model), lr=0.01)
    ctl = weightlora.WeightLoRAController(model)
    train_step(model, opt, token_ids)
    ctl.step(opt)
    train_step(model, opt, token_ids)
    with pytest.warns(UserWarning, match=r"got no optimizer.*controller.step\(optimizer\)"):
        assert ctl.step() == "disconnect"


@pytest.mark.parametrize("kw,event", [(dict(plus=True), "expand"),
                                      (dict(over="experts", num_experts=4, top_k=2, plus=False), "disconnect")])
def test_resizing_with_a_factored_optimizer_restarts_its_state(token_ids, kw, event):
    # Adafactor keeps [R, 1] / [1, d] statistics: carried over unchanged to a resized A or B they
    # broke the next step (a size mismatch), and zero-padded they would divide by zero.
    model = gated(keep=2, warmup_steps=3, threshold_start=2, **kw)
    opt = torch.optim.Adafactor(weightlora.param_groups(model), lr=1e-2)
    ctl = weightlora.WeightLoRAController(model)
    events = []
    for _ in range(5):
        train_step(model, opt, token_ids)
        with pytest.warns(UserWarning, match="starts afresh") if len(events) == 2 else contextlib.nullcontext():
            events.append(ctl.step(opt))
    assert events == [None, "threshold", event, None, None]
    assert all(torch.isfinite(p).all() for p in model.parameters())


# ------------------------------------------------------------------------------------ disconnection
def test_disconnection_frees_heads_and_matches_zeroed_omega(token_ids):
    model = gated(keep=2)
    randomize(model)
    opt = torch.optim.AdamW(weightlora.param_groups(model), lr=0.01)
    train_step(model, opt, token_ids)  # the optimizer now holds state for every parameter
    weightlora.hard_threshold(model)
    reference = copy.deepcopy(model)  # the same model, dropped heads still there with ω = 0
    dropped_layers = [layer for layer in weightlora.gated_layers(model) if float(layer.router.omega.detach()) == 0]
    freed = sum(p.numel() for layer in dropped_layers for p in layer.parameters() if p.requires_grad)
    watch = [weakref.ref(layer.bank.A) for layer in dropped_layers]
    before_params, before_state = optimizer_numel(opt), len(opt.state)

    dropped = weightlora.disconnect(model, opt)
    assert dropped == [lay.name for lay in dropped_layers] and len(dropped) == 4
    assert optimizer_numel(opt) == before_params - freed and len(opt.state) == before_state - 3 * len(dropped)
    assert optimizer_numel(opt) == moelora.trainable_parameters(model)[0]
    for name in dropped:
        assert type(model.get_submodule(name)) is nn.Linear  # the plain base layer: no LoRA compute
    assert get_state(model).wrapped == [lay.name for lay in weightlora.gated_layers(model)]
    del dropped_layers
    gc.collect()
    assert all(ref() is None for ref in watch), "dropped A / B must be freed"
    torch.testing.assert_close(eval_logits(model, token_ids), eval_logits(reference, token_ids), atol=0, rtol=0)
    cfg = weightlora.weightlora_config(model)
    assert cfg.stage == "disconnected" and cfg.disconnected == dropped and len(cfg.target_modules) == 2
    assert cfg.param_budget == weightlora.lora_parameter_count(reference)
    gates = moelora.routing_stats(model).gates
    assert sorted(n for n, g in gates.items() if g["status"] == "disconnected") == sorted(dropped)
    assert set(moelora.routing_stats(model).layers) <= set(cfg.target_modules)
    assert all(torch.isfinite(torch.tensor(train_step(model, opt, token_ids))) for _ in range(2))
    with pytest.raises(ValueError, match="already disconnected"):
        weightlora.disconnect(model, opt)


# ------------------------------------------------------------------------------------ WeightLoRA+
@pytest.mark.parametrize("plus_init", ["zero_b", "zero_a"])
def test_plus_expansion_keeps_outputs_and_keeps_training(token_ids, plus_init):
    # q_proj and o_proj are 32x32 in every layer: 4 equal heads, keep 1 -> rank 4 * 4 = 16.
    model = gated(keep=1, targets=["q_proj", "o_proj"], plus=True, plus_init=plus_init)
    randomize(model)
    opt = torch.optim.Adam(weightlora.param_groups(model), lr=0.01)
    train_step(model, opt, token_ids)
    weightlora.disconnect(model, opt)
    (layer,) = weightlora.gated_layers(model)
    old_a, old_b = layer.bank.A, layer.bank.Bt
    moments = opt.state[old_a]["exp_avg"].clone(), opt.state[old_b]["exp_avg_sq"].clone()
    before = eval_logits(model, token_ids)

    assert weightlora.expand_ranks(model, opt) == {layer.name: [16]}
    after = eval_logits(model, token_ids)
    # The new rows add exactly zero (B_new A_new = 0), but the matmul now sums over 16 rank
    # columns instead of 4, and BLAS may order that float32 sum differently: allow rounding.
    torch.testing.assert_close(after, before, atol=1e-6, rtol=0)
    bank = layer.bank
    assert bank.ranks == (16,) and bank.A.shape == (16, 32) and float(bank.scale[0]) == 8 / 4  # scale of rank 4
    assert torch.equal(bank.A[:4], old_a) and torch.equal(bank.Bt[:4], old_b)
    new_rows = bank.Bt[4:] if plus_init == "zero_b" else bank.A[4:]
    assert torch.count_nonzero(new_rows) == 0
    params = [p for g in opt.param_groups for p in g["params"]]
    assert any(p is bank.A for p in params) and not any(p is old_a for p in params)
    assert torch.equal(opt.state[bank.A]["exp_avg"][:4], moments[0]) and not opt.state[bank.A]["exp_avg"][4:].any()
    assert torch.equal(opt.state[bank.Bt]["exp_avg_sq"][:4], moments[1])
    assert weightlora.weightlora_config(model).stage == "expanded"

    model.train()
    loss = model(input_ids=token_ids, labels=token_ids).loss
    loss.backward()
    grown = bank.Bt.grad[4:] if plus_init == "zero_b" else bank.A.grad[4:]
    assert grown.abs().sum() > 0, "the new rank rows must get gradients"
    opt.step()
    opt.zero_grad()
    losses = [train_step(model, opt, token_ids) for _ in range(5)]
    assert losses[-1] < loss.item()


def test_plus_budget_rule_with_unequal_heads_stays_within_budget():
    model = gated(keep=2, plus=True)  # q: 32x32, v: 32->16, down: 64->32
    randomize(model, seed=3)
    weightlora.disconnect(model)
    budget, kept = weightlora.weightlora_config(model).param_budget, weightlora.lora_parameter_count(model)
    assert budget == 2 * 4 * (64 + 48 + 96)
    new = weightlora.expand_ranks(model)
    for layer in weightlora.gated_layers(model):
        cap = min(layer.bank.in_features, layer.bank.out_features)
        assert new[layer.name] == [min(cap, 4 * budget // kept)]
    assert weightlora.lora_parameter_count(model) <= budget
    with pytest.raises(ValueError, match="runs once"):
        weightlora.expand_ranks(model)


# ------------------------------------------------------------------------------------ save / load
@pytest.mark.parametrize("plus", [False, True])
def test_save_load_of_a_pruned_model_reproduces_outputs(tmp_path, token_ids, plus):
    model = gated(keep=2, plus=plus)
    randomize(model)
    opt = torch.optim.AdamW(weightlora.param_groups(model), lr=0.01)
    train_step(model, opt, token_ids)
    weightlora.disconnect(model, opt)
    if plus:
        weightlora.expand_ranks(model, opt)
    train_step(model, opt, token_ids)  # the grown rows are trained too
    want = eval_logits(model, token_ids)
    moelora.save_adapter(model, tmp_path)
    loaded = moelora.load_adapter(tiny_llama(), tmp_path)
    torch.testing.assert_close(eval_logits(loaded, token_ids), want, atol=0, rtol=0)
    cfg = weightlora.weightlora_config(loaded)
    assert cfg == weightlora.weightlora_config(model)
    assert [lay.bank.ranks for lay in weightlora.gated_layers(loaded)] == \
        [lay.bank.ranks for lay in weightlora.gated_layers(model)]
    assert all(type(loaded.get_submodule(n)) is nn.Linear for n in cfg.disconnected)
    with safe_open(str(tmp_path / "moelora_model.safetensors"), "pt") as f:
        saved = set(f.keys())
    assert not any(n in k for k in saved for n in cfg.disconnected)
    # a loaded, disconnected adapter does not threshold again
    assert weightlora.WeightLoRAController(loaded).step(step=1000) is None


# ------------------------------------------------------------------------------------ over a MoE method
def test_heads_over_a_moe_base_method(token_ids, tmp_path):
    base = moelora.MoELoRAConfig(target_modules=["q_proj", "v_proj"], num_experts=3, top_k=2, rank=2, seed=4)
    plain = moelora.inject(tiny_llama(), base)
    model = moelora.inject(tiny_llama(), moelora.WeightLoRAConfig(keep=1, base_method=base.to_dict()))
    with torch.no_grad():
        for a, b in zip(moelora.wrapped_layers(plain), moelora.wrapped_layers(model)):
            b.bank.Bt.copy_(torch.randn_like(b.bank.Bt))
            a.bank.Bt.copy_(b.bank.Bt)
    assert all(isinstance(layer.router, OmegaRouter) and layer.router.omega.shape == (1,)
               for layer in moelora.wrapped_layers(model))
    torch.testing.assert_close(eval_logits(model, token_ids), eval_logits(plain, token_ids), atol=0, rtol=0)  # ω = 1
    cfg = weightlora.weightlora_config(model)
    assert cfg.num_experts == 3 and cfg.target_modules == get_state(plain).wrapped
    with torch.no_grad():
        moelora.wrapped_layers(model)[2].router.omega.fill_(3.0)
    weightlora.disconnect(model)
    assert [lay.name for lay in weightlora.gated_layers(model)] == ["model.layers.1.self_attn.q_proj"]
    moelora.save_adapter(model, tmp_path)
    loaded = moelora.load_adapter(tiny_llama(), tmp_path)
    torch.testing.assert_close(eval_logits(loaded, token_ids), eval_logits(model, token_ids), atol=0, rtol=0)


def test_fold_omega_then_export_gives_a_peft_lora_of_the_kept_heads(tmp_path, token_ids):
    peft = pytest.importorskip("peft")
    model = gated(keep=2, plus=True)
    randomize(model)
    weightlora.disconnect(model)
    weightlora.expand_ranks(model)
    want = eval_logits(model, token_ids)
    weightlora.fold_omega(model)
    assert all(torch.equal(w, torch.ones(1)) for w in weightlora.omega_values(model).values())
    torch.testing.assert_close(eval_logits(model, token_ids), want, atol=1e-6, rtol=1e-6)
    (path,) = moelora.export_lora_adapters(model, tmp_path).values()
    reference = peft.PeftModel.from_pretrained(tiny_llama(), str(path)).eval()
    torch.testing.assert_close(eval_logits(reference, token_ids), want, atol=1e-5, rtol=0)


def test_export_folds_omega_itself_from_the_model_and_from_a_saved_adapter(tmp_path, token_ids):
    """ω ≠ 1 is part of each head's delta: an export that dropped it would not be the model."""
    peft = pytest.importorskip("peft")
    from moelora.lora_export import export_saved_adapter

    model = gated(keep=2, plus=False)
    randomize(model)
    weightlora.disconnect(model)
    assert any(float(w.max()) != 1.0 for w in weightlora.omega_values(model).values())
    want = eval_logits(model, token_ids)
    moelora.save_adapter(model, tmp_path / "saved")
    exported = [next(iter(moelora.export_lora_adapters(model, tmp_path / "live").values())),
                next(iter(export_saved_adapter(tmp_path / "saved", tmp_path / "offline").values()))]
    for path in exported:
        reference = peft.PeftModel.from_pretrained(tiny_llama(), str(path)).eval()
        torch.testing.assert_close(eval_logits(reference, token_ids), want, atol=1e-5, rtol=0)


def test_merge_into_base_points_weightlora_to_export():
    # The heads are fixed LoRAs, not input-dependent routing: the refusal must say what to do.
    with pytest.raises(ValueError, match="export_lora_adapters") as err:
        moelora.merge_into_base(gated())
    assert "routing depends on the input" not in str(err.value)
