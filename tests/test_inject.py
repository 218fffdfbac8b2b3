"""Injection: PEFT targeting rules, freezing, unwrap, errors that leave the model unchanged,
activation checkpointing, and the padding mask."""

import copy
import functools

import pytest
import torch

import moelora
from conftest import minilm_classifier, tiny_gpt2, tiny_llama, tiny_qwen2
from moelora.targeting import find_targets, name_matches


def state_snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, [type(m) for m in model.modules()], \
        {n: p.requires_grad for n, p in model.named_parameters()}


def assert_unchanged(model, snapshot):
    sd, types, grads = snapshot
    now = model.state_dict()
    assert sd.keys() == now.keys() and all(torch.equal(sd[k], now[k]) for k in sd)
    assert [type(m) for m in model.modules()] == types
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads
    assert not hasattr(model, "_moelora_state")


BUILDERS = {"llama": (tiny_llama, ["q_proj", "v_proj"]), "qwen2": (tiny_qwen2, ["q_proj", "k_proj", "o_proj"]),
            "gpt2": (tiny_gpt2, ["c_attn", "c_fc"])}


@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_zero_B_gives_base_outputs_and_training_changes_them(arch, token_ids):
    build, targets = BUILDERS[arch]
    base = build()
    with torch.no_grad():
        want = base(token_ids).logits
    model = moelora.inject(copy.deepcopy(base), moelora.MoELoRAConfig(target_modules=targets, seed=0))
    assert len(moelora.wrapped_layers(model)) == 2 * len(targets)
    with torch.no_grad():
        torch.testing.assert_close(model(token_ids).logits, want, atol=0, rtol=0)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".bank." in n or ".router." in n for n in trainable)
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    out = model(token_ids, labels=token_ids)
    (out.loss + moelora.aux_loss(model)).backward()
    opt.step()
    with torch.no_grad():
        assert (model.eval()(token_ids).logits - want).abs().max() > 1e-4


def test_minilm_injection_and_modules_to_save(minilm_tokenizer):
    model = minilm_classifier()
    head_before = model.classifier.weight.clone()
    moelora.inject(model, moelora.MoELoRAConfig(target_modules=["query", "value"], modules_to_save=["classifier"]))
    assert len(moelora.wrapped_layers(model)) == 12
    assert model.classifier.trained_module.weight.requires_grad
    assert not model.classifier.original_module.weight.requires_grad
    batch = minilm_tokenizer(["hello world", "hi"], padding=True, return_tensors="pt")
    model(**batch, labels=torch.tensor([0, 1])).loss.backward()
    assert model.classifier.trained_module.weight.grad is not None
    moelora.unwrap(model)
    assert torch.equal(model.classifier.weight, head_before)


