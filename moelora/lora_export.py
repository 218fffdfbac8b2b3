"""Export moelora experts back to Hugging Face PEFT LoRA directories.

- :func:`export_lora_adapters`: every expert to ``dir/<name>/`` (``adapter_config.json`` +
  ``adapter_model.safetensors``), loadable with ``peft.PeftModel.from_pretrained`` on the
  unwrapped base model, with the same outputs as the expert alone.
- :func:`collapse_lora_adapters`: a fixed weighted mixture of experts as one static LoRA
  (``ΔW = Σ_i w_i · scale_i · B_i A_i`` per module), for deploying a single task mix.
- :func:`export_saved_adapter`: either of the two from a saved moelora adapter directory, without
  loading the base model (what ``moelora export-lora`` runs).

Exported configs list the exact module names in ``target_modules`` and encode per-module ranks
and scales with ``rank_pattern`` / ``alpha_pattern`` (keys are full module names), so PEFT
rebuilds exactly the stored scale. Trained ``modules_to_save`` copies (a classifier or LM head)
go into every directory, listed in PEFT's ``modules_to_save``. Each directory also gets
``moelora_provenance.json`` (which PEFT ignores) saying where the weights came from.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from . import expert_space as space
from .config import MoELoRAConfig, config_from_dict
from .io import WEIGHTS_NAME, _atomic_write, check_save_id, read_adapter_meta
from .inject import SavedModule
from .layer import wrapped_layers
from .lora_import import CONFIG_FILE, PEFT_PREFIX, SAFETENSORS_FILE
from .merge import refuse_static
from .methods.meteora import expert_names, resolve_expert_weights
from .paths import check_output_dir, make_output_dir
from .state import get_state

PROVENANCE_FILE = "moelora_provenance.json"


def _fp32(x: float) -> float:
    return torch.tensor(x, dtype=torch.float32).item()


def _alpha_for(scale: float, rank: int, rslora: bool) -> float | int:
    """The ``lora_alpha`` PEFT needs to reproduce ``scale`` at ``rank``: a short decimal when one
    gives exactly the same float32 scale (so configs read ``16``, not ``16.0000005``)."""
    denom = math.sqrt(rank) if rslora else rank
    raw = scale * denom
    for digits in (0, 2, 4, 6):
        nice = round(raw, digits)
        if nice > 0 and _fp32(nice / denom) == _fp32(scale):
            return int(nice) if float(nice).is_integer() else nice
    return raw


def _peft_config(modules: dict[str, tuple[int, float]], *, rslora: bool, conv1d: bool,
                 extra: dict[str, Any], saved: Sequence[str] = ()) -> dict[str, Any]:
    """A PEFT LoRA ``adapter_config.json`` for ``{module: (rank, scale)}`` and the full names of
    the ``modules_to_save`` copies written beside it."""
    ranks = {m: r for m, (r, _) in modules.items()}
    alphas = {m: _alpha_for(s, r, rslora) for m, (r, s) in modules.items()}
    r_default = Counter(ranks.values()).most_common(1)[0][0]
    alpha_default = Counter(alphas.values()).most_common(1)[0][0]
    return {
        "peft_type": "LORA", "task_type": extra.get("task_type"),
        "base_model_name_or_path": extra.get("base_model_name_or_path"), "revision": extra.get("revision"),
        "r": r_default, "lora_alpha": alpha_default, "use_rslora": rslora,
        "target_modules": sorted(modules),
        "rank_pattern": {m: r for m, r in ranks.items() if r != r_default},
        "alpha_pattern": {m: a for m, a in alphas.items() if a != alpha_default},
        "lora_dropout": extra.get("lora_dropout") or 0.0, "fan_in_fan_out": conv1d, "bias": "none",
        "use_dora": False, "modules_to_save": sorted(saved) or None, "init_lora_weights": True, "inference_mode": True,
        "layers_to_transform": None, "layers_pattern": None,
    }


@dataclass
class _Bank:
    """What export needs of one wrapped module's experts (from a live model or a saved file).

    Attributes:
        name: module path. ranks: ``r_e`` per expert of the bank. scale: ``[K]`` output scales.
        A: ``[R, d_in]``. Bt: ``[R, d_out]``. conv1d: the base is GPT-2's ``Conv1D``.
        origin: the model-wide index of each of the bank's experts (a WeightLoRA bank keeps a
            subset), or ``None`` when the bank holds every expert in order.

    ``rank``, ``pair`` and ``scale_of`` take model-wide expert indices.
    """

    name: str
    ranks: tuple[int, ...]
    scale: Tensor
    A: Tensor
    Bt: Tensor
    conv1d: bool = False
    origin: list[int] | None = None

    def rank(self, expert: int) -> int:
        """Rank of model-wide expert ``expert`` here (0 where the bank dropped it)."""
        local = space.local_index(self.origin, expert)
        return 0 if local is None or local >= len(self.ranks) else self.ranks[local]

    def scale_of(self, expert: int) -> Tensor:
        return self.scale[space.local_index(self.origin, expert)]

    def pair(self, expert: int) -> tuple[Tensor, Tensor]:
        """PEFT layout ``(lora_A [r, d_in], lora_B [d_out, r])`` of one expert (rank > 0 here)."""
        local = space.local_index(self.origin, expert)
        start = sum(self.ranks[:local])
        rows = slice(start, start + self.ranks[local])
        return self.A[rows], self.Bt[rows].t()


@dataclass
class _Source:
    """A moelora adapter to export: its banks, config, expert names, base model name, and the
    trained ``modules_to_save`` copies (``{module: {param: tensor}}``, e.g. a classifier head:
    part of what every expert computes, so every exported directory carries them, in PEFT's
    layout ``base_model.model.<module>.<param>``)."""

    banks: list[_Bank]
    config: MoELoRAConfig
    names: list[str]
    base_name: str | None
    saved: dict[str, dict[str, Tensor]] = field(default_factory=dict)
    task_type: str | None = None

    def saved_tensors(self) -> dict[str, Tensor]:
        return {f"{PEFT_PREFIX}{module}.{key}": _tensor(t) for module, part in self.saved.items()
                for key, t in part.items()}

    @property
    def provenance(self) -> list[dict[str, Any]]:
        return space.provenance(self.config)


def _model_source(model: nn.Module) -> _Source:
    state = get_state(model)
    refuse_static(state.config, "export it as static PEFT LoRA adapters")
    banks = [_Bank(layer.name, tuple(layer.bank.ranks),
                   _with_omega(layer.bank.scale.detach(), getattr(layer.router, "omega", None)),
                   layer.bank.A.detach(), layer.bank.Bt.detach(), type(layer.base_layer).__name__ == "Conv1D",
                   space.layer_origin(state.config, layer.name))
             for layer in wrapped_layers(model)]
    base = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    saved = {name: dict(module.trained_module.state_dict()) for name in state.saved_modules
             if isinstance(module := model.get_submodule(name), SavedModule)}  # not MoA's block holders
    return _Source(banks, state.config, expert_names(model), base, saved, peft_task_type(type(model).__name__))


# PEFT task types by the transformers head class suffix: PEFT and ``moelora import-lora`` pick
# the class to load the base with from it (a bare base class would not have the head's modules).
_TASK_BY_HEAD = {"ForSequenceClassification": "SEQ_CLS", "ForCausalLM": "CAUSAL_LM",
                 "ForTokenClassification": "TOKEN_CLS", "ForQuestionAnswering": "QUESTION_ANS",
                 "ForConditionalGeneration": "SEQ_2_SEQ_LM", "Model": "FEATURE_EXTRACTION"}


def peft_task_type(class_name: str) -> str | None:
    """PEFT ``task_type`` for a transformers model class name (``None`` if not a known head)."""
    return next((task for suffix, task in _TASK_BY_HEAD.items() if class_name.endswith(suffix)), None)


def _with_omega(scale: Tensor, omega: Tensor | None) -> Tensor:
    """Per-expert output scales ``[E]`` with WeightLoRA's ω (``[1]`` per head or ``[E]`` per expert)
    folded in, so an exported expert computes what it computes in the model."""
    if omega is None:
        return scale
    return scale * omega.detach().to(scale.device, scale.dtype).expand_as(scale)


def _check_out_dir(directory: Path, overwrite: bool) -> None:
    check_output_dir(directory, "export directory")
    blocked = [f for f in (CONFIG_FILE, SAFETENSORS_FILE, PROVENANCE_FILE)
               if (directory / f).exists() and not (directory / f).is_file()]
    if blocked:  # found now, before any directory of this export is written
        raise ValueError(f"{directory} holds {blocked} that are not files; remove them or pick another directory.")
    clash = [f for f in (CONFIG_FILE, SAFETENSORS_FILE) if (directory / f).exists()]
    if clash and not overwrite:
        raise FileExistsError(f"{directory} already holds a PEFT adapter ({clash}); pass overwrite=True "
                              "(--overwrite) to replace it, or pick another directory.")


def _write_peft_dir(directory: Path, config: dict[str, Any], tensors: dict[str, Tensor],
                    provenance: dict[str, Any]) -> None:
    texts = {CONFIG_FILE: json.dumps(config, indent=2), PROVENANCE_FILE: json.dumps(provenance, indent=2)}
    make_output_dir(directory, "export directory")
    _atomic_write(directory / SAFETENSORS_FILE, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    for name, text in texts.items():
        _atomic_write(directory / name, lambda tmp, text=text: Path(tmp).write_text(text))


def _tensor(t: Tensor) -> Tensor:
    return t.detach().to("cpu").contiguous().clone()


def export_lora_adapters(model: nn.Module, path: str | os.PathLike, *, experts: Sequence[str | int] | None = None,
                         overwrite: bool = False) -> dict[str, Path]:
    """Write every expert of ``model`` as a PEFT LoRA directory ``path/<name>/``.

    Works for any moelora model (MeteoRA experts keep their adapter names, LoRA settings and
    base-model name; other methods' experts are ``expert_<i>``). Load one with
    ``peft.PeftModel.from_pretrained(base_model, path / name)`` on the base model (without the
    moelora adapter): it computes ``scale_i · B_i A_i x`` on exactly the modules where expert i has
    rank > 0, i.e. what the fused model computes with the gates forced to expert i
    (:func:`moelora.select_experts`).

    Args:
        model: a moelora model.
        path: output directory (created).
        experts: names or indices to export (default: all).
        overwrite: replace existing PEFT files in ``path/<name>/``.

    Returns:
        ``{name: directory}`` of the written adapters. An expert with rank 0 everywhere (nothing
        to export) is skipped with a warning.

    Raises:
        ValueError / FileExistsError: unknown experts, clashing files; nothing is written then.
    """
    return _export(_model_source(model), Path(path), experts=experts, overwrite=overwrite)


def _export(src: _Source, out: Path, *, experts, overwrite: bool) -> dict[str, Path]:
    names = src.names
    heads = src.saved_tensors()  # the same trained copies go into every expert's directory
    chosen = list(range(len(names))) if experts is None else [_expert_index(e, names) for e in experts]
    plans = []
    for i in chosen:
        banks = [b for b in src.banks if b.rank(i) > 0]
        if not banks:
            warnings.warn(f"expert {names[i]!r} has rank 0 in every wrapped module; nothing to export.",
                          UserWarning, stacklevel=3)
            continue
        prov = src.provenance[i] if i < len(src.provenance) else {}
        extra = dict(prov) if prov else {"lora_dropout": src.config.dropout}
        extra["base_model_name_or_path"] = extra.get("base_model_name_or_path") or src.base_name
        extra["task_type"] = extra.get("task_type") or src.task_type
        rslora = bool(prov.get("use_rslora", False)) if prov else bool(src.config.use_rslora)
        tensors, modules = {}, {}
        for bank in banks:
            lora_A, lora_B = bank.pair(i)
            tensors[f"{PEFT_PREFIX}{bank.name}.lora_A.weight"] = _tensor(lora_A)
            tensors[f"{PEFT_PREFIX}{bank.name}.lora_B.weight"] = _tensor(lora_B)
            modules[bank.name] = (bank.rank(i), float(bank.scale_of(i)))
        tensors.update(heads)
        config = _peft_config(modules, rslora=rslora, conv1d=any(b.conv1d for b in banks), extra=extra,
                              saved=src.saved)
        record = {"exported_by": "moelora", "expert": names[i], "index": i,
                  "source": {k: prov.get(k) for k in ("path", "weights_file", "sha256")} if prov else None}
        directory = out / names[i]
        _check_out_dir(directory, overwrite)
        plans.append((names[i], directory, config, tensors, record))
    for _, directory, config, tensors, record in plans:
        _write_peft_dir(directory, config, tensors, record)
    return {name: directory for name, directory, *_ in plans}


def _expert_index(expert: str | int, names: list[str]) -> int:
    if isinstance(expert, str) and expert in names:
        return names.index(expert)
    if isinstance(expert, int) and not isinstance(expert, bool) and 0 <= expert < len(names):
        return expert
    raise ValueError(f"unknown expert {expert!r}; experts are {names} (or indices 0..{len(names) - 1}).")


def collapse_lora_adapters(model: nn.Module, weights: Any, path: str | os.PathLike, *, rank: int | None = None,
                           overwrite: bool = False) -> Path:
    """Write one static PEFT LoRA equal to a fixed weighted mixture of the experts.

    Per wrapped module ``ΔW = Σ_i w_i · scale_i · B_i A_i``. With ``rank=None`` (default) this is
    exact: ``lora_A`` stacks the experts' ``A_i`` and ``lora_B`` the ``w_i · scale_i · B_i`` (rank
    ``Σ r_i`` over experts with ``w_i ≠ 0``, scale 1; PEFT's ``add_weighted_adapter(...,
    combination_type="cat")`` builds the same). With ``rank=k`` each module's ``ΔW`` is truncated
    to its best rank-k approximation by SVD (lossy when ``k < Σ r_i``).

    The result is what the fused model computes under ``moelora.select_experts(model, weights)``;
    weights are used as given (``[0.5, 0.5]`` averages two adapters; a one-hot picks one).

    Args:
        model: a moelora model.
        weights: ``{name: w}`` (missing experts weigh 0), N numbers, or one expert name/index.
        path: the output PEFT directory.
        rank: optional SVD rank bound (>= 1).
        overwrite: replace existing PEFT files in ``path``.

    Returns:
        ``path``.
    """
    return _collapse(_model_source(model), weights, Path(path), rank=rank, overwrite=overwrite)


def _collapse(src: _Source, weights: Any, directory: Path, *, rank: int | None, overwrite: bool) -> Path:
    w = resolve_expert_weights(src.names, weights)
    if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool) or rank < 1):
        raise ValueError(f"rank={rank!r} must be an integer >= 1, or None for the exact (concatenated) LoRA.")
    _check_out_dir(directory, overwrite)
    tensors, modules = {}, {}
    for bank in src.banks:
        parts = [i for i in range(len(src.names)) if w[i] != 0 and bank.rank(i) > 0]
        if not parts:
            continue
        # float64 for the products and the SVD; stored back in the adapter dtype.
        lora_A = torch.cat([bank.pair(i)[0].double() for i in parts])
        lora_B = torch.cat([bank.pair(i)[1].double() * (w[i] * bank.scale_of(i).double()) for i in parts], dim=1)
        if rank is not None and rank < lora_A.shape[0]:
            u, s, vh = torch.linalg.svd(lora_B @ lora_A, full_matrices=False)
            root = s[:rank].sqrt()  # split the singular values evenly between the two factors
            lora_B, lora_A = u[:, :rank] * root, root[:, None] * vh[:rank]
        tensors[f"{PEFT_PREFIX}{bank.name}.lora_A.weight"] = _tensor(lora_A.to(bank.A.dtype))
        tensors[f"{PEFT_PREFIX}{bank.name}.lora_B.weight"] = _tensor(lora_B.to(bank.A.dtype))
        modules[bank.name] = (int(lora_A.shape[0]), 1.0)
    if not modules:
        raise ValueError(f"the weights {w.tolist()} select no expert with rank > 0 in any module.")
    tensors.update(src.saved_tensors())
    config = _peft_config(modules, rslora=False, conv1d=any(b.conv1d for b in src.banks if b.name in modules),
                          extra={"base_model_name_or_path": src.base_name, "lora_dropout": 0.0,
                                 "task_type": src.task_type}, saved=src.saved)
    record = {"exported_by": "moelora", "collapse": {n: float(w[i]) for i, n in enumerate(src.names)},
              "svd_rank": rank,
              "sources": {p["name"]: {k: p.get(k) for k in ("path", "sha256")} for p in src.provenance}}
    _write_peft_dir(directory, config, tensors, record)
    return directory


def _saved_source(path: str | os.PathLike) -> _Source:
    """Banks of a saved moelora adapter directory, read with shape and value checks."""
    directory = Path(path)
    meta = read_adapter_meta(directory)
    config = config_from_dict(meta["config"])
    refuse_static(config, f"export the adapter {directory} as static PEFT LoRA adapters")
    modules = meta.get("modules") or {}
    weights_file = directory / WEIGHTS_NAME
    banks = []
    try:
        with safe_open(str(weights_file), framework="pt", device="cpu") as f:
            check_save_id(f, weights_file, meta.get("save_id"))
            keys = set(f.keys())
            for name, info in modules.items():
                ranks = tuple(int(r) for r in info["ranks"])
                want = {"A": (sum(ranks), info["in_features"]), "Bt": (sum(ranks), info["out_features"]),
                        "scale": (len(ranks),)}
                got = {}
                for part, shape in want.items():
                    key = f"{name}.bank.{part}"
                    if key not in keys or tuple(f.get_slice(key).get_shape()) != shape:
                        raise ValueError(f"{weights_file}: {key} is missing or not of shape {shape}; the "
                                         "adapter directory is damaged.")
                    got[part] = f.get_tensor(key)
                    if not torch.isfinite(got[part]).all():
                        raise ValueError(f"{weights_file}: {key} holds NaN/inf; the adapter is broken.")
                omega = f.get_tensor(f"{name}.router.omega") if f"{name}.router.omega" in keys else None
                banks.append(_Bank(name, ranks, _with_omega(got["scale"], omega), got["A"], got["Bt"],
                                   origin=space.layer_origin(config, name)))
            saved = {}
            for name in meta.get("modules_to_save") or []:
                prefix = f"{name}.trained_module."  # SavedModule copies (MoA's block holders have none)
                part = {k[len(prefix):]: f.get_tensor(k) for k in sorted(keys) if k.startswith(prefix)}
                if part:
                    saved[name] = part
    except SafetensorError as err:
        raise ValueError(f"{weights_file} is corrupt or truncated ({err}).") from err
    if not banks or len({len(b.ranks) if b.origin is None else -1 for b in banks} - {-1}) > 1:
        raise ValueError(f"{directory / 'moelora_config.json'} lists no wrapped modules, or modules with "
                         "different expert counts.")
    n = space.num_experts(config, max(len(b.ranks) for b in banks))
    base = meta.get("base_model") or {}
    return _Source(banks, config, space.expert_names(config, n), base.get("name_or_path"), saved,
                   peft_task_type(base.get("class") or ""))


def export_saved_adapter(path: str | os.PathLike, out: str | os.PathLike, *,
                         experts: Sequence[str | int] | None = None, collapse: Any = None,
                         rank: int | None = None, overwrite: bool = False) -> dict[str, Path]:
    """Export a saved moelora adapter directory to PEFT LoRA directories, without the base model.

    Without ``collapse``: as :func:`export_lora_adapters` (``out/<name>/`` per expert). With
    ``collapse`` (expert weights, see :func:`collapse_lora_adapters`): one PEFT directory ``out``.
    GPT-2 ``Conv1D`` bases are not known here, so ``fan_in_fan_out`` is written False (PEFT sets
    it itself, with a warning, when it meets a ``Conv1D``).

    Returns:
        ``{name: directory}``; for a collapse ``{"collapsed": out}``.
    """
    src = _saved_source(path)
    if collapse is not None:
        if experts is not None:
            raise ValueError("pass either experts (per-expert export) or collapse (one mixed LoRA), not both.")
        return {"collapsed": _collapse(src, collapse, Path(out), rank=rank, overwrite=overwrite)}
    if rank is not None:
        raise ValueError("rank applies to a collapse export only; pass collapse weights too.")
    return _export(src, Path(out), experts=experts, overwrite=overwrite)
