"""``moelora import-lora`` and ``moelora export-lora``: MeteoRA fusion and PEFT export from the shell.

    moelora import-lora math=adapters/math code=adapters/code -o fused/ --top-k 2
    moelora export-lora fused/ -o peft_out/                       # one PEFT dir per expert
    moelora export-lora fused/ -o mix/ --collapse math=0.7 code=0.3

``import-lora`` loads the base model (``--base``, default: the adapters' own
``base_model_name_or_path``), fuses the adapters with :func:`moelora.from_lora_adapters` and writes
a moelora adapter (``moelora_config.json`` + ``moelora_model.safetensors``) that
``moelora.load_adapter`` reads. ``export-lora`` reads a saved moelora adapter and writes PEFT LoRA
directories; it needs no base model. Both return 0 on success and 1 on a reported error
(argparse exits with 2 on bad arguments).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

MODEL_CLASSES = ("auto", "causal-lm", "sequence-classification", "base")
_AUTO_BY_KIND = {"causal-lm": "AutoModelForCausalLM", "sequence-classification": "AutoModelForSequenceClassification",
                 "base": "AutoModel"}
_KIND_BY_TASK = {"CAUSAL_LM": "causal-lm", "SEQ_CLS": "sequence-classification", "FEATURE_EXTRACTION": "base"}


def _pairs(values: list[str], what: str) -> dict[str, str]:
    """``["a=x", "b=y"]`` → ``{"a": "x", "b": "y"}``, with an error naming a malformed entry."""
    out: dict[str, str] = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            raise ValueError(f"{what} entry {item!r} must look like NAME=VALUE.")
        if key in out:
            raise ValueError(f"{what} name {key!r} is given twice.")
        out[key] = value
    return out


def _number(text: str, name: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"collapse weight for {name!r} is {text!r}, not a number.") from None


def _expert_ref(text: str, names: list[str]) -> str | int:
    """An ``--experts`` / ``--collapse`` entry: the expert's name when one is called that (names
    may be digits), else an index when it is a number, else the name (unknown names are reported
    later). ``names``: the imported experts' names (:func:`_imported_names`)."""
    return int(text) if text.isdigit() and text not in names else text


def _imported_names(adapter: str) -> list[str]:
    from .io import read_adapter_meta

    return [e.get("name") for e in read_adapter_meta(adapter)["config"].get("experts") or []]


def _import_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moelora import-lora", description=(
        "Fuse PEFT LoRA adapter directories into one MeteoRA moelora adapter: every adapter becomes a "
        "routed expert of every linear it touches, with a trainable top-k gate per linear."))
    p.add_argument("adapters", nargs="+", metavar="NAME=DIR",
                   help="expert name and PEFT LoRA directory, in gate (task-id) order")
    p.add_argument("-o", "--output", required=True, help="directory to write the moelora adapter to")
    p.add_argument("--base", help="base model name or local path (default: the adapters' base_model_name_or_path)")
    p.add_argument("--model-class", choices=MODEL_CLASSES, default="auto",
                   help="transformers class to load the base with (auto: the class the adapters were made on)")
    p.add_argument("--num-labels", type=int, help="num_labels for --model-class sequence-classification")
    p.add_argument("--config", help="JSON file of MeteoRAConfig fields; the flags below override it")
    p.add_argument("--top-k", type=int, help="adapters per token (default 2)")
    p.add_argument("--temperature", type=float, help="inference softmax temperature (default 1)")
    p.add_argument("--gate-loss-coef", type=float, help="gate-supervision cross-entropy weight (default 50)")
    p.add_argument("--train-loras", action="store_true", default=None, help="also train the LoRA weights")
    p.add_argument("--allow-pickle", action="store_true", default=None,
                   help="accept adapter_model.bin (read with torch.load(weights_only=True))")
    p.add_argument("--on-base-mismatch", choices=("warn", "raise", "ignore"))
    p.add_argument("--target-modules", nargs="+",
                   help="restrict fusion to these modules (PEFT rules: names or suffixes; one value "
                        "'all-linear' or one regex such as '.*q_proj' is taken as that string)")
    p.add_argument("--adapter-heads", choices=("refuse", "drop"),
                   help="adapters with modules_to_save copies (a SEQ_CLS head): refuse (default) or drop them")
    p.add_argument("--seed", type=int, help="seed for the gate initialisation")
    p.add_argument("--overwrite", action="store_true", help="replace an adapter already in --output")
    return p


def _load_base(base: str, kind: str, adapter_configs: list[dict[str, Any]], num_labels: int | None):
    """Load the base model offline-capable with the class the adapters were made on."""
    import transformers

    cls = None
    if kind == "auto":
        mapped = {(c.get("auto_mapping") or {}).get("base_model_class") for c in adapter_configs} - {None}
        tasks = {_KIND_BY_TASK.get(str(c.get("task_type"))) for c in adapter_configs} - {None}
        if len(mapped) == 1:
            # Only a class transformers itself exports: a name from a file must never import arbitrary code.
            candidate = getattr(transformers, next(iter(mapped)), None)
            if isinstance(candidate, type) and issubclass(candidate, transformers.PreTrainedModel):
                cls = candidate
        if cls is None:
            kind = next(iter(tasks)) if len(tasks) == 1 else "base"
    if cls is None:
        cls = getattr(transformers, _AUTO_BY_KIND[kind])
    kwargs = {"num_labels": num_labels} if num_labels is not None else {}
    return cls.from_pretrained(base, **kwargs)


def _targets(values: list[str] | None) -> list[str] | str | None:
    """A single ``all-linear`` or regex value is that string (PEFT's string form), else the list."""
    if values and len(values) == 1 and (values[0] == "all-linear" or any(c in values[0] for c in "*?[]()|\\^$+")):
        return values[0]
    return values


