"""A 1-expert, top-1 MoE-LoRA holding a real PEFT LoRA's weights gives PEFT's outputs."""

import copy

import pytest
import torch

import moelora
from conftest import minilm_path, tiny_gpt2, tiny_llama

peft = pytest.importorskip("peft")


def peft_lora(model, targets, *, r=4, alpha=8, rslora=False, fan_in_fan_out=False):
    cfg = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights=False,
                          use_rslora=rslora, fan_in_fan_out=fan_in_fan_out)
    torch.manual_seed(123)  # init_lora_weights=False draws a random, non-zero B
    return peft.get_peft_model(copy.deepcopy(model), cfg).eval()


def copy_peft_into_moelora(peft_model, moe_model):
    for layer in moelora.wrapped_layers(moe_model):
        src = peft_model.base_model.model.get_submodule(layer.name)
        layer.bank.set_lora_pair(0, src.lora_A["default"].weight, src.lora_B["default"].weight)


def assert_parity(base, targets, inputs, *, out, rslora=False, fan_in_fan_out=False):
    reference = peft_lora(base, targets, rslora=rslora, fan_in_fan_out=fan_in_fan_out)
    ours = moelora.inject(copy.deepcopy(base), moelora.MoELoRAConfig(
        target_modules=targets, num_experts=1, top_k=1, rank=4, alpha=8, use_rslora=rslora)).eval()
    copy_peft_into_moelora(reference, ours)
    with torch.no_grad():
        want, got, plain = out(reference(**inputs)), out(ours(**inputs)), out(base(**inputs))
    assert (want - plain).abs().max() > 1e-3, "the PEFT LoRA must change the output for the test to mean anything"
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    # Same trainable parameters as PEFT: a one-expert router has nothing to learn and is frozen.
    assert moelora.trainable_parameters(ours)[0] == sum(p.numel() for p in reference.parameters() if p.requires_grad)


def test_parity_with_peft_on_minilm(minilm_tokenizer):
    from transformers import AutoModel

    base = AutoModel.from_pretrained(minilm_path()).eval()
    batch = minilm_tokenizer(["routing experts is fun", "a second, longer sentence with padding"],
                             padding=True, return_tensors="pt")
    assert_parity(base, ["query", "value", "dense"], dict(batch), out=lambda o: o.last_hidden_state)


@pytest.mark.parametrize("rslora", [False, True])
def test_parity_with_peft_on_tiny_llama(token_ids, rslora):
    assert_parity(tiny_llama(), ["q_proj", "v_proj", "down_proj"], {"input_ids": token_ids},
                  out=lambda o: o.logits, rslora=rslora)


def test_parity_with_peft_on_gpt2_conv1d(token_ids):
    assert_parity(tiny_gpt2(), ["c_attn", "c_proj"], {"input_ids": token_ids}, out=lambda o: o.logits,
                  fan_in_fan_out=True)


@pytest.mark.parametrize("source", ["live", "saved"])
def test_export_carries_modules_to_save_into_peft(tmp_path, token_ids, source):
    # The trained head is part of what every expert computes: an export without it loaded in
    # PEFT gives other logits than the moelora model.
    from peft import PeftModel

    from moelora.lora_export import export_saved_adapter

    model = moelora.inject(tiny_llama(), moelora.MoELoRAConfig(target_modules=["q_proj", "v_proj"],
                                                               modules_to_save=["lm_head"], num_experts=1, top_k=1,
                                                               rank=4, seed=0)).eval()
    with torch.no_grad():
        for layer in moelora.wrapped_layers(model):
            layer.bank.Bt.normal_(0, 0.1)
        model.lm_head.trained_module.weight.add_(0.3)
        want = model(token_ids).logits
    if source == "live":
        out = moelora.export_lora_adapters(model, tmp_path / "peft")["expert_0"]
    else:
        moelora.save_adapter(model, tmp_path / "saved")
        out = export_saved_adapter(tmp_path / "saved", tmp_path / "peft")["expert_0"]
    peft_model = PeftModel.from_pretrained(tiny_llama(), str(out)).eval()
    assert peft_model.peft_config["default"].modules_to_save == ["lm_head"]
    with torch.no_grad():
        torch.testing.assert_close(peft_model(token_ids).logits, want, atol=1e-5, rtol=0)
    collapsed = moelora.collapse_lora_adapters(model, [1.0], tmp_path / "collapsed")
    with torch.no_grad():
        got = PeftModel.from_pretrained(tiny_llama(), str(collapsed)).eval()(token_ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