def test_targeting_rules_follow_peft():
    model = tiny_llama()
    # list: exact name or "."-suffix; "proj" alone matches nothing because no name ends in ".proj"
    assert name_matches("model.layers.0.self_attn.q_proj", ["q_proj"])
    assert not name_matches("model.layers.0.self_attn.q_proj", ["proj"])
    assert name_matches("model.layers.0.self_attn.q_proj", ["self_attn.q_proj"])
    # string: full-match regex
    assert find_targets(model, r".*\.1\.self_attn\.(q|v)_proj", None) == [
        "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    assert not name_matches("model.layers.1.self_attn.q_proj", "q_proj")  # no partial regex match
    # all-linear: everything but the output head
    names = find_targets(model, "all-linear", None)
    assert "lm_head" not in names and len(names) == 2 * 7
    # exclude wins
    names = find_targets(model, "all-linear", ["down_proj", "model.layers.0.self_attn.q_proj"])
    assert not any(n.endswith("down_proj") for n in names)
    assert "model.layers.0.self_attn.q_proj" not in names and "model.layers.1.self_attn.q_proj" in names
    # a misspelled entry beside a good one: injection goes on (as in PEFT), but it is named
    with pytest.warns(UserWarning, match=r"entries \['q_porj'\] match no module"):
        assert len(find_targets(model, ["q_porj", "v_proj"], None)) == 2


def test_all_linear_skips_classifier_head():
    model = minilm_classifier()
    names = find_targets(model, "all-linear", None)
    assert "classifier" not in names and "bert.pooler.dense" in names


def test_unknown_target_lists_candidates_and_leaves_model_unchanged():
    model = tiny_llama()
    snap = state_snapshot(model)
    with pytest.raises(ValueError, match=r"not found in the base model.*q_proj"):
        moelora.inject(model, moelora.MoELoRAConfig(target_modules=["query"]))
    assert_unchanged(model, snap)


def test_non_linear_target_is_refused_clearly():
    model = tiny_llama()
    snap = state_snapshot(model)
    with pytest.raises(ValueError, match="cannot wrap.*LlamaAttention"):
        moelora.inject(model, moelora.MoELoRAConfig(target_modules=["self_attn"]))
    assert_unchanged(model, snap)


def test_bad_modules_to_save_leaves_model_unchanged():
    model = tiny_llama()
    snap = state_snapshot(model)
    with pytest.raises(ValueError, match="modules_to_save entries \\['nope'\\]"):
        moelora.inject(model, moelora.MoELoRAConfig(target_modules=["q_proj"], modules_to_save=["nope"]))
    assert_unchanged(model, snap)


def test_inject_twice_is_an_error_and_unwrap_restores():
    model = tiny_llama()
    model.model.embed_tokens.weight.requires_grad_(True)
    snap = state_snapshot(model)
    moelora.inject(model, moelora.MoELoRAConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="already holds a moelora adapter"):
        moelora.inject(model, moelora.MoELoRAConfig(target_modules=["v_proj"]))
    moelora.unwrap(model)
    assert_unchanged(model, snap)
    with pytest.raises(ValueError, match="has no moelora adapter"):
        moelora.unwrap(model)


def test_disable_adapters_gives_base_output(token_ids):
    base = tiny_llama()
    model = moelora.inject(copy.deepcopy(base), moelora.MoELoRAConfig(target_modules=["q_proj"], seed=0))
    for layer in moelora.wrapped_layers(model):
        torch.nn.init.normal_(layer.bank.Bt)
    with torch.no_grad(), moelora.disable_adapters(model):
        torch.testing.assert_close(model(token_ids).logits, base(token_ids).logits, atol=0, rtol=0)
    with torch.no_grad():
        assert (model(token_ids).logits - base(token_ids).logits).abs().max() > 1e-4


def test_disable_adapters_also_bypasses_modules_to_save_copies(token_ids):
    base = tiny_llama()
    model = moelora.inject(copy.deepcopy(base), moelora.MoELoRAConfig(target_modules=["q_proj"],
                                                                      modules_to_save=["lm_head"], seed=0))
    with torch.no_grad():
        model.lm_head.trained_module.weight.add_(0.3)
        with moelora.disable_adapters(model):
            torch.testing.assert_close(model(token_ids).logits, base(token_ids).logits, atol=0, rtol=0)
        assert (model(token_ids).logits - base(token_ids).logits).abs().max() > 1e-2


def test_merge_swaps_in_a_tied_head_copy_and_leaves_the_embeddings(token_ids):
    # GPT-2's lm_head shares wte's weight: copying the trained head into it changed the input
    # embeddings too, so the merged model computed something else than the adapter.
    model = moelora.inject(tiny_gpt2(), moelora.MoELoRAConfig(target_modules=["c_attn"], modules_to_save=["lm_head"],
                                                              num_experts=1, top_k=1, rank=4, seed=0)).eval()
    assert model.config.tie_word_embeddings
    with torch.no_grad():
        for layer in moelora.wrapped_layers(model):
            layer.bank.Bt.normal_(0, 0.1)
        model.lm_head.trained_module.weight.add_(0.3)
        want, wte = model(token_ids).logits, model.transformer.wte.weight.clone()
    with pytest.warns(UserWarning, match="tie_word_embeddings is set to False"):
        merged = moelora.merge_into_base(model)
    with torch.no_grad():
        torch.testing.assert_close(merged(token_ids).logits, want, atol=1e-5, rtol=0)
    assert torch.equal(merged.transformer.wte.weight, wte) and not merged.config.tie_word_embeddings
    # The copy takes the original's restored requires_grad, like every other parameter.
    assert merged.lm_head.weight.requires_grad == merged.transformer.wte.weight.requires_grad


def test_a_batch_of_empty_sequences_keeps_its_shape():
    m = torch.nn.Sequential(torch.nn.Linear(6, 5))
    moelora.inject(m, moelora.MoELoRAConfig(target_modules=["0"], num_experts=4, top_k=2, rank=3))
    assert m(torch.randn(2, 0, 6)).shape == (2, 0, 5)


@pytest.mark.parametrize("config", [moelora.MoELoRAConfig, moelora.SiRAConfig])
def test_casting_the_injected_model_keeps_it_working(config, token_ids):
    # The routers compute in at least fp32; after model.double() their weights are float64 and
    # after .bfloat16() bf16, and a forward must follow the cast, not crash on a dtype mismatch.
    model = moelora.inject(tiny_llama(), config(target_modules=["q_proj", "v_proj"], num_experts=4, top_k=2,
                                                rank=4, seed=0)).eval()
    with torch.no_grad():
        for layer in moelora.wrapped_layers(model):
            layer.bank.Bt.normal_(0, 0.5)
        want = model(token_ids).logits
        torch.testing.assert_close(copy.deepcopy(model).double()(token_ids).logits, want.double(),
                                   atol=1e-4, rtol=0)
        low = copy.deepcopy(model).bfloat16()(token_ids).logits
    assert low.dtype == torch.bfloat16 and (low.float() - want).abs().max() < 0.5


def test_seed_makes_init_reproducible():
    a = moelora.inject(tiny_llama(), moelora.MoELoRAConfig(target_modules=["q_proj"], seed=7))
    b = moelora.inject(tiny_llama(), moelora.MoELoRAConfig(target_modules=["q_proj"], seed=7))
    c = moelora.inject(tiny_llama(), moelora.MoELoRAConfig(target_modules=["q_proj"], seed=8))
    la, lb, lc = (moelora.wrapped_layers(m)[0] for m in (a, b, c))
    assert torch.equal(la.bank.A, lb.bank.A) and torch.equal(la.router.weight, lb.router.weight)
    assert not torch.equal(la.bank.A, lc.bank.A)


def test_padding_tokens_are_not_counted(minilm_tokenizer):
    model = minilm_classifier()
    moelora.inject(model, moelora.MoELoRAConfig(target_modules=["query"], num_experts=4, top_k=2))
    batch = minilm_tokenizer(["one two three four five six", "short"], padding=True, return_tensors="pt")
    real = int(batch["attention_mask"].sum())
    assert real < batch["attention_mask"].numel()
    with torch.no_grad():
        model(**batch)
    for stats in moelora.routing_stats(model).layers.values():
        assert stats.tokens == real and stats.counts.sum() == 2 * real


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing_counts_once_and_keeps_aux_in_graph(token_ids, reentrant):
    model = moelora.inject(tiny_llama(), moelora.MoELoRAConfig(target_modules=["q_proj"], aux_loss_coef=1.0))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    model.train()
    out = model(token_ids, labels=token_ids)
    if reentrant:
        with pytest.warns(RuntimeWarning, match="use_reentrant"):
            aux = moelora.aux_loss(model)
        return
    aux = moelora.aux_loss(model)
    assert aux.requires_grad
    (out.loss + aux).backward()
    tracker = moelora.routing_stats(model)
    for layer in moelora.wrapped_layers(model):
        stats = tracker.layers[layer.name]
        assert stats.forwards == 1 and stats.tokens == token_ids.numel()
        assert layer.router.weight.grad is not None and layer.router.weight.grad.abs().sum() > 0


def test_aux_loss_is_handed_out_once(token_ids):
    model = moelora.inject(tiny_llama(), moelora.MoELoRAConfig(target_modules=["q_proj"])).train()
    model(token_ids)
    first = moelora.aux_loss(model)
    assert first.item() > 0
    assert moelora.aux_loss(model).item() == 0.0


def test_checkpointed_gradients_equal_plain_ones_with_padding(token_ids):
    # The recomputation runs after the forward returned; it must see the same padding mask.
    mask = torch.ones_like(token_ids)
    mask[1, 4:] = 0
    grads = []
    for checkpointing in (False, True):
        model = moelora.inject(tiny_llama(), moelora.MoELoRAConfig(target_modules=["q_proj"], aux_loss_coef=1.0, seed=0))
        for layer in moelora.wrapped_layers(model):
            torch.nn.init.normal_(layer.bank.Bt, std=0.1)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        out = model(input_ids=token_ids, attention_mask=mask, labels=token_ids)
        (out.loss + moelora.aux_loss(model)).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7, msg=name)


