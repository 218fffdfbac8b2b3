"""Save and load moelora adapters: safetensors + JSON, never pickle.

A saved adapter is a directory with

- ``moelora_config.json``: the method config, each wrapped module's expert ranks, the
  ``modules_to_save`` names and the base model's identity;
- ``moelora_model.safetensors``: trainable weights and router buffers only (never the backbone).

Loading validates every key and shape against the model before touching it; on any error the
model is unchanged. Files are written to a temporary name and renamed, so an interrupted save
never leaves a half-written file under the final name. Both files carry the same random
``save_id`` (the weights in their safetensors metadata): a save interrupted between the two
renames leaves new weights beside the old config, and loading refuses that pair by name.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import uuid
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from .config import config_from_dict
from .paths import make_output_dir
from .inject import AdapterPlan, adapter_state_dict, attach_adapter, build_adapter
from .layer import MoELoRALinear
from .state import get_state

CONFIG_NAME = "moelora_config.json"
WEIGHTS_NAME = "moelora_model.safetensors"
FORMAT_VERSION = 1


def _atomic_write(path: Path, write) -> None:
    """Call ``write(tmp_path)`` then rename onto ``path`` (same directory, so the rename is atomic)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it 0600; give it a new file's usual mode
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)  # the only portable read; set back at once
    os.umask(mask)
    return mask


#: Values per wrapped weight kept in ``weights_sample`` (evenly spaced over the flattened weight).
SAMPLE_SIZE = 16


def base_identity(model: nn.Module, module_names: list[str]) -> dict[str, Any]:
    """What identifies the base model: its name/path, class, and the wrapped weights.

    ``weights_sha256`` hashes each wrapped base layer's name, shape, dtype and (first 64k)
    values: exact, so it differs between one checkpoint loaded in fp32 and in bf16.
    ``weights_sample`` keeps each layer's dtype and :data:`SAMPLE_SIZE` of its values, which
    :func:`same_base_weights` compares within rounding when the dtypes differ.
    """
    digest = hashlib.sha256()
    sample: dict[str, dict[str, Any]] = {}
    for name in module_names:
        module = model.get_submodule(name)
        base = module.base_layer if isinstance(module, MoELoRALinear) else module
        weight = getattr(base, "weight", None)
        digest.update(name.encode())
        if isinstance(weight, Tensor):
            flat = weight.detach().reshape(-1)
            digest.update(f"{tuple(weight.shape)}|{weight.dtype}".encode())
            digest.update(flat[:65536].float().cpu().numpy().tobytes())
            at = torch.linspace(0, max(flat.numel() - 1, 0), min(SAMPLE_SIZE, flat.numel())).round().long()
            sample[name] = {"dtype": str(weight.dtype).removeprefix("torch."),
                            "values": flat[at.to(flat.device)].double().cpu().tolist()}
    cfg = getattr(model, "config", None)
    return {"name_or_path": getattr(cfg, "_name_or_path", None) or None,
            "class": type(model).__name__, "weights_sha256": digest.hexdigest(), "weights_sample": sample}


