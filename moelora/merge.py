"""Folding an adapter into the base weights, where that is exact, and refusing it where it is not.

moelora keeps every adapter as a layer beside the frozen base (design §3.4): a routed delta
``Σ_j w_j(x) · s_e B_e A_e x`` depends on ``x`` through the routing, so no fixed matrix equals it.
:func:`merge_into_base` folds only the one case where the delta *is* a fixed matrix (plain
MoE-LoRA with a single expert, i.e. ordinary LoRA) and refuses everything else with the reason.

Methods whose delta is never a fixed matrix (FlyLoRA, MoA) are refused everywhere a static
matrix would be made from them: here, and in the PEFT exports of :mod:`moelora.lora_export` (a
static PEFT LoRA would be folded by PEFT's ``merge_and_unload``). Both call :func:`refuse_static`.
FlyLoRA task adapters merge with each other instead, with :func:`moelora.merge_flylora`.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from .config import MoELoRAConfig
from .inject import _parent, unwrap
from .layer import wrapped_layers
from .state import get_state


def refuse_static(config: MoELoRAConfig, action: str) -> None:
    """Raise when ``config``'s method has an input-dependent delta that ``action`` would make static.

    A method declares this with a class attribute ``static_refusal``: the reason its delta is not
    a fixed matrix and what to do instead (FlyLoRA, MoA). ``None`` (the default) allows it.
    """
    reason = getattr(config, "static_refusal", None)
    if reason is None:
        return
    raise ValueError(f"cannot {action}: a {type(config).__name__} adapter is not a fixed weight delta. "
                     f"{reason} The model was not changed.")


def merge_into_base(model: nn.Module) -> nn.Module:
    """Fold the model's adapter into its base weights and remove it, in place; returns the model.

    Exact only when the delta does not depend on the input: a plain :class:`~moelora.MoELoRAConfig`
    adapter with ``num_experts == 1`` (every token gets weight 1 on its one expert, i.e. LoRA), on
    ``nn.Linear`` / ``Conv1D`` bases with floating-point weights. ``modules_to_save`` copies replace
    their originals (a copy of a tied module, e.g. GPT-2's ``lm_head``, ends untied, as in PEFT). Expert-input dropout is a training-time effect and is not part of the fold.

    Raises:
        ValueError: FlyLoRA (never foldable), any routed adapter (E > 1 or a method with capacity,
            dropout or gates), or a base layer without a float weight. The model is unchanged then.
    """
    state = get_state(model)
    config = state.config
    refuse_static(config, "merge it into the base weights")
    if type(config) is not MoELoRAConfig:
        raise ValueError(
            f"cannot merge a {type(config).__name__} adapter into the base weights: merge_into_base folds only a "
            "plain MoELoRAConfig adapter with num_experts=1 (ordinary LoRA). Where an expert is a fixed LoRA "
            "(WeightLoRA heads, a MeteoRA expert), export it with moelora.export_lora_adapters and merge it "
            "with PEFT's merge_and_unload. The model was not changed.")
    if config.num_experts != 1:
        raise ValueError(
            f"cannot merge a MoELoRAConfig adapter with num_experts={config.num_experts} into the base weights: "
            "its routing depends on the input, so no fixed weight equals it. Only num_experts=1 (ordinary "
            "LoRA) folds exactly; keep this one as an adapter. The model was not changed.")
    layers = wrapped_layers(model)
    for layer in layers:  # check everything before changing anything
        weight = getattr(layer.base_layer, "weight", None)
        if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
            raise ValueError(f"cannot merge into {layer.name}: its base layer ({type(layer.base_layer).__name__}) "
                             "has no floating-point weight (quantized?). The model was not changed.")
    with torch.no_grad():
        for layer in layers:
            weight, bank = layer.base_layer.weight, layer.bank
            delta = float(bank.scale[0]) * (bank.Bt.double().t() @ bank.A.double())  # [d_out, d_in]
            conv1d = not isinstance(layer.base_layer, nn.Linear)  # GPT-2 Conv1D stores [d_in, d_out]
            weight.add_((delta.t() if conv1d else delta).to(weight.dtype))
    # A trained modules_to_save copy replaces its original rather than being copied into it: the
    # original may share its weight (GPT-2's lm_head is tied to wte), and copying would change
    # the embeddings too. Its parameters take the original's requires_grad (restored by unwrap).
    swaps = [(name, model.get_submodule(name)) for name in state.saved_modules]
    unwrap(model)
    for name, saved in swaps:
        for new, old in zip(saved.trained_module.parameters(), saved.original_module.parameters()):
            new.requires_grad_(old.requires_grad)
        parent, child = _parent(model, name)
        setattr(parent, child, saved.trained_module)
    still_used = {id(p) for p in model.parameters()}
    untied = [name for name, saved in swaps if any(id(p) in still_used for p in saved.original_module.parameters())]
    cfg = getattr(model, "config", None)
    if untied and getattr(cfg, "tie_word_embeddings", False):
        # Left True, transformers would tie the merged head back to the embeddings on save/load.
        cfg.tie_word_embeddings = False
        warnings.warn(f"merge_into_base: the trained copies of {untied} replaced modules whose weights were tied "
                      "to others; they are untied now and model.config.tie_word_embeddings is set to False.",
                      UserWarning, stacklevel=2)
    return model
