"""MeteoRA: real PEFT LoRA adapters fused as routed experts.

Oracles: PEFT itself (each adapter loaded with ``PeftModel.from_pretrained``; PEFT's own
``add_weighted_adapter(..., "cat")`` for the collapse), and a cross-entropy recomputed from the
gates' logits for the supervision loss.
"""

import copy
import hashlib
import json

import pytest
import torch
import torch.nn.functional as F

import moelora
from conftest import minilm_path, tiny_gpt2, tiny_llama
from moelora.methods.meteora import meteora_routers
from moelora.routers import MeteoRARouter

peft = pytest.importorskip("peft")


def make_adapter(base, path, targets, *, r=4, alpha=8, seed=0, **kwargs):
    """Save a real PEFT LoRA of ``base`` with a random, non-zero B (init_lora_weights=False)."""
    kwargs.setdefault("init_lora_weights", False)
    cfg = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, **kwargs)
    torch.manual_seed(seed)
    peft.get_peft_model(copy.deepcopy(base), cfg).save_pretrained(str(path))
    return str(path)


def peft_reference(base, path):
    return peft.PeftModel.from_pretrained(copy.deepcopy(base), str(path)).eval()


# Three adapters with different ranks, alphas, scalings and targets (design §3.6).
LLAMA_ADAPTERS = {
    "qv": dict(targets=["q_proj", "v_proj"], r=4, alpha=8, seed=1),
    "mlp": dict(targets=["v_proj", "down_proj"], r=2, alpha=6, seed=2, use_rslora=True,
                rank_pattern={"down_proj": 3}, alpha_pattern={"layers.1.mlp.down_proj": 5}),
    "wide": dict(targets=["o_proj", "gate_proj", "up_proj"], r=8, alpha=16, seed=3),
}


@pytest.fixture(scope="session")
def llama_adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama_adapters")
    base = tiny_llama()
    return {name: make_adapter(base, root / name, spec.pop("targets"), **spec)
            for name, spec in copy.deepcopy(LLAMA_ADAPTERS).items()}


def fused_llama(adapters, **cfg):
    return moelora.from_lora_adapters(tiny_llama(), adapters, config=moelora.MeteoRAConfig(**cfg)).eval()


def test_one_hot_gates_give_each_peft_adapter_on_tiny_llama(llama_adapters, token_ids):
    base = tiny_llama()
    model = fused_llama(llama_adapters)
    with torch.no_grad():
        plain = base(token_ids).logits
        for name, path in llama_adapters.items():
            want = peft_reference(base, path)(token_ids).logits
            assert (want - plain).abs().max() > 1e-2, "the adapter must matter for the test to mean anything"
            with moelora.select_experts(model, name):
                got = model(token_ids).logits
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_fused_model_follows_a_dtype_cast(llama_adapters, token_ids):
    model = fused_llama(llama_adapters, top_k=2)
    with torch.no_grad():
        want = model(token_ids).logits
        torch.testing.assert_close(copy.deepcopy(model).double()(token_ids).logits, want.double(),
                                   atol=1e-4, rtol=0)


def test_bank_layout_ranks_scales_and_rank_zero_experts(llama_adapters):
    model = fused_llama(llama_adapters)
    base = tiny_llama()
    refs = {name: peft_reference(base, path) for name, path in llama_adapters.items()}
    layers = {layer.name: layer for layer in moelora.wrapped_layers(model)}
    touched = set()
    for i, (name, ref) in enumerate(refs.items()):
        for mod_name, module in ref.base_model.model.named_modules():
            if hasattr(module, "lora_A") and "default" in module.lora_A:
                touched.add(mod_name)
                bank = layers[mod_name].bank
                assert bank.ranks[i] == module.r["default"]
                assert bank.scale[i].item() == pytest.approx(module.scaling["default"], rel=1e-6)
                lora_A, lora_B = bank.lora_pair(i)
                torch.testing.assert_close(lora_A, module.lora_A["default"].weight, atol=0, rtol=0)
                torch.testing.assert_close(lora_B, module.lora_B["default"].weight, atol=0, rtol=0)
        for mod_name, layer in layers.items():
            if not (hasattr(ref.base_model.model.get_submodule(mod_name), "lora_A")):
                assert layer.bank.ranks[i] == 0, f"{name} does not touch {mod_name}: rank 0 expected"
    assert set(layers) == touched
    assert all(isinstance(layer.router, MeteoRARouter) and layer.router.gate.out_features == 3
               for layer in layers.values())


