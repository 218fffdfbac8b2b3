"""Read and validate Hugging Face PEFT LoRA adapter directories, without peft (design §1.2).

A PEFT LoRA directory holds ``adapter_config.json`` and ``adapter_model.safetensors`` (or the
legacy pickle ``adapter_model.bin``). Tensor keys are ``base_model.model.<module>.lora_A.weight``
(``[r, d_in]``) and ``….lora_B.weight`` (``[d_out, r]``); the prefix is absent for adapters saved
from a model that was not PEFT-wrapped.

Everything is checked before a single value is read (research/ecosystem.md §E.1): the config
(refusing LoRA variants a routed expert cannot represent), every key, every module against the
model, every shape against the module and the config's rank, dtypes and the total size. Only then
are values materialised and checked for NaN/inf. ``.bin`` files are refused unless the caller
opts in, and are then read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn

from .targeting import ALL_LINEAR, is_linear_like, linear_features, name_matches

CONFIG_FILE = "adapter_config.json"
SAFETENSORS_FILE = "adapter_model.safetensors"
BIN_FILE = "adapter_model.bin"
PEFT_PREFIX = "base_model.model."

# safetensors dtype codes we accept, with their sizes in bytes (fp8 and ints are refused).
_FLOAT_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}

# LoRA config features that change what an adapter computes beyond ``scale · B A x``; each is
# refused with its name. Values equal to the default (None / False / empty) are fine.
_REFUSED_FEATURES = {
    "use_dora": "DoRA (use_dora=true: a learned magnitude vector per module)",
    "lora_bias": "bias-LoRA (lora_bias=true: a trained bias on lora_B)",
    "target_parameters": "LoRA on raw nn.Parameters (target_parameters)",
    "trainable_token_indices": "trainable token embeddings (trainable_token_indices)",
    "modules_to_save": "full trained copies of modules (modules_to_save)",
    "layer_replication": "layer replication (layer_replication)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "use_qalora": "QA-LoRA (use_qalora=true)",
    "use_bdlora": "block-diagonal LoRA (use_bdlora)",
    "arrow_config": "Arrow routing (arrow_config)",
    "velora_config": "VeLoRA (velora_config)",
    "monteclora_config": "MonteCLoRA (monteclora_config)",
    "kasa_config": "KaSA (kasa_config)",
    "megatron_config": "Megatron-parallel LoRA layers (megatron_config)",
}

# init_lora_weights values (or prefixes) whose init subtracts the initial LoRA product from the
# base weight (PiSSA, OLoRA, CorDA, LoRA-GA) or replaces it (LoftQ): PEFT re-applies that to the
# base model on load. "gaussian", "eva", "orthogonal", "mica" and booleans leave the base as is.
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


@dataclass
class ModuleLora:
    """One adapter's LoRA on one module.

    Attributes:
        lora_A: ``[r, d_in]`` float tensor.
        lora_B: ``[d_out, r]`` float tensor.
        scale: ``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA), after rank/alpha patterns.
    """

    lora_A: Tensor
    lora_B: Tensor
    scale: float

    @property
    def rank(self) -> int:
        return int(self.lora_A.shape[0])


@dataclass
class LoraAdapter:
    """A validated PEFT LoRA adapter, ready to become one expert.

    Attributes:
        name: the expert name it is imported under.
        path: the adapter directory (absolute).
        weights_file: the tensor file that was read.
        sha256: hex digest of ``weights_file`` (provenance).
        config: the parsed ``adapter_config.json``.
        modules: module name in the model → its LoRA.
    """

    name: str
    path: Path
    weights_file: Path
    sha256: str
    config: dict[str, Any]
    modules: dict[str, ModuleLora] = field(default_factory=dict)

    def provenance(self) -> dict[str, Any]:
        """What is recorded in the fused config about this expert (JSON-compatible)."""
        c = self.config
        return {"name": self.name, "path": str(self.path), "weights_file": self.weights_file.name,
                "sha256": self.sha256, "r": c.get("r"), "lora_alpha": c.get("lora_alpha"),
                "use_rslora": bool(c.get("use_rslora", False)), "lora_dropout": c.get("lora_dropout", 0.0),
                "task_type": c.get("task_type"), "base_model_name_or_path": c.get("base_model_name_or_path"),
                "revision": c.get("revision"), "target_modules": c.get("target_modules"),
                "fan_in_fan_out": bool(c.get("fan_in_fan_out", False))}


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_lora_config(path: str | os.PathLike, *, name: str = "adapter", drop_heads: bool = False) -> dict[str, Any]:
    """Parse and check ``adapter_config.json``: a LoRA with no refused feature (``drop_heads``
    accepts ``modules_to_save``: :func:`read_lora_adapter` then leaves those copies out).

    Raises:
        FileNotFoundError: the directory or its config file does not exist.
        ValueError: not JSON, not a LoRA adapter, or a refused feature (named in the message).
    """
    directory = Path(path)
    if not directory.is_dir():
        from moelora.data.suite import TASKS

        # configs/meteora.yaml fuses loras/<task>: point at the command that makes them
        suite = (f" The bundled suite's LoRAs are made with `moelora suite-loras -o {directory.parent}`."
                 if directory.name in TASKS else "")
        raise FileNotFoundError(f"adapter {name!r}: directory {str(directory)!r} does not exist; pass the "
                                f"directory that holds {CONFIG_FILE} and {SAFETENSORS_FILE}.{suite}")
    config_file = directory / CONFIG_FILE
    if not config_file.is_file():
        raise FileNotFoundError(f"adapter {name!r}: {config_file} not found; a PEFT LoRA directory holds "
                                f"{CONFIG_FILE} and {SAFETENSORS_FILE} (written by save_pretrained).")
    try:
        cfg = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"adapter {name!r}: {config_file} is not valid JSON ({err}).") from err
    if not isinstance(cfg, dict):
        raise ValueError(f"adapter {name!r}: {config_file} must hold a JSON object.")
    peft_type = str(cfg.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise ValueError(f"adapter {name!r}: peft_type is {cfg.get('peft_type')!r}; only LoRA adapters "
                         "(peft_type 'LORA') can be imported as experts.")
    for key, what in _REFUSED_FEATURES.items():
        if cfg.get(key) and not (key == "modules_to_save" and drop_heads):
            hint = (" Or leave the copies out with MeteoRAConfig(adapter_heads='drop') (CLI: --adapter-heads drop): "
                    "the fused model then uses its own head (list it in modules_to_save to train one)."
                    if key == "modules_to_save" else "")
            raise ValueError(f"adapter {name!r} uses {what}, which a routed LoRA expert cannot represent; "
                             f"re-train or save it as a plain LoRA ({key} unset) to import it.{hint}")
    init = cfg.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        raise ValueError(f"adapter {name!r} was initialised with init_lora_weights={init!r}, which also rewrites "
                         "the base weights (W - scale·B₀A₀), so on the unchanged base model its LoRA factors do "
                         "not compute what PEFT computes. Convert it to a plain LoRA first: PEFT's "
                         "save_pretrained(..., path_initial_model_for_weight_conversion=<the initial adapter>), "
                         "then import that directory.")
    if cfg.get("bias", "none") not in ("none", None):
        raise ValueError(f"adapter {name!r} trains base-model biases (bias={cfg['bias']!r}), which a routed "
                         "LoRA expert cannot represent; re-train it with bias='none' to import it.")
    for key in ("r", "lora_alpha"):
        value = cfg.get(key, 8)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"adapter {name!r}: {CONFIG_FILE} field {key!r} = {value!r} must be a number > 0.")
    for key in ("rank_pattern", "alpha_pattern"):
        if not isinstance(cfg.get(key) or {}, dict):
            raise ValueError(f"adapter {name!r}: {CONFIG_FILE} field {key!r} must be a JSON object.")
    return cfg


def pattern_value(patterns: dict[str, Any] | None, module: str, default: Any) -> Any:
    """PEFT's ``rank_pattern`` / ``alpha_pattern`` lookup: the first key that, as a regex, matches
    the end of the module name at a ``.`` boundary; else ``default``."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def module_scale(cfg: dict[str, Any], module: str) -> tuple[int, float]:
    """``(rank, scale)`` PEFT gives ``module`` under this config (rank/alpha patterns, rsLoRA)."""
    r = pattern_value(cfg.get("rank_pattern"), module, cfg.get("r", 8))
    alpha = pattern_value(cfg.get("alpha_pattern"), module, cfg.get("lora_alpha", 8))
    return int(r), float(alpha) / (math.sqrt(r) if cfg.get("use_rslora") else r)


