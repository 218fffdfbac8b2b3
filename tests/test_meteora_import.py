"""MeteoRA import validation: every bad input gets a clear error and leaves the model unchanged;
config validation; the ``.bin`` opt-in; the import-lora / export-lora commands."""

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import moelora
from conftest import minilm_path, tiny_llama
from moelora.lora_cli import export_lora_main, import_lora_main
from test_meteora import llama_adapters, make_adapter, peft_reference  # noqa: F401 (a fixture)

peft = pytest.importorskip("peft")


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """Two valid adapters of tiny_llama()."""
    root = tmp_path_factory.mktemp("good")
    base = tiny_llama()
    return {"a": make_adapter(base, root / "a", ["q_proj", "v_proj"], r=4, alpha=8, seed=1),
            "b": make_adapter(base, root / "b", ["down_proj"], r=2, alpha=4, seed=2)}


def snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            [(n, type(m)) for n, m in model.named_modules()],
            {n: p.requires_grad for n, p in model.named_parameters()},
            len(model._forward_pre_hooks), len(model._forward_hooks))


def assert_unchanged(model, before):
    tensors, modules, grads, pre, post = before
    now = snapshot(model)
    assert now[1] == modules and now[2] == grads and now[3:] == (pre, post)
    assert tensors.keys() == now[0].keys() and all(torch.equal(tensors[k], now[0][k]) for k in tensors)
    assert not hasattr(model, "_moelora_state") and not moelora.wrapped_layers(model)


def expect_error(adapters, exc, match, model=None, **cfg):
    model = tiny_llama() if model is None else model
    before = snapshot(model)
    with pytest.raises(exc, match=match):
        moelora.from_lora_adapters(model, adapters, config=moelora.MeteoRAConfig(top_k=1, **cfg))
    assert_unchanged(model, before)


def tampered(src, dst, edit_tensors=None, edit_config=None):
    shutil.copytree(src, dst)
    if edit_tensors:
        tensors = load_file(f"{dst}/adapter_model.safetensors")
        edit_tensors(tensors)
        save_file(tensors, f"{dst}/adapter_model.safetensors")
    if edit_config:
        file = dst / "adapter_config.json"
        cfg = json.loads(file.read_text())
        edit_config(cfg)
        file.write_text(json.dumps(cfg))
    return str(dst)


def first_key(tensors, part):
    return next(k for k in sorted(tensors) if k.endswith(part))


def test_missing_path(good, tmp_path):
    expect_error({"a": good["a"], "gone": str(tmp_path / "nope")}, FileNotFoundError, "'gone'.*does not exist")


def test_wrong_base_shapes(good, tmp_path):
    wider = tiny_llama(hidden=48)
    path = make_adapter(wider, tmp_path / "wide", ["q_proj"], r=4, alpha=8)
    expect_error({"a": good["a"], "wide": path}, ValueError, r"do not fit.*expected lora_A \(4, 32\)")


def test_module_missing_from_the_model(tmp_path):
    deeper = tiny_llama(layers=3)
    path = make_adapter(deeper, tmp_path / "deep", ["q_proj"])
    expect_error({"deep": path}, ValueError, r"\['model.layers.2.self_attn.q_proj'\] do not exist")


def test_adapter_for_another_model_class_gets_a_hint(good):
    expect_error({"a": good["a"]}, ValueError, "another model class", model=tiny_llama().model)


def test_missing_keys(good, tmp_path):
    half = tampered(good["a"], tmp_path / "half",
                    edit_tensors=lambda t: t.pop(first_key(t, "lora_B.weight")))
    expect_error({"half": half}, ValueError, r"missing key .*lora_B\.weight")
    partial = tampered(good["a"], tmp_path / "partial",
                       edit_tensors=lambda t: [t.pop(k) for k in list(t) if "layers.1.self_attn.v_proj" in k])
    expect_error({"partial": partial}, ValueError, r"missing keys for modules \['model.layers.1.self_attn.v_proj'\]")


def test_nan_weights(good, tmp_path):
    def poison(t):
        t[first_key(t, "lora_A.weight")][0, 0] = float("nan")
    expect_error({"nan": tampered(good["a"], tmp_path / "nan", edit_tensors=poison)}, ValueError, "NaN")


def test_integer_dtype_and_rank_mismatch(good, tmp_path):
    def to_int(t):
        key = first_key(t, "lora_A.weight")
        t[key] = t[key].to(torch.int32)
    expect_error({"int": tampered(good["a"], tmp_path / "int", edit_tensors=to_int)}, ValueError,
                 "not a floating-point dtype")
    wrong_r = tampered(good["a"], tmp_path / "r", edit_config=lambda c: c.update(r=8))
    expect_error({"r": wrong_r}, ValueError, "at rank 8")