def test_backward_after_a_select_experts_block_recomputes_the_forced_routing(llama_adapters, token_ids):
    # With checkpointing, a forward inside select_experts whose backward runs after the block used
    # to be recomputed with the learned gates: silently other experts' gradients.
    grads = []
    for checkpointing in (False, True):
        model = moelora.from_lora_adapters(tiny_llama(), llama_adapters,
                                           config=moelora.MeteoRAConfig(top_k=1, train_loras=True, seed=0))
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        with moelora.select_experts(model, "mlp"):
            loss = model(input_ids=token_ids, labels=token_ids).loss
        assert all(router.forced is None for router in meteora_routers(model)), "select_experts restores the gates"
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-6, msg=name)


def test_two_checkpointed_forwards_replay_their_own_task_ids(llama_adapters):
    # Gate supervision reads the task ids of its forward; recomputed in backward, forward 1 used to
    # read forward 2's ids (same shape, so no error: 0.11 off in the gradients).
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randint(3, 97, (2, 8), generator=g), torch.randint(0, 3, (2, 8), generator=g)) for _ in range(2)]
    grads = []
    for checkpointing in (False, True):
        model = moelora.from_lora_adapters(tiny_llama(), llama_adapters,
                                           config=moelora.MeteoRAConfig(top_k=2, gate_loss_coef=1.0, seed=0))
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        loss = 0
        for ids, tasks in batches:
            moelora.set_task_ids(model, tasks)
            loss = loss + model(input_ids=ids, labels=ids).loss + moelora.aux_loss(model)
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-6, msg=name)


def test_a_whole_model_checkpointed_at_once_keeps_its_task_ids(llama_adapters, token_ids):
    # The recomputed forward's pre-hook used to drop the ids as "set for an earlier forward", so the
    # recomputation skipped the gate loss (CheckpointError: a different number of saved tensors).
    tasks = torch.randint(0, 3, token_ids.shape, generator=torch.Generator().manual_seed(2))
    grads = []
    for checkpointing in (False, True):
        model = moelora.from_lora_adapters(tiny_llama(), llama_adapters,
                                           config=moelora.MeteoRAConfig(top_k=2, gate_loss_coef=1.0, seed=0)).train()
        moelora.set_task_ids(model, tasks)
        run = lambda ids: model(input_ids=ids, labels=ids).loss  # noqa: E731
        loss = moelora.checkpoint(model, run, token_ids) if checkpointing else run(token_ids)
        (loss + moelora.aux_loss(model)).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-6, msg=name)


