"""The ``moelora`` console script.

    moelora fit -c configs/demo.yaml            # LightningCLI: fit | validate | test | predict
    moelora fit -c configs/sira.yaml --print_config
    moelora import-lora ... / export-lora ...   # MeteoRA fusion and PEFT export
    moelora report LOG_DIR                      # routing report (when the dashboard is installed)
    moelora suite-loras -o loras                # one PEFT LoRA per suite task (configs/meteora.yaml)

Method configs are chosen in YAML by ``class_path`` (``moelora.MoELoRAConfig``,
``moelora.SiRAConfig``, ...); a bad value fails with the field named.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

# Sub-commands outside LightningCLI: name -> "module:function" taking argv and returning an exit code.
EXTRA_COMMANDS = {
    "import-lora": "moelora.lora_cli:import_lora_main",
    "export-lora": "moelora.lora_cli:export_lora_main",
    "report": "moelora.dashboard.cli:report_main",
    "suite-loras": "moelora.suite_loras:suite_loras_main",
}


def _run_extra(name: str, argv: list[str]) -> int:
    module_name, func = EXTRA_COMMANDS[name].split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        print(f"moelora {name}: not available in this installation ({err})", file=sys.stderr)
        return 2
    return int(getattr(module, func)(argv) or 0)


def build_cli(args: list[str] | None = None, *, run: bool = True):
    """Construct the LightningCLI (``run=False`` only parses and instantiates, for tests)."""
    from jsonargparse import set_parsing_settings
    from lightning.pytorch.cli import LightningCLI

    from moelora.config import MoELoRAConfig
    from moelora.dashboard.callback import RoutingDashboard
    from moelora.lightning import MoELoRAModule, RoutingLogger, RoutingPredictionWriter, TextDataModule

    set_parsing_settings(subclasses_enabled=[MoELoRAConfig])

    class MoELoRACLI(LightningCLI):
        def add_arguments_to_parser(self, parser) -> None:
            parser.link_arguments("model.backbone", "data.tokenizer")
            parser.link_arguments("model.task", "data.task")
            parser.link_arguments("model.num_labels", "data.num_labels")  # the label range check
            parser.add_lightning_class_args(RoutingLogger, "routing")
            parser.add_lightning_class_args(RoutingPredictionWriter, "prediction_writer")
            parser.add_lightning_class_args(RoutingDashboard, "dashboard")  # routing store + HTML report

        def after_fit(self) -> None:
            trainer, module = self.trainer, self.model
            log_dir = trainer.log_dir  # a collective under DDP: every rank must ask
            if not trainer.is_global_zero:
                return
            ckpt = trainer.checkpoint_callback
            logger = next(iter(trainer.loggers), None)
            routing = next((c for c in trainer.callbacks if isinstance(c, RoutingLogger)), None)
            print("\nmoelora fit finished")
            print(f"  logs:            {log_dir}")
            if logger is not None and len(trainer.loggers) > 1:
                print("  loggers:         " + ", ".join(f"{type(lg).__name__} -> {lg.log_dir}" for lg in trainer.loggers))
            if ckpt is not None and ckpt.best_model_path:
                print(f"  checkpoint:      {ckpt.best_model_path}")
            print(f"  adapter:         {module.adapter_path}")
            if routing is not None and routing.stats_path is not None:
                print(f"  routing stats:   {routing.stats_path}")
            dashboard = next((c for c in trainer.callbacks if isinstance(c, RoutingDashboard)), None)
            report = getattr(dashboard, "report_path", None) or getattr(routing, "report_path", None)
            if report:
                print(f"  routing report:  {report}")

    callbacks = []
    try:
        from lightning.pytorch.callbacks import RichProgressBar

        import rich  # noqa: F401  (comes with lightning[pytorch-extra])

        callbacks.append(RichProgressBar())
    except ImportError:  # pragma: no cover
        pass
    trainer_defaults = {
        "logger": [{"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                    "init_args": {"save_dir": "runs", "name": "tensorboard"}},
                   {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "runs", "name": "csv"}}],
        "callbacks": callbacks,
        "default_root_dir": "runs",
    }
    return MoELoRACLI(MoELoRAModule, TextDataModule, args=args, run=run, auto_configure_optimizers=False,
                      save_config_kwargs={"overwrite": True}, trainer_defaults=trainer_defaults)


def shipped_config(name: str) -> str | None:
    """Path of the shipped config ``name`` (``demo``, ``demo.yaml`` or ``configs/demo.yaml``), or None."""
    from importlib import resources

    stem = Path(name).name
    candidate = resources.files("moelora.configs") / (stem if stem.endswith((".yaml", ".yml")) else f"{stem}.yaml")
    return str(candidate) if candidate.is_file() else None


def _resolve_configs(argv: list[str]) -> list[str]:
    """``-c X`` where ``X`` is no file here but names a shipped config (``configs/demo.yaml`` run
    outside a checkout, or just ``demo``): use the installed copy and say so."""
    out, i = list(argv), 0
    while i < len(out):
        flag, value, joined = out[i], None, False
        if flag in ("-c", "--config") and i + 1 < len(out):
            value = out[i + 1]
        elif flag.startswith("--config="):
            value, joined = flag.split("=", 1)[1], True
        if value is not None and not Path(value).exists() and (found := shipped_config(value)):
            print(f"moelora: {value} is not a file here; using the shipped config {found}", file=sys.stderr)
            if joined:
                out[i] = f"--config={found}"
            else:
                out[i + 1] = found
        i += 1
    return out


def _check_class_paths(argv: list[str]) -> None:
    """A ``--model.method.class_path X`` override naming no method config: exit with that said.
    jsonargparse itself fails with a bare ``AttributeError`` on it (the ``method`` argument is a
    union with ``dict``)."""
    import moelora  # noqa: F401  (registers every method config)
    from moelora.config import method_class

    flag = "--model.method.class_path"
    for i, arg in enumerate(argv):
        value = argv[i + 1] if arg == flag and i + 1 < len(argv) else \
            arg.split("=", 1)[1] if arg.startswith(flag + "=") else None
        if value is not None and "." in value:
            try:
                method_class(value)
            except ValueError as err:
                print(f"moelora: error: {flag} {value}: {err}", file=sys.stderr)
                sys.exit(2)


def main(argv: list[str] | None = None) -> int:
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in EXTRA_COMMANDS:
        return _run_extra(argv[0], argv[1:])
    if argv and argv[0] in ("-h", "--help"):
        print("extra commands: " + ", ".join(EXTRA_COMMANDS) + " (moelora <command> --help)\n")
    argv = _resolve_configs(argv)
    _check_class_paths(argv)
    if from_command_line:
        # LightningCLI reads sys.argv itself: passing a list that differs from it warns on every run.
        sys.argv[1:] = argv
        build_cli(None)
    else:
        build_cli(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
