"""One numbering of a model's experts, whatever each layer kept.

WeightLoRA over experts shrinks every bank to the experts it keeps, a different set per layer
(``WeightLoRAConfig.kept_experts``). Everything that names experts model-wide (MeteoRA adapter
names and task ids, :func:`moelora.select_experts`, PEFT export) keeps the original numbering;
these helpers translate between it and a layer's own.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def provenance(config: Any) -> list[dict]:
    """The per-expert provenance records of ``config`` (MeteoRA's adapters), through a WeightLoRA
    config's base method; ``[]`` when the experts were not imported."""
    records = getattr(config, "experts", None)
    if not records and callable(getattr(config, "layer_config", None)):
        records = getattr(config.layer_config(), "experts", None)
    return list(records or [])


def num_experts(config: Any, bank_experts: int) -> int:
    """Experts in the original numbering: before any WeightLoRA pruning (``bank_experts`` when
    the config does not say)."""
    return int(getattr(config, "layer_experts", None) or bank_experts)


def expert_names(config: Any, count: int) -> list[str]:
    """``count`` names in the original numbering: adapter names where known, else ``expert_<i>``."""
    records = provenance(config)
    return [str(records[i]["name"]) if i < len(records) and "name" in records[i] else f"expert_{i}"
            for i in range(count)]


def layer_origin(config: Any, layer_name: str) -> list[int] | None:
    """Original index of each expert the layer ``layer_name`` still has, or ``None`` when it has
    all of them in order."""
    kept = (getattr(config, "kept_experts", None) or {}).get(layer_name)
    return None if kept is None else [int(e) for e in kept]


def to_layer(values: Tensor, origin: list[int] | None) -> Tensor:
    """``values [N]`` in the original numbering → ``[K]`` for a layer with ``origin``."""
    return values if origin is None else values[torch.tensor(origin, dtype=torch.long)]


def local_index(origin: list[int] | None, expert: int) -> int | None:
    """A layer's own index of original expert ``expert`` (``None``: the layer dropped it)."""
    if origin is None:
        return expert
    return origin.index(expert) if expert in origin else None


def lookup(origin: list[int], count: int) -> Tensor:
    """``[count]`` int64: the layer's index of every original expert, ``-1`` where dropped."""
    table = torch.full((count,), -1, dtype=torch.long)
    table[torch.tensor(origin, dtype=torch.long)] = torch.arange(len(origin))
    return table
