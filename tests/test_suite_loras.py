"""`moelora suite-loras`: per-task PEFT LoRAs for configs/meteora.yaml; per-sequence task ids."""

import pytest
import torch
import torch.nn.functional as F

import moelora
from conftest import minilm_classifier
from moelora.state import AdapterState
from moelora.suite_loras import make_suite_loras, suite_loras_main, train_task_lora


@pytest.fixture(scope="module")
def two_loras(tmp_path_factory):
    out = tmp_path_factory.mktemp("loras")
    return make_suite_loras(out, tasks=("topic", "same"), steps=2, examples=4, batch_size=4)


def test_task_ids_for_token_and_sequence_layers():
    state = AdapterState(config=moelora.MoELoRAConfig(target_modules=["q"]))
    state.task_ids = torch.tensor([[2, 2, -100], [0, 0, 0]])
    assert state.task_ids_for(6).tolist() == [2, 2, -100, 0, 0, 0]
    assert state.task_ids_for(2).tolist() == [2, 0]  # one row per sequence: padding ids ignored
    assert state.task_ids_for(4) is None
    state.task_ids = torch.tensor([[1, 0, 0], [-1, -1, -1]])
    assert state.task_ids_for(2) is None  # a sequence with two tasks has no single id
    state.task_ids = torch.tensor([[1, 1, 1], [-1, -1, -1]])
    assert state.task_ids_for(2).tolist() == [1, -1]
    state.task_ids = torch.tensor([1, 1, 0, 0])  # flat ids say nothing about sequences
    assert state.task_ids_for(2) is None


def test_exported_adapter_is_the_trained_lora_in_peft(two_loras, minilm_tokenizer):
    peft = pytest.importorskip("peft")
    assert set(two_loras) == {"topic", "same"} and all((d / "adapter_config.json").is_file() for d in two_loras.values())
    trained = train_task_lora("topic", steps=2, examples=4, batch_size=4)
    batch = minilm_tokenizer(["topic: we saw a heron near the shed", "same: river / river"], padding=True,
                             return_tensors="pt")
    loaded = peft.PeftModel.from_pretrained(minilm_classifier(), str(two_loras["topic"])).eval()
    with torch.no_grad():
        want = trained.bert(**batch).last_hidden_state
        got = loaded.base_model.model.bert(**batch).last_hidden_state
        base = minilm_classifier().bert(**batch).last_hidden_state
    assert (want - base).abs().max() > 1e-4, "two training steps must move the LoRA off zero"
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # the trained head goes with it (modules_to_save), so the logits agree too
        torch.testing.assert_close(loaded(**batch).logits, trained.eval()(**batch).logits, atol=1e-5, rtol=1e-5)


def test_cli_imports_suite_loras_with_the_class_and_heads_they_need(two_loras, tmp_path, capsys):
    import json
    import shutil

    from moelora.lora_cli import import_lora_main

    assert json.loads((two_loras["topic"] / "adapter_config.json").read_text())["task_type"] == "SEQ_CLS"
    pairs = [f"{t}={d}" for t, d in two_loras.items()]
    assert import_lora_main(pairs + ["-o", str(tmp_path / "a"), "--top-k", "1"]) == 1
    assert "--adapter-heads drop" in capsys.readouterr().err
    assert import_lora_main(pairs + ["-o", str(tmp_path / "b"), "--top-k", "1", "--adapter-heads", "drop"]) == 0, \
        capsys.readouterr().err
    # Without a task type, "auto" loads the bare BertModel; the error says how to pick the class.
    bare = tmp_path / "bare"
    shutil.copytree(two_loras["topic"], bare)
    cfg = json.loads((bare / "adapter_config.json").read_text())
    cfg["task_type"] = None
    (bare / "adapter_config.json").write_text(json.dumps(cfg))
    assert import_lora_main([f"topic={bare}", "-o", str(tmp_path / "c"), "--top-k", "1", "--adapter-heads", "drop"]) == 1
    assert "--model-class" in capsys.readouterr().err


def test_pooler_gate_is_supervised_by_each_sequence_task(two_loras, minilm_tokenizer):
    adapters = {t: str(d) for t, d in two_loras.items()}
    # Each suite LoRA carries its trained head (modules_to_save), which one routed expert cannot.
    with pytest.raises(ValueError, match="adapter_heads='drop'"):
        moelora.from_lora_adapters(minilm_classifier(), adapters, config=moelora.MeteoRAConfig(top_k=1))
    with pytest.warns(UserWarning, match=r"copies of \['classifier'\] \(modules_to_save\) are not imported"):
        model = moelora.from_lora_adapters(minilm_classifier(), adapters, config=moelora.MeteoRAConfig(
            top_k=1, gate_loss_coef=3.0, seed=0, adapter_heads="drop")).train()
    pooler = next(layer for layer in moelora.wrapped_layers(model) if layer.name.endswith("pooler.dense"))
    logits = []
    pooler.router.register_forward_hook(lambda m, args, out: logits.append(m.gate(args[0]).detach()))
    batch = minilm_tokenizer(["topic: a heron", "same: river / river", "same: ice / fire"], padding=True,
                             return_tensors="pt")
    ids = torch.tensor([0, 1, 1])[:, None].expand_as(batch["input_ids"]).clone()
    ids[batch["attention_mask"] == 0] = -100
    moelora.set_task_ids(model, ids)
    model(**batch)
    num_gates = len(moelora.wrapped_layers(model))
    want = 3.0 / num_gates * F.cross_entropy(logits[0], torch.tensor([0, 1, 1]))
    torch.testing.assert_close(pooler.pop_aux_loss(), want, rtol=1e-5, atol=1e-6)


def test_bad_requests_fail_before_any_training(tmp_path, two_loras, capsys):
    with pytest.raises(ValueError, match="unknown suite task"):
        make_suite_loras(tmp_path, tasks=("topic", "poetry"))
    out = next(iter(two_loras.values())).parent
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(FileExistsError, match="overwrite"):
        make_suite_loras(out, tasks=("topic",))
    assert suite_loras_main(["-o", str(out), "--tasks", "same"]) == 2
    assert "already exist" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    with pytest.raises(SystemExit):
        suite_loras_main(["-o", str(tmp_path), "--steps", "0"])