def test_one_hot_gates_give_each_peft_adapter_on_minilm(tmp_path, minilm_tokenizer):
    from transformers import AutoModel

    base = AutoModel.from_pretrained(minilm_path()).eval()
    adapters = {"attn": make_adapter(base, tmp_path / "attn", ["query", "value"], r=4, alpha=8, seed=4),
                "ffn": make_adapter(base, tmp_path / "ffn", ["intermediate.dense", "key"], r=2, alpha=4, seed=5)}
    # backend="torch": under TRITON_INTERPRET the kernels sum in another fp32 order, and six
    # post-LN layers amplify that to ~5e-5 with these large random adapters; the kernels have
    # their own tests against the torch twin, this test is about the import.
    model = moelora.from_lora_adapters(copy.deepcopy(base), adapters,
                                       config=moelora.MeteoRAConfig(top_k=1, backend="torch")).eval()
    batch = dict(minilm_tokenizer(["routing experts is fun", "a second, longer sentence with padding"],
                                  padding=True, return_tensors="pt"))
    with torch.no_grad():
        for name, path in adapters.items():
            want = peft_reference(base, path)(**batch).last_hidden_state
            with moelora.select_experts(model, name):
                got = model(**batch).last_hidden_state
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_one_hot_gates_on_gpt2_conv1d_and_export(tmp_path, token_ids):
    base = tiny_gpt2()
    adapters = {"attn": make_adapter(base, tmp_path / "attn", ["c_attn"], r=4, alpha=8, seed=6, fan_in_fan_out=True),
                "mlp": make_adapter(base, tmp_path / "mlp", ["c_fc", "c_proj"], r=2, alpha=2, seed=7,
                                    fan_in_fan_out=True)}
    model = moelora.from_lora_adapters(tiny_gpt2(), adapters).eval()
    exported = moelora.export_lora_adapters(model, tmp_path / "out")
    assert json.loads((exported["mlp"] / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    with torch.no_grad():
        for name, path in adapters.items():
            want = peft_reference(base, path)(token_ids).logits
            with moelora.select_experts(model, name):
                torch.testing.assert_close(model(token_ids).logits, want, atol=1e-5, rtol=0)
            torch.testing.assert_close(peft_reference(base, exported[name])(token_ids).logits, want, atol=1e-5, rtol=0)


def test_export_loads_in_peft_with_the_original_outputs(llama_adapters, tmp_path, token_ids):
    model = fused_llama(llama_adapters)
    exported = moelora.export_lora_adapters(model, tmp_path)
    assert set(exported) == set(llama_adapters)
    base = tiny_llama()
    with torch.no_grad():
        for name, path in llama_adapters.items():
            want = peft_reference(base, path)(token_ids).logits
            got = peft_reference(base, exported[name])(token_ids).logits
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    provenance = json.loads((exported["qv"] / "moelora_provenance.json").read_text())
    assert provenance["source"]["sha256"] == hashlib.sha256(
        open(f"{llama_adapters['qv']}/adapter_model.safetensors", "rb").read()).hexdigest()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        moelora.export_lora_adapters(model, tmp_path)


def test_trained_loras_export_what_the_fused_model_computes(llama_adapters, tmp_path, token_ids):
    model = fused_llama(llama_adapters, train_loras=True, top_k=2).train()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.endswith("bank.A") for n in trainable) and any(n.endswith("gate.weight") for n in trainable)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model(token_ids, labels=token_ids).loss.backward()
    opt.step()
    model.eval()
    exported = moelora.export_lora_adapters(model, tmp_path)
    base = tiny_llama()
    with torch.no_grad():
        for name in llama_adapters:
            with moelora.select_experts(model, name):
                ours = model(token_ids).logits
            theirs = peft_reference(base, exported[name])(token_ids).logits
            original = peft_reference(base, llama_adapters[name])(token_ids).logits
            torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)
            assert (theirs - original).abs().max() > 1e-4, "training must have changed the LoRA weights"


def test_collapse_equals_peft_cat_mixture(llama_adapters, tmp_path, token_ids):
    model = fused_llama(llama_adapters)
    weights = {"qv": 0.25, "mlp": 0.75}
    path = moelora.collapse_lora_adapters(model, weights, tmp_path / "mix")
    base = tiny_llama()
    reference = peft.PeftModel.from_pretrained(copy.deepcopy(base), llama_adapters["qv"], adapter_name="qv")
    reference.load_adapter(llama_adapters["mlp"], adapter_name="mlp")
    reference.add_weighted_adapter(["qv", "mlp"], [0.25, 0.75], "mix", combination_type="cat")
    reference.set_adapter("mix")
    with torch.no_grad():
        want = reference.eval()(token_ids).logits
        got = peft_reference(base, path)(token_ids).logits
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
        with moelora.select_experts(model, weights):
            torch.testing.assert_close(model(token_ids).logits, want, atol=1e-5, rtol=0)
        # An SVD bound at the full rank is still exact; a smaller one gives a LoRA of that rank.
        full = moelora.collapse_lora_adapters(model, weights, tmp_path / "svd_full", rank=8)
        torch.testing.assert_close(peft_reference(base, full)(token_ids).logits, want, atol=1e-5, rtol=0)
    small = moelora.collapse_lora_adapters(model, weights, tmp_path / "svd1", rank=1)
    cfg = json.loads((small / "adapter_config.json").read_text())
    assert cfg["r"] == 1 and not cfg["rank_pattern"]