def _sira_pair_setup():
    """A SiRA model (capacity counts real tokens only) and two batches with different padding."""
    cfg = moelora.SiRAConfig(target_modules="all-linear", num_experts=4, top_k=2, rank=4, seed=0,
                             min_capacity=0, capacity_factor=1.0, expert_dropout=0.0)
    base = moelora.inject(tiny_llama(), cfg)
    with torch.no_grad():
        for layer in moelora.wrapped_layers(base):
            layer.bank.Bt.normal_(0, 0.3, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    ids1, ids2 = torch.randint(3, 97, (2, 10), generator=g), torch.randint(3, 97, (2, 12), generator=g)
    m1, m2 = torch.ones_like(ids1), torch.ones_like(ids2)
    m1[1, :5] = 0
    return base, (ids1, m1, ids1.masked_fill(m1 == 0, -100)), (ids2, m2, ids2)


def _pair_grads(model, batches, call=None):
    # use_cache=False: a recomputed block would append its keys to the cache a second time
    # (transformers turns the cache off itself when its own checkpointing is on).
    call = call or (lambda model, ids, mask, labels: model(input_ids=ids, attention_mask=mask, labels=labels,
                                                           use_cache=False))
    sum(call(model, *batch).loss for batch in batches).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_two_checkpointed_forwards_sharing_one_backward_replay_their_own_masks():
    # SiRA's capacity counts real tokens only. Recomputed in backward, forward 1 used to read
    # forward 2's mask (the last one), so padding took capacity and other slots were dropped.
    base, *batches = _sira_pair_setup()
    grads = []
    for checkpointing in (False, True):
        model = copy.deepcopy(base).train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        grads.append(_pair_grads(model, batches))
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-6, msg=name)
    moelora.unwrap(model)
    assert not any(type(m.__dict__.get("_gradient_checkpointing_func")).__name__ == "ReplayingCheckpoint"
                   for m in model.modules()), "unwrap restores transformers' checkpoint function"


