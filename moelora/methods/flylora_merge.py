"""Merge FlyLoRA task adapters by averaging B (FlyLoRA's multi-task merging, research/methods.md §3.4).

FlyLoRA's frozen A is drawn from ``(seed, module name)``, so adapters trained on different tasks
from the same base model and config share A exactly; their rank-1 experts then live in the same
random subspaces and the adapters combine by averaging ``B``::

    moelora.merge_flylora(["math/", "code/"], out_dir="merged/")          # plain mean
    moelora.merge_flylora(["math/", "code/"], [3, 1], out_dir="merged/")  # weighted mean
    model = moelora.load_adapter(base_model, "merged/")                   # loads like any adapter

Every floating-point tensor other than A and the scales is averaged with the same weights: ``B``,
the balancing bias ``d`` (as the official ``merge_lora_adapters.py`` averages every ``lora_*``
tensor) and ``modules_to_save`` copies (e.g. a classification head; averaging per-task heads is
rarely what you want, so merge adapters without them where you can). A and the scales must be
identical, and nothing is written unless every check passes.
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from moelora.config import config_from_dict
from moelora.io import WEIGHTS_NAME, _read_tensors, read_adapter_meta, same_base_weights, write_adapter_files
from moelora.paths import make_output_dir

from .flylora import FlyLoRAConfig

#: Tensors that must be identical across the merged adapters (checked, then copied).
SHARED_SUFFIXES = (".bank.A", ".bank.scale")


def _weights(weights: Sequence[float] | None, n: int) -> list[float]:
    """Normalised merge weights (``None`` = equal); errors name the problem."""
    if weights is None:
        return [1.0 / n] * n
    w = list(weights)
    if len(w) != n or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                              and v >= 0 for v in w) or sum(w) <= 0:
        raise ValueError(f"weights={weights!r} is invalid: expected {n} finite numbers >= 0 (one per adapter, "
                         "not all 0), or None for a plain mean. They are normalised to sum to 1.")
    total = float(sum(w))
    return [float(v) / total for v in w]


def _shapes(weights_file: Path) -> dict[str, tuple[int, ...]]:
    try:
        with safe_open(str(weights_file), framework="pt", device="cpu") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except SafetensorError as err:
        raise ValueError(f"{weights_file} is corrupt or truncated ({err}); re-save the adapter.") from err


def _check_compatible(first: tuple[Path, dict], other: tuple[Path, dict]) -> None:
    """Rank, k, scale, score, wrapped modules, saved modules and base model must agree."""
    (d0, m0), (d1, m1) = first, other
    c0, c1 = config_from_dict(m0["config"]), config_from_dict(m1["config"])
    for field, why in (("rank", "B has one row per rank"), ("top_k", "the merged adapter routes with one k"),
                       ("lora_scale", "B is averaged at one output scale alpha/r; set the same alpha"),
                       ("score", "the merged adapter routes with one score rule"),
                       ("adapter_dtype", "A must be bitwise identical")):
        if getattr(c0, field) != getattr(c1, field):
            raise ValueError(f"cannot merge FlyLoRA adapters {d0} and {d1}: {field} differs "
                             f"({getattr(c0, field)!r} vs {getattr(c1, field)!r}); {why}. Merge only adapters "
                             "trained with the same FlyLoRAConfig apart from the data.")
    mods0, mods1 = m0.get("modules") or {}, m1.get("modules") or {}
    if mods0 != mods1:
        only0, only1 = sorted(set(mods0) - set(mods1)), sorted(set(mods1) - set(mods0))
        shaped = sorted(n for n in set(mods0) & set(mods1) if mods0[n] != mods1[n])
        raise ValueError(f"cannot merge FlyLoRA adapters {d0} and {d1}: they wrap different target modules "
                         f"(only in the first {only0[:10]}, only in the second {only1[:10]}, different shapes "
                         f"{shaped[:10]}). Train every task adapter with the same target_modules.")
    if sorted(m0.get("modules_to_save") or []) != sorted(m1.get("modules_to_save") or []):
        raise ValueError(f"cannot merge FlyLoRA adapters {d0} and {d1}: modules_to_save differ "
                         f"({m0.get('modules_to_save')} vs {m1.get('modules_to_save')}).")
    if not same_base_weights(m0.get("base_model") or {}, m1.get("base_model") or {}):
        raise ValueError(f"cannot merge FlyLoRA adapters {d0} and {d1}: they were trained on different base "
                         "model weights (the wrapped layers' hashes and sampled values differ), so their B "
                         "matrices do not combine.")


def merge_flylora(adapter_dirs: Sequence[str | os.PathLike], weights: Sequence[float] | None = None, *,
                  out_dir: str | os.PathLike) -> Path:
    """Average FlyLoRA task adapters into one adapter directory; returns ``out_dir``.

    Args:
        adapter_dirs: directories written by :func:`moelora.save_adapter` from FlyLoRA models.
        weights: one weight per adapter (normalised to sum to 1), or None for the plain mean.
        out_dir: where the merged adapter is written (created; an adapter already there is
            replaced whole). It loads with :func:`moelora.load_adapter` like any other; its config
            is the first adapter's, with ``extra["merged_from"]`` listing the sources and weights.

    Returns:
        ``Path(out_dir)``. Merged ``B = Σ_i w_i B_i`` (likewise the bias and ``modules_to_save``
        copies), computed in float64 and stored in the adapters' dtype.

    Raises:
        ValueError: not FlyLoRA adapters, or A, rank, top_k, scale, score, dtype, wrapped modules,
            saved modules or base model differ; bad weights. Nothing is written then.
    """
    if isinstance(adapter_dirs, (str, os.PathLike)) or not adapter_dirs:
        raise ValueError(f"adapter_dirs={adapter_dirs!r} is invalid: pass a non-empty list of FlyLoRA adapter "
                         "directories (written by moelora.save_adapter).")
    dirs = [Path(d) for d in adapter_dirs]
    w = _weights(weights, len(dirs))
    metas = []
    for d in dirs:
        meta = read_adapter_meta(d)
        if meta["config"].get("method") != FlyLoRAConfig.method:
            raise ValueError(f"{d} holds a {meta['config'].get('method')!r} adapter, not FlyLoRA: merge_flylora "
                             "averages FlyLoRA adapters that share A.")
        metas.append(meta)
    for d, meta in zip(dirs[1:], metas[1:]):
        _check_compatible((dirs[0], metas[0]), (d, meta))
    shapes = _shapes(dirs[0] / WEIGHTS_NAME)
    tensors = [_read_tensors(d / WEIGHTS_NAME, {k: torch.Size(s) for k, s in shapes.items()}, m.get("save_id"))
               for d, m in zip(dirs, metas)]
    merged: dict[str, Tensor] = {}
    for key in sorted(shapes):
        first = tensors[0][key]
        if key.endswith(SHARED_SUFFIXES) or not first.is_floating_point():
            for d, t in zip(dirs[1:], tensors[1:]):
                if not torch.equal(t[key], first):
                    what = "A" if key.endswith(".bank.A") else key.rsplit(".", 1)[-1]
                    raise ValueError(
                        f"cannot merge FlyLoRA adapters {dirs[0]} and {d}: {what} of {key.rsplit('.bank', 1)[0]} "
                        "differs. Task adapters merge only when they share A, i.e. were injected into the same "
                        "base model with the same seed, rank, top_k, density and adapter_dtype; retrain with "
                        "matching FlyLoRAConfig(seed=...).")
            merged[key] = first.clone()
        else:
            acc = sum(wi * t[key].double() for wi, t in zip(w, tensors))
            merged[key] = acc.to(first.dtype).contiguous()
    meta = copy.deepcopy(metas[0])
    meta["config"].setdefault("extra", {})["merged_from"] = [
        {"path": str(d), "weight": wi} for d, wi in zip(dirs, w)]
    out = make_output_dir(out_dir, "merge_flylora out_dir")
    write_adapter_files(out, merged, meta)
    return out