def test_save_load_keeps_provenance_gates_and_outputs(llama_adapters, tmp_path, token_ids):
    model = fused_llama(llama_adapters, top_k=2, temperature=2.0, seed=0)
    with torch.no_grad():
        for layer in moelora.wrapped_layers(model):  # non-trivial gates, so routing matters
            layer.router.gate.weight.normal_(0, 1)
        want = model(token_ids).logits
    moelora.save_adapter(model, tmp_path)
    meta = json.loads((tmp_path / "moelora_config.json").read_text())
    experts = meta["config"]["experts"]
    assert [e["name"] for e in experts] == list(llama_adapters)
    for entry in experts:
        file = f"{llama_adapters[entry['name']]}/adapter_model.safetensors"
        assert entry["sha256"] == hashlib.sha256(open(file, "rb").read()).hexdigest()
        assert entry["path"] == str(__import__("pathlib").Path(llama_adapters[entry["name"]]).resolve())
    loaded = moelora.load_adapter(tiny_llama(), tmp_path).eval()
    assert isinstance(loaded._moelora_state.config, moelora.MeteoRAConfig)
    with torch.no_grad():
        torch.testing.assert_close(loaded(token_ids).logits, want, atol=1e-6, rtol=0)
    grads = {n for n, p in loaded.named_parameters() if p.requires_grad}
    assert grads and all(n.endswith("router.gate.weight") for n in grads), "gates only by default"


def test_gate_weights_follow_the_meteora_paths():
    torch.manual_seed(0)
    router = MeteoRARouter(in_features=8, num_experts=5, top_k=2, temperature=3.0, init_std=1.0)
    x = torch.randn(16, 8)
    logits = router.logits(x)
    routing = router.train()(x)
    top_p, top_i = logits.softmax(-1).topk(2, dim=-1)
    torch.testing.assert_close(routing.weights, top_p / top_p.sum(-1, keepdim=True))
    assert torch.equal(routing.expert_ids, top_i)
    routing = router.eval()(x)
    top_l, top_i = logits.topk(2, dim=-1)
    torch.testing.assert_close(routing.weights, (top_l / 3.0).softmax(-1))
    assert torch.equal(routing.expert_ids, top_i)
    router.temperature = 1.0  # at T = 1 the inference path equals the training path
    torch.testing.assert_close(router.eval()(x).weights, router.train()(x).weights)
    top1 = MeteoRARouter(in_features=8, num_experts=5, top_k=1)
    assert torch.equal(top1.eval()(x).weights, torch.ones(16, 1))


def gate_logits(model):
    """Capture every gate's logits of the next forward, in module order."""
    captured = []
    handles = [layer.router.gate.register_forward_hook(lambda m, i, o: captured.append(o))
               for layer in moelora.wrapped_layers(model)]
    return captured, handles


def test_gate_supervision_is_one_cross_entropy_over_all_gates(llama_adapters, token_ids):
    model = fused_llama(llama_adapters, gate_loss_coef=7.0).train()
    task_ids = torch.tensor([[0] * 7, [2] * 5 + [-100] * 2])
    mask = torch.ones_like(token_ids)
    mask[1, -1] = 0  # padding is never supervised either
    captured, handles = gate_logits(model)
    moelora.set_task_ids(model, task_ids)
    out = model(token_ids, attention_mask=mask, labels=token_ids)
    aux = moelora.aux_loss(model)
    for h in handles:
        h.remove()
    keep = (task_ids.view(-1) >= 0) & mask.view(-1).bool()
    all_logits = torch.cat([c[keep] for c in captured])
    want = 7.0 * F.cross_entropy(all_logits, task_ids.view(-1)[keep].repeat(len(captured)))
    torch.testing.assert_close(aux, want, rtol=1e-5, atol=1e-6)
    (out.loss + aux).backward()
    assert all(layer.router.gate.weight.grad.abs().sum() > 0 for layer in moelora.wrapped_layers(model))
    # The ids belong to that one forward: the next forward has no supervision.
    model(token_ids)
    assert moelora.aux_loss(model).item() == 0.0
    assert model._moelora_state.task_ids is None


