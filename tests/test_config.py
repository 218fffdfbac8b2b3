"""Config validation names the field and the allowed values; JSON round trips."""

import json

import pytest

import moelora
from moelora.config import MoELoRAConfig


@pytest.mark.parametrize("kwargs,field", [
    ({"top_k": 5, "num_experts": 4}, "top_k"),
    ({"top_k": 0}, "top_k"),
    ({"rank": 0}, "rank"),
    ({"rank": 2.5}, "rank"),
    ({"num_experts": 0}, "num_experts"),
    ({"alpha": -1}, "alpha"),
    ({"dropout": 1.0}, "dropout"),
    ({"aux_loss_coef": -0.1}, "aux_loss_coef"),
    ({"router_noise_std": "high"}, "router_noise_std"),
    ({"init_lora_weights": "orthogonal"}, "init_lora_weights"),
    ({"adapter_dtype": "int8"}, "adapter_dtype"),
    ({"backend": "cuda"}, "backend"),
    ({"target_modules": []}, "target_modules"),
    ({"target_modules": None}, "target_modules"),
    ({"exclude_modules": [""]}, "exclude_modules"),
    ({"modules_to_save": "classifier"}, "modules_to_save"),
    ({"seed": "0"}, "seed"),
    ({"use_rslora": "false"}, "use_rslora"),
    ({"renormalize": "false"}, "renormalize"),
    ({"renormalize": 0}, "renormalize"),
    ({"alpha": float("nan")}, "alpha"),
    ({"alpha": float("inf")}, "alpha"),
    ({"router_noise_std": float("nan")}, "router_noise_std"),
    ({"aux_loss_coef": float("inf")}, "aux_loss_coef"),
    ({"extra": {"when": object()}}, "extra"),
    ({"extra": {"x": float("nan")}}, "extra"),
])
def test_invalid_values_name_the_field(kwargs, field):
    args = {"target_modules": ["q_proj"], **kwargs}
    with pytest.raises(ValueError, match=f"`{field}`"):
        MoELoRAConfig(**args)


def test_json_round_trip():
    cfg = MoELoRAConfig(target_modules="all-linear", exclude_modules=["lm_head"], num_experts=8, top_k=2,
                        rank=4, alpha=8, use_rslora=True, router_noise_std=0.1, seed=3, extra={"run": 1})
    data = json.loads(cfg.to_json())
    assert data["method"] == "moelora"
    assert moelora.config_from_dict(data) == cfg


def test_unknown_fields_and_methods_are_named():
    with pytest.raises(ValueError, match=r"unknown MoELoRAConfig field\(s\) \['rnak'\]"):
        MoELoRAConfig.from_dict({"target_modules": ["q"], "rnak": 4})
    with pytest.raises(ValueError, match="unknown moelora method 'nope'"):
        moelora.config_from_dict({"method": "nope"})


def test_scale():
    assert MoELoRAConfig(target_modules=["q"], rank=4, alpha=8).lora_scale == 2.0
    assert MoELoRAConfig(target_modules=["q"], rank=4, alpha=8, use_rslora=True).lora_scale == 4.0


@pytest.mark.parametrize("data,match", [
    ({"class_path": "moelora.FooConfig", "init_args": {}}, r"class_path 'moelora.FooConfig' is not a moelora method"),
    ({"class_path": "moelora.FlyLora"}, "moelora.FlyLoRAConfig"),
    ({"class_path": "moelora.MoELoRAConfig", "init_args": {"target_modules": ["q"], "num_expert": 4}},
     r"unknown MoELoRAConfig field\(s\) \['num_expert'\]"),
    ({"num_expert": "4"}, r"names no method.*\['num_expert'\] is no field"),
])
def test_cli_shaped_method_dicts_name_the_mistake(data, match):
    # What the Lightning CLI hands the module when it could not build the class itself.
    with pytest.raises(ValueError, match=match):
        moelora.config_from_dict(data)


def test_class_path_dict_builds_the_config():
    cfg = moelora.config_from_dict({"class_path": "moelora.SiRAConfig", "init_args": {"target_modules": ["q"]}})
    assert type(cfg).__name__ == "SiRAConfig" and cfg.target_modules == ["q"]