def same_base_weights(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two :func:`base_identity` records describe the same wrapped base weights.

    Equal hashes are the same weights. Different hashes are different weights, unless some
    layer's dtype differs and every sampled value agrees within that rounding (relative 2⁻⁷,
    twice bf16's step): one checkpoint trained in fp32 and loaded in bf16 or fp16 is one base.
    Records without a hash (older or hand-written) are taken as matching.
    """
    if not a.get("weights_sha256") or not b.get("weights_sha256") or a["weights_sha256"] == b["weights_sha256"]:
        return True
    sa, sb = a.get("weights_sample"), b.get("weights_sample")
    if not sa or not sb or sa.keys() != sb.keys() or all(sa[n]["dtype"] == sb[n]["dtype"] for n in sa):
        return False
    for name in sa:
        x = torch.tensor(sa[name]["values"], dtype=torch.float64)
        y = torch.tensor(sb[name]["values"], dtype=torch.float64)
        scale = float(torch.cat([x, y]).abs().max()) if x.numel() else 0.0
        if x.shape != y.shape or not torch.allclose(x, y, rtol=2 ** -7, atol=1e-4 * scale):
            return False
    return True


def save_adapter(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write the model's adapter to directory ``path`` (created if needed); returns the path.

    Only adapter tensors (experts, routers and their buffers, ``modules_to_save`` copies) are
    written. Existing files of another adapter in ``path`` are replaced whole, never partially.
    """
    state = get_state(model)
    out = make_output_dir(path, "save_adapter path")
    tensors = {}
    for name in state.wrapped + state.saved_modules:
        for key, t in adapter_state_dict(model.get_submodule(name)).items():
            tensors[f"{name}.{key}"] = t.detach().to("cpu").contiguous().clone()
    meta = {
        "format": "moelora-adapter", "format_version": FORMAT_VERSION,
        "config": state.config.to_dict(),
        "modules": {name: {"ranks": list(model.get_submodule(name).bank.ranks),
                           "in_features": model.get_submodule(name).in_features,
                           "out_features": model.get_submodule(name).out_features}
                    for name in state.wrapped},
        "modules_to_save": list(state.saved_modules),
        "base_model": base_identity(model, state.wrapped),
    }
    write_adapter_files(out, tensors, meta)
    return out


def write_adapter_files(out: Path, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
    """Write weights then config into the directory ``out``, each atomically, paired by a fresh
    ``save_id`` (replacing any ``save_id`` in ``meta``)."""
    meta = {**meta, "save_id": uuid.uuid4().hex}
    text = json.dumps(meta, indent=2, allow_nan=False)  # before any file is replaced: it can fail
    _atomic_write(out / WEIGHTS_NAME,
                  lambda tmp: save_file(tensors, tmp, metadata={"format": "pt", "save_id": meta["save_id"]}))
    _atomic_write(out / CONFIG_NAME, lambda tmp: Path(tmp).write_text(text))


def check_save_id(opened, weights_file: Path, save_id: str | None) -> None:
    """Raise when the open safetensors file ``opened`` was not written by the same save as the
    config whose ``save_id`` is given. Checked only when both carry one: adapters saved before
    save ids existed, and weights re-written by other tools (no metadata), load as before."""
    file_id = (opened.metadata() or {}).get("save_id")
    if save_id is not None and file_id is not None and file_id != save_id:
        raise ValueError(f"{weights_file} and the {CONFIG_NAME} beside it come from different saves "
                         f"(save_id {file_id} vs {save_id}): a save was interrupted between writing the "
                         f"two. Save the adapter again.")


def read_adapter_meta(path: str | os.PathLike) -> dict[str, Any]:
    """Parse and check ``moelora_config.json`` of a saved adapter directory."""
    directory = Path(path)
    config_file, weights_file = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    for f in (config_file, weights_file):
        if not f.is_file():
            raise FileNotFoundError(f"{f} not found: a moelora adapter directory holds {CONFIG_NAME} and "
                                    f"{WEIGHTS_NAME} (written by moelora.save_adapter).")
    try:
        meta = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{config_file} is not valid JSON ({err}); the adapter directory is damaged.") from err
    if not isinstance(meta, dict) or meta.get("format") != "moelora-adapter" or "config" not in meta:
        raise ValueError(f"{config_file} is not a moelora adapter config (missing 'format'/'config').")
    modules = meta.get("modules", {})
    if not isinstance(meta["config"], dict) or not isinstance(modules, dict) or not all(
            isinstance(m, dict) and isinstance(m.get("ranks"), list)
            and all(isinstance(r, int) and not isinstance(r, bool) for r in m["ranks"]) for m in modules.values()):
        raise ValueError(f"{config_file} is damaged: 'config' must be an object and 'modules' an object of "
                         "{module name: {\"ranks\": [integers]}}; re-save the adapter.")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"{config_file} has format_version {meta['format_version']}, newer than this "
                         f"moelora supports ({FORMAT_VERSION}); upgrade moelora.")
    return meta


def _read_tensors(weights_file: Path, expected: dict[str, torch.Size], save_id: str | None = None) -> dict[str, Tensor]:
    """Open the safetensors file, check names, shapes and (when the config has one) the save id
    before reading values, then load them."""
    try:
        with safe_open(str(weights_file), framework="pt", device="cpu") as f:
            check_save_id(f, weights_file, save_id)
            keys = set(f.keys())
            missing = sorted(set(expected) - keys)
            unexpected = sorted(keys - set(expected))
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in keys & set(expected)}
            wrong = sorted(f"{k}: file {shapes[k]} vs model {tuple(expected[k])}"
                           for k in shapes if shapes[k] != tuple(expected[k]))
            if missing or unexpected or wrong:
                raise ValueError(
                    f"{weights_file} does not fit this model: missing keys {missing[:10]}"
                    f"{' …' if len(missing) > 10 else ''}, unexpected keys {unexpected[:10]}"
                    f"{' …' if len(unexpected) > 10 else ''}, mis-shaped {wrong[:10]}. Was it saved from "
                    "the same base model and moelora config?")
            tensors = {k: f.get_tensor(k) for k in sorted(keys)}
    except SafetensorError as err:
        raise ValueError(f"{weights_file} is corrupt or truncated ({err}); re-save the adapter.") from err
    bad = sorted(k for k, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all())
    if bad:
        raise ValueError(f"{weights_file} holds non-finite values (NaN/inf) in {bad[:10]}; the adapter is broken.")
    return tensors