def _classify_key(key: str) -> tuple[str, str]:
    """``(module, kind)`` for one tensor key; kind in {"A", "B"} or a refusal reason."""
    name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
    for suffix, kind in ((".lora_A.weight", "A"), (".lora_B.weight", "B")):
        if name.endswith(suffix):
            return name[: -len(suffix)], kind
    if name.endswith(".base_layer.weight"):  # PEFT's save_embedding_layers copy of the base weight
        return name[: -len(".base_layer.weight")], "base"
    if ".lora_magnitude_vector" in name:
        return name, "DoRA magnitude vectors (lora_magnitude_vector)"
    if ".lora_embedding_A" in name or ".lora_embedding_B" in name:
        return name, "embedding LoRA (lora_embedding_A/B)"
    if name.endswith(".lora_B.bias"):
        return name, "bias-LoRA (lora_B.bias)"
    return name, "a tensor that is not a LoRA factor (e.g. a saved bias or a modules_to_save copy)"


def _head_of(key: str, heads: list[str]) -> str | None:
    """The ``modules_to_save`` module (PEFT suffix rules) that tensor ``key`` belongs to, or None."""
    if not heads:
        return None
    parts = (key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key).split(".")
    return next((".".join(parts[:i]) for i in range(1, len(parts)) if name_matches(".".join(parts[:i]), heads)),
                None)