@pytest.mark.parametrize("how", ["blocks", "whole model"])
def test_moelora_checkpoint_replays_each_forwards_mask(how):
    # Blocks checkpointed by hand: moelora.checkpoint carries each forward's padding mask into its
    # recomputation; plain torch.utils.checkpoint reads the last forward's (the gradients differ).
    import torch.utils.checkpoint as tuc

    base, *batches = _sira_pair_setup()
    want = _pair_grads(copy.deepcopy(base).train(), batches)

    def by_hand(checkpoint_fn):
        model = copy.deepcopy(base).train()
        if how == "blocks":
            for block in model.model.layers:
                block.forward = functools.partial(checkpoint_fn, model, block.forward)
            return _pair_grads(model, batches)
        return _pair_grads(model, batches, lambda model, ids, mask, labels: checkpoint_fn(
            model, model, input_ids=ids, attention_mask=mask, labels=labels, use_cache=False))

    got = by_hand(moelora.checkpoint)
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=name)
    if how == "blocks":
        plain = by_hand(lambda model, fn, *a, **k: tuc.checkpoint(fn, *a, use_reentrant=False, **k))
        assert max((plain[n] - want[n]).abs().max().item() for n in want) > 1e-3, \
            "plain torch checkpointing replays the wrong mask here, or this test cannot tell"


def test_whole_model_recompute_without_a_mask_does_not_read_the_next_forwards_mask():
    # Forward 1 passes no mask; forward 2, of the same shape, has padding. Recomputing forward 1
    # (the whole model checkpointed) used to fall back to the last forward's mask.
    import torch.utils.checkpoint as tuc

    base, _, (ids2, m2, labels2) = _sira_pair_setup()
    m2 = m2.clone()
    m2[0, :4] = 0
    ids1 = torch.randint(3, 97, ids2.shape, generator=torch.Generator().manual_seed(1))
    batches = [(ids1, None, ids1), (ids2, m2, ids2.masked_fill(m2 == 0, -100))]
    want = _pair_grads(copy.deepcopy(base).train(), batches)
    got = _pair_grads(copy.deepcopy(base).train(), batches, lambda model, ids, mask, labels: tuc.checkpoint(
        model, input_ids=ids, attention_mask=mask, labels=labels, use_cache=False, use_reentrant=False))
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=name)


def test_checkpoint_inside_a_recomputed_checkpoint_keeps_the_outer_forwards_mask():
    # moelora.checkpoint around a transformers model that checkpoints its own layers: the inner
    # checkpoints are reached while the outer one recomputes, outside the injected model's forward.
    class Outer(torch.nn.Module):
        def __init__(self, use_checkpoint):
            super().__init__()
            self.lm, self.use_checkpoint = tiny_llama(), use_checkpoint

        def forward(self, input_ids, attention_mask=None):
            run = lambda ids, mask: self.lm(input_ids=ids, attention_mask=mask, use_cache=False).logits  # noqa: E731
            return moelora.checkpoint(self, run, input_ids, attention_mask) if self.use_checkpoint \
                else run(input_ids, attention_mask)

    ids = torch.randint(3, 97, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    grads = []
    for use_checkpoint in (False, True):
        cfg = moelora.SiRAConfig(target_modules=["q_proj", "v_proj"], num_experts=4, top_k=2, rank=4, seed=0,
                                 capacity_factor=0.5, min_capacity=1, expert_dropout=0.0)
        model = moelora.inject(Outer(use_checkpoint), cfg)
        with torch.no_grad():
            for layer in moelora.wrapped_layers(model):
                layer.bank.Bt.normal_(0, 0.3, generator=torch.Generator().manual_seed(0))
        if use_checkpoint:
            model.lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        (model(ids, attention_mask=mask).logsumexp(-1).mean() + moelora.aux_loss(model)).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-6, msg=name)