def load_adapter(model: nn.Module, path: str | os.PathLike, *, trainable: bool = True) -> nn.Module:
    """Inject the adapter saved in ``path`` into a fresh ``model`` and load its weights, in place.

    Args:
        model: the base model the adapter was trained on (without an adapter).
        path: a directory written by :func:`save_adapter`.
        trainable: leave adapter weights trainable. ``False`` is for inference: it freezes them
            and puts the whole model in eval mode (as PEFT's ``from_pretrained`` does), so that
            dropout, SiRA's training capacity, MeteoRA's training gate and FlyLoRA's bias
            update are off. Call ``model.train()`` to train after all.

    Returns:
        The same ``model``.

    Raises:
        FileNotFoundError / ValueError: missing, damaged, truncated or mismatched files, with
            the offending keys named. The model is left unchanged.
    """
    directory = Path(path)
    meta = read_adapter_meta(directory)
    config = config_from_dict(meta["config"])
    modules = meta.get("modules", {})
    plan: AdapterPlan = build_adapter(model, config, expert_ranks={n: m["ranks"] for n, m in modules.items()})
    if set(plan.state.wrapped) != set(modules):
        only_file = sorted(set(modules) - set(plan.state.wrapped))
        only_model = sorted(set(plan.state.wrapped) - set(modules))
        raise ValueError(f"adapter in {directory} wraps other modules than this model offers: only in the "
                         f"adapter {only_file[:10]}, only in the model {only_model[:10]}.")
    current = plan.adapter_tensors()
    tensors = _read_tensors(directory / WEIGHTS_NAME, {k: t.shape for k, t in current.items()}, meta.get("save_id"))
    with torch.no_grad():
        for key, value in tensors.items():
            current[key].copy_(value.to(current[key].dtype))
    _warn_if_other_base(model, meta, plan.state.wrapped, directory)
    attach_adapter(model, plan)
    if not trainable:
        for module in plan.modules.values():
            for p in module.parameters():
                p.requires_grad_(False)
        model.eval()
    return model


def _warn_if_other_base(model: nn.Module, meta: dict[str, Any], wrapped: list[str], directory: Path) -> None:
    saved = meta.get("base_model") or {}
    now = base_identity(model, wrapped)
    diffs = [f"{k}: adapter {saved.get(k)!r} vs model {now[k]!r}"
             for k in ("name_or_path", "class") if saved.get(k) and now[k] and saved.get(k) != now[k]]
    if not same_base_weights(saved, now):
        diffs.append("the wrapped base weights differ from those the adapter was saved with")
    if diffs:
        warnings.warn(f"adapter in {directory} was saved from another base model ({'; '.join(diffs)}); "
                      "outputs may not match.", UserWarning, stacklevel=3)
