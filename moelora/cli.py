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
import os
import sys
import warnings
from pathlib import Path

# Sub-commands outside LightningCLI: name -> "module:function" taking argv and returning an exit code.
EXTRA_COMMANDS = {
    "import-lora": "moelora.lora_cli:import_lora_main",
    "export-lora": "moelora.lora_cli:export_lora_main",
    "report": "moelora.dashboard.cli:report_main",
    "suite-loras": "moelora.suite_loras:suite_loras_main",
}


class SettingError(Exception):
    """A setting the model or data module refused while being built; :func:`main` prints it as
    one ``moelora: error:`` line and exits with 2 (``MOELORA_TRACEBACK=1`` re-raises the original
    error with its traceback instead)."""


def _own_error(err: BaseException) -> BaseException:
    """The first error in ``err``'s cause chain that moelora itself raised: jsonargparse wraps a
    method config's "config field `top_k` = 9 is invalid" into a page about union subtypes."""
    package = Path(__file__).resolve().parent
    seen: BaseException | None = err
    while seen is not None:
        tb, last = seen.__traceback__, None
        while tb is not None:
            last, tb = tb.tb_frame.f_code.co_filename, tb.tb_next
        if last is not None and Path(last).resolve().is_relative_to(package):
            return seen
        seen = seen.__cause__ or seen.__context__
    return err


#: Where runs go by default: ``trainer.default_root_dir`` and the two default loggers' ``save_dir``.
DEFAULT_ROOT = "runs"


def _loggers_follow_root_dir(trainer) -> None:
    """Point every logger still at :data:`DEFAULT_ROOT` to ``trainer.default_root_dir`` when that
    was changed, so ``--trainer.default_root_dir D`` moves logs, checkpoints, the adapter and the
    routing report to ``D`` as it does in plain Lightning (whose default loggers read it). A logger
    given its own ``save_dir`` keeps it."""
    root, loggers = trainer.get("default_root_dir"), trainer.get("logger")
    if root in (None, DEFAULT_ROOT) or not isinstance(loggers, list):
        return
    for logger in loggers:
        init_args = logger.get("init_args") if hasattr(logger, "get") else None
        if init_args is not None and init_args.get("save_dir") == DEFAULT_ROOT:
            init_args.save_dir = root


def _model_settings(model) -> dict[str, object]:
    """The model section as flat ``{"model.x": value}``, the method as its config's fields (the
    parsed ``class_path`` form and a checkpoint's ``to_dict`` form compare equal)."""
    from moelora.config import config_from_dict

    if model is None:
        return {}
    data = model.as_dict() if hasattr(model, "as_dict") else dict(model)
    out = {}
    for key, value in data.items():
        if key == "method" and isinstance(value, dict):
            try:
                value = config_from_dict(value).to_dict()
            except ValueError:
                pass
            if isinstance(value, dict):
                out.update({f"model.method.{k}": v for k, v in value.items()})
                continue
        if key not in ("optimizer", "scheduler"):  # callables, not saved in the hyperparameters
            out[f"model.{key}"] = value
    return out


def _model_overrides(argv: list[str]) -> set[str]:
    """Keys of the ``--model.*`` overrides in ``argv``, as :func:`_model_settings` names them
    (``--model.method.init_args.top_k=2`` -> ``model.method.top_k``)."""
    keys = set()
    for arg in argv:
        if arg.startswith("--model."):
            key = arg[2:].split("=", 1)[0].replace("model.method.init_args.", "model.method.")
            keys.add(key)
    return keys


def _warn_replaced_on_resume(before: dict[str, object], after: dict[str, object], ckpt_path,
                             given: set[str]) -> None:
    """Warn about each command-line override that the checkpoint's model settings replaced (only
    those: a method fills some fields in itself, e.g. MeteoRA's targets, WeightLoRA's stage)."""
    changed = sorted(k for k in given if k in before and k in after and before[k] != after[k])
    if changed:
        listed = ", ".join(f"{k}: given {before[k]!r}, checkpoint {after[k]!r}" for k in changed)
        warnings.warn(f"resuming from {ckpt_path}: the checkpoint's model settings replace these given ones "
                      f"({listed}). A resumed run keeps the model it was trained with; start a new run "
                      "(no --ckpt_path) to change them.", UserWarning, stacklevel=2)


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
    from lightning.pytorch.callbacks import ProgressBar
    from lightning.pytorch.cli import LightningCLI

    from moelora.config import MoELoRAConfig
    from moelora.dashboard.callback import RoutingDashboard
    from moelora.lightning import MoELoRAModule, RoutingLogger, RoutingPredictionWriter, TextDataModule

    set_parsing_settings(subclasses_enabled=[MoELoRAConfig])

    class MoELoRACLI(LightningCLI):
        def instantiate_classes(self) -> None:
            try:
                super().instantiate_classes()
            except (ValueError, OSError) as err:  # a bad setting (or path): the model/data refused it
                if os.environ.get("MOELORA_TRACEBACK"):
                    raise
                raise SettingError(str(_own_error(err))) from err

        def before_instantiate_classes(self) -> None:
            config = self.config[self.subcommand] if self.subcommand else self.config
            _loggers_follow_root_dir(config.trainer)
            if config.trainer.get("enable_progress_bar") is False:  # Lightning refuses a bar callback then
                self.trainer_defaults["callbacks"] = [c for c in self.trainer_defaults.get("callbacks", [])
                                                      if not isinstance(c, ProgressBar)]

        def _parse_ckpt_path(self) -> None:
            # Lightning replaces the whole model config with the checkpoint's hyperparameters on
            # resume, silently dropping --model.* overrides: say which ones were replaced.
            sub = self.config.get("subcommand")
            before = _model_settings(self.config[sub].get("model")) if sub else {}
            super()._parse_ckpt_path()
            if sub:
                _warn_replaced_on_resume(before, _model_settings(self.config[sub].get("model")),
                                         self.config[sub].get("ckpt_path"),
                                         _model_overrides(sys.argv[1:] if args is None else args))

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
                    "init_args": {"save_dir": DEFAULT_ROOT, "name": "tensorboard"}},
                   {"class_path": "lightning.pytorch.loggers.CSVLogger",
                    "init_args": {"save_dir": DEFAULT_ROOT, "name": "csv"}}],
        "callbacks": callbacks,
        "default_root_dir": DEFAULT_ROOT,
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
        if value is not None and not Path(value).is_file() and (found := shipped_config(value)):
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
    from moelora.lightning.data_checks import DataError

    try:
        if from_command_line:
            # LightningCLI reads sys.argv itself: passing a list that differs from it warns on every run.
            sys.argv[1:] = argv
            build_cli(None)
        else:
            build_cli(argv)
    except (SettingError, DataError) as err:  # DataError: the data module's setup, inside trainer.fit
        if isinstance(err, DataError) and os.environ.get("MOELORA_TRACEBACK"):
            raise
        print(f"moelora: error: {err}\n(MOELORA_TRACEBACK=1 shows where it was raised)", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