@pytest.mark.parametrize("kwargs,match", [
    ({"use_dora": True}, "DoRA"),
    ({"lora_bias": True}, "bias-LoRA"),
    ({"bias": "all"}, "bias='none'"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"init_lora_weights": "pissa"}, "init_lora_weights='pissa'.*rewrites the base weights"),
    ({"init_lora_weights": "olora"}, "init_lora_weights='olora'"),
])
def test_refused_lora_variants(tmp_path, kwargs, match):
    base = tiny_llama()
    path = make_adapter(base, tmp_path / "x", ["q_proj"], **kwargs)
    expect_error({"x": path}, ValueError, match)


def test_lm_head_lora_with_its_saved_base_weight_imports(tmp_path, token_ids):
    # PEFT's default save_embedding_layers="auto" stores lm_head.base_layer.weight beside an
    # lm_head LoRA; equal to the model's, it is no reason to refuse the adapter.
    base = tiny_llama()
    path = make_adapter(base, tmp_path / "head", ["q_proj", "lm_head"])
    assert any(k.endswith("lm_head.base_layer.weight") for k in load_file(f"{path}/adapter_model.safetensors"))
    model = moelora.from_lora_adapters(tiny_llama(), {"head": path}, moelora.MeteoRAConfig(top_k=1)).eval()
    with torch.no_grad(), moelora.select_experts(model, "head"):
        torch.testing.assert_close(model(token_ids).logits, peft_reference(base, path)(token_ids).logits,
                                   atol=1e-5, rtol=0)

    def resize(t):
        key = first_key(t, "lm_head.base_layer.weight")
        t[key] = t[key] + 1.0
    expect_error({"x": tampered(path, tmp_path / "resized", edit_tensors=resize)}, ValueError,
                 r"its own base weights for \['lm_head'\]")


def test_embedding_lora_is_refused_by_its_keys(tmp_path):
    path = make_adapter(tiny_llama(), tmp_path / "emb", ["embed_tokens", "q_proj"])
    expect_error({"emb": path}, ValueError, "embedding LoRA")


def test_corrupt_file_size_bound_and_bad_arguments(good, tmp_path):
    broken = tampered(good["a"], tmp_path / "broken")
    with open(f"{broken}/adapter_model.safetensors", "r+b") as f:
        f.truncate(40)
    expect_error({"broken": broken}, ValueError, "corrupt or truncated")
    expect_error({"a": good["a"]}, ValueError, "max_adapter_bytes", max_adapter_bytes=100)
    expect_error({"a/b": good["a"]}, ValueError, "names")
    expect_error({}, TypeError, "non-empty mapping")
    model = tiny_llama()
    before = snapshot(model)
    with pytest.raises(ValueError, match="top_k=2 but only 1 adapter"):
        moelora.from_lora_adapters(model, {"a": good["a"]}, config=moelora.MeteoRAConfig(top_k=2))
    assert_unchanged(model, before)
    injected = moelora.from_lora_adapters(tiny_llama(), good, config=moelora.MeteoRAConfig(top_k=1))
    with pytest.raises(ValueError, match="already holds a moelora adapter"):
        moelora.from_lora_adapters(injected, good)


def test_pickle_bin_needs_opt_in_and_then_matches(good, tmp_path, token_ids):
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    shutil.copy(f"{good['a']}/adapter_config.json", legacy)
    torch.save(load_file(f"{good['a']}/adapter_model.safetensors"), legacy / "adapter_model.bin")
    expect_error({"legacy": str(legacy)}, ValueError, "pickle file.*allow_pickle=True")
    model = moelora.from_lora_adapters(tiny_llama(), {"legacy": str(legacy)},
                                       config=moelora.MeteoRAConfig(top_k=1, allow_pickle=True)).eval()
    assert model._moelora_state.config.experts[0]["weights_file"] == "adapter_model.bin"
    with torch.no_grad():
        want = peft_reference(tiny_llama(), good["a"])(token_ids).logits
        torch.testing.assert_close(model(token_ids).logits, want, atol=1e-5, rtol=0)


def test_base_model_mismatch_warns_or_raises(tmp_path):
    from transformers import AutoModel

    base = AutoModel.from_pretrained(minilm_path()).eval()
    good = make_adapter(base, tmp_path / "ok", ["query"])
    other = tampered(good, tmp_path / "other",
                     edit_config=lambda c: c.update(base_model_name_or_path="org/some-other-model"))
    with pytest.warns(UserWarning, match="some-other-model"):
        moelora.from_lora_adapters(copy.deepcopy(base), {"ok": good, "other": other})
    expect_error({"ok": good, "other": other}, ValueError, "base model mismatch", model=copy.deepcopy(base),
                 on_base_mismatch="raise")