def test_task_ids_survive_checkpoint_recompute_and_are_checked(llama_adapters, token_ids):
    model = fused_llama(llama_adapters).train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    mask = torch.ones_like(token_ids)
    mask[0, -2:] = 0
    moelora.set_task_ids(model, torch.ones_like(token_ids))
    loss = model(token_ids, attention_mask=mask, labels=token_ids).loss + moelora.aux_loss(model)
    loss.backward()  # recomputation inside backward must see the same ids and mask (same saved tensors)
    assert all(layer.router.gate.weight.grad is not None for layer in moelora.wrapped_layers(model))
    with pytest.raises(ValueError, match="fuses 3 adapters"):
        moelora.set_task_ids(model, torch.full_like(token_ids, 3))
    with pytest.raises(TypeError, match="integer tensor"):
        moelora.set_task_ids(model, torch.zeros(2, 7))
    moelora.set_task_ids(model, torch.zeros(3, 7, dtype=torch.long))
    with pytest.raises(ValueError, match="one id per token|would supervise the wrong tokens"):
        model(token_ids)


def test_gate_training_routes_each_task_to_its_adapter(llama_adapters):
    """Two tasks drawing tokens from disjoint small vocabularies; a short supervised gate-training run.

    Small vocabularies keep the tasks linearly separable at every gate, including the first
    layer's, which sees only the token embedding."""
    names = ["qv", "wide"]
    model = fused_llama({n: llama_adapters[n] for n in names}, top_k=1, seed=0, backend="torch").train()
    g = torch.Generator().manual_seed(0)

    def batch(task, n=8, s=12):
        low, high = (0, 10) if task == 0 else (10, 20)
        return torch.randint(low, high, (n, s), generator=g)

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-2)
    task_ids = torch.cat([torch.zeros(8, 12), torch.ones(8, 12)]).long()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 32-wide matrices: one thread is fastest, and immune to oversubscribed CPUs
    try:
        for _ in range(100):
            ids = torch.cat([batch(0), batch(1)])
            moelora.set_task_ids(model, task_ids)
            loss = model(ids, labels=ids).loss + moelora.aux_loss(model)
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    model.eval()
    with torch.no_grad():
        for task in (0, 1):
            model(batch(task))
            for layer in moelora.wrapped_layers(model):
                share = (layer.last_expert_ids[:, 0] == task).float().mean().item()
                assert share > 0.75, f"{layer.name}: only {share:.0%} of task {task} tokens go to its adapter"


def test_gate_loss_supervises_the_clean_logits_under_router_noise(llama_adapters, token_ids):
    # The noise once reached the supervised logits: one gate's loss on one input moved from call
    # to call (2.27, 2.07) around the documented CE of W_g x (1.98).
    model = moelora.from_lora_adapters(tiny_llama(), llama_adapters, config=moelora.MeteoRAConfig(
        top_k=2, gate_loss_coef=1.0, router_noise_std=1.0, seed=0)).train()
    tasks = torch.randint(0, 3, token_ids.shape, generator=torch.Generator().manual_seed(2))
    moelora.set_task_ids(model, tasks)
    router = moelora.wrapped_layers(model)[0].router
    x = torch.randn(token_ids.numel(), router.gate.weight.shape[1], generator=torch.Generator().manual_seed(3))
    losses = [router(x).aux_loss.item() for _ in range(2)]
    with torch.no_grad():
        want = torch.nn.functional.cross_entropy(router.gate(x).double(), tasks.reshape(-1)).item()
    num_gates = len(moelora.wrapped_layers(model))
    assert losses[0] == losses[1] == pytest.approx(want / num_gates, rel=1e-5)