def _check_base_copies(where: str, base_copies: dict[str, str], load, module_names: dict[str, nn.Module]) -> None:
    """Accept the base weights PEFT saves beside an ``lm_head`` / embedding LoRA
    (``save_embedding_layers="auto"``) when they equal the model's: nothing to import then. A
    different one (a resized vocabulary) would have to replace a base weight, which an expert
    cannot do."""
    if not base_copies:
        return
    saved = load(sorted(base_copies.values()))
    differ = []
    for module, key in sorted(base_copies.items()):
        weight = getattr(module_names.get(module), "weight", None)
        if not isinstance(weight, Tensor) or tuple(weight.shape) != tuple(saved[key].shape) \
                or not torch.equal(saved[key].to(weight.dtype), weight.detach().cpu()):
            differ.append(module)
    if differ:
        raise ValueError(f"{where} carries its own base weights for {differ[:5]} (PEFT's save_embedding_layers) "
                         "that differ from this model's, e.g. after resizing the vocabulary. A routed LoRA expert "
                         "cannot replace base weights: fuse it into the base model it was trained on (resized the "
                         "same way).")


def _open_tensors(name: str, directory: Path, *, allow_pickle: bool):
    """``(weights_file, shapes {key: (shape, dtype_code)}, loader)``; nothing is materialised yet."""
    st, binary = directory / SAFETENSORS_FILE, directory / BIN_FILE
    if st.is_file():
        try:
            with safe_open(str(st), framework="pt", device="cpu") as f:
                shapes = {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}
        except (SafetensorError, OSError) as err:
            raise ValueError(f"adapter {name!r}: {st} is corrupt or truncated ({err}).") from err

        def load(keys: list[str]) -> dict[str, Tensor]:
            with safe_open(str(st), framework="pt", device="cpu") as f:
                return {k: f.get_tensor(k) for k in keys}
        return st, shapes, load
    if binary.is_file():
        if not allow_pickle:
            raise ValueError(
                f"adapter {name!r}: only {binary.name} was found. It is a pickle file, which can run code when "
                f"loaded. Convert it to {SAFETENSORS_FILE} (e.g. save_pretrained(safe_serialization=True)), or "
                "opt in with MeteoRAConfig(allow_pickle=True) to read it with torch.load(weights_only=True).")
        try:
            # weights_only=True restricts unpickling to tensors and containers; mmap avoids reading
            # every value before the shapes are checked.
            state = torch.load(binary, map_location="cpu", weights_only=True, mmap=True)
        except Exception as err:  # noqa: BLE001 - any unpickling failure is a refused file
            raise ValueError(f"adapter {name!r}: {binary} could not be read safely with "
                             f"torch.load(weights_only=True) ({type(err).__name__}: {err}).") from err
        if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, Tensor)
                                                  for k, v in state.items()):
            raise ValueError(f"adapter {name!r}: {binary} does not hold a {{name: tensor}} state dict.")
        codes = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
        shapes = {k: (tuple(v.shape), codes.get(v.dtype, str(v.dtype))) for k, v in state.items()}
        return binary, shapes, lambda keys: {k: state[k] for k in keys}
    raise FileNotFoundError(f"adapter {name!r}: no {SAFETENSORS_FILE} (or {BIN_FILE}) in {directory}.")


