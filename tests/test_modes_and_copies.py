"""Every method's adapter modules take the model's train/eval mode on inject and load, and a
model can be deep-copied (EMA, swa_utils.AveragedModel) after a training forward whose aux loss
was never collected."""

import copy

import peft
import pytest
import torch

import moelora
from conftest import tiny_llama

METHODS = {
    "moelora": lambda: moelora.MoELoRAConfig(target_modules=["q_proj", "v_proj"], num_experts=4, top_k=2,
                                             aux_loss_coef=0.01),
    "sira": lambda: moelora.SiRAConfig(target_modules=["q_proj", "v_proj"], num_experts=4, top_k=2,
                                       expert_dropout=0.5, aux_loss_coef=0.01),
    "flylora": lambda: moelora.FlyLoRAConfig(target_modules=["q_proj", "v_proj"], rank=8, top_k=2),
    "moa": lambda: moelora.MoAConfig(variant="sparse"),
    "weightlora": lambda: moelora.WeightLoRAConfig(target_modules=["q_proj", "v_proj"], rank=2, keep=1),
}


def adapted(method, base, tmp_path):
    if method == "meteora":
        torch.manual_seed(0)
        path = tmp_path / "lora"
        peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=2, target_modules=["q_proj"],
                                                          init_lora_weights=False)).save_pretrained(str(path))
        return moelora.from_lora_adapters(base, {"a": str(path), "b": str(path)})
    return moelora.inject(base, METHODS[method]())


def adapter_modules(model):
    base_ids = {id(m) for layer in moelora.wrapped_layers(model) for m in layer.base_layer.modules()}
    return [(n, m) for n, m in model.named_modules() if id(m) not in base_ids]


@pytest.mark.parametrize("method", [*METHODS, "meteora"])
@pytest.mark.parametrize("mode", [True, False])
def test_adapter_modules_take_the_models_mode_on_inject_and_load(method, mode, tmp_path):
    model = adapted(method, tiny_llama().train(mode), tmp_path)
    wrong = [n for n, m in adapter_modules(model) if m.training != mode]
    assert not wrong, f"modules not in {'train' if mode else 'eval'} mode after inject: {wrong[:4]}"
    moelora.save_adapter(model, tmp_path / "saved")
    loaded = moelora.load_adapter(tiny_llama().train(mode), tmp_path / "saved")
    wrong = [n for n, m in adapter_modules(loaded) if m.training != mode]
    assert not wrong, f"modules not in {'train' if mode else 'eval'} mode after load_adapter: {wrong[:4]}"


@pytest.mark.parametrize("method", [*METHODS, "meteora"])
def test_deepcopy_after_a_training_forward_whose_aux_loss_was_not_collected(method, tmp_path, token_ids):
    model = adapted(method, tiny_llama(), tmp_path).train()
    model(input_ids=token_ids, labels=token_ids).loss.backward()   # no moelora.aux_loss(model)
    twin = copy.deepcopy(model).eval()
    averaged = torch.optim.swa_utils.AveragedModel(model).eval()
    model.eval()
    with torch.no_grad():
        want = model(input_ids=token_ids).logits
        torch.testing.assert_close(twin(input_ids=token_ids).logits, want, rtol=0, atol=0)
        torch.testing.assert_close(averaged.module(input_ids=token_ids).logits, want, rtol=0, atol=0)