@pytest.mark.parametrize("kwargs,field", [
    ({"temperature": 0}, "temperature"),
    ({"gate_loss_coef": -1.0}, "gate_loss_coef"),
    ({"train_loras": "yes"}, "train_loras"),
    ({"allow_pickle": 1}, "allow_pickle"),
    ({"on_base_mismatch": "explode"}, "on_base_mismatch"),
    ({"max_adapter_bytes": 0}, "max_adapter_bytes"),
    ({"top_k": 0}, "top_k"),
    ({"experts": [{"path": "x"}]}, "experts"),
])
def test_config_fields_are_validated(kwargs, field):
    with pytest.raises(ValueError, match=f"`{field}`"):
        moelora.MeteoRAConfig(**kwargs)


def test_config_round_trips_through_json(good):
    model = moelora.from_lora_adapters(tiny_llama(), good, config=moelora.MeteoRAConfig(temperature=4.0))
    cfg = model._moelora_state.config
    assert cfg.num_experts == 2 and len(cfg.target_modules) == 6 and cfg.temperature == 4.0
    assert moelora.config_from_dict(json.loads(cfg.to_json())) == cfg


def test_inject_fuses_the_adapters_named_in_the_config(good, tmp_path, token_ids):
    """A config alone (as LightningCLI builds it from YAML) builds the model through inject."""
    cfg = moelora.MeteoRAConfig(adapters=dict(good), top_k=1)
    model = moelora.inject(tiny_llama(), moelora.config_from_dict(json.loads(cfg.to_json()))).eval()
    direct = moelora.from_lora_adapters(tiny_llama(), good, config=moelora.MeteoRAConfig(top_k=1)).eval()
    assert model._moelora_state.config == direct._moelora_state.config
    with torch.no_grad():
        torch.testing.assert_close(model(token_ids).logits, direct(token_ids).logits, atol=0, rtol=0)
    # Re-fusing from the saved (fused) config checks the files against the recorded sha256.
    fused = json.loads(model._moelora_state.config.to_json())
    changed = tampered(good["b"], tmp_path / "b2", edit_tensors=lambda t: t.update(
        {k: v * 2 for k, v in t.items() if k.endswith("lora_B.weight")}))
    fused["adapters"]["b"] = changed
    with pytest.warns(UserWarning, match=r"\['b'\] differ from the sha256"):
        moelora.inject(tiny_llama(), moelora.config_from_dict(fused))
    with pytest.raises(TypeError, match="MeteoRAConfig.adapters"):
        moelora.from_lora_adapters(tiny_llama())


