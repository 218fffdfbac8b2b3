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
