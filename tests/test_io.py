"""save_adapter / load_adapter: exact round trips, strict validation, model untouched on error."""

import json
import os
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

import moelora
from conftest import minilm_classifier, tiny_gpt2, tiny_llama
from moelora.io import CONFIG_NAME, WEIGHTS_NAME
from moelora.state import get_state
from test_inject import assert_unchanged, state_snapshot


def trained(model, config, token_ids):
    """Inject and give every adapter tensor non-trivial values."""
    moelora.inject(model, config)
    torch.manual_seed(5)
    for layer in moelora.wrapped_layers(model):
        torch.nn.init.normal_(layer.bank.Bt, std=0.1)
        torch.nn.init.normal_(layer.router.weight)
    return model.eval()


@pytest.mark.parametrize("build,targets", [(tiny_llama, ["q_proj", "v_proj"]), (tiny_gpt2, ["c_attn"])])
def test_round_trip_is_exact(tmp_path, token_ids, build, targets):
    cfg = moelora.MoELoRAConfig(target_modules=targets, num_experts=3, top_k=2, rank=2, seed=1)
    model = trained(build(), cfg, token_ids)
    with torch.no_grad():
        want = model(token_ids).logits
    moelora.save_adapter(model, tmp_path)
    assert sorted(os.listdir(tmp_path)) == [CONFIG_NAME, WEIGHTS_NAME]
    saved = load_file(tmp_path / WEIGHTS_NAME)
    assert not any("base_layer" in k for k in saved), "the frozen backbone must not be saved"
    fresh = moelora.load_adapter(build(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(fresh(token_ids).logits, want, atol=0, rtol=0)
    assert moelora.wrapped_layers(fresh)[0].bank.A.requires_grad


def test_round_trip_minilm_with_head_and_heterogeneous_ranks(tmp_path, minilm_tokenizer):
    cfg = moelora.MoELoRAConfig(target_modules=["query"], modules_to_save=["classifier"], num_experts=3, top_k=2)
    model = minilm_classifier()
    names = [n for n, m in model.named_modules() if n.endswith("query")]
    moelora.inject(model, cfg, expert_ranks={n: [2, 0, 5] for n in names}, expert_scales={n: [1.0, 3.0, 0.5] for n in names})
    for layer in moelora.wrapped_layers(model):
        torch.nn.init.normal_(layer.bank.Bt, std=0.1)
    torch.nn.init.normal_(model.classifier.trained_module.weight)
    batch = minilm_tokenizer(["a b c", "d"], padding=True, return_tensors="pt")
    with torch.no_grad():
        want = model.eval()(**batch).logits
    moelora.save_adapter(model, tmp_path)
    fresh = moelora.load_adapter(minilm_classifier(seed=99), tmp_path, trainable=False)
    layer = moelora.wrapped_layers(fresh)[0]
    assert layer.bank.ranks == (2, 0, 5) and layer.bank.scale.tolist() == [1.0, 3.0, 0.5]
    assert not any(p.requires_grad for p in fresh.parameters())
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(**batch).logits, want, atol=0, rtol=0)


def test_config_json_round_trip(tmp_path, token_ids):
    cfg = moelora.MoELoRAConfig(target_modules=r".*q_proj", exclude_modules=["model.layers.0.self_attn.q_proj"],
                                num_experts=2, top_k=1, z_loss_coef=0.1, extra={"note": "x"})
    moelora.save_adapter(trained(tiny_llama(), cfg, token_ids), tmp_path)
    meta = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert moelora.config_from_dict(meta["config"]) == cfg
    assert meta["base_model"]["class"] == "LlamaForCausalLM"
    assert list(meta["modules"]) == ["model.layers.1.self_attn.q_proj"]


@pytest.fixture
def saved(tmp_path, token_ids):
    cfg = moelora.MoELoRAConfig(target_modules=["q_proj"], num_experts=2, top_k=1, rank=2)
    moelora.save_adapter(trained(tiny_llama(), cfg, token_ids), tmp_path)
    return tmp_path


def rewrite_weights(path, edit):
    tensors = load_file(path / WEIGHTS_NAME)
    edit(tensors)
    save_file(tensors, path / WEIGHTS_NAME)


@pytest.mark.parametrize("edit,message", [
    (lambda t: t.pop("model.layers.0.self_attn.q_proj.bank.A"), r"missing keys \['model.layers.0.self_attn.q_proj.bank.A'\]"),
    (lambda t: t.__setitem__("model.layers.0.self_attn.q_proj.bank.extra", torch.ones(1)), "unexpected keys"),
    (lambda t: t.__setitem__("model.layers.1.self_attn.q_proj.bank.Bt", torch.ones(3, 32)), r"mis-shaped.*bank.Bt"),
    (lambda t: t.__setitem__("model.layers.1.self_attn.q_proj.bank.Bt", torch.full((4, 32), float("nan"))), "non-finite"),
])
def test_bad_weights_are_named_and_model_unchanged(saved, edit, message):
    rewrite_weights(saved, edit)
    model = tiny_llama()
    snap = state_snapshot(model)
    with pytest.raises(ValueError, match=message):
        moelora.load_adapter(model, saved)
    assert_unchanged(model, snap)


def test_truncated_file_and_bad_json(saved):
    model = tiny_llama()
    snap = state_snapshot(model)
    data = (saved / WEIGHTS_NAME).read_bytes()
    (saved / WEIGHTS_NAME).write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        moelora.load_adapter(model, saved)
    (saved / CONFIG_NAME).write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        moelora.load_adapter(model, saved)
    (saved / CONFIG_NAME).unlink()
    with pytest.raises(FileNotFoundError, match=CONFIG_NAME):
        moelora.load_adapter(model, saved)
    assert_unchanged(model, snap)


@pytest.mark.parametrize("damage", [
    lambda m: m.__setitem__("config", None), lambda m: m.__setitem__("config", [1]),
    lambda m: m.__setitem__("modules", [1]), lambda m: m["modules"].__setitem__(next(iter(m["modules"])), None),
    lambda m: m["modules"][next(iter(m["modules"]))].__setitem__("ranks", ["2", 2]),
], ids=["config-null", "config-list", "modules-list", "module-null", "ranks-strings"])
def test_wrongly_typed_config_fields_are_named_and_model_unchanged(saved, damage):
    meta = json.loads((saved / CONFIG_NAME).read_text())
    damage(meta)
    (saved / CONFIG_NAME).write_text(json.dumps(meta))
    model = tiny_llama()
    snap = state_snapshot(model)
    with pytest.raises(ValueError, match=f"{CONFIG_NAME} is damaged"):
        moelora.load_adapter(model, saved)
    assert_unchanged(model, snap)


def test_saving_onto_a_file_names_it_and_keeps_it(tmp_path, token_ids):
    model = moelora.inject(tiny_llama(), moelora.MoELoRAConfig(target_modules=["q_proj"], num_experts=2, rank=2))
    blocker = tmp_path / "taken"
    blocker.write_text("keep me")
    for target, where in ((blocker, "is a file"), (blocker / "inside", "lies inside")):
        with pytest.raises(NotADirectoryError, match=f"save_adapter path .*{where}"):
            moelora.save_adapter(model, target)
    assert blocker.read_text() == "keep me"


def test_adapter_for_other_modules_is_refused(saved):
    model = tiny_llama(layers=3)
    snap = state_snapshot(model)
    with pytest.raises(ValueError, match=r"only in the model \['model.layers.2.self_attn.q_proj'\]"):
        moelora.load_adapter(model, saved)
    assert_unchanged(model, snap)


def test_other_base_weights_warn(saved):
    with pytest.warns(UserWarning, match="wrapped base weights differ"):
        moelora.load_adapter(tiny_llama(seed=3), saved)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_same_base_in_another_dtype_is_the_same_base(saved, dtype):
    # Trained in fp32, served in bf16/fp16: the exact hash differs (it includes the dtype), the
    # sampled values agree within rounding, so no warning. The adapter itself stays fp32.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        moelora.load_adapter(tiny_llama().to(dtype), saved)
    with pytest.warns(UserWarning, match="wrapped base weights differ"):  # another base in that dtype still warns
        moelora.load_adapter(tiny_llama(seed=3).to(dtype), saved)


def test_adapter_cast_to_bf16_loads_in_the_configured_dtype(tmp_path, token_ids):
    # model.bfloat16() after inject casts the adapter too, so the file holds bf16 tensors while the
    # config still says adapter_dtype="float32". Loading builds the adapter in the configured dtype
    # and upcasts the values exactly (PEFT's autocast_adapter_dtype does the same): every value
    # survives bit for bit, and to_dtype afterwards gives back the bf16 model.
    cfg = moelora.MoELoRAConfig(target_modules=["q_proj"], num_experts=3, top_k=2, rank=2)
    model = trained(tiny_llama(), cfg, token_ids).to(torch.bfloat16)
    moelora.save_adapter(model, tmp_path)
    saved = load_file(tmp_path / WEIGHTS_NAME)
    assert {t.dtype for k, t in saved.items() if not k.endswith(".scale")} == {torch.bfloat16}  # scale stays fp32
    fresh = moelora.load_adapter(tiny_llama(), tmp_path)
    layer, old = moelora.wrapped_layers(fresh)[0], moelora.wrapped_layers(model)[0]
    assert layer.bank.A.dtype == torch.float32
    torch.testing.assert_close(layer.bank.A, old.bank.A.float(), atol=0, rtol=0)
    torch.testing.assert_close(layer.router.weight, old.router.weight.float(), atol=0, rtol=0)
    fresh.to(torch.bfloat16)
    with torch.no_grad():
        torch.testing.assert_close(fresh(token_ids).logits, model(token_ids).logits, atol=0, rtol=0)


def test_a_slightly_changed_base_in_the_same_dtype_warns(saved):
    # The tolerance is only for a change of dtype: in the same dtype the hash is exact, so a base
    # fine-tuned by a hair (far below bf16 rounding) is still another base.
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight[0, 0] *= 1 + 1e-5
    with pytest.warns(UserWarning, match="wrapped base weights differ"):
        moelora.load_adapter(model, saved)


def test_loading_into_an_injected_model_is_refused(saved):
    model = moelora.inject(tiny_llama(), moelora.MoELoRAConfig(target_modules=["v_proj"]))
    with pytest.raises(ValueError, match="already holds"):
        moelora.load_adapter(model, saved)


def test_save_interrupted_between_the_two_files_is_refused_on_load(saved, monkeypatch, token_ids):
    # The weights are renamed into place first; a stop before the config's rename leaves the new
    # weights beside the old config (here: another method's top_k), which must not load as one.
    model = trained(tiny_llama(), moelora.MoELoRAConfig(target_modules=["q_proj"], num_experts=2, top_k=2,
                                                        rank=2), token_ids)
    real = moelora.io._atomic_write

    def stop_at_config(path, write):
        if path.name == CONFIG_NAME:
            raise KeyboardInterrupt
        real(path, write)

    monkeypatch.setattr("moelora.io._atomic_write", stop_at_config)
    with pytest.raises(KeyboardInterrupt):
        moelora.save_adapter(model, saved)
    monkeypatch.undo()
    fresh = tiny_llama()
    snap = state_snapshot(fresh)
    with pytest.raises(ValueError, match="come from different saves"):
        moelora.load_adapter(fresh, saved)
    assert_unchanged(fresh, snap)
    moelora.save_adapter(model, saved)  # a completed save is whole again
    moelora.load_adapter(fresh, saved)


def test_loading_for_inference_gives_eval_outputs(tmp_path, token_ids):
    # SiRA with dropout: left in train mode after the load, every forward would differ.
    cfg = moelora.SiRAConfig(target_modules=["q_proj", "v_proj"], num_experts=4, top_k=2, rank=2, dropout=0.5,
                             expert_dropout=0.5)
    model = trained(tiny_llama(), cfg, token_ids)
    with torch.no_grad():
        want = model(token_ids).logits
    moelora.save_adapter(model, tmp_path)
    fresh = moelora.load_adapter(tiny_llama().train(), tmp_path, trainable=False)
    assert not any(m.training for m in fresh.modules())
    with torch.no_grad():
        torch.testing.assert_close(fresh(token_ids).logits, want, atol=0, rtol=0)
    assert moelora.load_adapter(tiny_llama().train(), tmp_path).training, "trainable loads keep the mode"


def test_failed_save_keeps_previous_files(saved, monkeypatch, token_ids):
    before = {n: (saved / n).read_bytes() for n in (CONFIG_NAME, WEIGHTS_NAME)}
    model = trained(tiny_llama(), moelora.MoELoRAConfig(target_modules=["v_proj"]), token_ids)

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("moelora.io.save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        moelora.save_adapter(model, saved)
    assert {n: (saved / n).read_bytes() for n in (CONFIG_NAME, WEIGHTS_NAME)} == before
    assert sorted(os.listdir(saved)) == [CONFIG_NAME, WEIGHTS_NAME], "no temp file may be left behind"
    # A config that cannot be written as JSON fails before the weights are replaced.
    monkeypatch.undo()
    get_state(model).config.extra["bad"] = float("nan")  # bypasses the config's own check
    with pytest.raises(ValueError, match="JSON"):
        moelora.save_adapter(model, saved)
    assert {n: (saved / n).read_bytes() for n in (CONFIG_NAME, WEIGHTS_NAME)} == before


def test_saved_files_get_the_usual_mode(saved):
    # mkstemp creates 0600; an adapter shared with a team must be as readable as any new file.
    mask = os.umask(0)
    os.umask(mask)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        assert (saved / name).stat().st_mode & 0o777 == 0o666 & ~mask