def _meteora_config(args: argparse.Namespace):
    from .methods.meteora import MeteoRAConfig

    data: dict[str, Any] = {}
    if args.config:
        data = json.loads(Path(args.config).read_text())
        if not isinstance(data, dict):
            raise ValueError(f"{args.config} must hold a JSON object of MeteoRAConfig fields.")
        data.pop("method", None)
    flags = {"top_k": args.top_k, "temperature": args.temperature, "gate_loss_coef": args.gate_loss_coef,
             "train_loras": args.train_loras, "allow_pickle": args.allow_pickle,
             "on_base_mismatch": args.on_base_mismatch, "target_modules": _targets(args.target_modules), "seed": args.seed,
             "adapter_heads": args.adapter_heads}
    data.update({k: v for k, v in flags.items() if v is not None})
    return MeteoRAConfig.from_dict(data)


def import_lora_main(argv: list[str] | None = None) -> int:
    """``moelora import-lora NAME=DIR ... -o OUT``; returns the exit status."""
    args = _import_parser().parse_args(argv)
    try:
        from . import from_lora_adapters, save_adapter
        from .io import CONFIG_NAME
        from .lora_import import read_lora_config
        from .paths import check_model_location, check_output_dir

        adapters = _pairs(args.adapters, "adapter")
        config = _meteora_config(args)
        out = check_output_dir(args.output, "-o/--output")
        if (out / CONFIG_NAME).exists() and not args.overwrite:
            raise FileExistsError(f"{out} already holds a moelora adapter; pass --overwrite to replace it.")
        configs = [read_lora_config(path, name=name, drop_heads=config.adapter_heads == "drop")
                   for name, path in adapters.items()]
        base = args.base
        if base is None:
            named = {c.get("base_model_name_or_path") for c in configs} - {None}
            if len(named) != 1:
                raise ValueError(f"cannot tell the base model from the adapters (they name {sorted(named) or 'none'}); "
                                 "pass --base NAME_OR_PATH.")
            base = next(iter(named))
        check_model_location(base, "--base" if args.base is not None else "the adapters' base_model_name_or_path")
        model = _load_base(base, args.model_class, configs, args.num_labels)
        try:
            from_lora_adapters(model, adapters, config=config)
        except ValueError as err:
            if args.model_class == "auto" and "do not exist in" in str(err):
                raise ValueError(f"{err} [--model-class auto loaded {type(model).__name__}; pick the class the "
                                 f"adapters were trained on with --model-class "
                                 f"{{{','.join(MODEL_CLASSES[1:])}}}]") from err
            raise
        save_adapter(model, out)
    except (OSError, ValueError, TypeError, RuntimeError) as err:  # RuntimeError: transformers loading the base
        print(f"moelora import-lora: error: {err}", file=sys.stderr)
        return 1
    layers = model._moelora_state.wrapped
    print(f"fused {len(adapters)} adapters into {len(layers)} modules of {type(model).__name__} ({base}) -> {out}")
    for entry in model._moelora_state.config.experts:
        print(f"  {entry['name']}: {entry['path']} sha256={entry['sha256'][:16]}…")
    return 0


def _export_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moelora export-lora", description=(
        "Write the experts of a saved moelora adapter as PEFT LoRA directories (OUT/<name>/), or with "
        "--collapse one static LoRA mixing them by fixed weights. No base model is loaded."))
    p.add_argument("adapter", help="a saved moelora adapter directory (moelora.save_adapter / import-lora)")
    p.add_argument("-o", "--output", required=True, help="output directory")
    p.add_argument("--experts", nargs="+", help="names (or indices) of the experts to export (default: all)")
    p.add_argument("--collapse", nargs="+", metavar="NAME=WEIGHT",
                   help="write one LoRA equal to sum_i w_i * expert_i (unnamed experts weigh 0)")
    p.add_argument("--rank", type=int, help="with --collapse: truncate each module to this rank by SVD (lossy)")
    p.add_argument("--overwrite", action="store_true", help="replace PEFT files already in the output")
    return p


def export_lora_main(argv: list[str] | None = None) -> int:
    """``moelora export-lora ADAPTER -o OUT [--collapse NAME=W ...]``; returns the exit status."""
    args = _export_parser().parse_args(argv)
    try:
        from .lora_export import export_saved_adapter

        names = _imported_names(args.adapter) if args.collapse or args.experts else []
        collapse = None
        if args.collapse:
            # NAME may also be an index, read as --experts reads it (a name made of digits wins).
            collapse = {_expert_ref(k, names): _number(v, k) for k, v in _pairs(args.collapse, "collapse").items()}
        experts = None if not args.experts else [_expert_ref(e, names) for e in args.experts]
        written = export_saved_adapter(args.adapter, args.output, experts=experts, collapse=collapse,
                                       rank=args.rank, overwrite=args.overwrite)
    except (OSError, ValueError, TypeError) as err:
        print(f"moelora export-lora: error: {err}", file=sys.stderr)
        return 1
    for name, directory in written.items():
        print(f"{name}: {directory}")
    return 0


if __name__ == "__main__":  # pragma: no cover - `python -m moelora.lora_cli import-lora ...`
    commands = {"import-lora": import_lora_main, "export-lora": export_lora_main}
    if len(sys.argv) < 2 or sys.argv[1] not in commands:
        print(f"usage: python -m moelora.lora_cli {{{','.join(commands)}}} ...", file=sys.stderr)
        sys.exit(2)
    sys.exit(commands[sys.argv[1]](sys.argv[2:]))
