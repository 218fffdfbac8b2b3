"""Which modules to wrap: PEFT's ``target_modules`` / ``exclude_modules`` rules, exactly.

- a list matches a module whose full name equals an entry or ends with ``"." + entry``;
- a string is a regex that must match the *whole* module name (``re.fullmatch``);
- ``"all-linear"`` selects every linear layer except the model's output head;
- ``exclude_modules`` wins over ``target_modules``.
"""

from __future__ import annotations

import re
import warnings

from torch import nn

ALL_LINEAR = "all-linear"
HEAD_NAMES = frozenset({"lm_head", "classifier", "score", "qa_outputs", "cls", "head"})


def is_linear_like(module: nn.Module) -> bool:
    """``nn.Linear`` or transformers' ``Conv1D`` (GPT-2): the layer types moelora can wrap."""
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def linear_features(module: nn.Module) -> tuple[int, int]:
    """``(d_in, d_out)`` of a linear-like module (Conv1D stores its weight as ``[d_in, d_out]``)."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    return int(module.weight.shape[0]), int(module.nf)


def name_matches(name: str, patterns: list[str] | str | None) -> bool:
    """PEFT's match of one module name against a list of names/suffixes or a full-match regex."""
    if patterns is None:
        return False
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def output_head_names(model: nn.Module) -> set[str]:
    """Names of the module(s) that produce the model's output logits (never ``all-linear`` targets)."""
    heads: set[str] = set()
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    for name, module in model.named_modules():
        if out is not None and module is out:
            heads.add(name)
    # Task heads of classifier models (which have no output embeddings) are heads too.
    heads.update(name for name, m in model.named_modules()
                 if is_linear_like(m) and name.rsplit(".", 1)[-1] in HEAD_NAMES)
    return heads


def find_targets(model: nn.Module, target_modules: list[str] | str, exclude_modules: list[str] | str | None,
                 *, skip: set[str] = frozenset()) -> list[str]:
    """Names of the modules to wrap, in module order.

    Raises:
        ValueError: nothing matched (the message lists candidate names), or a matched module
            is not a linear layer moelora can wrap.
    """
    heads = output_head_names(model) if target_modules == ALL_LINEAR else set()
    matched: list[str] = []
    unsupported: list[str] = []
    for name, module in model.named_modules():
        if not name or name in skip or any(name.startswith(s + ".") for s in skip):
            continue
        if target_modules == ALL_LINEAR:
            hit = is_linear_like(module) and name not in heads
        else:
            hit = name_matches(name, target_modules)
        if not hit or name_matches(name, exclude_modules):
            continue
        (matched if is_linear_like(module) else unsupported).append(name)
    if unsupported:
        kinds = sorted({type(model.get_submodule(n)).__name__ for n in unsupported})
        raise ValueError(
            f"target_modules matched modules moelora cannot wrap ({kinds}): {unsupported[:8]}. "
            "Only nn.Linear and transformers' Conv1D are supported: target their linear children instead.")
    if not matched:
        raise ValueError(
            f"Target modules {target_modules!r} not found in the base model "
            f"(exclude_modules={exclude_modules!r}). Linear modules it has, by short name: "
            f"{candidate_names(model)}. Please check target_modules and try again.")
    if isinstance(target_modules, list):
        names = [n for n, _ in model.named_modules() if n]
        idle = [t for t in target_modules if not any(name_matches(n, [t]) for n in names)]
        if idle:  # PEFT ignores these silently; a typo then just trains fewer modules
            warnings.warn(f"target_modules entries {idle} match no module of {type(model).__name__} (the others "
                          f"do, so injection goes on). Linear modules it has, by short name: "
                          f"{candidate_names(model)}.", UserWarning, stacklevel=4)
    return matched


def candidate_names(model: nn.Module, limit: int = 30) -> list[str]:
    """Distinct short names (last path component) of the model's linear-like modules."""
    seen: list[str] = []
    for name, module in model.named_modules():
        short = name.rsplit(".", 1)[-1]
        if is_linear_like(module) and short not in seen:
            seen.append(short)
    return seen[:limit]
