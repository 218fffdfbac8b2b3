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