def test_cli_import_then_export(tmp_path, token_ids, capsys):
    model_dir = tmp_path / "base"
    tiny_llama().save_pretrained(model_dir)
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    adapters = {"a": make_adapter(base, tmp_path / "a", ["q_proj"], r=4, alpha=8, seed=1),
                "b": make_adapter(base, tmp_path / "b", ["v_proj", "up_proj"], r=2, alpha=8, seed=2)}
    fused = tmp_path / "fused"
    argv = [f"{n}={p}" for n, p in adapters.items()] + ["-o", str(fused), "--top-k", "1", "--temperature", "2"]
    assert import_lora_main(argv) == 0, capsys.readouterr().err
    loaded = moelora.load_adapter(copy.deepcopy(base), fused).eval()
    assert loaded._moelora_state.config.temperature == 2.0
    assert import_lora_main(argv) == 1 and "--overwrite" in capsys.readouterr().err
    assert export_lora_main([str(fused), "-o", str(tmp_path / "peft")]) == 0
    assert export_lora_main([str(fused), "-o", str(tmp_path / "mix"), "--collapse", "a=0.5", "b=0.5"]) == 0
    with torch.no_grad():
        for name, path in adapters.items():
            want = peft_reference(base, path)(token_ids).logits
            torch.testing.assert_close(peft_reference(base, tmp_path / "peft" / name)(token_ids).logits, want,
                                       atol=1e-5, rtol=0)
        with moelora.select_experts(loaded, [0.5, 0.5]):
            torch.testing.assert_close(peft_reference(base, tmp_path / "mix")(token_ids).logits,
                                       loaded(token_ids).logits, atol=1e-5, rtol=0)
    assert import_lora_main(["a=" + str(tmp_path / "missing"), "-o", str(tmp_path / "x")]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert import_lora_main([f"{n}={p}" for n, p in adapters.items()] + ["-o", str(tmp_path / "z"),
                            "--base", str(tmp_path / "no_base")]) == 1
    assert "--base" in (err := capsys.readouterr().err) and "is no directory" in err
    (tmp_path / "file").write_text("")
    assert import_lora_main([f"{n}={p}" for n, p in adapters.items()] + ["-o", str(tmp_path / "file")]) == 1
    assert "-o/--output" in (err := capsys.readouterr().err) and "is a file" in err
    assert export_lora_main([str(fused), "-o", str(tmp_path / "file")]) == 1
    assert "lies inside" in capsys.readouterr().err
    assert export_lora_main([str(fused), "-o", str(tmp_path / "y"), "--collapse", "zz=1"]) == 1
    assert "unknown expert 'zz'" in capsys.readouterr().err


def test_cli_names_targets_and_partial_exports(tmp_path, capsys):
    import json as _json

    tiny_llama().save_pretrained(tmp_path / "base")
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    a = make_adapter(base, tmp_path / "a", ["q_proj"], seed=1)
    b = make_adapter(base, tmp_path / "b", ["v_proj"], seed=2)
    # Digit names: "--experts 1" is the expert named "1", not index 1 (which is expert "0").
    assert import_lora_main([f"1={a}", f"0={b}", "-o", str(tmp_path / "f"), "--top-k", "1"]) == 0
    assert export_lora_main([str(tmp_path / "f"), "-o", str(tmp_path / "e"), "--experts", "1"]) == 0
    assert sorted(p.name for p in (tmp_path / "e").iterdir()) == ["1"]
    cfg = _json.loads((tmp_path / "e" / "1" / "adapter_config.json").read_text())
    assert cfg["target_modules"] == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    saved = _json.loads((tmp_path / "f" / "moelora_config.json").read_text())["config"]["adapters"]
    assert all(Path(p).is_absolute() for p in saved.values()), "a config re-fused from another directory"
    # --collapse reads NAME like --experts: "0=1" is the expert named "0", an index only otherwise.
    assert export_lora_main([str(tmp_path / "f"), "-o", str(tmp_path / "c0"), "--collapse", "0=1"]) == 0
    collapsed = _json.loads((tmp_path / "c0" / "moelora_provenance.json").read_text())["collapse"]
    assert collapsed == {"1": 0.0, "0": 1.0}
    # One "all-linear" value is PEFT's string form, not a module literally called that.
    assert import_lora_main([f"a={a}", "-o", str(tmp_path / "g"), "--top-k", "1",
                             "--target-modules", "all-linear"]) == 0, capsys.readouterr().err
    # A trailing newline is no valid name ("$" matched before it).
    assert import_lora_main(["a\n=" + a, "-o", str(tmp_path / "h"), "--top-k", "1"]) == 1
    # Export with --overwrite checks every target first: nothing is replaced when one is blocked.
    assert export_lora_main([str(tmp_path / "f"), "-o", str(tmp_path / "e2")]) == 0
    before = {p: p.read_bytes() for p in (tmp_path / "e2").rglob("*") if p.is_file()}
    target = tmp_path / "e2" / "1" / "adapter_model.safetensors"
    target.unlink()
    target.mkdir()
    assert export_lora_main([str(tmp_path / "f"), "-o", str(tmp_path / "e2"), "--overwrite"]) == 1
    assert "not files" in capsys.readouterr().err
    assert all(p.read_bytes() == data for p, data in before.items() if p.is_file())


def test_expert_weights_and_task_ids_refuse_ambiguous_input(llama_adapters, token_ids):
    from moelora.methods.meteora import resolve_expert_weights

    with pytest.raises(ValueError, match="given twice"):
        resolve_expert_weights(["a", "b"], {"a": 1.0, 0: 2.0})
    with pytest.raises(ValueError, match="1-D"):
        resolve_expert_weights(["a", "b"], torch.tensor(1.0))
    model = moelora.from_lora_adapters(tiny_llama(), llama_adapters, config=moelora.MeteoRAConfig(top_k=1)).train()
    with pytest.raises(ValueError, match=r"shape \(2, 7, 1\)"):
        moelora.set_task_ids(model, torch.zeros(2, 7, 1, dtype=torch.long))
    moelora.set_task_ids(model, torch.zeros(token_ids.shape[::-1], dtype=torch.long))  # transposed
    with pytest.raises(ValueError, match="would supervise the wrong tokens"):
        model(token_ids)


def test_top_k_error_does_not_quote_a_placeholder_expert_count():
    with pytest.raises(ValueError, match=r"`top_k` = 0 is invalid: expected an integer >= 1 \(at most the number"):
        moelora.MeteoRAConfig(top_k=0)
