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


def main(argv: list[str] | None = None) -> int:
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in EXTRA_COMMANDS:
        return _run_extra(argv[0], argv[1:])
    if argv and argv[0] in ("-h", "--help"):
        print("extra commands: " + ", ".join(EXTRA_COMMANDS) + " (moelora <command> --help)\n")
    # None lets LightningCLI read sys.argv itself; passing the same list warns on every run.
    build_cli(None if from_command_line else argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