def expected_modules(model: nn.Module, cfg: dict[str, Any]) -> set[str] | None:
    """Linear modules of ``model`` that the config's ``target_modules`` select (PEFT rules), or
    ``None`` when that cannot be decided exactly here (``all-linear``, layer filters)."""
    targets = cfg.get("target_modules")
    if not targets or targets == ALL_LINEAR or cfg.get("layers_to_transform") is not None \
            or cfg.get("layers_pattern"):
        return None
    exclude = cfg.get("exclude_modules")
    return {n for n, m in model.named_modules()
            if n and is_linear_like(m) and name_matches(n, targets) and not name_matches(n, exclude)}


def read_lora_adapter(name: str, path: str | os.PathLike, model: nn.Module, *, allow_pickle: bool = False,
                      max_bytes: int | None = None, drop_heads: bool = False) -> LoraAdapter:
    """Read one PEFT LoRA directory and validate it against ``model`` (which is never modified).

    Args:
        name: the expert name (used in messages and provenance).
        path: the adapter directory.
        model: the base model the adapter will be fused into (module names and shapes).
        allow_pickle: accept a legacy ``adapter_model.bin`` (read with ``weights_only=True``).
        max_bytes: refuse tensor files whose tensors total more bytes than this (None = no bound).
        drop_heads: leave out the adapter's ``modules_to_save`` copies (e.g. the classification
            head PEFT adds for ``SEQ_CLS``) with a warning, instead of refusing the adapter.

    Returns:
        The adapter with every module's ``lora_A [r, d_in]``, ``lora_B [d_out, r]`` and scale.

    Raises:
        FileNotFoundError: missing directory or files.
        ValueError: a refused feature, unknown or missing keys, modules absent from the model or not
            linear, wrong shapes or ranks, non-float dtypes, non-finite values, too many bytes.
    """
    directory = Path(path).expanduser().resolve()
    cfg = read_lora_config(directory, name=name, drop_heads=drop_heads)
    weights_file, shapes, load = _open_tensors(name, directory, allow_pickle=allow_pickle)
    where = f"adapter {name!r} ({weights_file})"
    if not shapes:
        raise ValueError(f"{where} holds no tensors.")
    heads = list(cfg.get("modules_to_save") or []) if drop_heads else []
    dropped = sorted({m for k in shapes if (m := _head_of(k, heads)) is not None})
    if dropped:
        shapes = {k: v for k, v in shapes.items() if _head_of(k, heads) is None}
        warnings.warn(f"{where}: its trained copies of {dropped} (modules_to_save) are not imported "
                      "(adapter_heads='drop'); the fused model computes with its own modules there.",
                      UserWarning, stacklevel=3)

    pairs: dict[str, dict[str, str]] = {}
    base_copies: dict[str, str] = {}
    refused: list[str] = []
    for key in shapes:
        module, kind = _classify_key(key)
        if kind in ("A", "B"):
            pairs.setdefault(module, {})[kind] = key
        elif kind == "base":
            base_copies[module] = key
        else:
            refused.append(f"{key!r}: {kind}")
    if refused:
        refused.sort(key=lambda item: "not a LoRA factor" in item)  # name the specific features first
        raise ValueError(f"{where} holds tensors a routed LoRA expert cannot represent: {refused[:5]}"
                         f"{' …' if len(refused) > 5 else ''}. Only plain LoRA factors "
                         "(<module>.lora_A.weight, <module>.lora_B.weight) can be imported.")

    problems: list[str] = []
    absent_modules: list[str] = []
    total_bytes = 0
    module_names = dict(model.named_modules())
    for module, pair in sorted(pairs.items()):
        if set(pair) != {"A", "B"}:
            have = "lora_A" if "A" in pair else "lora_B"
            lacking = "lora_B" if "A" in pair else "lora_A"
            problems.append(f"missing key {module}.{lacking}.weight (the file has its {have})")
            continue
        target = module_names.get(module)
        if target is None:
            absent_modules.append(module)
            continue
        if not is_linear_like(target):
            problems.append(f"module {module!r} is a {type(target).__name__}, not a linear layer")
            continue
        d_in, d_out = linear_features(target)
        (shape_a, dt_a), (shape_b, dt_b) = shapes[pair["A"]], shapes[pair["B"]]
        r, _ = module_scale(cfg, module)
        if shape_a != (r, d_in) or shape_b != (d_out, r):
            problems.append(f"{module}: lora_A {shape_a} / lora_B {shape_b} do not fit the model's "
                            f"[{d_out} x {d_in}] layer at rank {r} (expected lora_A {(r, d_in)}, "
                            f"lora_B {(d_out, r)})")
        for key, code in ((pair["A"], dt_a), (pair["B"], dt_b)):
            if code not in _FLOAT_DTYPES:
                problems.append(f"{key}: dtype {code} is not a floating-point dtype (F64/F32/F16/BF16)")
            else:
                total_bytes += math.prod(shapes[key][0]) * _FLOAT_DTYPES[code]
    if absent_modules:
        problems.insert(0, f"modules {absent_modules[:4]}{' …' if len(absent_modules) > 4 else ''} do not exist in "
                           f"{type(model).__name__}{_prefix_hint(absent_modules[0], module_names)}")
    expected = None if absent_modules else expected_modules(model, cfg)
    if expected is not None:
        absent = sorted(expected - set(pairs))
        if absent:
            problems.append(f"missing keys for modules {absent[:5]}{' …' if len(absent) > 5 else ''} "
                            f"that {CONFIG_FILE} targets ({cfg.get('target_modules')!r})")
    if problems:
        raise ValueError(f"{where} does not fit {type(model).__name__}: " + "; ".join(problems[:8])
                         + (f"; … ({len(problems) - 8} more)" if len(problems) > 8 else "")
                         + ". Was it trained on this base model (same architecture and sizes)?")
    if max_bytes is not None and total_bytes > max_bytes:
        raise ValueError(f"{where} holds {total_bytes} bytes of tensors, more than max_adapter_bytes="
                         f"{max_bytes}; raise the bound in MeteoRAConfig if the adapter is trusted.")

    _check_base_copies(where, base_copies, load, module_names)
    tensors = load(sorted(k for pair in pairs.values() for k in pair.values()))
    bad = sorted(k for k, t in tensors.items() if not torch.isfinite(t).all())
    if bad:
        raise ValueError(f"{where} holds non-finite values (NaN/inf) in {bad[:5]}; the adapter is broken.")
    adapter = LoraAdapter(name=name, path=directory, weights_file=weights_file,
                          sha256=file_sha256(weights_file), config=cfg)
    for module, pair in pairs.items():
        _, scale = module_scale(cfg, module)
        adapter.modules[module] = ModuleLora(tensors[pair["A"]], tensors[pair["B"]], scale)
    return adapter


def _prefix_hint(module: str, module_names: dict[str, nn.Module]) -> str:
    """Say so when the module exists under another prefix (adapter made on another model class)."""
    tail = module.split(".", 1)[-1]
    for candidate in module_names:
        if candidate and (candidate.endswith("." + tail) or candidate == tail or module.endswith("." + candidate)):
            return (f" (but {candidate!r} does: the adapter was probably trained on another model class, e.g. "
                    "AutoModelForCausalLM vs AutoModel; load the class it was trained on)")
    return ""
