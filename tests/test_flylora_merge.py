"""merge_flylora: task adapters sharing A average their B (and bias) exactly; incompatible adapters
are refused naming the difference, and nothing is written then."""

import json

import pytest
import torch

import moelora
from moelora.io import CONFIG_NAME, WEIGHTS_NAME
from test_flylora import D_IN, Net, config


def trained_adapter(path, *, B_seed, net_seed=0, **kw):
    """Save a FlyLoRA adapter whose B (and bias) stand for one task's training."""
    model = moelora.inject(Net(net_seed), config(**kw))
    g = torch.Generator().manual_seed(B_seed)
    with torch.no_grad():
        for layer in moelora.wrapped_layers(model):
            layer.bank.Bt.copy_(torch.randn(layer.bank.Bt.shape, generator=g, dtype=torch.float64))
            layer.router.bias.copy_(torch.randn(layer.router.bias.shape, generator=g))
    moelora.save_adapter(model, path)
    return model


@pytest.mark.parametrize("weights,w", [(None, (0.5, 0.5)), ([3, 1], (0.75, 0.25))])
def test_merge_of_two_adapters_averages_B_and_loads_like_any_adapter(tmp_path, weights, w):
    a = trained_adapter(tmp_path / "a", B_seed=1)
    b = trained_adapter(tmp_path / "b", B_seed=2)
    out = moelora.merge_flylora([tmp_path / "a", str(tmp_path / "b")], weights, out_dir=tmp_path / "m")
    assert out == tmp_path / "m"
    merged = moelora.load_adapter(Net(0), out).eval()
    for la, lb, lm in zip(*(moelora.wrapped_layers(m) for m in (a, b, merged))):
        assert torch.equal(lm.bank.A, la.bank.A) and torch.equal(lm.bank.A, lb.bank.A)
        assert torch.equal(lm.bank.Bt, w[0] * la.bank.Bt + w[1] * lb.bank.Bt)  # float64: exact
        want_bias = (w[0] * la.router.bias.double() + w[1] * lb.router.bias.double()).float()
        assert torch.equal(lm.router.bias, want_bias)
    # The merged model computes what a model holding the averaged B and bias computes.
    manual = moelora.inject(Net(0), config()).eval()
    with torch.no_grad():
        for lm, lx in zip(moelora.wrapped_layers(merged), moelora.wrapped_layers(manual)):
            lx.bank.Bt.copy_(lm.bank.Bt)
            lx.router.bias.copy_(lm.router.bias)
    x = torch.randn(2, 5, D_IN, dtype=torch.float64)
    assert torch.equal(merged(x), manual(x))
    meta = json.loads((out / CONFIG_NAME).read_text())
    assert [s["weight"] for s in meta["config"]["extra"]["merged_from"]] == list(w)


@pytest.mark.parametrize("change,match", [
    (dict(seed=1), "A of block.1 differs"),
    (dict(density=0.5), "A of block.1 differs"),
    (dict(rank=4), "rank differs"),
    (dict(top_k=1), "top_k differs"),
    (dict(target_modules=["fc1"]), "different target modules"),
    (dict(alpha=8.0), "lora_scale differs"),
    (dict(score="abs"), "score differs"),
])
def test_incompatible_adapters_are_refused_and_nothing_is_written(tmp_path, change, match):
    trained_adapter(tmp_path / "a", B_seed=1)
    trained_adapter(tmp_path / "b", B_seed=2, **change)
    with pytest.raises(ValueError, match=match):
        moelora.merge_flylora([tmp_path / "a", tmp_path / "b"], out_dir=tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_adapters_trained_on_the_base_in_two_dtypes_merge(tmp_path):
    # One task trained on the fp32 base, another on the same base cast to bf16: one base model
    # (io.same_base_weights), so they merge; another base in bf16 is still refused.
    trained_adapter(tmp_path / "a", B_seed=1)
    model = moelora.inject(Net(0).to(torch.bfloat16), config())
    moelora.save_adapter(model, tmp_path / "b")
    moelora.merge_flylora([tmp_path / "a", tmp_path / "b"], out_dir=tmp_path / "m")
    assert (tmp_path / "m" / WEIGHTS_NAME).exists()
    moelora.save_adapter(moelora.inject(Net(3).to(torch.bfloat16), config()), tmp_path / "c")
    with pytest.raises(ValueError, match="different base model"):
        moelora.merge_flylora([tmp_path / "a", tmp_path / "c"], out_dir=tmp_path / "m2")


def test_other_inputs_are_refused(tmp_path):
    trained_adapter(tmp_path / "a", B_seed=1)
    trained_adapter(tmp_path / "other_base", B_seed=2, net_seed=3)
    with pytest.raises(ValueError, match="different base model"):
        moelora.merge_flylora([tmp_path / "a", tmp_path / "other_base"], out_dir=tmp_path / "m")
    plain = moelora.inject(Net(0), moelora.MoELoRAConfig(target_modules=["fc1"], adapter_dtype="float64"))
    moelora.save_adapter(plain, tmp_path / "plain")
    with pytest.raises(ValueError, match="'moelora' adapter, not FlyLoRA"):
        moelora.merge_flylora([tmp_path / "a", tmp_path / "plain"], out_dir=tmp_path / "m")
    with pytest.raises(ValueError, match="weights="):
        moelora.merge_flylora([tmp_path / "a", tmp_path / "a"], [1.0], out_dir=tmp_path / "m")
    with pytest.raises(ValueError, match="weights="):
        moelora.merge_flylora([tmp_path / "a", tmp_path / "a"], [1.0, -1.0], out_dir=tmp_path / "m")
    with pytest.raises(ValueError, match="non-empty list"):
        moelora.merge_flylora(str(tmp_path / "a"), out_dir=tmp_path / "m")
    with pytest.raises(FileNotFoundError):
        moelora.merge_flylora([tmp_path / "a", tmp_path / "missing"], out_dir=tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_merging_an_adapter_with_itself_is_the_identity(tmp_path):
    trained_adapter(tmp_path / "a", B_seed=1)
    moelora.merge_flylora([tmp_path / "a", tmp_path / "a", tmp_path / "a"], out_dir=tmp_path / "m")
    from safetensors.torch import load_file

    before, after = load_file(tmp_path / "a" / WEIGHTS_NAME), load_file(tmp_path / "m" / WEIGHTS_NAME)
    assert before.keys() == after.keys()
    # (x + x + x) / 3 in float64 is x again for float32 values; float64 B may differ in the last ulp.
    for key in before:
        torch.testing.assert_close(after[key], before[key], rtol=1e-15, atol=0)