def test_backward_after_a_disable_adapters_block_recomputes_the_base_forward(token_ids):
    # The recomputation of a forward made inside disable_adapters must run with adapters off even
    # when backward runs after the block (a KL to the base model): it used to raise CheckpointError.
    grads = []
    for checkpointing in (False, True):
        model = moelora.inject(tiny_llama(), moelora.MoELoRAConfig(target_modules=["q_proj"], seed=0))
        model.model.embed_tokens.weight.requires_grad_(True)   # something upstream that trains
        for layer in moelora.wrapped_layers(model):
            torch.nn.init.normal_(layer.bank.Bt, std=0.1)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        out = model(input_ids=token_ids, labels=token_ids)
        with moelora.disable_adapters(model):
            base = model(input_ids=token_ids)
        (out.loss + (out.logits - base.logits).pow(2).mean()).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-6, msg=name)


def test_moelora_checkpoint_names_an_uninjected_model():
    with pytest.raises(ValueError, match="no moelora adapter"):
        moelora.checkpoint(tiny_llama(), lambda x: x * 2, torch.ones(2, requires_grad=True))


def test_positional_attention_mask_is_the_token_mask(token_ids):
    model = moelora.inject(tiny_llama(), moelora.MoELoRAConfig(target_modules=["q_proj"], seed=0)).eval()
    mask = torch.ones_like(token_ids)
    mask[1, :3] = 0
    with torch.no_grad():
        by_name = model(input_ids=token_ids, attention_mask=mask).logits
        tokens = moelora.routing_stats(model).layers["model.layers.0.self_attn.q_proj"].tokens
        by_position = model(token_ids, mask).logits
    assert moelora.routing_stats(model).layers["model.layers.0.self_attn.q_proj"].tokens == 2 * tokens
    assert tokens == int(mask.sum())
    torch.testing.assert_close(by_position, by_name, atol=0, rtol=0)


def test_an_inference_mode_forward_does_not_break_the_next_training_step(token_ids):
    model = moelora.inject(tiny_llama(), moelora.MoELoRAConfig(target_modules=["q_proj"], seed=0))
    with torch.inference_mode():
        model.eval()(token_ids)
    out = model.train()(input_ids=token_ids, labels=token_ids)
    (out.loss + moelora.aux_loss(model)).backward()
    stats = moelora.routing_stats(model).layers["model.layers.0.self_attn.q_proj"]
    assert stats.forwards == 2 and not stats.counts.is_inference()


def test_injected_model_pickles_and_deepcopies(token_ids):
    import pickle

    model = moelora.inject(tiny_llama(), moelora.MoELoRAConfig(target_modules=["q_proj"], seed=0)).eval()
    for layer in moelora.wrapped_layers(model):
        torch.nn.init.normal_(layer.bank.Bt)
    with torch.no_grad():
        want = model(token_ids).logits
    for clone in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model)):
        with torch.no_grad():
            torch.testing.assert_close(clone(token_ids).logits, want, atol=0, rtol=0)
        moelora.unwrap(clone)  # the copy has its own adapter state
    assert len(moelora.wrapped_layers(model)) == 2


def test_float64_bank_keeps_its_scale_in_float64():
    # alpha / r = 8/3 stored in fp32 is off by 3e-8 relative: visible against a float64 oracle.
    base = torch.nn.Sequential(torch.nn.Linear(5, 4)).double()
    model = moelora.inject(copy.deepcopy(base), moelora.MoELoRAConfig(
        target_modules=["0"], num_experts=1, top_k=1, rank=3, alpha=8, adapter_dtype="float64", seed=0))
    layer = moelora.wrapped_layers(model)[0]
    with torch.no_grad():
        layer.bank.Bt.normal_()
    x = torch.randn(6, 5, dtype=torch.float64)
    want = base(x) + (8 / 3) * (x @ layer.bank.A.t()) @ layer.bank.Bt
    assert layer.bank.scale.dtype == torch.float64
    torch.testing.assert_close(model(x), want, atol=1e-12, rtol=1e-12)
